"""A device's personal state (tensors + a small JSON record) and its one file on disk.

Methods that keep something on the device between rounds (FDLoRA's personal adapter and fusion
weights) hand a :class:`PersonalState` back from their hooks; the agent writes it with
:func:`save_personal` (one safetensors file, written atomically, the record in its metadata),
so a restarted device picks up where it stopped. Nothing here ever goes on the network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor

from edge_runtime.atomic_io import write_bytes_atomic
from edge_runtime.errors import EdgeRuntimeError

_META_KEY = "edge_runtime.personal"


@dataclass
class PersonalState:
    tensors: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)   # JSON-able


def save_personal(path: Path, personal: PersonalState) -> Path:
    data = safetensors_save({k: v.detach().contiguous() for k, v in personal.tensors.items()},
                            metadata={_META_KEY: json.dumps(personal.meta, sort_keys=True)})
    write_bytes_atomic(Path(path), data)
    return Path(path)


def load_personal(path: Path) -> PersonalState | None:
    """The saved state, or None if there is none; an unreadable file is an error naming it."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = path.read_bytes()
        tensors = safetensors_load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(json.loads(data[8:8 + header_len])["__metadata__"][_META_KEY])
    except (OSError, SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise EdgeRuntimeError(f"{path}: unreadable personal state ({exc}); move it away to start afresh") from exc
    return PersonalState(tensors, meta)
