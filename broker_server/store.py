"""The server's persistent state in ``--state-dir``: one JSON document plus safetensors files.

Every change is written atomically (temp file, fsync, rename), and tensors are written before the
JSON that refers to them, so a server killed at any instant restarts from a consistent state:
an update is "accepted" exactly when ``state.json`` lists it, and only then is it acked.
"""

from __future__ import annotations

import json
import logging
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

    def load(self) -> dict[str, Any] | None:
        if not self.state_path.exists():
            return None
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise StateError(f"{self.state_path}: cannot read server state: {exc}") from exc
        if state.get("schema") != SCHEMA:
            raise StateError(f"{self.state_path}: state schema {state.get('schema')!r}, expected {SCHEMA}")
        return state

    def save(self, state: dict[str, Any]) -> None:
        state["schema"] = SCHEMA
        write_json_atomic(self.state_path, state)

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

    def read_tensors(self, path: Path) -> dict[str, torch.Tensor]:
        return load_file(path)

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def resolve(self, rel: str) -> Path:
        return self.root / rel
