"""FeDeRA: SVD init, the residual identity, identical inits across devices, plain-LoRA export."""

import pytest
import torch

from edge_runtime.errors import ConfigError
from edge_runtime.methods import federa, lora
from edge_runtime.methods.federa import FederaConfig
from edge_runtime.training.data import load_dataset
from edge_runtime.training.spec import TrainingSpec, build_model
from edge_runtime.training.trainer import TrainConfig, train_local

WORDS = tuple("the a dog cat oak pine car bus red blue runs sits on under".split())


def _spec(model="tiny-bert", residual=True, **kw) -> TrainingSpec:
    return TrainingSpec(model=model, labels=("a", "b", "c"), method="federa", federa=FederaConfig(residual=residual),
                        lora=lora.LoraMethodConfig(rank=4, dropout=0.0), tokenizer_corpus=WORDS, **kw)


def _inputs(tok):
    enc = tok(["the dog sits on a car", "red pine", "a blue bus runs"], padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_round0_logits_equal_the_base_model(name):
    spec = _spec(name)
    model, tok = build_model(spec)
    batch = _inputs(tok)
    with model.disable_adapter():  # B = 0 at peft's init, so the untouched model
        base = _logits(model, batch)
    federa.initial_global(model, spec)
    torch.testing.assert_close(_logits(model, batch), base, atol=1e-5, rtol=0)
    # the base weights really did change (to the residual): the identity is not trivial
    first = next(layer for _, layer in federa.lora_layers(model))
    assert first.lora_B["default"].weight.abs().max() > 0


def test_no_residual_variant_keeps_the_base_weight_and_changes_round0_outputs():
    spec = _spec(residual=False)
    model, tok = build_model(spec)
    w_before = {n: layer.get_base_layer().weight.detach().clone() for n, layer in federa.lora_layers(model)}
    batch = _inputs(tok)
    base = _logits(model, batch)
    federa.initial_global(model, spec)
    assert all(torch.equal(layer.get_base_layer().weight, w_before[n]) for n, layer in federa.lora_layers(model))
    assert (_logits(model, batch) - base).abs().max() > 1e-4


def test_residual_plus_scaled_BA_reconstructs_W_and_BA_is_the_best_rank_r_part():
    spec = _spec()
    model, _ = build_model(spec)
    originals = {n: layer.get_base_layer().weight.detach().clone() for n, layer in federa.lora_layers(model)}
    federa.initial_global(model, spec)
    for name, layer in federa.lora_layers(model):
        w, s = originals[name], layer.scaling["default"]
        a0, b0 = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        ba = s * (b0 @ a0)
        torch.testing.assert_close(layer.get_base_layer().weight + ba, w, atol=1e-6, rtol=0)
        u, sv, vh = torch.linalg.svd(w.double())
        best = (u[:, :4] * sv[:4]) @ vh[:4]
        torch.testing.assert_close(ba.double(), best, atol=1e-5, rtol=0)


def test_two_devices_build_the_same_model_bit_for_bit_from_the_shipped_init():
    spec = _spec()
    server, _ = build_model(spec)
    init = federa.initial_global(server, spec)
    again, _ = build_model(spec)
    assert all(torch.equal(init[k], v) for k, v in federa.initial_global(again, spec).items())  # deterministic SVD
    dev1, _ = build_model(spec)
    dev2, _ = build_model(spec)
    federa.prepare(dev1, spec, init)
    federa.prepare(dev2, spec, init)
    p1, p2, ps = dict(dev1.named_parameters()), dict(dev2.named_parameters()), dict(server.named_parameters())
    assert p1.keys() == p2.keys()
    assert all(torch.equal(p1[k], p2[k]) and torch.equal(p1[k], ps[k]) for k in p1)


def test_prepare_twice_is_idempotent_and_a_missing_or_other_init_is_refused():
    spec = _spec()
    model, _ = build_model(spec)
    init = federa.initial_global(model, spec)
    w = {n: layer.get_base_layer().weight.detach().clone() for n, layer in federa.lora_layers(model)}
    federa.prepare(model, spec, init)  # same init: nothing subtracted twice
    assert all(torch.equal(layer.get_base_layer().weight, w[n]) for n, layer in federa.lora_layers(model))
    other = {k: v * 2 for k, v in init.items()}
    with pytest.raises(ConfigError, match="already prepared"):
        federa.prepare(model, spec, other)
    fresh, _ = build_model(spec)
    with pytest.raises(ConfigError, match="init adapter"):
        federa.prepare(fresh, spec, None)


def test_quantized_base_weight_is_refused_with_a_reason():
    spec = _spec()
    model, _ = build_model(spec)
    name, layer = next(federa.lora_layers(model))
    base = layer.get_base_layer()
    base.weight = torch.nn.Parameter(torch.zeros(base.weight.shape, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ConfigError, match="quantized weight.*fp32 / fp16"):
        federa.initial_global(model, spec)


@pytest.mark.parametrize("residual", [True, False])
def test_trained_adapter_exports_as_plain_lora_for_the_untouched_base(tmp_path, toy_jsonl, residual):
    from peft import PeftModel

    from edge_runtime.training.models import load_model, resolve_model_source

    ds = load_dataset(toy_jsonl)
    spec = TrainingSpec(model="tiny-bert", labels=ds.label_names, method="federa", tokenizer_corpus=ds.inputs,
                        federa=FederaConfig(residual=residual), lora=lora.LoraMethodConfig(rank=4, dropout=0.0))
    model, tok = build_model(spec)
    federa.initial_global(model, spec)
    train_local(model, tok, ds, TrainConfig(max_steps=5, batch_size=8, lr=1e-2), seed=0)
    federa.save_adapter(model, tmp_path / "adapter")
    base = load_model(resolve_model_source("tiny-bert"), "classification", len(ds.label_names), tok, seed=spec.seed)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert loaded.peft_config["default"].r == (8 if residual else 4)
    batch = tok(list(ds.inputs[:6]), padding=True, return_tensors="pt")
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), atol=1e-5, rtol=0)
