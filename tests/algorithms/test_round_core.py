"""The pure steps of a round (edge_runtime.round), on hand-computed numbers."""

import dataclasses

import pytest
import torch

from edge_runtime.algorithms.aggregation import Update
from edge_runtime.errors import AggregationError, ConfigError
from edge_runtime.methods import METHODS
from edge_runtime.round.device import score_seed, train_seed
from edge_runtime.round.server import (aggregate_checked, as_update,
                                       configurator_row, finite_metrics,
                                       record_eval, round_row,
                                       select_participants, weighted)
from edge_runtime.training.spec import TrainingSpec

SPEC = TrainingSpec(labels=("a", "b"), seed=3)
ACCEPTED = {"d1": {"n_samples": 30, "bytes": 100, "metrics": {"train_loss": 1.0, "train_steps": 4, "eval_accuracy": 0.5,
                                                                 "eval_n": 10}},
            "d0": {"n_samples": 10, "bytes": 50, "metrics": {"train_loss": 2.0, "train_steps": 2, "eval_accuracy": 1.0,
                                                                "eval_n": 30}}}


def test_selection_samples_then_caps_keeping_the_devices_that_did_rounds():
    pool = [f"d{i}" for i in range(10)]
    assert select_participants(pool, 1, 0, 0, 100, {}) == sorted(pool)          # 0 per round: everyone
    picked = select_participants(pool, 1, 0, 4, 100, {})
    assert len(picked) == 4 and picked == sorted(picked) and set(picked) <= set(pool)
    assert select_participants(list(reversed(pool)), 1, 0, 4, 100, {}) == picked   # the pool's order does not matter
    assert select_participants(pool, 2, 0, 4, 100, {}) != picked or select_participants(pool, 3, 0, 4, 100, {}) != picked
    assert select_participants(pool, 1, 0, 0, 3, {"d7": 5, "d2": 4, "d9": 1}) == ["d2", "d7", "d9"]


def test_weighted_means_and_the_history_row():
    assert weighted(ACCEPTED, "train_loss") == pytest.approx((30 * 1.0 + 10 * 2.0) / 40)   # by samples: 1.25
    assert weighted(ACCEPTED, "eval_accuracy", weight="eval_n") == pytest.approx((0.5 * 10 + 1.0 * 30) / 40)
    assert weighted(ACCEPTED, "missing") is None
    row = round_row(2, ["d0", "d1", "d2"], ACCEPTED, global_bytes=7, seconds=3.5)
    assert row["accepted"] == ["d0", "d1"] and row["weights"] == {"d1": 30, "d0": 10}
    assert row["steps"] == {"d1": 4, "d0": 2} and row["bytes_up"] == 150 and row["bytes_down"] == 21
    assert row["train_loss"] == pytest.approx(1.25) and row["accuracy"] is None and "configurator" not in row


def test_record_eval_fills_the_row_of_the_global_the_devices_received():
    history = []
    row = record_eval(history, 0, ACCEPTED)   # round 1's devices evaluated the initial global
    assert [h["round"] for h in history] == [0] and row["accuracy"] == pytest.approx(0.875)
    assert "personal_accuracy" not in row
    assert record_eval(history, 5, ACCEPTED) is None   # no such row: nothing invented


def test_finite_metrics_keeps_numbers_only():
    assert finite_metrics({"a": 1, "b": float("nan"), "c": True, "d": "x", "e": 2.5, 3: 1.0}) == {"a": 1, "e": 2.5}
    assert finite_metrics({"big": 10**400, "ok": 1.0}) == {"ok": 1.0}   # a huge JSON integer: dropped, no OverflowError


def test_an_aggregate_with_nan_or_other_keys_is_refused():
    g = {"w": torch.zeros(2)}
    ups = [Update("d0", {"w": torch.ones(2)}, 1.0, 1, {})]
    new, server, config, defence = aggregate_checked(METHODS["lora"], g, ups, {}, {}, SPEC, 1, 1)
    assert server == {} and config == {} and defence["clipped"] == [] and defence["bound"] == pytest.approx(3 * 2 ** 0.5)
    torch.testing.assert_close(new["w"], torch.ones(2))
    nan = dataclasses.replace(METHODS["lora"], aggregate=lambda *a: ({"w": torch.full((2,), float("nan"))}, {}))
    with pytest.raises(AggregationError, match="NaN"):
        aggregate_checked(nan, g, ups, {}, {}, SPEC, 1, 1)
    other = dataclasses.replace(METHODS["lora"], aggregate=lambda *a: ({"v": torch.zeros(2)}, {}))
    with pytest.raises(AggregationError):
        aggregate_checked(other, g, ups, {}, {}, SPEC, 1, 1)
    # the configurator's state must be a JSON object: no tensors, no NaN
    for bad, why in (({"n": torch.ones(2)}, "not JSON"), ({"n": float("nan")}, "not JSON"), ([1], "JSON object")):
        learner = dataclasses.replace(METHODS["lora"], learn=lambda *a, b=bad: b)
        with pytest.raises(AggregationError, match=why):
            aggregate_checked(learner, g, ups, {}, {}, SPEC, 1, 1)
    keeps = dataclasses.replace(METHODS["lora"], learn=lambda state, updates, spec: {"seen": len(updates)})
    assert aggregate_checked(keeps, g, ups, {}, {}, SPEC, 1, 1)[2] == {"seen": 1}


