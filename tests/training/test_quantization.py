"""NF4 / int8 bases (bitsandbytes, on this CPU): LoRA trains on them, the head stays fp32, the
adapter exports onto the fp32 base, and a device without bitsandbytes falls back with a reason."""

import logging

import pytest
import torch

from edge_runtime.errors import ConfigError
from edge_runtime.methods import lora
from edge_runtime.methods.lora import LoraMethodConfig
from edge_runtime.training.spec import TrainingSpec, build_model

WORDS = tuple("the a dog cat oak pine car bus red blue runs sits on under".split())


def _spec(model="tiny-llama", quantization="nf4", method="lora"):
    return TrainingSpec(model=model, labels=("a", "b", "c"), method=method, quantization=quantization,
                        lora=LoraMethodConfig(rank=4, dropout=0.0), tokenizer_corpus=WORDS)


def _weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_lora_trains_on_a_quantized_base(name, quantization):
    import bitsandbytes as bnb

    model, tok = build_model(_spec(name, quantization))
    kind = bnb.nn.Linear4bit if quantization == "nf4" else bnb.nn.Linear8bitLt
    base_linears = [m for n, m in model.named_modules() if isinstance(m, kind)]
    assert len(base_linears) >= 8   # every block projection
    head = model.get_submodule("base_model.model." + ("score" if name == "tiny-llama" else "classifier"))
    assert not isinstance(head.modules_to_save["default"], kind)
    enc = tok(["the dog sits", "a red bus", "oak pine"], padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.tensor([0, 1, 2])}
    model.eval()
    with torch.no_grad():   # a device evaluates the global first: the base must stay trainable after that
        before = model(**batch).logits
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert torch.isfinite(before).all()


def test_quantized_bases_are_smaller():
    fp32, _ = build_model(_spec(quantization="fp32"))
    int8, _ = build_model(_spec(quantization="int8"))
    nf4, _ = build_model(_spec(quantization="nf4"))
    assert _weight_bytes(nf4) < _weight_bytes(int8) < _weight_bytes(fp32)


def test_the_adapter_loads_onto_the_fp32_base(tmp_path):
    from peft import PeftModel

    from edge_runtime.training.models import load_model, resolve_model_source

    model, tok = build_model(_spec(quantization="nf4"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    lora.save_adapter(model, tmp_path / "a")
    base = load_model(resolve_model_source("tiny-llama"), "classification", 3, tok, seed=0)
    loaded = PeftModel.from_pretrained(base, tmp_path / "a")
    state = dict(loaded.named_parameters())
    for n, p in model.named_parameters():
        if "lora_B" in n:
            assert torch.equal(state[n], p)   # same names, same values: export needs nothing special


def test_no_bitsandbytes_falls_back_to_fp32_with_the_reason(monkeypatch, caplog):
    import edge_runtime.training.spec as spec_module

    monkeypatch.setattr(spec_module, "bitsandbytes_problem", lambda: "bitsandbytes cannot run here (no wheel)")
    with caplog.at_level(logging.WARNING, logger="edge_runtime.training"):
        model, _ = build_model(_spec(quantization="nf4"))
    assert "no wheel" in caplog.text and "fp32 base instead of nf4" in caplog.text
    assert not any("bnb" in type(m).__module__ for m in model.modules())


def test_bad_quantization_and_federa_on_a_quantized_base_are_refused():
    with pytest.raises(ConfigError, match="training.quantization must be one of"):
        _spec(quantization="fp8")
    with pytest.raises(ConfigError, match="quantized weight"):
        build_model(_spec(quantization="nf4", method="federa"))
