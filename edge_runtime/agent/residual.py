"""The device's error-feedback residual (``compression.error_feedback``): what its compressed
uploads could not carry yet, kept in ``<state-dir>/residual.safetensors`` across restarts.

A round's new residual is written next to its pending update (``pending/<id>.residual.safetensors``)
and becomes the residual only when the server accepts that update: the residual always matches
what the server has counted. A refused or dropped update leaves the last one in force.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

from safetensors import safe_open
from safetensors.torch import load_file, save as safetensors_save
from torch import Tensor

from edge_runtime.atomic_io import write_bytes_atomic

log = logging.getLogger("edge_runtime.agent")
FILE = "residual.safetensors"


def load_residual(state_dir: Path, run_id: str, reference: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    """The residual of run ``run_id``, if one is kept and it fits ``reference`` (the upload's float
    tensors, by name and shape); None otherwise (a new run, another adapter, a damaged file)."""
    path = Path(state_dir) / FILE
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(path)
    except Exception as exc:   # a damaged file costs the residual, not the round
        log.warning("ignoring the error-feedback residual %s: %s", path, exc)
        return None
    if meta.get("run_id") != run_id:
        return None
    want = {k: tuple(v.shape) for k, v in reference.items() if v.is_floating_point()}
    if {k: tuple(v.shape) for k, v in tensors.items()} != want:
        log.warning("the error-feedback residual does not fit this round's upload; starting from zero")
        return None
    return tensors


def stage_residual(pending_file: Path, residual: Mapping[str, Tensor], run_id: str) -> Path:
    """Write ``residual`` next to the pending update it belongs to; returns its path."""
    path = pending_file.with_suffix(".residual.safetensors")
    write_bytes_atomic(path, safetensors_save({k: v.contiguous() for k, v in residual.items()},
                                              metadata={"run_id": run_id}))
    return path


def commit_residual(state_dir: Path, staged: str | None, accepted: bool) -> None:
    """The pending update was acked: its residual becomes the residual (accepted) or is dropped."""
    if not staged:
        return
    if accepted and Path(staged).exists():
        os.replace(staged, Path(state_dir) / FILE)
    else:
        Path(staged).unlink(missing_ok=True)
