"""``train.micro_batch_size``: a batch runs forward and backward a few examples at a time, and the
step it takes is the whole batch's (the gradients add up to the batch's mean-loss gradient)."""

import math
import random

import pytest
import torch

from edge_runtime.errors import ConfigError
from edge_runtime.methods import lora
from edge_runtime.training.data import LocalDataset
from edge_runtime.training.models import build_tiny_model, load_tokenizer, resolve_model_source
from edge_runtime.training.spec import TrainingSpec
from edge_runtime.training.trainer import TrainConfig, loss_shares, train_local

WORDS = "oak fern moss kelp rose pine lily reed ivy sage mint thyme".split()


def _data(n=40, seed=0, kind="classification") -> LocalDataset:
    rng = random.Random(seed)
    texts = tuple(" ".join(rng.choices(WORDS, k=rng.choice([1, 3, 6, 12]))) for _ in range(n))
    if kind == "classification":
        return LocalDataset(kind, texts, tuple(rng.randrange(3) for _ in range(n)), ("a", "b", "c"))
    # responses of 1 to 5 words: micro-batches predict different numbers of tokens
    return LocalDataset(kind, texts, tuple(" ".join(rng.choices(WORDS, k=rng.randint(1, 5))) for _ in range(n)), ())


def _model(data, name="tiny-bert", top=0):
    tok = load_tokenizer(resolve_model_source(name), data.inputs + tuple(map(str, data.targets)))
    task = "classification" if data.kind == "classification" else "causal-lm"
    base = build_tiny_model(name, task, len(tok), 3, layers=4, seed=0)
    spec = TrainingSpec(model=name, task=task, labels=("a", "b", "c") if task == "classification" else (),
                        lora=lora.LoraMethodConfig(rank=4, dropout=0.0, top_blocks=top))
    model = lora.build(base, spec)
    for m in model.modules():   # no dropout: the two paths must take the same step, not the same in law
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for cfg in (getattr(base, "config", None),):
        for key in ("attention_probs_dropout_prob", "attention_dropout", "hidden_dropout_prob"):
            if cfg is not None and hasattr(cfg, key):
                setattr(cfg, key, 0.0)
    return model, tok


def _trained(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_loss_shares_on_hand_computed_labels():
    # classification: by examples (3 of 4, then 1 of 4)
    assert loss_shares([torch.tensor([0, 2, 1]), torch.tensor([1])]) == [0.75, 0.25]
    # generation: by the tokens the model predicts (labels shifted by one, -100 not counted)
    a = torch.tensor([[-100, -100, 5, 6, 7], [-100, 4, 4, -100, -100]])   # predicts 3 + 2 = 5 tokens
    b = torch.tensor([[-100, -100, -100, 9, -100]])                       # predicts 1 token
    assert loss_shares([a, b]) == pytest.approx([5 / 6, 1 / 6])
    # a micro-batch with nothing to predict has no share (its own mean loss would be 0 / 0)
    none = torch.full((2, 3), -100)
    assert loss_shares([a, none]) == [1.0, 0.0] and loss_shares([none, none[:1]]) == [0.0, 0.0]


@pytest.mark.parametrize("name, kind, top, cache", [("tiny-bert", "classification", 0, False),
                                                    ("tiny-llama", "generation", 0, False),
                                                    ("tiny-bert", "classification", 2, True)])
def test_micro_batches_take_the_whole_batch_step(name, kind, top, cache):
    data = _data(kind=kind)
    results, weights, widths = {}, {}, {}
    for micro in (0, 5):
        model, tok = _model(data, name, top)
        seen = []   # the examples each training forward pass runs (the cache's build runs without grad)

        def count(_m, args, kwargs):
            if torch.is_grad_enabled():
                seen.append(int(kwargs["input_ids"].shape[0]))
        hook = model.get_base_model().register_forward_pre_hook(count, with_kwargs=True)
        cfg = TrainConfig(epochs=1, max_steps=3, batch_size=16, micro_batch_size=micro, lr=1e-2, max_seq_len=64,
                          cache_frozen=cache)
        results[micro] = train_local(model, tok, data, cfg, seed=0)
        hook.remove()
        weights[micro], widths[micro] = _trained(model), seen
    assert widths[0] == [16, 16, 16]                 # full batches (the third runs into the next epoch)
    assert widths[5] == [5, 5, 5, 1] * 3             # the same examples, 5 at a time
    assert results[5].tokens == results[0].tokens and results[5].examples == results[0].examples == 48
    assert results[5].padded_tokens <= results[0].padded_tokens   # each micro-batch pads to its own longest
    assert results[5].mean_loss == pytest.approx(results[0].mean_loss, rel=1e-5)
    moved = 0
    for k, w in weights[0].items():
        assert torch.allclose(weights[5][k], w, rtol=1e-4, atol=1e-6), (k, (weights[5][k] - w).abs().max())
        moved += int(not torch.equal(w, _model(data, name, top)[0].state_dict()[k]))
    assert moved > 0   # training changed the weights, so equality above is about the step


def test_micro_batch_size_is_validated():
    assert TrainConfig(micro_batch_size=0).micro_batch_size == 0
    for bad in (-1, True, 2.5, "8"):
        with pytest.raises(ConfigError, match="micro_batch_size"):
            TrainConfig(micro_batch_size=bad)


def test_micro_batches_with_nothing_to_predict_are_skipped_not_nan():
    # prompts of 12 words fill max_seq_len 8: those examples have no response token to predict
    rng = random.Random(1)
    prompts = tuple(" ".join(rng.choices(WORDS, k=12 if i % 3 == 0 else 2)) for i in range(24))
    data = LocalDataset("generation", prompts, tuple(rng.choice(WORDS) for _ in prompts), ())
    weights, results = {}, {}
    for micro in (0, 1):
        model, tok = _model(data, "tiny-llama")
        cfg = TrainConfig(epochs=1, batch_size=6, micro_batch_size=micro, lr=1e-2, max_seq_len=8)
        results[micro] = train_local(model, tok, data, cfg, seed=0)
        weights[micro] = _trained(model)
    assert math.isfinite(results[1].mean_loss) and results[1].mean_loss == pytest.approx(results[0].mean_loss, rel=1e-5)
    for k, w in weights[0].items():
        assert torch.isfinite(weights[1][k]).all() and torch.allclose(weights[1][k], w, rtol=1e-4, atol=1e-6), k
