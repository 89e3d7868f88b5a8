"""Bounded influence on hand-computed numbers: weight caps, the norm bound, median, trimmed mean."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.algorithms.aggregation import Update
from edge_runtime.algorithms.robust import (RobustConfig, cap_shares, clip_to,
                                            coordinate_median, defend,
                                            delta_norm, trimmed_mean)
from edge_runtime.errors import AggregationError, ConfigError

G = {"w": torch.zeros(2), "b": torch.zeros(1)}


def _u(dev, w, b=0.0, n=100.0):
    return Update(dev, {"w": torch.tensor(w, dtype=torch.float32), "b": torch.tensor([b])}, n)


def test_cap_shares_water_fills_the_largest_to_one_level():
    # 1e9 among 100, 200, 300 with a 0.5 cap: the giant is lowered to the rest's total (600)
    assert cap_shares([100, 200, 300, 1e9], 0.5) == [100, 200, 300, 600]
    # two large ones share the level: c = 0.4 * 100 / (1 - 0.4 * 2) = 200, shares 200/500 = 0.4
    assert cap_shares([100, 1000, 5000], 0.4) == pytest.approx([100, 200, 200])
    assert cap_shares([1, 1, 1], 0.5) == [1, 1, 1]              # nothing above the cap: unchanged
    assert cap_shares([5, 1], 0.5) == [1, 1]                    # two devices: at most half each
    assert cap_shares([9, 1, 2], 0.3) == [4, 4, 4]              # 0.3 x 3 < 1: only equal weights come close
    assert cap_shares([3, 7], 1.0) == [3, 7]
    # found by Hypothesis: a zero weight and a cap of 1/3 used to divide by zero (rounding walked the
    # water level down to it); a cap of exactly 1/n gave two levels instead of equal weights
    assert cap_shares([0.0, 1.0, 1.0, 2.0], 1 / 3) == pytest.approx([0.0, 1.0, 1.0, 1.0])
    assert cap_shares([1.0, 1.0, 2.0], 1 / 3) == pytest.approx([1.0, 1.0, 1.0])
    assert cap_shares([0.0, 0.0, 5.0], 0.5) == [0.0, 0.0, 5.0]   # one positive weight: it is the mean of itself


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.just(0.0), st.floats(1e-3, 1e9)), min_size=1, max_size=12), st.floats(0.05, 1.0))
def test_cap_shares_never_leaves_a_share_above_the_cap(weights, share):
    out = cap_shares(weights, share)
    total = sum(out)
    if total <= 0:
        return
    positive = [o for o, w in zip(out, weights) if w > 0]
    assert all(o == 0 for o, w in zip(out, weights) if w == 0)   # a zero weight stays zero
    if share * len(positive) > 1 + 1e-9:
        assert max(out) / total <= share * (1 + 1e-6)
        assert all(o <= w * (1 + 1e-9) for o, w in zip(out, weights))   # only lowered, never raised
    else:
        assert max(positive) - min(positive) <= 1e-9 * max(positive)   # equal weights


def test_norm_and_clip_keep_the_direction():
    u = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0])}
    assert delta_norm(u, G) == pytest.approx(5.0)
    c = clip_to(u, G, 5.0, 1.0)
    assert torch.allclose(c["w"], torch.tensor([0.6, 0.8])) and c["w"].dtype == torch.float32
    g1 = {"w": torch.ones(2), "b": torch.ones(1)}
    assert delta_norm({"w": torch.tensor([4.0, 5.0]), "b": torch.ones(1)}, g1) == pytest.approx(5.0)


def test_median_and_trimmed_mean_by_hand():
    states = [{"w": torch.tensor([1.0, 10.0])}, {"w": torch.tensor([2.0, -5.0])}, {"w": torch.tensor([100.0, 0.0])}]
    assert coordinate_median(states)["w"].tolist() == [2.0, 0.0]
    four = states + [{"w": torch.tensor([3.0, 1.0])}]
    assert coordinate_median(four)["w"].tolist() == [2.5, 0.5]          # mean of the middle two
    # trim 0.25 of 4: drop the lowest and highest of each coordinate, average the middle two
    assert trimmed_mean(four, 0.25)["w"].tolist() == [2.5, 0.5]
    assert trimmed_mean(four, 0.0)["w"].tolist() == [26.5, 1.5]       # no trim: the plain mean
    assert trimmed_mean(states, 0.2)["w"].tolist() == pytest.approx([103 / 3, 5 / 3])   # floor(0.6) = 0 cut
    with pytest.raises(AggregationError):
        coordinate_median([])


def test_defend_caps_a_declared_billion_and_clips_a_huge_update():
    honest = [_u("d0", [1.0, 0.0], n=100), _u("d1", [0.0, 1.0], n=200), _u("d2", [1.0, 1.0], n=300)]
    liar = _u("d3", [1.0, 1.0], n=1e9)
    huge = _u("d4", [3e6, 4e6], n=100)
    out, rep = defend(G, [*honest, liar, huge], RobustConfig(max_samples=10_000, max_share=0.5, norm_multiple=3.0))
    by = {u.device_id: u for u in out}
    # norms 1, 1, sqrt2, sqrt2, 5e6: the lower median is sqrt2, the bound 3 sqrt2
    assert rep["median_norm"] == pytest.approx(math.sqrt(2)) and rep["bound"] == pytest.approx(3 * math.sqrt(2))
    assert rep["clipped"] == ["d4"]
    assert delta_norm(by["d4"].tensors, G) == pytest.approx(3 * math.sqrt(2), rel=1e-6)
    assert by["d4"].tensors["w"][1] / by["d4"].tensors["w"][0] == pytest.approx(4 / 3)
    # 1e9 -> 10,000 (the server's cap) -> 700, half the round's weight (100 + 200 + 300 + 100 others)
    assert by["d3"].n_samples == pytest.approx(700.0)
    assert rep["capped"]["d3"] == [1e9, pytest.approx(700.0)]
    assert [by[d].n_samples for d in ("d0", "d1", "d2", "d4")] == [100, 200, 300, 100]


def test_the_median_weight_bounds_a_liar_and_two_updates_keep_honest_differences():
    g = {"w": torch.zeros(1)}
    two = [Update("d0", {"w": torch.ones(1)}, 10.0), Update("d1", {"w": torch.ones(1)}, 30.0)]
    out, rep = defend(g, two, RobustConfig())
    assert [u.n_samples for u in out] == [10.0, 30.0] and rep["capped"] == {}   # 3x the other: counted as is
    liar = [Update("d0", {"w": torch.ones(1)}, 10.0), Update("d1", {"w": torch.ones(1)}, 1e6)]
    out, rep = defend(g, liar, RobustConfig())
    assert [u.n_samples for u in out] == [10.0, 40.0] and rep["capped"] == {"d1": [1e6, 40.0]}   # 4 x the median


def test_defend_with_enrolment_caps_reject_and_fixed_bounds():
    ups = [_u("d0", [1.0, 0.0], n=500), _u("d1", [0.0, 2.0], n=500), _u("d2", [30.0, 40.0], n=500)]
    out, rep = defend(G, ups, RobustConfig(max_share=1.0, norm_bound="fixed", max_norm=10.0, on_norm="reject"),
                      sample_caps={"d0": 50, "d1": None})
    assert [u.device_id for u in out] == ["d0", "d1"] and "d2" in rep["rejected"]
    assert "delta norm 50 over the bound 10" in rep["rejected"]["d2"]
    assert [u.n_samples for u in out] == [50, 500]                   # d0's enrolled cap
    with pytest.raises(AggregationError, match="every update was rejected"):
        defend(G, [ups[2]], RobustConfig(norm_bound="fixed", max_norm=1.0, on_norm="reject"))
    same, rep = defend(G, ups, RobustConfig(max_share=1.0, norm_bound="off"))
    assert rep["clipped"] == [] and rep["bound"] is None and all(a is b for a, b in
                                                                 zip([u.tensors for u in same], [u.tensors for u in ups]))


@pytest.mark.parametrize("kw,msg", [({"max_share": 0}, "max_share"), ({"norm_bound": "fixed"}, "max_norm"),
                                    ({"aggregator": "krum"}, "aggregator"), ({"trim": 0.5}, "trim"),
                                    ({"on_norm": "drop"}, "on_norm"), ({"max_samples": 0}, "max_samples"),
                                    ({"norm_multiple": 0.5}, "norm_multiple"),
                                    ({"weight_multiple": 0.9}, "weight_multiple")])
def test_bad_robust_settings_name_the_field(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        RobustConfig(**kw)
