import pytest
import torch

from edge_runtime.errors import AggregationError, ConfigError
from edge_runtime.methods import lora
from edge_runtime.training.data import load_dataset
from edge_runtime.training.models import load_model, load_tokenizer, resolve_model_source
from edge_runtime.training.spec import TrainingSpec
from edge_runtime.training.trainer import TrainConfig, train_local


def _model(name="tiny-bert", texts=("a b c",)):
    src = resolve_model_source(name)
    tok = load_tokenizer(src, texts)
    spec = TrainingSpec(model=name, labels=("a", "b", "c"), lora=lora.LoraMethodConfig(rank=4))
    return lora.build(load_model(src, "classification", 3, tok), spec), tok


def test_trainable_state_is_lora_plus_head_only():
    model, _ = _model()
    state = lora.trainable_state(model)
    assert state and all(("lora_" in k) or ("classifier" in k) or ("pooler" in k) for k in state)
    assert any("lora_A" in k for k in state) and any("classifier" in k for k in state)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(v.numel() for v in state.values()) == n_trainable


def test_training_moves_only_trainable_parameters(toy_jsonl):
    ds = load_dataset(toy_jsonl)
    model, tok = _model(texts=ds.inputs)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_local(model, tok, ds, TrainConfig(max_steps=3, batch_size=8, lr=1e-2), seed=0)
    after = dict(model.named_parameters())
    frozen = [n for n, p in after.items() if not p.requires_grad]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    moved = {n for n, p in after.items() if p.requires_grad and not torch.equal(before[n], p)}
    assert any("lora_B" in n for n in moved) and any("classifier" in n for n in moved)


def test_state_round_trip_and_rejection_of_wrong_shapes():
    model, _ = _model()
    state = lora.trainable_state(model)
    changed = {k: v + 1.0 for k, v in state.items()}
    lora.load_trainable_state(model, changed)
    assert all(torch.equal(lora.trainable_state(model)[k], changed[k]) for k in state)
    key = next(iter(state))
    bad = dict(changed)
    bad[key] = torch.zeros(7, 7)
    with pytest.raises(AggregationError, match="shape"):
        lora.load_trainable_state(model, bad)
    assert torch.equal(lora.trainable_state(model)[key], changed[key])  # nothing was half-applied


@pytest.mark.parametrize("kwargs, field", [({"rank": 0}, "lora.rank"), ({"alpha": -1}, "lora.alpha"),
                                           ({"dropout": 1.0}, "lora.dropout")])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        lora.LoraMethodConfig(**kwargs)


def test_the_pooler_is_trained_whole_through_lora_or_frozen_and_off_the_wire():
    from edge_runtime.methods import lora as lora_method
    from edge_runtime.methods.lora import LoraMethodConfig
    from edge_runtime.training.spec import TrainingSpec, build_model

    def state(train_pooler):
        spec = TrainingSpec(model="tiny-bert", labels=("a", "b", "c"), tokenizer_corpus=("x", "y"),
                            lora=LoraMethodConfig(rank=4, train_pooler=train_pooler))
        model, _ = build_model(spec)
        return model, lora_method.trainable_state(model)

    (_, whole), (_, frozen), (model, low_rank) = state(True), state(False), state("lora")
    assert any("pooler" in k for k in whole)
    assert not any("pooler" in k for k in frozen)
    assert {k for k in whole if "pooler" not in k} == set(frozen)       # LoRA and the classifier unchanged
    pooler = {k: v for k, v in low_rank.items() if "pooler" in k}
    hidden = model.base_model.model.config.hidden_size
    assert sorted(pooler) == ["base_model.model.bert.pooler.dense.lora_A.weight",
                              "base_model.model.bert.pooler.dense.lora_B.weight"]
    assert [tuple(pooler[k].shape) for k in sorted(pooler)] == [(4, hidden), (hidden, 4)]
    assert {k for k in low_rank if "pooler" not in k} == set(frozen)
    whole_n = sum(v.numel() for k, v in whole.items() if "pooler" in k)
    assert whole_n == hidden * hidden + hidden and sum(v.numel() for v in pooler.values()) == 8 * hidden
    # only the LoRA factors of the pooler train: its dense weight and bias stay the base model's
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "pooler" in n}
    assert trainable == {"base_model.model.bert.pooler.dense.lora_A.default.weight",
                         "base_model.model.bert.pooler.dense.lora_B.default.weight"}
    with pytest.raises(ConfigError, match="train_pooler"):
        LoraMethodConfig(train_pooler="no")
