"""Which devices may speak: the enrolled devices' public keys, and the server's own key pair.

``<state-dir>/enrolled.json`` holds one entry per device::

    {"format": 1, "devices": {"jetson-07": {"public_key": "ed25519:...", "fingerprint": "...",
                                            "added_at": 1764550000.0, "revoked_at": null,
                                            "max_samples": 5000}}}

The operator edits it with ``broker-server devices add / revoke`` (under a lock file, written
atomically); a running server re-reads it when it changes (checked at most once a second), so an
enrolment or a revocation takes effect within about a second without a restart. A file that cannot
be read keeps the last good one in force and says why in the log.

The server's key pair is ``<state-dir>/server.key`` (mode 0600); devices pin its public key.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import time
from pathlib import Path

from edge_runtime.atomic_io import write_json_atomic
from edge_runtime.errors import ConfigError
from edge_runtime.protocol import topics
from edge_runtime.protocol.messages import ProtocolError, check_id
from edge_runtime.protocol.signing import (Identity, fingerprint,
                                           parse_public_key)

SERVER_KEY_FILE = "server.key"
ENROLLED_FILE = "enrolled.json"
MAX_FILE_BYTES = 64 * 1024 * 1024
log = logging.getLogger("broker_server.enrolment")


def server_identity(state_dir: Path) -> tuple[Identity, bool]:
    """(the server's key pair, created now)."""
    return Identity.load_or_create(Path(state_dir) / SERVER_KEY_FILE)


def _read(path: Path) -> dict:
    if not path.exists():
        return {"format": 1, "devices": {}}
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: over {MAX_FILE_BYTES} bytes")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != 1 or not isinstance(data.get("devices"), dict):
        raise ConfigError(f"{path}: not an enrolment file (format 1)")
    return data


def _check_entry(device_id: str, e: object) -> dict:
    if not isinstance(e, dict):
        raise ConfigError(f"enrolment of {device_id} is not an object")
    check_id("device_id", device_id)
    parse_public_key(e.get("public_key"))
    ms = e.get("max_samples")
    if ms is not None and (isinstance(ms, bool) or not isinstance(ms, int) or ms < 1):
        raise ConfigError(f"enrolment of {device_id}: max_samples must be an integer >= 1 or null, got {ms!r}")
    return e


class Enrolment:
    """The enrolled devices, as a keyring: ``key_for(topic)`` is the key of the device the topic names."""

    def __init__(self, state_dir: Path, clock=time.monotonic) -> None:
        self.path = Path(state_dir) / ENROLLED_FILE
        self.clock = clock
        self._stamp: tuple | None = None
        self._checked_at = -1e18
        self._keys: dict[str, object] = {}
        self._entries: dict[str, dict] = {}
        self.reload(force=True)

    # -- reading (the server) -----------------------------------------------------------------
    def reload(self, force: bool = False, fresh: bool = False) -> None:
        """Re-read the file if it changed: checked at most once a second, unless ``fresh`` (checked
        now: one stat) or ``force`` (read now, changed or not)."""
        now = self.clock()
        if not force and not fresh and now - self._checked_at < 1.0:
            return
        self._checked_at = now
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp and not force:
            return
        try:
            entries = {d: _check_entry(d, e) for d, e in _read(self.path)["devices"].items()}
            keys = {d: parse_public_key(e["public_key"]) for d, e in entries.items() if e.get("revoked_at") is None}
        except ConfigError as exc:
            if force and self._stamp is None and not self._entries:
                raise
            log.error("%s: %s; the enrolment read before stays in force", self.path, exc)
            self._stamp = stamp
            return
        if not force:   # a running server saw the operator's change
            log.info("enrolment changed: %d device(s), %d active", len(entries), len(keys))
        self._stamp, self._entries, self._keys = stamp, entries, keys

    def key_for(self, topic: str):
        t = topics.parse_topic(topic)
        if t.device_id is None:
            raise ProtocolError(f"only devices publish on {topic}, and this is not a device topic")
        return self.key_of(t.device_id)

    def key_of(self, device_id: str):
        self.reload()
        key = self._keys.get(device_id)
        if key is not None:
            return key
        if device_id in self._entries:
            raise ProtocolError(f"device {device_id} was revoked; nothing it sends is accepted")
        raise ProtocolError(f"device {device_id} is not enrolled on this server "
                            f"(broker-server devices add {device_id} --public-key ...)")

    def active(self, device_id: str, fresh: bool = False) -> bool:
        """Enrolled and not revoked; ``fresh``: as the file says now (before an update is accepted,
        so a revocation takes effect at once, not within the second)."""
        self.reload(fresh=fresh)
        return device_id in self._keys

    def max_samples(self, device_id: str) -> int | None:
        e = self._entries.get(device_id)
        return e.get("max_samples") if e else None

    def entries(self) -> dict[str, dict]:
        self.reload(force=True)
        return dict(self._entries)

    # -- editing (the operator's CLI) ----------------------------------------------------------
    @contextlib.contextmanager
    def _editing(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(ENROLLED_FILE + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = _read(self.path)
            yield data["devices"]
            write_json_atomic(self.path, data)
        self.reload(force=True)

    def add(self, device_id: str, public_key: str, max_samples: int | None = None, now: float | None = None,
            replace: bool = False) -> dict:
        """Enrol (or re-enrol after a revocation) ``device_id`` with ``public_key``."""
        check_id("device_id", device_id)
        key = parse_public_key(public_key)
        entry = _check_entry(device_id, {"public_key": public_key, "fingerprint": fingerprint(key),
                                         "added_at": time.time() if now is None else now, "revoked_at": None,
                                         "max_samples": max_samples})
        with self._editing() as devices:
            old = devices.get(device_id)
            if old and old.get("revoked_at") is None and old["public_key"] != public_key and not replace:
                raise ConfigError(f"{device_id} is enrolled with another key ({old.get('fingerprint')}); "
                                  f"revoke it first, or pass --replace")
            devices[device_id] = entry
        return entry

    def revoke(self, device_id: str, now: float | None = None) -> dict:
        with self._editing() as devices:
            e = devices.get(device_id)
            if e is None:
                raise ConfigError(f"{device_id} is not enrolled")
            if e.get("revoked_at") is None:
                e["revoked_at"] = time.time() if now is None else now
        return e




def enrol_local_devices(server_dir: Path, device_dirs: dict[str, Path], key_file: str = "device.key") -> str:
    """A fleet on one machine (the demo, tests): every device's key made in its own state folder (or
    the one there kept) and enrolled with the server in ``server_dir``; returns the server's public
    key, what each agent pins with ``--server-key``."""
    server, _ = server_identity(server_dir)
    enrolment = Enrolment(server_dir)
    for device_id, folder in device_dirs.items():
        identity, _ = Identity.load_or_create(Path(folder) / key_file)
        enrolment.add(device_id, identity.public_text, replace=True)
    return server.public_text
