"""Layer-dropout probabilities and the per-step draw: exact means, caps, counts and frequencies."""

import collections

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.algorithms.layer_dropout import SHAPES, drop_probabilities, max_kept, sample_kept


@given(n=st.integers(1, 40), ratio=st.floats(0, 0.95), shape=st.sampled_from(SHAPES))
@settings(max_examples=200, deadline=None)
def test_probabilities_keep_the_mean_and_the_cap(n, ratio, shape):
    p = drop_probabilities(n, ratio, shape)
    assert len(p) == n
    assert sum(p) / n == pytest.approx(ratio, abs=1e-9)
    assert all(-1e-12 <= q <= 0.95 + 1e-12 for q in p)
    if shape == "increasing" and 1e-6 < ratio <= 0.45 and n > 1:   # (denormal ratios underflow)
        assert all(a < b for a, b in zip(p, p[1:]))
    if shape == "decreasing" and 1e-6 < ratio <= 0.45 and n > 1:
        assert all(a > b for a, b in zip(p, p[1:]))


def test_hand_numbers():
    assert drop_probabilities(3, 0.5, "increasing") == pytest.approx([0.25, 0.5, 0.75])   # 0.5 x 2l/(L+1)
    assert drop_probabilities(3, 0.5, "decreasing") == pytest.approx([0.75, 0.5, 0.25])
    # 0.8 x (0.5, 1, 1.5) = 0.4, 0.8, 1.2: capped at 0.95, the excess 0.25 goes to the others by their room
    p = drop_probabilities(3, 0.8, "increasing")
    assert p[2] == pytest.approx(0.95) and sum(p) == pytest.approx(2.4)
    assert max_kept(drop_probabilities(6, 0.5)) == 3 and max_kept(drop_probabilities(6, 0.6)) == 3
    assert max_kept(drop_probabilities(30, 0.6)) == 12      # 30 x 0.4 = 12.000000000000002 must not round up
    with pytest.raises(ValueError):
        drop_probabilities(4, 0.99)
    with pytest.raises(ValueError):
        drop_probabilities(4, 0.5, "sideways")


@pytest.mark.parametrize("n,ratio,shape", [(6, 0.5, "increasing"), (12, 0.3, "decreasing"), (5, 0.7, "uniform"),
                                           (7, 0.45, "increasing")])
def test_each_layer_is_kept_with_its_probability_and_the_count_is_bounded(n, ratio, shape):
    p = drop_probabilities(n, ratio, shape)
    gen = torch.Generator().manual_seed(0)
    draws = 20000
    kept, sizes = collections.Counter(), collections.Counter()
    for _ in range(draws):
        k = sample_kept(p, gen)
        assert k == sorted(set(k)) and all(0 <= i < n for i in k)
        sizes[len(k)] += 1
        kept.update(k)
    for l in range(n):   # binomial sd <= 0.0036 at 20000 draws
        assert kept[l] / draws == pytest.approx(1 - p[l], abs=0.015)
    mean = sum(1 - q for q in p)
    assert set(sizes) <= {int(mean), max_kept(p)} and max(sizes) <= max_kept(p)


def test_the_linear_schedule_drops_more_early_and_nothing_after_its_rounds():
    from edge_runtime.algorithms.layer_dropout import keep_scales, schedule_scale

    assert [schedule_scale("linear", r, 4) for r in range(1, 7)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert [schedule_scale("constant", r, 4) for r in (1, 5, 50)] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        schedule_scale("cosine", 1, 4)
    with pytest.raises(ValueError):
        schedule_scale("linear", 1, 0)
    # 1 / (1 - p_l) for the kept blocks that could have been dropped; a block never dropped keeps 1
    assert keep_scales([0.5, 0.0, 0.75, 0.2], [0, 1, 2]) == {0: 2.0, 2: 4.0}
