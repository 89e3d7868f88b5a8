"""The server's persistent state in ``--state-dir``: one JSON document, the fleet registry's journal,
and safetensors files.

Every change of ``state.json`` is written atomically (temp file, fsync, rename), and tensors are
written before the JSON that refers to them, so a server killed at any instant restarts from a
consistent state: an update is "accepted" exactly when ``state.json`` lists it, and only then is it
acked. The fleet registry is an append-only journal (``devices.jsonl``, one record per line, a torn
last line is skipped), compacted when it holds more than twice the live records, so registering a
device costs one short appended line instead of a rewrite of the whole state.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from edge_runtime.atomic_io import write_bytes_atomic, write_json_atomic
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.protocol.codec import encode_tensors

log = logging.getLogger("broker_server.store")
SCHEMA = 1


class StateError(EdgeRuntimeError):
    """The state directory is unreadable or belongs to another run."""


class Store:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_path = self.root / "state.json"
        self.journal_path = self.root / "devices.jsonl"
        self.journal_lines = 0

    def load(self) -> dict[str, Any] | None:
        """The state document with the fleet registry as ``state["devices"]``."""
        if not self.state_path.exists():
            return None
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise StateError(f"{self.state_path}: cannot read server state: {exc}") from exc
        if state.get("schema") != SCHEMA:
            raise StateError(f"{self.state_path}: state schema {state.get('schema')!r}, expected {SCHEMA}")
        if self.journal_path.exists():   # else: a state from before the journal keeps its "devices"
            state["devices"] = self.load_devices()
        state.setdefault("devices", {})
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Write the state document (the registry goes to the journal, see :meth:`append_devices`)."""
        doc = {k: v for k, v in state.items() if k != "devices"}
        doc["schema"] = SCHEMA
        write_json_atomic(self.state_path, doc)

    # -- the fleet registry's journal ----------------------------------------------------------
    def load_devices(self) -> dict[str, dict]:
        devices: dict[str, dict] = {}
        lines = 0
        try:
            with open(self.journal_path, "rb") as f:
                for raw in f:
                    lines += 1
                    try:
                        entry = json.loads(raw)
                    except ValueError:
                        log.warning("%s: skipped an unreadable line %d (a write cut short)", self.journal_path, lines)
                        continue
                    if isinstance(entry, dict) and isinstance(entry.get("removed"), str):
                        devices.pop(entry["removed"], None)
                    elif isinstance(entry, dict) and isinstance(entry.get("device_id"), str):
                        devices[entry["device_id"]] = entry
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StateError(f"{self.journal_path}: cannot read the fleet registry: {exc}") from exc
        self.journal_lines = lines
        return devices

    def append_devices(self, records: list[dict], removed: list[str] = ()) -> int:
        """Append changed records (and eviction tombstones) durably; returns the bytes written."""
        if not records and not removed:
            return 0
        data = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)
        data += b"".join(json.dumps({"removed": d}).encode() + b"\n" for d in removed)
        with open(self.journal_path, "ab") as f:
            if f.tell() and not self._ends_with_newline():
                data = b"\n" + data   # after a torn last line: start on a line of our own
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.journal_lines += len(records) + len(removed)
        return len(data)

    def _ends_with_newline(self) -> bool:
        with open(self.journal_path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def needs_compaction(self, live: int) -> bool:
        return self.journal_lines > 2 * live + 64

    def rewrite_devices(self, devices: dict[str, dict]) -> None:
        """Replace the journal with one line per live record (atomic)."""
        write_bytes_atomic(self.journal_path, b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n"
                                                       for r in devices.values()))
        self.journal_lines = len(devices)

    def clean_stale_temp(self) -> int:
        """Remove the ``.NAME.XXXX.tmp`` files / folders (and ``.NAME.old`` folders) a killed writer left."""
        n = 0
        for p in list(self.root.rglob(".*.tmp")) + list(self.root.rglob(".*.old")):
            try:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                n += 1
            except OSError as exc:
                log.warning("cannot remove stale %s: %s", p, exc)
        if n:
            log.info("removed %d stale temporary file(s) left by an interrupted write", n)
        return n

    def global_path(self, round_: int) -> Path:
        return self.root / "global" / f"round_{round_:05d}.safetensors"

    def update_path(self, round_: int, device_id: str, update_id: str) -> Path:
        return self.root / "updates" / f"round_{round_:05d}" / f"{device_id}__{update_id}.safetensors"

    def write_tensors(self, path: Path, state: dict[str, torch.Tensor]) -> bytes:
        data = encode_tensors(state)
        write_bytes_atomic(path, data)
        return data

    def write_bytes(self, path: Path, data: bytes) -> None:
        write_bytes_atomic(path, data)

    def write_json(self, path: Path, doc: dict) -> None:
        """Atomically, compact (a configurator state can hold thousands of devices)."""
        write_bytes_atomic(path, json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8"))

    def read_json(self, path: Path) -> dict:
        """A JSON object the server wrote (StateError if unreadable or not an object)."""
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise StateError(f"{path}: cannot read: {exc}") from exc
        if not isinstance(doc, dict):
            raise StateError(f"{path}: expected a JSON object, got {type(doc).__name__}")
        return doc

    def read_tensors(self, path: Path) -> dict[str, torch.Tensor]:
        return load_file(path)

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def resolve(self, rel: str) -> Path:
        return self.root / rel
