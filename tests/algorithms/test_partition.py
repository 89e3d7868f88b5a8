import numpy as np
import pytest

from edge_runtime.algorithms.partition import label_histogram, partition_dirichlet, split_train_val_test
from edge_runtime.errors import ConfigError

LABELS = np.repeat(np.arange(10), 200)  # 2,000 examples, 10 balanced classes


def _mean_label_entropy(shards):
    hist = label_histogram(LABELS, shards, 10).astype(float)
    p = hist / hist.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
    return ent.mean()


def test_same_seed_same_split_and_different_seed_differs():
    a = partition_dirichlet(LABELS, 8, 0.5, np.random.default_rng(7))
    b = partition_dirichlet(LABELS, 8, 0.5, np.random.default_rng(7))
    c = partition_dirichlet(LABELS, 8, 0.5, np.random.default_rng(8))
    assert a == b
    assert a != c


def test_every_example_assigned_exactly_once():
    shards = partition_dirichlet(LABELS, 8, 0.1, np.random.default_rng(0))
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(len(LABELS)))
    assert min(len(s) for s in shards) >= 10


def test_label_skew_grows_as_alpha_shrinks():
    ent = {a: np.mean([_mean_label_entropy(partition_dirichlet(LABELS, 8, a, np.random.default_rng(s)))
                       for s in range(5)]) for a in (0.1, 0.5, 100.0)}
    assert ent[0.1] < ent[0.5] < ent[100.0]
    assert ent[100.0] > 0.95 * np.log(10)   # near uniform over the 10 labels
    assert ent[0.1] < 0.5 * np.log(10)      # a few labels per device


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_devices=0, alpha=1.0), "n_devices"),
    (dict(n_devices=4, alpha=0.0), "alpha"),
    (dict(n_devices=400, alpha=1.0), "cannot give"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        partition_dirichlet(LABELS, rng=np.random.default_rng(0), **kwargs)


def test_train_val_test_split_is_a_partition():
    tr, va, te = split_train_val_test(list(range(100)), (0.8, 0.1, 0.1), np.random.default_rng(0))
    assert (len(tr), len(va), len(te)) == (80, 10, 10)
    assert sorted(tr + va + te) == list(range(100))
    tr, va, te = split_train_val_test([1, 2, 3], (0.8, 0.1, 0.1), np.random.default_rng(0))
    assert len(va) == 1 and len(te) == 1 and len(tr) == 1
    with pytest.raises(ConfigError, match="sum"):
        split_train_val_test([1, 2], (0.5, 0.1, 0.1), np.random.default_rng(0))
