"""The server optimizers (FedAvgM, FedAdam, FedYogi, warm-up) on hand-computed numbers, and their
place in the round: after the mean and the defences, their state carried in the server state."""

import math

import pytest
import torch

from edge_runtime.algorithms.aggregation import Update
from edge_runtime.algorithms.fedopt import FedOptConfig, fedopt_step, own_state
from edge_runtime.errors import ConfigError
from edge_runtime.methods import METHODS
from edge_runtime.round.server import aggregate_checked
from edge_runtime.training.spec import TrainingSpec


def test_fedadam_two_steps_match_the_closed_form():
    cfg = FedOptConfig(optimizer="fedadam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    x0 = {"w": torch.tensor([1.0, -2.0]), "step": torch.tensor([5])}
    mean1 = {"w": torch.tensor([1.5, -2.0]), "step": torch.tensor([6])}
    x1, s1 = fedopt_step(x0, mean1, {}, cfg)
    d = torch.tensor([0.5, 0.0], dtype=torch.float64)
    m = 0.1 * d
    v = 0.99 * 1e-6 + 0.01 * d * d
    want = torch.tensor([1.0, -2.0], dtype=torch.float64) + 0.1 * m / (v.sqrt() + 1e-3)
    torch.testing.assert_close(x1["w"], want.float())
    assert x1["step"].item() == 6 and s1["fedopt.t"].item() == 1
    # the second step starts from the state the first returned
    mean2 = {"w": x1["w"] + torch.tensor([0.0, 1.0]), "step": torch.tensor([7])}
    x2, s2 = fedopt_step(x1, mean2, s1, cfg)
    d2 = torch.tensor([0.0, 1.0], dtype=torch.float64)
    m2 = 0.9 * s1["fedopt.m.w"].double() + 0.1 * d2
    v2 = 0.99 * s1["fedopt.v.w"].double() + 0.01 * d2 * d2
    torch.testing.assert_close(x2["w"], (x1["w"].double() + 0.1 * m2 / (v2.sqrt() + 1e-3)).float())
    assert s2["fedopt.t"].item() == 2
    assert x0["w"].tolist() == [1.0, -2.0]          # inputs untouched


def test_fedyogi_grows_v_additively_and_fedavgm_without_momentum_is_fedavg():
    x = {"w": torch.zeros(1)}
    mean = {"w": torch.ones(1)}
    _, s = fedopt_step(x, mean, {}, FedOptConfig(optimizer="fedyogi", beta2=0.9, tau=1e-3))
    # v0 = tau^2 < delta^2 = 1: v = v0 + (1 - beta2) * 1
    assert s["fedopt.v.w"].item() == pytest.approx(1e-6 + 0.1, rel=1e-6)
    new, _ = fedopt_step(x, mean, {}, FedOptConfig(optimizer="fedavgm", lr=1.0, beta1=0.0))
    assert new["w"].item() == 1.0
    with_m, s = fedopt_step(x, mean, {}, FedOptConfig(optimizer="fedavgm", lr=1.0, beta1=0.5))
    again, _ = fedopt_step(with_m, {"w": with_m["w"] + 1}, s, FedOptConfig(optimizer="fedavgm", lr=1.0, beta1=0.5))
    assert again["w"].item() == pytest.approx(1.0 + 1.0 + 0.5)   # momentum carries half the last step on


def test_warm_up_ramps_the_server_rate_linearly():
    cfg = FedOptConfig(optimizer="fedadam", lr=0.3, warmup_rounds=3)
    assert [cfg.rate(t) for t in (1, 2, 3, 4)] == pytest.approx([0.1, 0.2, 0.3, 0.3])
    x, mean = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    warm, _ = fedopt_step(x, mean, {}, cfg)
    cold, _ = fedopt_step(x, mean, {}, FedOptConfig(optimizer="fedadam", lr=0.3))
    assert warm["w"].item() == pytest.approx(cold["w"].item() / 3, rel=1e-6)


@pytest.mark.parametrize("bad", [dict(optimizer="adam"), dict(lr=0), dict(beta1=1.0), dict(beta2=-0.1),
                                 dict(tau=0), dict(warmup_rounds=-1), dict(warmup_rounds=1.5)])
def test_bad_settings_are_config_errors(bad):
    with pytest.raises(ConfigError, match="fedopt"):
        FedOptConfig(**bad)


def test_the_round_steps_from_the_defended_mean_and_carries_the_state_on():
    spec = TrainingSpec.from_json({**TrainingSpec(labels=("a", "b")).to_json(), "robust": {"norm_bound": "off"},
                                   "fedopt": {"optimizer": "fedadam", "lr": 0.01}})
    g = {"w": torch.zeros(2)}
    ups = [Update("d0", {"w": torch.tensor([1.0, 0.0])}, 10.0), Update("d1", {"w": torch.tensor([0.0, 1.0])}, 30.0)]
    new, server, *_ = aggregate_checked(METHODS["lora"], g, ups, {}, {}, spec, 2, 1)
    # the mean (0.25, 0.75) is the step's target; the first Adam step moves each coordinate by about
    # lr * (1 - beta1) / sqrt(1 - beta2), whatever the size of the mean's change
    delta = torch.tensor([0.25, 0.75], dtype=torch.float64)
    want = 0.01 * 0.1 * delta / ((0.99e-6 + 0.01 * delta * delta).sqrt() + 1e-3)
    torch.testing.assert_close(new["w"], want.float())
    assert set(server) == {"fedopt.t", "fedopt.m.w", "fedopt.v.w"} and own_state(server) == server
    again, server2, *_ = aggregate_checked(METHODS["lora"], new, ups, server, {}, spec, 2, 2)
    assert server2["fedopt.t"].item() == 2 and not torch.equal(again["w"], new["w"])
    assert math.isfinite(again["w"].sum().item())


def test_a_method_with_its_own_server_update_refuses_a_server_optimizer():
    with pytest.raises(ConfigError, match="fedpeptao aggregates otherwise"):
        TrainingSpec(labels=("a", "b"), method="fedpeptao", fedopt=FedOptConfig(optimizer="fedyogi"))
