"""Where a round's time goes: the server's phase table from the devices' own timings."""

import pytest

from edge_runtime.round.phases import PHASES, describe_phases, device_phases, phase_totals, round_phases
from edge_runtime.round.device import phase_metrics


def test_round_phases_split_each_device_round_into_its_parts():
    accepted = {
        "b": {"at": 130.0, "metrics": {"t_fetch_s": 1.0, "t_eval_s": 2.0, "t_train_s": 20.0, "t_encode_s": 0.5,
                                        "train_tokens": 1000.0, "train_tokens_per_s": 50.0}},
        "a": {"at": 110.0, "metrics": {"t_load_s": 3.0, "t_train_s": 4.0, "train_tokens": 200.0,
                                        "train_tokens_per_s": 50.0, "loss": 1.0}},
    }
    p = round_phases(accepted, started_at=100.0, closed_at=131.0, aggregate_s=0.25)
    assert list(p["devices"]) == ["a", "b"]
    a, b = p["devices"]["a"], p["devices"]["b"]
    assert a["transfer_s"] == pytest.approx(10.0 - 7.0) and a["idle_s"] == pytest.approx(21.0)
    assert b["transfer_s"] == pytest.approx(30.0 - 23.5) and b["idle_s"] == pytest.approx(1.0)
    for d in (a, b):   # the phases add up to the round, for every device
        assert sum(d[k] for k in PHASES) == pytest.approx(31.0)
    assert "loss" not in a
    assert p["mean"]["train_s"] == pytest.approx(12.0) and p["mean"]["train_tokens"] == pytest.approx(600.0)
    assert p["server"] == {"collect_s": 31.0, "aggregate_s": 0.25}
    assert describe_phases({"phases": p}) == ("mean device: train 12.0 s, idle 11.0 s, transfer 4.8 s, load 1.5 s, "
                                              "eval 1.0 s, 50 tokens/s; aggregate 0.25 s")
    assert describe_phases({"round": 0}) == ""


def test_device_time_beyond_the_round_is_not_negative_transfer():
    # a device that times more than the server saw (e.g. it kept a global from before the round)
    d = device_phases({"t_train_s": 9.0}, accepted_after=5.0, round_seconds=6.0)
    assert d["transfer_s"] == 0.0 and d["idle_s"] == pytest.approx(1.0)


def test_without_the_servers_clock_only_device_phases():
    p = round_phases({"x": {"metrics": {"t_train_s": 2.0}}}, aggregate_s=0.1)
    assert "transfer_s" not in p["devices"]["x"] and p["server"] == {"aggregate_s": 0.1}


def test_phase_metrics_and_totals():
    assert phase_metrics({"eval_s": 1, "train_s": 2.5, "first_send_at": 9}) == {"t_eval_s": 1.0, "t_train_s": 2.5}
    hist = [{"round": 0}, {"round": 1, "phases": {"mean": {"train_s": 2.0, "eval_s": 1.0, "train_tokens": 5}}},
            {"round": 2, "phases": {"mean": {"train_s": 3.0}}}]
    assert phase_totals(hist) == {"train_s": 5.0, "eval_s": 1.0}
