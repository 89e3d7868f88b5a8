"""FedPepTAO's layer scores: which layers' prompts matter most, from one batch of frozen features.

For layer ``l`` a device runs its frozen model (no prompts) on one batch, flattens each example's
hidden states after that layer into a row of ``X``, and scores the batch's cosine-similarity
matrix ``K = normalise(X) normalise(X)^T`` by ``sum_j log(lambda_j) + 1 / lambda_j`` over
``K``'s eigenvalues (each + 1e-5). The server sums the devices' scores weighted by ``n_k / N`` and
shares the prompts of the ``ceil(r * L)`` highest-scoring layers. Pure functions, no model code.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from edge_runtime.errors import AggregationError, ConfigError

EIG_EPS = 1e-5


def layer_score(features: Tensor) -> float:
    """Score of one layer from ``features`` ``[batch, ...]`` (each example flattened to one row)."""
    x = features.detach().reshape(features.shape[0], -1).to(torch.float64)
    if x.shape[0] < 2:
        raise ConfigError("layer_score needs a batch of at least 2 examples")
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    eig = torch.linalg.eigvalsh(x @ x.T).clamp_min(0.0) + EIG_EPS   # K is PSD: tiny negatives are rounding
    return float((eig.log() + 1.0 / eig).sum())


def combine_scores(reports: Sequence[tuple[Sequence[float], float]]) -> list[float]:
    """``sum_k (n_k / N) * s_k``: the devices' per-layer scores weighted by their data sizes."""
    if not reports:
        raise AggregationError("no layer scores to combine")
    n_layers = len(reports[0][0])
    if any(len(s) != n_layers for s, _ in reports):
        raise AggregationError(f"devices reported scores for different numbers of layers: "
                               f"{sorted({len(s) for s, _ in reports})}")
    total = float(sum(n for _, n in reports))
    if not total > 0 or any(not n >= 0 for _, n in reports):
        raise AggregationError("layer-score weights must be >= 0 and sum to > 0")
    out = [0.0] * n_layers
    for scores, n in reports:
        for i, s in enumerate(scores):
            if not math.isfinite(s):
                raise AggregationError(f"layer score {i} is not finite ({s})")
            out[i] += n / total * float(s)
    return out


def select_layers(scores: Sequence[float], ratio: float) -> list[int]:
    """The ``ceil(ratio * L)`` best-scoring layers (at least one), in layer order; ties to the lower layer."""
    if not 0 < ratio <= 1:
        raise ConfigError(f"share ratio must be in (0, 1], got {ratio}")
    k = max(1, math.ceil(ratio * len(scores) - 1e-9))
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:k])
