"""FedPepTAO's layer score, its weighted combination and the top-r*L selection, on hand-built numbers."""

import math

import pytest
import torch

from edge_runtime.algorithms.layer_score import EIG_EPS, combine_scores, layer_score, select_layers
from edge_runtime.errors import AggregationError, ConfigError


def _s(eigs):
    return sum(math.log(e + EIG_EPS) + 1 / (e + EIG_EPS) for e in eigs)


def test_orthogonal_examples_give_the_identity_kernel():
    x = torch.tensor([[3.0, 0.0, 0.0], [0.0, -2.0, 0.0]])  # cosine K = I: eigenvalues 1, 1
    assert layer_score(x) == pytest.approx(_s([1.0, 1.0]), rel=1e-9)


def test_identical_examples_give_a_rank_one_kernel():
    x = torch.tensor([[1.0, 2.0], [2.0, 4.0]])  # parallel rows: K = [[1, 1], [1, 1]], eigenvalues 0 and 2
    assert layer_score(x) == pytest.approx(_s([0.0, 2.0]), rel=1e-6)
    assert layer_score(x) > 1e4  # 1 / (0 + 1e-5) dominates: redundant features score high


def test_features_are_flattened_per_example_and_scale_free():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, -1.0]]])  # rows (1,0,0,1), (1,0,0,-1): cos 0
    assert layer_score(x) == pytest.approx(_s([1.0, 1.0]), rel=1e-9)
    assert layer_score(7.0 * x) == pytest.approx(layer_score(x), rel=1e-12)


def test_a_known_two_by_two_kernel():
    # rows at 60 degrees: cos = 0.5, K = [[1, .5], [.5, 1]], eigenvalues 1.5 and 0.5
    x = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    assert layer_score(x) == pytest.approx(_s([1.5, 0.5]), rel=1e-7)  # float32 input


def test_one_example_is_refused():
    with pytest.raises(ConfigError, match="at least 2"):
        layer_score(torch.ones(1, 4))


def test_combine_weights_by_data_size():
    combined = combine_scores([([1.0, 10.0], 1), ([5.0, 2.0], 3)])
    assert combined == pytest.approx([0.25 * 1 + 0.75 * 5, 0.25 * 10 + 0.75 * 2])


def test_combine_refuses_mismatched_or_non_finite_reports():
    with pytest.raises(AggregationError, match="different numbers of layers"):
        combine_scores([([1.0, 2.0], 1), ([1.0], 1)])
    with pytest.raises(AggregationError, match="not finite"):
        combine_scores([([1.0, float("nan")], 1)])
    with pytest.raises(AggregationError):
        combine_scores([])


def test_select_takes_ceil_r_L_best_layers_in_layer_order():
    scores = [3.0, 9.0, 1.0, 9.0, 5.0]
    assert select_layers(scores, 0.5) == [1, 3, 4]     # ceil(2.5) = 3
    assert select_layers(scores, 0.2) == [1]            # tie between 1 and 3 goes to the lower layer
    assert select_layers(scores, 1.0) == [0, 1, 2, 3, 4]
    assert select_layers(scores, 0.01) == [1]           # at least one layer
    with pytest.raises(ConfigError):
        select_layers(scores, 0.0)
