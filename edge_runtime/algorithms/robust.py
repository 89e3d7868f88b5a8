"""Bounded influence of any one update: weight caps, a norm bound on each update's delta, and
robust aggregators. Pure functions over ``{name: tensor}``; the server and the simulation apply
them (``edge_runtime.round.server.aggregate_checked``) before the method's own aggregate.

What each defends against (a device that trains honestly but lies, or sends garbage):

- ``max_samples`` / the enrolment's per-device cap: a declared ``n_samples = 1e9`` counts as the cap;
- ``weight_multiple``: no weight above that multiple of the round's (lower) median weight, so one
  liar among honest devices cannot outweigh them however its number is chosen, while honest
  differences in data size up to that factor count as they are;
- ``max_share``: with three updates or more, none carries more than this share of a round's weight
  (water-filling: the largest weights are lowered to a common level, the others keep theirs). With
  two, nothing tells the liar from the honest device, and a share cap would only erase honest
  differences;
- the norm bound: ``||update - global||`` above ``norm_multiple`` x the round's (lower) median, or
  above a fixed ``max_norm``, is clipped to the bound (its direction kept) or the update rejected;
- ``median`` / ``trimmed_mean``: the coordinate-wise median, or the mean after cutting ``trim`` of
  the values at each end, of the updates (unweighted, as in Yin et al. 2018 and Flower's FedMedian /
  FedTrimmedAvg). Krum is not offered: it needs 2f + 3 updates to tolerate f attackers and throws
  away all but one update, too costly for fleets of a handful of devices per round.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import torch
from torch import Tensor

from edge_runtime.algorithms.aggregation import StateDict, Update
from edge_runtime.errors import AggregationError, ConfigError

AGGREGATORS = ("fedavg", "median", "trimmed_mean")
NORM_BOUNDS = ("adaptive", "fixed", "off")


@dataclass(frozen=True)
class RobustConfig:
    """The server's defences (the training spec's ``robust`` section; on by default)."""

    max_samples: int = 1_000_000     # an update's n_samples counts as at most this
    weight_multiple: float = 4.0     # a weight counts as at most this multiple of the round's median weight
    max_share: float = 0.5           # the most of a round's weight one update carries (1.0: no cap)
    norm_bound: str = "adaptive"     # adaptive: norm_multiple x the round's median; fixed: max_norm; off
    norm_multiple: float = 3.0
    max_norm: float = 0.0            # the fixed bound (norm_bound "fixed")
    on_norm: str = "clip"            # clip to the bound, or reject the update
    aggregator: str = "fedavg"       # fedavg (the method's own aggregate) | median | trimmed_mean
    trim: float = 0.2                # trimmed_mean: the share cut at each end of every coordinate

    def __post_init__(self) -> None:
        if isinstance(self.max_samples, bool) or not isinstance(self.max_samples, int) or self.max_samples < 1:
            raise ConfigError(f"robust.max_samples must be an integer >= 1, got {self.max_samples!r}")
        if not self.weight_multiple >= 1:
            raise ConfigError(f"robust.weight_multiple must be >= 1, got {self.weight_multiple!r}")
        if not 0 < self.max_share <= 1:
            raise ConfigError(f"robust.max_share must be in (0, 1], got {self.max_share!r}")
        if self.norm_bound not in NORM_BOUNDS:
            raise ConfigError(f"robust.norm_bound must be one of {NORM_BOUNDS}, got {self.norm_bound!r}")
        if not self.norm_multiple >= 1:
            raise ConfigError(f"robust.norm_multiple must be >= 1, got {self.norm_multiple!r}")
        if self.norm_bound == "fixed" and not self.max_norm > 0:
            raise ConfigError(f"robust.norm_bound fixed needs robust.max_norm > 0, got {self.max_norm!r}")
        if self.on_norm not in ("clip", "reject"):
            raise ConfigError(f"robust.on_norm must be clip or reject, got {self.on_norm!r}")
        if self.aggregator not in AGGREGATORS:
            raise ConfigError(f"robust.aggregator must be one of {AGGREGATORS}, got {self.aggregator!r}")
        if not 0 <= self.trim < 0.5:
            raise ConfigError(f"robust.trim must be in [0, 0.5), got {self.trim!r}")


def cap_shares(weights: Sequence[float], max_share: float) -> list[float]:
    """Weights with no share above ``max_share``: the largest are lowered to one level ``c`` with
    ``c / total' = max_share``, the rest unchanged. Zero weights stay zero and do not count. When
    ``max_share * m < 1`` for the ``m`` positive weights, no weighting can meet it and each of them
    gets the same weight (their mean); at exactly ``1 / m`` all are lowered to the smallest.
    Comparisons allow for rounding (1e-9 relative)."""
    w = [float(x) for x in weights]
    positive = [i for i, x in enumerate(w) if x > 0]
    m, total = len(positive), sum(w)
    if m == 0 or total <= 0 or max_share >= 1:
        return w

    def each(value: float) -> list[float]:
        return [value if x > 0 else x for x in w]

    if max_share * m < 1 - 1e-9:
        return each(total / m)
    order = sorted(positive, key=lambda i: -w[i])
    for k in range(m):   # k = how many are capped; ends by k = m - 1 since max_share * m >= 1
        room = 1 - max_share * k
        if room <= 1e-12:   # only reachable through rounding, at a cap of 1 / m: all at the smallest
            return each(min(w[i] for i in positive))
        level = max_share * sum(w[i] for i in order[k:]) / room
        if w[order[k]] <= level * (1 + 1e-9) or k == m - 1:
            out = list(w)
            for i in order[:k]:
                out[i] = level
            return out
    return w   # never reached: the loop returns by k = m - 1


def delta_norm(update: StateDict, global_state: StateDict) -> float:
    """``||update - global||_2`` over every floating tensor, in float64."""
    sq = 0.0
    for name, g in global_state.items():
        if g.is_floating_point():
            sq += float(((update[name].double() - g.double()) ** 2).sum())
    return math.sqrt(sq)


def clip_to(update: StateDict, global_state: StateDict, norm: float, bound: float) -> dict[str, Tensor]:
    """``global + (update - global) * bound / norm``: the same direction, the bound's length."""
    scale = bound / norm
    return {name: ((g.double() + (update[name].double() - g.double()) * scale).to(g.dtype)
                   if g.is_floating_point() else update[name].clone())
            for name, g in global_state.items()}


