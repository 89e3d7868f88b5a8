"""Non-IID data partitioning: a seeded Dirichlet label split, and per-device train/val/test splits."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from edge_runtime.errors import ConfigError


def partition_dirichlet(
    labels: Sequence[int],
    n_devices: int,
    alpha: float,
    rng: np.random.Generator,
    min_per_device: int = 10,
    max_tries: int = 100,
) -> list[list[int]]:
    """Split example indices over devices with per-class proportions drawn from Dir(alpha).

    Small ``alpha`` (0.1) gives each device few labels; large ``alpha`` (100) is near IID.
    Redraws (up to ``max_tries``) until every device holds at least ``min_per_device`` examples.
    Returns one sorted index list per device; every index appears exactly once.
    """
    if n_devices < 1:
        raise ConfigError(f"n_devices must be >= 1, got {n_devices}")
    if not alpha > 0:
        raise ConfigError(f"alpha must be > 0, got {alpha}")
    labels_arr = np.asarray(labels)
    if len(labels_arr) < n_devices * min_per_device:
        raise ConfigError(f"{len(labels_arr)} examples cannot give {n_devices} devices "
                          f"{min_per_device} each (lower min_per_device or use more data)")
    classes = np.unique(labels_arr)
    for _ in range(max_tries):
        shards: list[list[int]] = [[] for _ in range(n_devices)]
        for c in classes:
            idx = np.flatnonzero(labels_arr == c)
            rng.shuffle(idx)
            props = rng.dirichlet(np.full(n_devices, alpha))
            cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
            for dev, part in enumerate(np.split(idx, cuts)):
                shards[dev].extend(part.tolist())
        if min(len(s) for s in shards) >= min_per_device:
            return [sorted(s) for s in shards]
    raise ConfigError(f"no Dirichlet(alpha={alpha}) draw in {max_tries} tries gave every one of "
                      f"{n_devices} devices >= {min_per_device} examples; raise alpha or use more data")


def split_train_val_test(
    indices: Sequence[int], fractions: tuple[float, float, float], rng: np.random.Generator
) -> tuple[list[int], list[int], list[int]]:
    """Shuffle ``indices`` and cut them into train / validation / test by ``fractions`` (sum 1).

    Validation and test get at least one example each when there are at least three.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ConfigError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    idx = np.array(indices)
    rng.shuffle(idx)
    n = len(idx)
    n_val = int(round(n * fractions[1]))
    n_test = int(round(n * fractions[2]))
    if n >= 3:
        n_val = max(n_val, 1 if fractions[1] > 0 else 0)
        n_test = max(n_test, 1 if fractions[2] > 0 else 0)
    n_train = n - n_val - n_test
    return idx[:n_train].tolist(), idx[n_train:n_train + n_val].tolist(), idx[n_train + n_val:].tolist()


def label_histogram(labels: Sequence[int], shards: Sequence[Sequence[int]], n_labels: int) -> np.ndarray:
    """Counts of each label on each device: shape (n_devices, n_labels)."""
    hist = np.zeros((len(shards), n_labels), dtype=np.int64)
    lab = np.asarray(labels)
    for d, shard in enumerate(shards):
        if len(shard):
            hist[d] = np.bincount(lab[np.asarray(shard)], minlength=n_labels)
    return hist
