import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.algorithms.aggregation import weighted_mean
from edge_runtime.errors import AggregationError


def test_weighted_mean_hand_computed():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([[4.0]])}
    out = weighted_mean([(a, 1.0), (b, 3.0)])
    # (1*1 + 3*3)/4 = 2.5, (2*1 + 6*3)/4 = 5.0, (0 + 4*3)/4 = 3.0
    assert torch.equal(out["w"], torch.tensor([2.5, 5.0]))
    assert torch.equal(out["b"], torch.tensor([[3.0]]))


def test_zero_weight_update_is_ignored_and_dtype_kept():
    a = {"w": torch.tensor([1.0], dtype=torch.float16)}
    b = {"w": torch.tensor([100.0], dtype=torch.float16)}
    out = weighted_mean([(a, 5), (b, 0)])
    assert out["w"].dtype == torch.float16 and out["w"].item() == 1.0


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.lists(st.floats(0.1, 1e4), min_size=1, max_size=6), st.integers(0, 2**31 - 1))
def test_identical_updates_aggregate_to_themselves(n, weights, seed):
    g = torch.Generator().manual_seed(seed)
    state = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}
    out = weighted_mean([(state, w) for w in weights[:n]])
    for k in state:
        torch.testing.assert_close(out[k], state[k], rtol=1e-6, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.permutations(range(4)))
def test_order_does_not_matter(perm):
    g = torch.Generator().manual_seed(0)
    ups = [({"x": torch.randn(6, generator=g)}, float(i + 1)) for i in range(4)]
    ref = weighted_mean(ups)
    out = weighted_mean([ups[i] for i in perm])
    torch.testing.assert_close(out["x"], ref["x"], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"w": torch.zeros(3)}, "shape"),
        ({"w": torch.zeros(2, dtype=torch.float64)}, "dtype"),
        ({"v": torch.zeros(2)}, "keys differ"),
        ({"w": torch.tensor([1.0, math.nan])}, "NaN"),
        ({"w": torch.tensor([1.0, math.inf])}, "NaN or Inf"),
    ],
)
def test_incompatible_updates_are_rejected_with_reason(bad, message):
    with pytest.raises(AggregationError, match=message):
        weighted_mean([({"w": torch.zeros(2)}, 1.0), (bad, 1.0)])


@pytest.mark.parametrize("weights", [[0.0, 0.0], [-1.0, 2.0], [math.nan, 1.0]])
def test_bad_weights_rejected(weights):
    s = {"w": torch.zeros(2)}
    with pytest.raises(AggregationError, match="weights"):
        weighted_mean([(s, w) for w in weights])


def test_empty_rejected():
    with pytest.raises(AggregationError, match="no updates"):
        weighted_mean([])


def test_masked_weighted_mean_on_hand_numbers():
    from edge_runtime.algorithms.aggregation import masked_weighted_mean

    g = {"x": torch.tensor([1.0, 1.0]), "y": torch.tensor([5.0])}
    a = {"x": torch.tensor([3.0, 0.0]), "y": torch.tensor([9.0])}
    b = {"x": torch.tensor([6.0, 3.0]), "y": torch.tensor([7.0])}
    out = masked_weighted_mean(g, [(a, {"x": 1.0}), (b, {"x": 2.0, "y": 0.0})])
    assert out["x"].tolist() == [5.0, 2.0]      # (1*3 + 2*6)/3, (1*0 + 2*3)/3
    assert out["y"].tolist() == [5.0]            # nobody's weight: the global stays
    with pytest.raises(AggregationError, match="weights"):
        masked_weighted_mean(g, [(a, {"x": float("nan")})])
    with pytest.raises(AggregationError, match="shape"):
        masked_weighted_mean(g, [({"x": torch.zeros(3), "y": torch.zeros(1)}, {"x": 1.0})])
