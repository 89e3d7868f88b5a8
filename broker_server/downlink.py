"""The compressed downlink on the server (``compression.downlink``): each new global goes out as a
delta from the one devices hold, and the global in force becomes what they rebuild from it.

Per closed round ``r``: ``global/delta_<r>.safetensors`` (the delta's bytes, re-published after a
restart) and ``server/downlink_<r>.safetensors`` (the server's error-feedback residual); the state
names both, and the sha256 of the global the delta applies to (``delta_base``). Both are written
before the state that names them, so a crash before the save re-closes the round from the same
inputs: the same bytes, nothing counted twice.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING

from torch import Tensor

from edge_runtime.round.wire import encode_global

if TYPE_CHECKING:
    from broker_server.coordinator import Coordinator

log = logging.getLogger("broker_server.coordinator")


def compress_global(run: "Coordinator", round_: int, new: dict[str, Tensor]) -> dict[str, Tensor]:
    """The global in force after ``round_`` (``new`` itself when the downlink is not compressed)."""
    s, cfg, store = run.state, run.spec.compression, run.store
    if not cfg.compresses_downlink:
        return new
    kept = store.resolve(s["downlink_file"]) if s.get("downlink_file") else None
    # (after failed rounds in a row the residual's round may be pruned: the delta starts again from zero)
    residual = store.read_tensors(kept) if kept is not None and kept.exists() else None
    data, wire, new_residual = encode_global(new, run.global_state, cfg, residual)
    if data is None:   # another layout: devices fetch it whole
        clear_delta(run)
        return wire
    path = store.root / "global" / f"delta_{round_:05d}.safetensors"
    store.write_bytes(path, data)
    if new_residual is not None:
        rpath = store.root / "server" / f"downlink_{round_:05d}.safetensors"
        store.write_tensors(rpath, new_residual)
        s["downlink_file"] = store.relative(rpath)
    s.update(delta_file=store.relative(path), delta_base=hashlib.sha256(run.global_blob).hexdigest())
    run.delta_blob = data
    return wire


def clear_delta(run: "Coordinator") -> None:
    """The global in force has no delta (the first, a failed round's, a new layout)."""
    run.state.pop("delta_file", None)
    run.state.pop("delta_base", None)
    run.delta_blob = None


def load_delta(run: "Coordinator") -> bytes | None:
    """The delta the persisted state names (after a restart)."""
    rel = run.state.get("delta_file")
    return run.store.resolve(rel).read_bytes() if rel else None


def prune(run: "Coordinator", closed_round: int) -> None:
    for name in (f"global/delta_{closed_round - 2:05d}.safetensors", f"server/downlink_{closed_round - 2:05d}.safetensors"):
        (run.store.root / name).unlink(missing_ok=True)
