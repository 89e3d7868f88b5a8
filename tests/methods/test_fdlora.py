"""FDLoRA: two adapters, only the global one uploaded, fusion never worse, personal state persists."""

import dataclasses

import pytest
import torch

from edge_runtime.methods import fdlora
from edge_runtime.methods.fdlora import FdloraConfig
from edge_runtime.methods.lora import LoraMethodConfig
from edge_runtime.methods.personal import PersonalState, load_personal, save_personal
from edge_runtime.training.data import Splits, load_dataset
from edge_runtime.training.spec import TrainingSpec, build_model
from edge_runtime.training.trainer import TrainConfig


def fdlora_layers(model):
    from peft.tuners.lora import LoraLayer

    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer))


@pytest.fixture
def setup(toy_jsonl):
    ds = load_dataset(toy_jsonl)
    n = len(ds)
    splits = Splits(ds.subset(range(0, int(0.6 * n))), ds.subset(range(int(0.6 * n), int(0.8 * n))),
                    ds.subset(range(int(0.8 * n), n)))
    spec = TrainingSpec(model="tiny-bert", labels=ds.label_names, method="fdlora", tokenizer_corpus=ds.inputs,
                        lora=LoraMethodConfig(rank=4, dropout=0.0),
                        train=TrainConfig(max_steps=15, batch_size=16, lr=1e-2, max_seq_len=16),
                        fdlora=FdloraConfig(fusion_evals=12))
    model, tok = build_model(spec)
    return spec, model, tok, splits


def test_upload_is_the_global_adapter_only_with_a_full_rank_head_delta(setup):
    spec, model, tok, splits = setup
    state = fdlora.trainable_state(model)
    head = model.get_base_model().classifier
    assert isinstance(head, fdlora.DualDeltaLinear)
    assert state["head_delta.classifier.weight"].shape == head.base.weight.shape  # full rank, like the head
    assert all("lora_" in k or k.startswith("head_delta.") for k in state)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".global" in n for n in trainable)
    assert not head.base.weight.requires_grad


def test_local_train_trains_both_but_uploads_only_global(setup):
    spec, model, tok, splits = setup
    g0 = fdlora.trainable_state(model)
    res, personal = fdlora.local_train(model, tok, splits, spec, seed=0, personal=None)
    assert personal.meta["trained"] is True
    g1 = fdlora.trainable_state(model)
    assert any(not torch.equal(g0[k], g1[k]) for k in g0)                       # G moved
    p_init = fdlora.STATE.of(model)
    assert any(not torch.equal(p_init[k], personal.tensors[k]) for k in p_init)  # P moved
    # same names in both adapters; the upload carries G's values, never P's
    b_keys = [k for k in g1 if "lora_B" in k]
    assert all(not torch.equal(g1[k], personal.tensors[k]) for k in b_keys)
    assert res.steps == 2 * 15  # warm-up of P (1 epoch, capped by max_steps) + G


def test_fusion_never_worse_than_the_better_adapter_alone(setup):
    spec, model, tok, splits = setup
    _, personal = fdlora.local_train(model, tok, splits, spec, seed=0, personal=None)
    metrics, personal = fdlora.personalise(model, tok, splits, spec, personal)
    assert metrics["fusion_val_loss"] <= min(metrics["personal_val_loss"], metrics["global_val_loss"]) + 1e-9
    assert 0 <= metrics["fusion_a"] <= spec.fdlora.fusion_max and 0 <= metrics["fusion_b"] <= spec.fdlora.fusion_max
    assert personal.meta["a"] == metrics["fusion_a"]
    # the model is left with the global adapter alone, at scale 1, for evaluation and upload
    head = model.get_base_model().classifier
    assert head.active == ["global"] and head.scales == {"global": 1.0, "personal": 1.0}
    _, layer = next(fdlora_layers(model))
    assert layer.active_adapters == ["global"] and layer.scaling["global"] == pytest.approx(
        layer.lora_alpha["global"] / layer.r["global"])


def test_personal_state_round_trips_through_its_file(tmp_path, setup):
    spec, model, tok, splits = setup
    _, personal = fdlora.local_train(model, tok, splits, spec, seed=0, personal=None)
    personal = PersonalState(personal.tensors, {**personal.meta, "a": 0.25, "b": 1.5})
    path = save_personal(tmp_path / "p" / "fdlora.safetensors", personal)
    back = load_personal(path)
    assert back.meta == personal.meta
    assert back.tensors.keys() == personal.tensors.keys()
    assert all(torch.equal(back.tensors[k], personal.tensors[k]) for k in back.tensors)
    path.write_bytes(b"garbage")
    with pytest.raises(Exception, match="unreadable personal state"):
        load_personal(path)


def test_fused_model_exports_as_plain_lora_for_the_untouched_base(tmp_path, setup):
    from peft import PeftModel

    from edge_runtime.training.models import load_model, resolve_model_source

    spec, model, tok, splits = setup
    _, personal = fdlora.local_train(model, tok, splits, spec, seed=0, personal=None)
    fdlora.local_train(model, tok, splits, dataclasses.replace(spec, seed=1), seed=1, personal=personal)
    personal = PersonalState(personal.tensors, {**personal.meta, "a": 0.6, "b": 1.3})
    fdlora.save_personal_adapter(model, personal, tmp_path / "personal")
    fdlora.save_adapter(model, tmp_path / "global")
    batch = tok(list(splits.test.inputs[:6]), padding=True, return_tensors="pt")
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def fresh(folder):
        base = load_model(resolve_model_source("tiny-bert"), "classification", len(spec.labels), tok, seed=spec.seed)
        return PeftModel.from_pretrained(base, folder).eval()

    model.eval()
    with torch.no_grad():
        global_only = model(**batch).logits
        fdlora._load_adapter(model, "personal", personal.tensors, "personal")
        fdlora._activate(model, ["personal", "global"])
        fdlora._set_scales(model, 0.6, 1.3)
        fused = model(**batch).logits
        fdlora._activate(model, "global")
        torch.testing.assert_close(fresh(tmp_path / "global")(**batch).logits, global_only, atol=1e-5, rtol=0)
        torch.testing.assert_close(fresh(tmp_path / "personal")(**batch).logits, fused, atol=1e-5, rtol=0)
