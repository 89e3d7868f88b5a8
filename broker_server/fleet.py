"""Fleet registry: which devices exist, what they reported, whether they are online and live.

Registering or refreshing a device is cheap: the registry only marks a record dirty when something
persistent changed (a new device, a new profile, sample count or runtime version, rounds done); the
coordinator appends the dirty records to the store's journal in batches. Presence (online, last seen,
last heartbeat) lives in memory and is re-learnt after a restart from retained status and heartbeats.

The registry is bounded: past ``max_devices`` a new device takes the slot of the longest-silent
device that never did any work and is not in the open round; if there is none, the hello is refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

MAX_PROFILE_BYTES = 4096        # a hello's profile as stored (JSON); larger is refused
VOLATILE = ("memory_available",)   # changes with every hello: kept in memory, not worth a journal line


def _stable(profile: dict) -> dict:
    return {k: v for k, v in profile.items() if k not in VOLATILE}


class RegistryFull(Exception):
    """No room for a new device: every slot is held by a device that has worked or is in the round."""


@dataclass
class DeviceRecord:
    device_id: str
    profile: dict = field(default_factory=dict)
    n_samples: int = 0
    online: bool = False
    last_seen: float = 0.0          # wall clock, seconds since epoch
    rounds_done: int = 0
    state: str = "unknown"          # last heartbeat state
    runtime_version: str = ""
    last_heartbeat: float = 0.0     # a live agent heartbeats; a hello alone is not liveness


class Fleet:
    """Online = said hello / online and not yet offline (last will) nor silent past ``timeout_s``.
    Eligible for a round = online and heartbeating within ``timeout_s``."""

    def __init__(self, timeout_s: float = 60.0, records: dict[str, dict] | None = None,
                 max_devices: int = 10_000) -> None:
        self.timeout_s = timeout_s
        self.max_devices = max_devices
        fields = set(DeviceRecord.__dataclass_fields__)
        self.devices: dict[str, DeviceRecord] = {
            k: DeviceRecord(**{f: v for f, v in rec.items() if f in fields}) for k, rec in (records or {}).items()}
        self.dirty: set[str] = set()      # records to append to the journal
        self.removed: set[str] = set()    # evicted since the last flush (journal tombstones)

    def to_json(self) -> dict[str, Any]:
        return {k: asdict(v) for k, v in self.devices.items()}

    def take_dirty(self) -> tuple[list[dict], list[str]]:
        """The records changed since the last call (and the ids evicted), for the journal."""
        recs = [asdict(self.devices[d]) for d in sorted(self.dirty) if d in self.devices]
        gone = sorted(self.removed)
        self.dirty.clear()
        self.removed.clear()
        return recs, gone

    def hello(self, device_id: str, profile: dict, n_samples: int, version: str, now: float,
              protected: Iterable[str] = ()) -> bool:
        """Register or refresh a device; True if it is new. Raises ``ValueError`` for an oversized
        profile and :class:`RegistryFull` when there is no room for a new device."""
        if len(json.dumps(profile, separators=(",", ":"))) > MAX_PROFILE_BYTES:
            raise ValueError(f"device profile over {MAX_PROFILE_BYTES} bytes of JSON")
        rec = self.devices.get(device_id)
        new = rec is None
        if new:
            if len(self.devices) >= self.max_devices:
                self._evict_one(set(protected))
            rec = self.devices[device_id] = DeviceRecord(device_id)
            self.removed.discard(device_id)
        if new or (_stable(rec.profile), rec.n_samples, rec.runtime_version) != (_stable(profile), n_samples, version):
            self.dirty.add(device_id)
        rec.profile, rec.n_samples, rec.runtime_version = profile, n_samples, version
        rec.online, rec.last_seen = True, now
        return new

    def _evict_one(self, protected: set[str]) -> None:
        idle = [d for d in self.devices.values() if d.rounds_done == 0 and d.device_id not in protected]
        if not idle:
            raise RegistryFull(f"the fleet registry is full ({self.max_devices} devices, all of them have worked "
                               f"or take part in the open round)")
        victim = min(idle, key=lambda d: (d.last_heartbeat > 0, d.online, d.last_seen))
        del self.devices[victim.device_id]
        self.dirty.discard(victim.device_id)
        self.removed.add(victim.device_id)

    def seen(self, device_id: str, now: float, state: str | None = None) -> bool:
        """A heartbeat (``state`` given) or other message from a known device; True if it came back
        online, False for unknown devices."""
        rec = self.devices.get(device_id)
        if rec is None:
            return False
        changed = not rec.online
        rec.online, rec.last_seen = True, now
        if state:
            rec.state, rec.last_heartbeat = state, now
        return changed

    def set_online(self, device_id: str, online: bool, now: float) -> bool:
        rec = self.devices.get(device_id)
        if rec is None or rec.online == online:
            return False
        rec.online = online
        if online:
            rec.last_seen = now
        return True

    def worked(self, device_id: str) -> None:
        """One more round done (persisted with the next flush)."""
        if device_id in self.devices:
            self.devices[device_id].rounds_done += 1
            self.dirty.add(device_id)

    def expire(self, now: float) -> list[str]:
        """Mark devices silent for longer than ``timeout_s`` offline; returns their ids."""
        gone = [d.device_id for d in self.devices.values() if d.online and now - d.last_seen > self.timeout_s]
        for d in gone:
            self.devices[d].online = False
        return gone

    def known(self, device_id: str) -> bool:
        return device_id in self.devices

    def online_ids(self) -> list[str]:
        return sorted(d.device_id for d in self.devices.values() if d.online)

    def eligible_ids(self, now: float) -> list[str]:
        """Devices a round may select: online and heartbeating recently (a hello alone does not count)."""
        return sorted(d.device_id for d in self.devices.values()
                      if d.online and d.last_heartbeat and now - d.last_heartbeat <= self.timeout_s)

    def active_count(self, also: Iterable[str] = ()) -> int:
        """Devices that have done work (the fleet size methods scale by): not every id that said hello."""
        return len({d.device_id for d in self.devices.values() if d.rounds_done > 0} | set(also))
