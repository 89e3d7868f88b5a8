"""``lora.train_pooler: identity``: BERT's pooler becomes tanh of the [CLS] vector, frozen and off the
wire, and every adapter folder carries it, so the untouched base plus the folder gives the runtime's logits."""

import pytest
import torch

from edge_runtime.methods import METHODS
from edge_runtime.methods.lora import LoraMethodConfig, identity_pooler_tensors
from edge_runtime.training.data import LocalDataset
from edge_runtime.training.models import load_model, load_tokenizer, resolve_model_source
from edge_runtime.training.spec import TrainingSpec
from edge_runtime.training.trainer import TrainConfig, train_local

TEXTS = tuple(f"{w} {v} {u}" for w in "oak fern moss kelp".split() for v in "rose pine lily".split()
              for u in "reed ivy".split())
LABELS = ("a", "b", "c")


def _spec(method: str, train_pooler) -> TrainingSpec:
    return TrainingSpec(model="tiny-bert", method=method, labels=LABELS, tokenizer_corpus=TEXTS,
                        lora=LoraMethodConfig(rank=4, dropout=0.0, train_pooler=train_pooler))


def _base(tok):
    return load_model(resolve_model_source("tiny-bert"), "classification", len(LABELS), tok)


def test_the_identity_pooler_is_frozen_and_off_the_wire():
    tok = load_tokenizer(resolve_model_source("tiny-bert"), TEXTS)
    method = METHODS["lora"]
    whole = method.trainable_state(method.build(_base(tok), _spec("lora", True)))
    model = method.build(_base(tok), _spec("lora", "identity"))
    state = method.trainable_state(model)
    assert not any("pooler" in k for k in state)
    assert set(state) == {k for k in whole if "pooler" not in k}
    dense = model.base_model.model.bert.pooler.dense
    assert torch.equal(dense.weight, torch.eye(dense.in_features)) and not dense.bias.any()
    assert not dense.weight.requires_grad and not dense.bias.requires_grad
    # what the head reads is tanh([CLS]) itself
    enc = tok(list(TEXTS[:3]), return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        hidden = model.base_model.model.bert(**enc).last_hidden_state[:, 0]
        pooled = model.base_model.model.bert(**enc).pooler_output
    assert torch.allclose(pooled, torch.tanh(hidden))
    # the checkpoint's own pooler (train_pooler false) is frozen too, but is not the identity: not shipped
    frozen = method.build(_base(tok), _spec("lora", False))
    assert identity_pooler_tensors(frozen) == {} and len(identity_pooler_tensors(model)) == 2
    with pytest.raises(Exception, match="train_pooler"):
        LoraMethodConfig(train_pooler="mean")


@pytest.mark.parametrize("name", ["lora", "droppeft", "federa", "fdlora"])
def test_an_adapter_folder_carries_the_identity_pooler_to_the_untouched_base(tmp_path, name):
    from peft import PeftModel

    tok = load_tokenizer(resolve_model_source("tiny-bert"), TEXTS)
    spec = _spec(name, "identity")
    method = METHODS[name]
    init = method.initial_global(method.build(_base(tok), spec), spec)    # the server's round 0
    model = method.build(_base(tok), spec)
    method.prepare(model, spec, init)
    method.load_trainable_state(model, init)
    assert not any("pooler" in k for k in method.trainable_state(model))    # off the wire for every method
    data = LocalDataset("classification", TEXTS, tuple(i % 3 for i in range(len(TEXTS))), LABELS)
    train_local(model, tok, data, TrainConfig(epochs=2, batch_size=8, lr=1e-2, max_seq_len=16), seed=0)
    method.save_adapter(model, tmp_path / "adapter")

    enc = tok(list(TEXTS[:5]), return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        ours = model(**enc).logits
        base = _base(tok)
        assert not torch.equal(base.bert.pooler.dense.weight, torch.eye(base.config.hidden_size))
        loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        theirs = loaded(**enc).logits
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
