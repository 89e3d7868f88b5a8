"""``train.precision``: bf16 autocast in training and evaluation, fp32 weights and updates, ``auto``
resolved per device."""

import random

import pytest
import torch

from edge_runtime.errors import ConfigError
from edge_runtime.methods import lora
from edge_runtime.training import precision
from edge_runtime.training.data import LocalDataset
from edge_runtime.training.evaluate import evaluate
from edge_runtime.training.models import load_model, load_tokenizer, resolve_model_source
from edge_runtime.training.spec import TrainingSpec
from edge_runtime.training.trainer import TrainConfig, train_local

WORDS = {"a": ["oak", "fern", "moss", "pine"], "b": ["kelp", "reed", "lily", "rose"], "c": ["ivy", "sage", "mint", "thyme"]}
FILL = "the of and with some old new".split()


def _data(n=240, seed=0) -> LocalDataset:
    rng = random.Random(seed)
    labels = sorted(WORDS)
    ys = [rng.randrange(3) for _ in range(n)]
    texts = tuple(" ".join(rng.sample(FILL, 3) + [rng.choice(WORDS[labels[y]])]) for y in ys)
    return LocalDataset("classification", texts, tuple(ys), tuple(labels))


def _model(data, name="tiny-bert"):
    src = resolve_model_source(name)
    tok = load_tokenizer(src, data.inputs)
    spec = TrainingSpec(model=name, labels=tuple(data.label_names), lora=lora.LoraMethodConfig(rank=4, dropout=0.0))
    return lora.build(load_model(src, "classification", 3, tok, seed=0), spec), tok


def _linear_dtypes(model):
    """The dtypes the model's Linear layers produced in the next forward pass."""
    seen, hooks = set(), []
    for m in model.modules():
        if type(m) is torch.nn.Linear:
            hooks.append(m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype)))
    return seen, hooks


def test_precision_is_validated_and_auto_follows_the_hardware(monkeypatch):
    with pytest.raises(ConfigError, match="train.precision"):
        TrainConfig(precision="fp16")
    assert TrainConfig().precision == "fp32"
    assert precision.resolve("fp32", "cpu") == "fp32" and precision.resolve("bf16", "cpu") == "bf16"
    for native in (True, False):
        monkeypatch.setattr(precision, "native_bf16", lambda device_type, n=native: n)
        assert precision.resolve("auto", "cpu") == ("bf16" if native else "fp32")
    with pytest.raises(ValueError):
        precision.resolve("half", "cpu")


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_bf16_runs_the_matmuls_in_bf16_and_keeps_weights_and_gradients_fp32(name):
    data = _data()
    model, tok = _model(data, name)
    seen, hooks = _linear_dtypes(model)
    res = train_local(model, tok, data, TrainConfig(epochs=1, batch_size=32, lr=1e-2, precision="bf16"), seed=0)
    for h in hooks:
        h.remove()
    assert torch.bfloat16 in seen and torch.float32 not in seen
    assert res.metrics["train_bf16"] == 1.0
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in trained)

    seen, hooks = _linear_dtypes(model)
    res = train_local(model, tok, data, TrainConfig(epochs=1, batch_size=32, lr=1e-2), seed=0)
    for h in hooks:
        h.remove()
    assert seen == {torch.float32} and res.metrics["train_bf16"] == 0.0


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_bf16_learns_as_fp32_does_and_evaluates_within_bf16_rounding(name):
    data, test = _data(seed=0), _data(n=120, seed=1)
    results = {}
    for prec in ("fp32", "bf16"):
        model, tok = _model(data, name)
        before = evaluate(model, tok, test, precision=prec)
        res = train_local(model, tok, data, TrainConfig(epochs=6, batch_size=16, lr=1e-2, precision=prec), seed=0)
        results[prec] = (before, res, evaluate(model, tok, test, precision=prec), evaluate(model, tok, test))
    (b32, r32, e32, _), (b16, r16, e16, e16_as32) = results["fp32"], results["bf16"]
    # the same untrained model evaluated both ways: the losses agree to bf16's rounding
    assert b16.loss == pytest.approx(b32.loss, rel=2e-2)
    # both learn the task, and end close to each other
    assert r16.mean_loss == pytest.approx(r32.mean_loss, rel=0.1)
    assert e32.loss < 0.3 * b32.loss and e16.loss < 0.3 * b16.loss
    assert e32.accuracy > 0.9 and e16.accuracy > 0.9
    assert abs(e16.accuracy - e32.accuracy) <= 0.05
    # the bf16-trained weights are ordinary fp32 weights: evaluated in fp32 they do as well
    assert abs(e16_as32.accuracy - e16.accuracy) <= 0.02
