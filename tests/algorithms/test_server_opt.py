"""FedPepTAO's server update on hand-computed numbers (two rounds, control variates, a newcomer's c_k = 0)."""

import pytest
import torch

from edge_runtime.algorithms.aggregation import Update
from edge_runtime.algorithms.server_opt import ServerOptConfig, server_update
from edge_runtime.errors import AggregationError, ConfigError


def _t(x):
    return torch.tensor([x], dtype=torch.float32)


def _upd(dev, theta, ck, n, k):
    return Update(dev, {"prompt.0": _t(theta), "cv.prompt.0": _t(ck)}, n, k)


def test_two_rounds_by_hand():
    glob = {"prompt.0": _t(1.0), "cv.prompt.0": _t(0.2)}
    # round 1: p = (1/4, 3/4); w_bar = .8; Delta = .2; g = 0 - .2; correction = c - sum p c_k(old = 0) = .2
    # v = .1 * -.2 + .2 = .18; w = .8 - .05 * .18 = .791; c = .2 + (2/4)((2/8)(.4) + (6/8)(-.2)) = .175
    g1, s1 = server_update(glob, [_upd("A", 0.5, 0.4, 1, 2), _upd("B", 0.9, -0.2, 3, 6)], {}, ServerOptConfig(), 4)
    assert g1["prompt.0"].item() == pytest.approx(0.791, abs=1e-7)
    assert g1["cv.prompt.0"].item() == pytest.approx(0.175, abs=1e-7)
    assert s1["v.prompt.0"].item() == pytest.approx(0.18, abs=1e-7)
    assert s1["dprev.prompt.0"].item() == pytest.approx(0.2, abs=1e-7)
    assert s1["ck.A.prompt.0"].item() == pytest.approx(0.4) and s1["ck.B.prompt.0"].item() == pytest.approx(-0.2)
    assert int(s1["round"]) == 1
    # round 2, A alone: eta = .05 * .99; w_bar = .7; Delta = .091; g = .2 - .091 = .109
    # correction = .175 - .4 = -.225; v = .9 * .18 + .1 * .109 - .225 = -.0521; w = .7 + .0495 * .0521
    # c = .175 + (1/4)(.1 - .4) = .1; B's recorded c_k is kept
    g2, s2 = server_update(g1, [_upd("A", 0.7, 0.1, 1, 2)], s1, ServerOptConfig(), 4)
    assert g2["prompt.0"].item() == pytest.approx(0.7 + 0.0495 * 0.0521, abs=1e-6)
    assert g2["cv.prompt.0"].item() == pytest.approx(0.1, abs=1e-6)
    assert s2["v.prompt.0"].item() == pytest.approx(-0.0521, abs=1e-6)
    assert s2["ck.A.prompt.0"].item() == pytest.approx(0.1) and s2["ck.B.prompt.0"].item() == pytest.approx(-0.2)


def test_fedavg_mode_is_the_weighted_mean_and_the_learning_rate_floor_holds():
    glob = {"prompt.0": _t(1.0), "cv.prompt.0": _t(0.0)}
    ups = [_upd("A", 0.5, 0.0, 1, 2), _upd("B", 0.9, 0.0, 3, 6)]
    g, _ = server_update(glob, ups, {}, ServerOptConfig(mode="fedavg"), 2)
    assert g["prompt.0"].item() == pytest.approx(0.8)
    # after many rounds eta sits at its floor: w = w_bar - 1e-4 * v
    g, s = server_update(glob, ups, {"round": torch.tensor(10_000)}, ServerOptConfig(), 2)
    v = s["v.prompt.0"].item()
    assert g["prompt.0"].item() == pytest.approx(0.8 - 1e-4 * v, abs=1e-7)


def test_momentum_mode_without_control_variates():
    glob = {"prompt.0": _t(1.0)}
    ups = [Update("A", {"prompt.0": _t(0.6)}, 1, 1)]
    g, s = server_update(glob, ups, {}, ServerOptConfig(mode="momentum", beta=0.5), 1)
    assert g["prompt.0"].item() == pytest.approx(0.6) and set(g) == {"prompt.0"}   # v = Delta = .4
    g2, _ = server_update(g, [Update("A", {"prompt.0": _t(0.5)}, 1, 1)], s, ServerOptConfig(mode="momentum", beta=0.5), 1)
    assert g2["prompt.0"].item() == pytest.approx(0.6 - (0.5 * 0.4 + 0.1))


def test_bad_updates_and_settings_are_refused():
    glob = {"prompt.0": _t(1.0)}
    with pytest.raises(AggregationError, match="NaN"):
        server_update(glob, [Update("A", {"prompt.0": _t(float("nan"))}, 1, 1)], {}, ServerOptConfig(), 1)
    with pytest.raises(AggregationError, match="keys differ"):
        server_update(glob, [Update("A", {"prompt.1": _t(0.0)}, 1, 1)], {}, ServerOptConfig(), 1)
    with pytest.raises(ConfigError):
        ServerOptConfig(mode="adam")
