"""DP-FedAvg: the clip and the mean on hand-computed numbers, the noise's scale, the accountant's
epsilon against the Gaussian mechanism's closed forms, and the spec's checks."""

import dataclasses
import math

import pytest
import torch

from edge_runtime.algorithms.aggregation import Update
from edge_runtime.algorithms.dp import (DPConfig, dp_mean, epsilon,
                                        privacy_spent)
from edge_runtime.errors import ConfigError
from edge_runtime.methods import METHODS
from edge_runtime.round.server import aggregate_checked
from tests.fleet_helpers import toy_spec


def _u(dev, values, n=10.0):
    return Update(dev, {"w": torch.tensor(values, dtype=torch.float32), "step": torch.tensor(3)}, n, 1, {}, ())


G = {"w": torch.zeros(2), "step": torch.tensor(3)}


def test_each_delta_is_clipped_then_averaged_with_equal_weight():
    # norms 5 and 0.5; clip 1: (3, 4) -> (0.6, 0.8); the mean ignores n_samples (1000 vs 1)
    out, report = dp_mean(G, [_u("a", [3.0, 4.0], n=1000), _u("b", [0.3, 0.4], n=1)], DPConfig(clip=1.0))
    torch.testing.assert_close(out["w"], torch.tensor([0.45, 0.6]))
    assert out["step"].item() == 3 and out["w"].dtype == torch.float32
    assert report == {"clip": 1.0, "noise_multiplier": 0.0, "noise_std": 0.0, "clipped": ["a"],
                      "median_norm": pytest.approx(0.5)}


def test_the_delta_is_taken_from_the_global_not_from_zero():
    g = {"w": torch.tensor([10.0, 10.0]), "step": torch.tensor(3)}
    out, _ = dp_mean(g, [_u("a", [13.0, 14.0]), _u("b", [10.0, 10.0])], DPConfig(clip=1.0))
    torch.testing.assert_close(out["w"], torch.tensor([10.3, 10.4]))


def test_the_noise_on_the_mean_has_std_z_clip_over_n():
    g = {"w": torch.zeros(200_000)}
    ups = [Update(d, {"w": torch.zeros(200_000)}, 1.0, 1, {}, ()) for d in "abcd"]
    out, report = dp_mean(g, ups, DPConfig(clip=0.5, noise_multiplier=2.0), torch.Generator().manual_seed(1))
    assert report["noise_std"] == pytest.approx(0.25)   # 2.0 * 0.5 / 4
    assert out["w"].std().item() == pytest.approx(0.25, rel=0.01)
    assert abs(out["w"].mean().item()) < 0.01
    again, _ = dp_mean(g, ups, DPConfig(clip=0.5, noise_multiplier=2.0), torch.Generator().manual_seed(1))
    torch.testing.assert_close(again["w"], out["w"])   # a given generator is reproducible
    fresh1, _ = dp_mean(g, ups, DPConfig(clip=0.5, noise_multiplier=2.0))
    fresh2, _ = dp_mean(g, ups, DPConfig(clip=0.5, noise_multiplier=2.0))
    assert not torch.equal(fresh1["w"], fresh2["w"])   # by default every round draws new noise


def test_epsilon_composes_like_the_gaussian_mechanism():
    # k Gaussian mechanisms of multiplier z are one of multiplier z / sqrt(k) (RDP is k * a / (2 z^2))
    assert epsilon(2.0, 4, 1e-5) == pytest.approx(epsilon(1.0, 1, 1e-5), rel=1e-9)
    assert epsilon(1.0, 1, 1e-5) < epsilon(1.0, 2, 1e-5) < epsilon(1.0, 10, 1e-5)
    assert epsilon(4.0, 10, 1e-5) < epsilon(2.0, 10, 1e-5)
    # never worse than the classical RDP bound min_a k a / (2 z^2) + log(1 / delta) / (a - 1)
    z, k, delta = 1.5, 5, 1e-5
    classical = min(k * a / (2 * z * z) + math.log(1 / delta) / (a - 1) for a in [1 + x / 100 for x in range(1, 20000)])
    assert 0.8 * classical < epsilon(z, k, delta) <= classical
    assert epsilon(0.0, 3, 1e-5) == math.inf and epsilon(1.0, 0, 1e-5) == 0.0


def test_privacy_spent_counts_the_rounds_aggregated_with_dp():
    cfg = DPConfig(clip=1.0, noise_multiplier=1.1, delta=1e-6)
    rows = [{"round": 0}, {"round": 1, "defence": {"dp": {"noise_multiplier": 1.1}}}, {"round": 2, "failed": "x"},
            {"round": 3, "defence": {"dp": {"noise_multiplier": 1.1}}}]
    assert privacy_spent(rows, cfg) == {"epsilon": pytest.approx(epsilon(1.1, 2, 1e-6)), "delta": 1e-6,
                                        "noise_multiplier": 1.1, "clip": 1.0, "rounds": 2}
    assert privacy_spent(rows[:1], cfg) is None
    clip_only = privacy_spent([{"defence": {"dp": {"noise_multiplier": 0.0}}}], DPConfig(clip=1.0))
    assert clip_only["epsilon"] is None and clip_only["rounds"] == 1


def test_aggregate_checked_uses_dp_mean_and_reports_it():
    spec = dataclasses.replace(toy_spec(), dp=DPConfig(clip=1.0))
    g = {"w": torch.zeros(2)}
    ups = [Update(d, {"w": torch.tensor(v)}, 10.0, 1, {}, ()) for d, v in
           (("a", [3.0, 4.0]), ("b", [0.3, 0.4]), ("c", [0.0, 0.1]))]
    agg = aggregate_checked(METHODS["lora"], g, ups, {}, {}, spec, 3, 1)
    torch.testing.assert_close(agg.global_state["w"], torch.tensor([0.3, 1.3 / 3]))
    assert agg.defence["dp"]["clipped"] == ["a"] and agg.server_state == {}


@pytest.mark.parametrize("bad", [dict(clip=-1.0), dict(clip=math.inf), dict(noise_multiplier=1.0),
                                 dict(clip=1.0, delta=0.0), dict(clip=1.0, delta=1.0), dict(clip=True)])
def test_bad_dp_settings_are_refused(bad):
    with pytest.raises(ConfigError, match="dp\\."):
        DPConfig(**bad)


def test_dp_needs_a_method_that_averages():
    spec = toy_spec()
    with pytest.raises(ConfigError, match="DP-FedAvg"):
        dataclasses.replace(spec, method="fedpeptao", dp=DPConfig(clip=1.0))
    with pytest.raises(ConfigError, match="DP-FedAvg"):
        dataclasses.replace(spec, dp=DPConfig(clip=1.0), robust=dataclasses.replace(spec.robust, aggregator="median"))
    assert dataclasses.replace(spec, dp=DPConfig(clip=1.0)).to_json()["dp"] == {"clip": 1.0, "noise_multiplier": 0.0,
                                                                               "delta": 1e-5}


def test_without_opacus_the_accountant_names_the_extra(monkeypatch):
    import sys

    from edge_runtime.deps import MissingDependency

    monkeypatch.setitem(sys.modules, "opacus.accountants.analysis.rdp", None)   # as if not installed
    with pytest.raises(MissingDependency, match=r"'opacus'.*edge-runtime\[dp\]"):
        epsilon(1.0, 3, 1e-5)
    assert epsilon(0.0, 3, 1e-5) == math.inf   # no noise: nothing to account, no opacus needed
