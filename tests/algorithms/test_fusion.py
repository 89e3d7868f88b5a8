import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.algorithms.fusion import search_fusion


def test_finds_the_minimum_of_a_smooth_bowl_within_the_budget():
    calls = []

    def loss(a, b):
        calls.append((a, b))
        return (a - 0.7) ** 2 + (b - 1.3) ** 2 + 0.5

    res = search_fusion(loss, budget=40, upper=2.0, l1=0.0, seed=0)
    assert len(calls) == res.evaluations <= 40
    assert abs(res.a - 0.7) < 0.15 and abs(res.b - 1.3) < 0.15
    assert res.personal_loss == pytest.approx(loss(1.0, 0.0)) and res.global_loss == pytest.approx(loss(0.0, 1.0))
    assert all(0.0 <= a <= 2.0 and 0.0 <= b <= 2.0 for a, b in calls)


def test_l1_penalty_prefers_smaller_scales_on_a_flat_loss():
    res = search_fusion(lambda a, b: 1.0, budget=30, l1=0.1, seed=1)
    assert res.a + res.b <= 1.0 + 1e-9  # one of the anchors (1, 0) / (0, 1): the cheapest eligible points


def test_nan_losses_are_never_chosen():
    res = search_fusion(lambda a, b: math.nan if a > 0.5 and b > 0.5 else a + b + 1.0, budget=20, seed=2)
    assert math.isfinite(res.loss)


def test_budget_below_three_is_an_error():
    with pytest.raises(ValueError, match="budget"):
        search_fusion(lambda a, b: 0.0, budget=2)


@settings(max_examples=60, deadline=None)
@given(st.floats(-3, 3), st.floats(-3, 3), st.floats(-3, 3), st.floats(0, 1), st.integers(0, 10_000))
def test_never_worse_than_the_better_single_adapter(c1, c2, c3, l1, seed):
    """Any loss surface: the chosen point's loss <= min(loss(1, 0), loss(0, 1))."""
    def loss(a, b):
        return math.sin(c1 * a) + math.cos(c2 * b) + c3 * a * b

    res = search_fusion(loss, budget=25, l1=l1, seed=seed)
    assert res.loss <= min(res.personal_loss, res.global_loss) + 1e-12
