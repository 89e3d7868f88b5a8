"""Evaluation in length-sorted batches equals evaluation one example at a time (the results back in
data order), and the spec's eval section picks which globals and which examples a round evaluates."""

import numpy as np
import pytest

from edge_runtime.errors import ConfigError
from edge_runtime.methods import METHODS
from edge_runtime.round.device import device_round
from edge_runtime.training.data import device_splits, resolve_dataset
from edge_runtime.training.evaluate import EvalConfig, evaluate
from edge_runtime.training.spec import TrainingSpec, build_model
from tests.conftest import make_toy_rows, write_jsonl
from tests.fleet_helpers import toy_spec


def _toy(tmp_path, n=120):
    spec = toy_spec(epochs=1)
    model, tok = build_model(spec)
    rows = make_toy_rows(n, seed=1)
    for i, r in enumerate(rows):      # 1 to 8 words: batches of mixed lengths, padded differently when sorted
        r["text"] = " ".join((r["text"].split() * 2)[: 1 + i % 8])
    data = resolve_dataset(str(write_jsonl(tmp_path / "d.jsonl", rows)), spec.labels)
    return spec, model, tok, data


def test_sorted_batches_give_the_per_example_results_of_one_at_a_time_in_data_order(tmp_path):
    spec, model, tok, data = _toy(tmp_path, 60)
    lengths = [len(t.split()) for t in data.inputs]
    assert len(set(lengths)) > 3            # the texts differ in length: sorting changes the batches
    batched = evaluate(model, tok, data, batch_size=16, max_seq_len=16)
    single = evaluate(model, tok, data, batch_size=1, max_seq_len=16)
    assert batched.correct == single.correct
    assert batched.accuracy == pytest.approx(single.accuracy) and batched.loss == pytest.approx(single.loss, rel=1e-5)


def test_eval_every_and_sample_choose_the_globals_and_examples_a_round_evaluates(tmp_path):
    spec, model, tok, data = _toy(tmp_path)
    spec = TrainingSpec.from_json({**spec.to_json(), "eval": {"every": 2, "sample": 5}})
    splits = device_splits(data, spec.split, np.random.default_rng(0))
    method = METHODS[spec.method]
    kw = dict(device_id="dev0", personal=None)
    r1 = device_round(method, model, tok, splits, spec, action="train", round_=1, **kw)   # global 0: evaluated
    r2 = device_round(method, model, tok, splits, spec, action="train", round_=2, **kw)   # global 1: skipped
    r3 = device_round(method, model, tok, splits, spec, action="train", round_=3, **kw)   # global 2: evaluated
    assert r1.metrics["eval_n"] == r3.metrics["eval_n"] == 5 and "eval_s" in r1.timings
    assert "eval_accuracy" not in r2.metrics and "eval_s" not in r2.timings and r2.metrics["train_steps"] > 0
    final = device_round(method, model, tok, splits, spec, action="evaluate", round_=4, **kw)
    assert final.metrics["eval_n"] == len(splits.test) > 5      # the final global: the whole test split
    a, b = EvalConfig(sample=5).subset(splits.test, 7), EvalConfig(sample=5).subset(splits.test, 7)
    assert a.inputs == b.inputs and set(a.inputs) <= set(splits.test.inputs)   # the same sample every round
    assert EvalConfig(sample=10_000).subset(splits.test, 7) is splits.test


def test_eval_initial_false_skips_only_the_untrained_start(tmp_path):
    spec, model, tok, data = _toy(tmp_path)
    spec = TrainingSpec.from_json({**spec.to_json(), "eval": {"initial": False}})
    splits = device_splits(data, spec.split, np.random.default_rng(0))
    method = METHODS[spec.method]
    kw = dict(device_id="dev0", personal=None)
    r1 = device_round(method, model, tok, splits, spec, action="train", round_=1, **kw)   # global 0: skipped
    r2 = device_round(method, model, tok, splits, spec, action="train", round_=2, **kw)   # global 1: evaluated
    assert "eval_accuracy" not in r1.metrics and "eval_s" not in r1.timings and r1.metrics["train_steps"] > 0
    assert r2.metrics["eval_n"] == len(splits.test)
    assert [EvalConfig(every=2, initial=False).evaluates(r) for r in range(5)] == [False, False, True, False, True]
    assert all(EvalConfig().evaluates(r) for r in range(3))


@pytest.mark.parametrize("bad", [dict(every=0), dict(sample=-1), dict(every=True), dict(sample=2.5),
                                 dict(initial="no"), dict(initial=0)])
def test_bad_eval_settings_are_config_errors(bad):
    with pytest.raises(ConfigError, match="eval"):
        EvalConfig(**bad)