def test_layer_steps_are_typed_refused_where_unused_and_read_from_protocol_1_records():
    with pytest.raises(AggregationError, match="takes no layer_steps"):
        METHODS["lora"].check_update(Update("d0", {}, 1.0, 3, {}, (3, 3)), {}, SPEC)
    METHODS["lora"].check_update(Update("d0", {}, 1.0, 3, {}), {}, SPEC)
    rec = {"n_samples": 4, "metrics": {"train_steps": 3}, "layer_steps": [3, 1]}
    assert as_update("d0", rec, {}).layer_steps == (3, 1)
    old = {"n_samples": 4, "metrics": {"train_steps": 3, "layer_steps.1": 1, "layer_steps.0": 3}}   # protocol 1
    assert as_update("d0", old, {}).layer_steps == (3, 1)
    assert as_update("d0", {"n_samples": 4, "metrics": {"layer_steps.1": 1}}, {}).layer_steps == ()  # a gap: none
    row = round_row(1, ["d0", "d1"], {"d0": {**rec, "bytes": 1}, "d1": {**old, "bytes": 1}}, 0, 1.0)
    assert row["layer_steps"] == {"d0": [3, 1]}


def test_configurator_row_keeps_the_method_round_metrics_only():
    m = dataclasses.replace(METHODS["lora"], round_metrics=("drop_ratio", "layer_steps."))
    ups = [Update("d0", {}, 1.0, 1, {"drop_ratio": 0.5, "layer_steps.3": 7, "eval_loss": 1.0})]
    assert configurator_row(m, {"d0": {"arm": 1}}, ups)["reports"] == {"d0": {"drop_ratio": 0.5, "layer_steps.3": 7}}


def test_seeds_depend_on_the_run_round_and_device_only():
    assert train_seed(SPEC, 2, "dev0") == train_seed(SPEC, 2, "dev0")
    assert len({train_seed(SPEC, r, d) for r in (1, 2) for d in ("dev0", "dev1")}) == 4
    assert score_seed(SPEC, "dev0") != score_seed(SPEC, "dev1")
    assert train_seed(dataclasses.replace(SPEC, seed=4), 2, "dev0") != train_seed(SPEC, 2, "dev0")


def test_device_round_evaluates_trains_and_builds_the_upload_on_a_tiny_model(tmp_path):
    import numpy as np

    from edge_runtime.round.device import device_round
    from edge_runtime.training.data import device_splits, resolve_dataset
    from edge_runtime.training.spec import build_model
    from tests.conftest import make_toy_rows, write_jsonl
    from tests.fleet_helpers import toy_spec

    spec = toy_spec(epochs=1)
    method = METHODS[spec.method]
    model, tok = build_model(spec)
    data = resolve_dataset(str(write_jsonl(tmp_path / "d.jsonl", make_toy_rows(120, seed=0))), spec.labels)
    splits = device_splits(data, spec.split, np.random.default_rng(0))
    before = method.trainable_state(model)
    steps = []
    rep = device_round(method, model, tok, splits, spec, action="train", round_=1, device_id="dev0", personal=None,
                       on_step=steps.append)
    assert steps == ["evaluating", "training"]
    assert rep.n_samples == len(splits.train) and rep.metrics["eval_n"] == len(splits.test)
    assert rep.metrics["train_steps"] == rep.train_result.steps > 0
    assert set(rep.upload) == set(before) and any(not torch.equal(rep.upload[k], before[k]) for k in before)
    ev = device_round(method, model, tok, splits, spec, action="evaluate", round_=2, device_id="dev0", personal=None)
    assert ev.upload is None and ev.n_samples == 0 and "train_steps" not in ev.metrics


def test_the_spec_s_defences_apply_before_the_method_and_a_robust_aggregator_replaces_the_mean():
    g = {"w": torch.zeros(2)}
    ups = [Update("d0", {"w": torch.tensor([1.0, 0.0])}, 10.0), Update("d1", {"w": torch.tensor([0.0, 1.0])}, 10.0),
           Update("d2", {"w": torch.tensor([1.0, 1.0])}, 10.0), Update("d3", {"w": torch.tensor([-1e6, 1e6])}, 10.0)]
    # FedAvg after clipping d3 to 3 x the lower median norm (1): d3 counts as 3/sqrt2 * (-1, 1)
    new, _, _, defence = aggregate_checked(METHODS["lora"], g, ups, {}, {}, SPEC, 4, 1)
    c = 3 / 2 ** 0.5
    torch.testing.assert_close(new["w"], torch.tensor([(2 - c) / 4, (2 + c) / 4]))
    assert defence["clipped"] == ["d3"]
    median = TrainingSpec.from_json({**SPEC.to_json(), "robust": {"aggregator": "median", "norm_bound": "off"}})
    new, *_ = aggregate_checked(METHODS["lora"], g, ups, {}, {}, median, 4, 1)
    torch.testing.assert_close(new["w"], torch.tensor([0.5, 1.0]))    # the coordinates' medians
    with pytest.raises(ConfigError, match="droppeft aggregates otherwise"):
        TrainingSpec.from_json({**SPEC.to_json(), "method": "droppeft", "robust": {"aggregator": "median"}})
