"""Differential privacy for the global model: DP-FedAvg with a fixed clip, Gaussian noise on the
server's sum, and the privacy spent from opacus' RDP accountant. Pure functions over
``{name: tensor}``; the server and the simulation apply :func:`dp_mean` in place of the method's
weighted mean when the training spec's ``dp.clip`` is set (``round.server.aggregate_checked``).

What it guarantees (McMahan et al. 2018, "Learning differentially private recurrent language
models"; the same mechanism as TensorFlow Federated's and Flower's server-side fixed clipping):
every device's delta from the global is clipped to ``clip`` (L2, over every trained tensor), the
clipped deltas are summed with equal weight (a device's example count would give a large device a
larger sensitivity), Gaussian noise of standard deviation ``noise_multiplier * clip`` is added to
the sum, and the sum is divided by the number of updates. Adding or removing one device's whole
data then changes what anyone sees of the released global by a Gaussian mechanism of that noise
multiplier: *device-level* (user-level) DP at (epsilon, delta) for the whole run.

The accounting is conservative on purpose: the round manifest names each round's participants, so
no amplification by sampling is claimed (sample rate 1 every round), and epsilon is for a device
that took part in every DP round. The trust model is *central* DP: the server sees single clipped
updates; what it protects is the released global (every device, every export, every observer of
the broker). The noise comes from a torch generator seeded with 63 bits from the OS; the
floating-point attacks on Gaussian samplers (Mironov 2012) are out of scope, as in opacus' default
(non ``secure_mode``) path.
"""

from __future__ import annotations

import math
import secrets
import statistics
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from edge_runtime.algorithms.aggregation import StateDict, Update, finite_number
from edge_runtime.algorithms.robust import clip_to, delta_norm
from edge_runtime.deps import require
from edge_runtime.errors import AggregationError, ConfigError


@dataclass(frozen=True)
class DPConfig:
    """The training spec's ``dp`` section (off unless ``clip`` is set)."""

    clip: float = 0.0               # C: each update's delta is clipped to this L2 norm; 0: DP off
    noise_multiplier: float = 0.0   # z: the noise on the sum has standard deviation z * C (0: clipping only, no guarantee)
    delta: float = 1e-5             # the delta epsilon is reported at (below 1 / the number of devices)

    def __post_init__(self) -> None:
        for name in ("clip", "noise_multiplier"):
            v = getattr(self, name)
            if not finite_number(v) or v < 0:
                raise ConfigError(f"dp.{name} must be a finite number >= 0, got {v!r}")
        if self.noise_multiplier > 0 and not self.clip > 0:
            raise ConfigError("dp.noise_multiplier needs dp.clip > 0 (the noise is scaled to the clip)")
        if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)) or not 0 < self.delta < 1:
            raise ConfigError(f"dp.delta must be in (0, 1), got {self.delta!r}")

    @property
    def enabled(self) -> bool:
        return self.clip > 0


def dp_mean(global_state: StateDict, updates: Sequence[Update], cfg: DPConfig,
            generator: torch.Generator | None = None) -> tuple[dict[str, Tensor], dict]:
    """``global + (sum_k clip(delta_k) + N(0, (z C)^2 I)) / n`` over every floating tensor, and a
    report ``{"clip", "noise_multiplier", "noise_std", "clipped": [devs], "median_norm"}``
    (``noise_std`` is the noise's standard deviation on the mean, per coordinate)."""
    if not updates:
        raise AggregationError("no updates to aggregate")
    if not cfg.enabled:
        raise AggregationError("dp_mean needs dp.clip > 0")
    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    n = len(updates)
    sigma = cfg.noise_multiplier * cfg.clip
    norms = [delta_norm(u.tensors, global_state) for u in updates]
    clipped = [clip_to(u.tensors, global_state, norm, cfg.clip) if norm > cfg.clip else u.tensors
               for u, norm in zip(updates, norms)]
    out = {}
    for name, g in global_state.items():
        if not g.is_floating_point():
            out[name] = g.clone()
            continue
        g64 = g.double()
        total = sum((s[name].double() - g64 for s in clipped), torch.zeros_like(g64))
        if sigma > 0:
            total = total + sigma * torch.randn(g.shape, generator=generator, dtype=torch.float64)
        out[name] = (g64 + total / n).to(g.dtype)
    report = {"clip": cfg.clip, "noise_multiplier": cfg.noise_multiplier, "noise_std": sigma / n,
              "clipped": [u.device_id for u, norm in zip(updates, norms) if norm > cfg.clip],
              "median_norm": statistics.median_low(norms)}
    return out, report


def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """The epsilon at ``delta`` of ``rounds`` Gaussian mechanisms of ``noise_multiplier``, each on
    every device (sample rate 1), from opacus' RDP accountant; ``inf`` without noise."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    rdp = require("opacus.accountants.analysis.rdp", "differential privacy's accountant (dp.noise_multiplier)")
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 256))
    eps, _order = rdp.get_privacy_spent(orders=orders, delta=delta,
                                        rdp=rdp.compute_rdp(q=1.0, noise_multiplier=noise_multiplier,
                                                            steps=rounds, orders=orders))
    return float(eps)


def privacy_spent(history: Sequence[dict], cfg: DPConfig) -> dict | None:
    """What a run has spent after the rounds in ``history`` (rows whose defence holds a ``dp``
    report): ``{"epsilon", "delta", "noise_multiplier", "clip", "rounds"}``, ``epsilon`` None
    when infinite (clipping without noise); None when no round was aggregated with DP."""
    rounds = [h for h in history if (h.get("defence") or {}).get("dp")]
    if not rounds:
        return None
    z = min(h["defence"]["dp"]["noise_multiplier"] for h in rounds)   # one spec a run; else the weakest
    eps = epsilon(z, len(rounds), cfg.delta)
    return {"epsilon": eps if math.isfinite(eps) else None, "delta": cfg.delta, "noise_multiplier": z,
            "clip": cfg.clip, "rounds": len(rounds)}
