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
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from typing import Any, Iterable

MAX_PROFILE_BYTES = 4096        # a hello's profile as stored (JSON); larger is refused
VOLATILE = ("memory_available",)   # changes with every hello: kept in memory, not worth a journal line


def _as_json(rec: "DeviceRecord") -> dict:
    return {f: getattr(rec, f) for f in _FIELDS}


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


_FIELDS = tuple(f.name for f in fields(DeviceRecord))


class Fleet:
    """Online = said hello / online and not yet offline (last will) nor silent past ``timeout_s``.
    Eligible for a round = online and heartbeating within ``timeout_s``."""

    def __init__(self, timeout_s: float = 60.0, records: dict[str, dict] | None = None,
                 max_devices: int = 10_000) -> None:
        self.timeout_s = timeout_s
        self.max_devices = max_devices
        known = set(_FIELDS)
        self.devices: dict[str, DeviceRecord] = {
            k: DeviceRecord(**{f: v for f, v in rec.items() if f in known}) for k, rec in (records or {}).items()}
        self.dirty: set[str] = set()      # records to append to the journal
        self.removed: set[str] = set()    # evicted since the last flush (journal tombstones)
        # devices that never did a round, least recently heard from first: eviction candidates in O(1)
        self._idle: OrderedDict[str, None] = OrderedDict(
            (d.device_id, None) for d in sorted(self.devices.values(), key=lambda d: d.last_seen) if not d.rounds_done)

    def to_json(self) -> dict[str, Any]:
        return {k: _as_json(v) for k, v in self.devices.items()}

    def _touch(self, device_id: str) -> None:
        if device_id in self._idle:
            self._idle.move_to_end(device_id)

    def take_dirty(self) -> tuple[list[dict], list[str]]:
        """The records changed since the last call (and the ids evicted), for the journal."""
        recs = [_as_json(self.devices[d]) for d in sorted(self.dirty) if d in self.devices]
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
            self._idle[device_id] = None
        if new or (_stable(rec.profile), rec.n_samples, rec.runtime_version) != (_stable(profile), n_samples, version):
            self.dirty.add(device_id)
        rec.profile, rec.n_samples, rec.runtime_version = profile, n_samples, version
        rec.online, rec.last_seen = True, now
        self._touch(device_id)
        return new

    def _evict_one(self, protected: set[str]) -> None:
        """Drop the device that never did a round and was heard from longest ago (not one in ``protected``)."""
        victim = next((d for d in self._idle if d not in protected), None)
        if victim is None:
            raise RegistryFull(f"the fleet registry is full ({self.max_devices} devices, all of them have worked "
                               f"or take part in the open round)")
        del self._idle[victim]
        del self.devices[victim]
        self.dirty.discard(victim)
        self.removed.add(victim)

    def seen(self, device_id: str, now: float, state: str | None = None) -> bool:
        """A heartbeat (``state`` given) or other message from a known device; True if it came back
        online, False for unknown devices."""
        rec = self.devices.get(device_id)
        if rec is None:
            return False
        changed = not rec.online
        rec.online, rec.last_seen = True, now
        self._touch(device_id)
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
            self._idle.pop(device_id, None)

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
