"""Aggregation of adapter updates: pure functions over ``{name: tensor}`` and weights, no I/O.

Shared by the in-process simulation and the aggregation server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor

from edge_runtime.errors import AggregationError

StateDict = Mapping[str, Tensor]


def check_compatible(reference: StateDict, update: StateDict, where: str = "update") -> None:
    """Raise AggregationError unless ``update`` has exactly ``reference``'s keys, shapes, dtypes, finite values."""
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        raise AggregationError(f"{where}: keys differ from the global adapter "
                               f"(missing {missing[:5]}, unexpected {extra[:5]})")
    for name, ref in reference.items():
        t = update[name]
        if not isinstance(t, Tensor):
            raise AggregationError(f"{where}: {name} is {type(t).__name__}, not a tensor")
        if t.shape != ref.shape:
            raise AggregationError(f"{where}: {name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        if t.dtype != ref.dtype:
            raise AggregationError(f"{where}: {name} has dtype {t.dtype}, expected {ref.dtype}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AggregationError(f"{where}: {name} contains NaN or Inf")


def weighted_mean(updates: Sequence[tuple[StateDict, float]]) -> dict[str, Tensor]:
    """FedAvg: ``sum_k w_k * theta_k / sum_k w_k`` for every tensor name.

    ``updates``: (state, weight) pairs, weight = e.g. number of training examples (>= 0, sum > 0).
    Accumulates in float64 and returns each tensor in its input dtype.
    """
    if not updates:
        raise AggregationError("no updates to aggregate")
    weights = [float(w) for _, w in updates]
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise AggregationError(f"weights must be finite and >= 0, got {weights}")
    total = sum(weights)
    if total <= 0:
        raise AggregationError(f"weights sum to {total}; at least one must be > 0")
    reference = updates[0][0]
    for k, (state, _) in enumerate(updates[1:], 1):
        check_compatible(reference, state, where=f"update {k}")
    out: dict[str, Tensor] = {}
    for name, ref in reference.items():
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for (state, _), w in zip(updates, weights):
            if w:
                acc += state[name].detach().to(torch.float64) * (w / total)
        out[name] = acc.to(ref.dtype)
    return out


def masked_weighted_mean(global_state: StateDict, updates: Sequence[tuple[StateDict, Mapping[str, float]]]
                         ) -> dict[str, Tensor]:
    """Per-tensor FedAvg over the updates that trained each tensor.

    ``updates``: (state, weights) pairs where ``weights[name]`` (>= 0, missing = 0) is how much that
    update's ``name`` counts. ``name`` becomes ``sum_k w_k theta_k / sum_k w_k``; a tensor with no
    weight anywhere keeps its value in ``global_state``. Accumulates in float64.
    """
    if not updates:
        raise AggregationError("no updates to aggregate")
    for k, (state, weights) in enumerate(updates):
        check_compatible(global_state, state, where=f"update {k}")
        bad = {n: w for n, w in weights.items() if not math.isfinite(float(w)) or float(w) < 0}
        if bad:
            raise AggregationError(f"update {k}: weights must be finite and >= 0, got {dict(list(bad.items())[:3])}")
    out: dict[str, Tensor] = {}
    for name, ref in global_state.items():
        pairs = [(state[name], float(weights.get(name, 0.0))) for state, weights in updates]
        total = sum(w for _, w in pairs)
        if total <= 0:
            out[name] = ref.detach().clone()
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for t, w in pairs:
            if w:
                acc += t.detach().to(torch.float64) * (w / total)
        out[name] = acc.to(ref.dtype)
    return out



def finite_number(v: object) -> bool:
    """A finite int or float, not a bool (a device's metric worth using). A JSON integer too large
    for a float (10**400) is not one: ``math.isfinite`` would raise OverflowError on it."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False

@dataclass(frozen=True)
class Update:
    """One device's accepted update as the server's aggregation sees it."""

    device_id: str
    tensors: StateDict
    n_samples: float          # FedAvg weight
    steps: int = 0            # local optimizer steps behind it (FedPepTAO's K_k)
    metrics: Mapping[str, float] = field(default_factory=dict)   # what the device reported with it
    layer_steps: tuple[int, ...] = ()   # steps each transformer block ran (DropPEFT's layer dropout)


def fedavg(global_state: StateDict, updates: Sequence[Update], server_state: dict[str, Tensor] | None,
           spec, fleet_size: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The default ``aggregate`` hook of a method: weighted FedAvg, no server state."""
    return weighted_mean([(u.tensors, u.n_samples) for u in updates]), {}
