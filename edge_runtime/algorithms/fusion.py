"""Gradient-free search for FDLoRA's fusion weights (a, b): forward passes only.

``loss(a, b)`` is the device's validation loss with the personal adapter scaled by ``a`` and the
global one by ``b``. The search minimises ``loss + l1 * (|a| + |b|)`` within ``[0, upper]^2``:
three anchors (personal alone, global alone, their plain sum), a seeded random phase over the
box, then a shrinking Gaussian local search around the best point. The returned point never has
a higher validation loss than the better of the two adapters alone: candidates worse than that
are not eligible, and the anchors always are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class FusionResult:
    a: float                    # personal adapter's scale
    b: float                    # global adapter's scale
    loss: float                 # validation loss at (a, b)
    personal_loss: float        # at (1, 0)
    global_loss: float          # at (0, 1)
    evaluations: int


def search_fusion(loss: Callable[[float, float], float], budget: int = 40, upper: float = 2.0, l1: float = 0.01,
                  seed: int = 0) -> FusionResult:
    if budget < 3:
        raise ValueError(f"fusion budget must be >= 3 evaluations, got {budget}")
    rng = np.random.default_rng(seed)
    seen: dict[tuple[float, float], float] = {}

    def f(a: float, b: float) -> float:
        key = (round(float(a), 6), round(float(b), 6))
        if key not in seen:
            value = float(loss(*key))
            seen[key] = value if math.isfinite(value) else math.inf
        return seen[key]

    for a, b in ((1.0, 0.0), (0.0, 1.0), (1.0, 1.0)):
        f(a, b)
    n_random = max(0, (budget - 3) // 3)
    for a, b in rng.uniform(0.0, upper, size=(n_random, 2)):
        f(a, b)
    sigma = upper / 4

    def objective(p: tuple[float, float]) -> float:
        return seen[p] + l1 * (abs(p[0]) + abs(p[1]))

    for _ in range(20 * budget):  # proposals may repeat a point (clipped to a corner): bounded attempts
        if len(seen) >= budget:
            break
        best = min(seen, key=objective)
        a, b = np.clip(np.asarray(best) + rng.normal(0.0, sigma, 2), 0.0, upper)
        before = objective(best)
        f(a, b)
        if objective(min(seen, key=objective)) >= before:
            sigma = max(sigma * 0.8, 1e-3)
    personal_loss, global_loss = seen[(1.0, 0.0)], seen[(0.0, 1.0)]
    ceiling = min(personal_loss, global_loss)
    eligible = [p for p, v in seen.items() if v <= ceiling]
    a, b = min(eligible, key=objective)
    return FusionResult(a, b, seen[(a, b)], personal_loss, global_loss, len(seen))