def coordinate_median(states: Sequence[StateDict]) -> dict[str, Tensor]:
    """Every coordinate's median over the updates (the mean of the middle two for an even count)."""
    if not states:
        raise AggregationError("no updates to aggregate")
    out = {}
    for name, ref in states[0].items():
        stack = torch.stack([s[name].double() for s in states])
        out[name] = stack.quantile(0.5, dim=0).to(ref.dtype) if ref.is_floating_point() else ref.clone()
    return out


def trimmed_mean(states: Sequence[StateDict], trim: float) -> dict[str, Tensor]:
    """Every coordinate's mean after dropping the ``floor(trim * n)`` lowest and highest values."""
    if not states:
        raise AggregationError("no updates to aggregate")
    n = len(states)
    cut = int(math.floor(trim * n))
    if n - 2 * cut < 1:
        cut = (n - 1) // 2
    out = {}
    for name, ref in states[0].items():
        if not ref.is_floating_point():
            out[name] = ref.clone()
            continue
        stack = torch.stack([s[name].double() for s in states]).sort(dim=0).values
        out[name] = stack[cut:n - cut].mean(dim=0).to(ref.dtype)
    return out


def robust_aggregate(updates: Sequence[Update], cfg: RobustConfig) -> dict[str, Tensor]:
    states = [u.tensors for u in updates]
    return coordinate_median(states) if cfg.aggregator == "median" else trimmed_mean(states, cfg.trim)


def defend(global_state: StateDict, updates: Sequence[Update], cfg: RobustConfig,
           sample_caps: Mapping[str, int | None] | None = None) -> tuple[list[Update], dict]:
    """The updates with capped weights and bounded deltas, and a report of what was changed:
    ``{"bound", "median_norm", "largest_norm", "capped": {dev: [declared, counted]}, "clipped": [devs],
    "rejected": {dev: reason}}`` (what the history row keeps: a few numbers, and the devices it acted on)."""
    caps = sample_caps or {}
    report: dict = {"capped": {}, "clipped": [], "rejected": {}}
    counted = []
    for u in updates:
        limit = min(cfg.max_samples, caps.get(u.device_id) or cfg.max_samples)
        n = min(u.n_samples, float(limit))
        if n < u.n_samples:
            report["capped"][u.device_id] = [u.n_samples, n]
        counted.append(n)
    if counted:
        ceiling = cfg.weight_multiple * statistics.median_low(counted)
        for i, u in enumerate(updates):
            if counted[i] > ceiling:
                report["capped"][u.device_id] = [u.n_samples, ceiling]
                counted[i] = ceiling
    norms = [delta_norm(u.tensors, global_state) for u in updates]
    report["largest_norm"] = max(norms, default=0.0)
    bound = None
    if cfg.norm_bound == "adaptive" and updates:
        report["median_norm"] = statistics.median_low(norms)
        bound = cfg.norm_multiple * report["median_norm"]
    elif cfg.norm_bound == "fixed":
        bound = cfg.max_norm
    report["bound"] = bound
    kept = []
    for u, n, norm in zip(updates, counted, norms):
        tensors = u.tensors
        if bound is not None and norm > bound:
            if cfg.on_norm == "reject":
                report["rejected"][u.device_id] = f"delta norm {norm:.4g} over the bound {bound:.4g}"
                continue
            tensors = clip_to(u.tensors, global_state, norm, bound)
            report["clipped"].append(u.device_id)
        kept.append(replace(u, tensors=tensors, n_samples=n))
    shares = cap_shares([u.n_samples for u in kept], cfg.max_share if len(kept) >= 3 else 1.0)
    for i, (u, w) in enumerate(zip(kept, shares)):
        if w < u.n_samples:
            report["capped"][u.device_id] = [report["capped"].get(u.device_id, [u.n_samples])[0], w]
            kept[i] = replace(u, n_samples=w)
    if not kept:
        raise AggregationError(f"every update was rejected by the norm bound ({report['rejected']})")
    return kept, report
