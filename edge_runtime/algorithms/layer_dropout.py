"""Stochastic transformer-layer dropout (DropPEFT, seed 001): per-layer drop probabilities and
the per-step draw of the layers that run. Pure functions, no model.

A configuration is a mean drop ratio ``p`` and a shape over depth:

- ``uniform``: every layer has ``p``;
- ``increasing``: ``p_l`` grows linearly with depth (deep layers are dropped more often);
- ``decreasing``: the mirror image.

The shaped probabilities keep the mean exactly ``p`` and are capped at ``cap`` (no layer is
dropped at every step, so every adapter keeps learning); what a cap cuts off is spread over the
other layers.

Each step keeps *exactly* ``round-down or round-up of sum(1 - p_l)`` layers, drawn by randomised
systematic sampling, so layer ``l`` runs with probability exactly ``1 - p_l`` and the number of
layers that run never exceeds ``max_kept``: the memory model can price a hard bound instead of a
quantile (ALGORITHMS.md allows either; a hard bound cannot be exceeded by an unlucky draw).
"""

from __future__ import annotations

import math

import torch

SHAPES = ("uniform", "increasing", "decreasing")
SCHEDULES = ("constant", "linear")


def schedule_scale(schedule: str, round_: int, rounds: int) -> float:
    """The share of the configured drop ratio that round ``round_`` (1-based) uses: 1 throughout
    for ``constant``; for ``linear``, 1 in round 1 falling by ``1 / rounds`` a round to 0 from
    round ``rounds + 1`` on (more dropout early, when the adapters are far from any optimum and
    cheap rough steps pay most; the whole network once they are close)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if rounds < 1:
        raise ValueError(f"schedule rounds must be >= 1, got {rounds}")
    if schedule == "constant":
        return 1.0
    return max(0.0, 1.0 - (max(round_, 1) - 1) / rounds)


def keep_scales(probs: list[float], kept: list[int]) -> dict[int, float]:
    """LayerDrop-style rescaling: each kept block's residual branch times ``1 / (1 - p_l)``, so
    that over the draws a block adds, in expectation, what it adds when every block runs."""
    return {l: 1.0 / (1.0 - probs[l]) for l in kept if probs[l] > 0}


def drop_probabilities(n_layers: int, ratio: float, shape: str = "uniform", cap: float = 0.95) -> list[float]:
    """Per-layer drop probabilities ``p_0 .. p_{L-1}`` with mean ``ratio`` (each in ``[0, cap]``)."""
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    if not 0 < cap <= 1:
        raise ValueError(f"cap must be in (0, 1], got {cap}")
    if not 0 <= ratio <= cap:
        raise ValueError(f"drop ratio must be in [0, {cap}], got {ratio}")
    if shape == "uniform" or n_layers == 1 or ratio == 0:
        return [float(ratio)] * n_layers
    weights = [(l + 1) for l in range(n_layers)]          # linear in depth, mean (L+1)/2
    if shape == "decreasing":
        weights.reverse()
    probs = [ratio * w * 2 / (n_layers + 1) for w in weights]
    # cap and spread the excess over the layers below the cap (water-filling; ends in <= L passes)
    for _ in range(n_layers):
        over = sum(max(0.0, q - cap) for q in probs)
        if over <= 1e-12:
            break
        free = [i for i, q in enumerate(probs) if q < cap]
        probs = [min(q, cap) for q in probs]
        room = sum(cap - probs[i] for i in free)
        for i in free:
            probs[i] += over * (cap - probs[i]) / room
    return probs


def max_kept(probs: list[float]) -> int:
    """The most layers one step can run: ``ceil(sum(1 - p_l))`` (what memory is budgeted for)."""
    return max(1, math.ceil(sum(1 - q for q in probs) - 1e-9))


def sample_kept(probs: list[float], gen: torch.Generator) -> list[int]:
    """The layers that run this step (sorted), each with probability ``1 - p_l``; their count is
    ``floor`` or ``ceil`` of ``sum(1 - p_l)`` and never 0.

    Randomised systematic sampling: lay the keep probabilities end to end in a random order and
    take the layers that contain the points ``u, u + 1, u + 2, ...`` for one uniform ``u``.
    """
    n = len(probs)
    keep = [1.0 - q for q in probs]
    order = torch.randperm(n, generator=gen).tolist()
    u = float(torch.rand((), generator=gen))
    chosen, acc = [], 0.0
    for i in order:
        lo, acc = acc, acc + keep[i]
        if math.ceil(acc - u) > math.ceil(lo - u):   # one of the points u + m falls in [lo, acc)
            chosen.append(i)
    if not chosen:   # only when sum(1 - p_l) < 1: run the likeliest layer rather than none
        chosen = [max(range(n), key=lambda i: keep[i])]
    return sorted(chosen)
