"""Fleet registry: which devices exist, what they reported, whether they are online."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


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


class Fleet:
    """Online = said hello / online and not yet offline (last will) nor silent past ``timeout_s``."""

    def __init__(self, timeout_s: float = 60.0, records: dict[str, dict] | None = None) -> None:
        self.timeout_s = timeout_s
        self.devices: dict[str, DeviceRecord] = {k: DeviceRecord(**v) for k, v in (records or {}).items()}

    def to_json(self) -> dict[str, Any]:
        return {k: asdict(v) for k, v in self.devices.items()}

    def hello(self, device_id: str, profile: dict, n_samples: int, version: str, now: float) -> bool:
        """Register or refresh a device; True if it is new."""
        rec = self.devices.get(device_id)
        new = rec is None
        if new:
            rec = self.devices[device_id] = DeviceRecord(device_id)
        rec.profile, rec.n_samples, rec.runtime_version = profile, n_samples, version
        rec.online, rec.last_seen = True, now
        return new

    def seen(self, device_id: str, now: float, state: str | None = None) -> bool:
        """A heartbeat / message from a known device; returns False for unknown devices."""
        rec = self.devices.get(device_id)
        if rec is None:
            return False
        changed = not rec.online
        rec.online, rec.last_seen = True, now
        if state:
            rec.state = state
        return changed

    def set_online(self, device_id: str, online: bool, now: float) -> bool:
        rec = self.devices.get(device_id)
        if rec is None or rec.online == online:
            return False
        rec.online = online
        if online:
            rec.last_seen = now
        return True

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
