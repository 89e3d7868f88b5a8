"""The frozen-activation cache (``train.cache_frozen``) and LoRA on the top blocks (``lora.top_blocks``).

The cached path must compute what the reference path computes with its frozen bottom blocks in
eval mode (the one documented difference: no dropout there): logits and gradients are compared
with a float tolerance, since the cache was built with other batch widths than the step's.
"""

import contextlib
import dataclasses
import logging
import random
import types

import pytest
import torch

from edge_runtime.errors import ConfigError
from edge_runtime.methods import METHODS, lora
from edge_runtime.training import frozen_cache as fc
from edge_runtime.training.blocks import find_blocks, lowest_trained_block
from edge_runtime.training.data import LocalDataset, encode_batch
from edge_runtime.training.models import build_tiny_model, load_tokenizer, resolve_model_source
from edge_runtime.training.spec import TrainingSpec
from edge_runtime.training.trainer import TrainConfig, train_local

WORDS = "oak fern moss kelp rose pine lily reed ivy sage mint thyme".split()
TOL = 1e-5   # fp32: the same sums in another batch width (padding) differ in the last bits


def _data(n=48, seed=0, kind="classification") -> LocalDataset:
    rng = random.Random(seed)
    texts = tuple(" ".join(rng.choices(WORDS, k=rng.choice([1, 3, 6, 12]))) for _ in range(n))
    if kind == "classification":
        return LocalDataset(kind, texts, tuple(rng.randrange(3) for _ in range(n)), ("a", "b", "c"))
    return LocalDataset(kind, texts, tuple(" ".join(rng.choices(WORDS, k=3)) for _ in range(n)), ())


def _model(data, name="tiny-bert", top=2, layers=4, **lora_kw):
    tok = load_tokenizer(resolve_model_source(name), data.inputs + tuple(map(str, data.targets)))
    task = "classification" if data.kind == "classification" else "causal-lm"
    base = build_tiny_model(name, task, len(tok), 3, layers=layers, seed=0)
    spec = TrainingSpec(model=name, task=task, labels=("a", "b", "c") if task == "classification" else (),
                        lora=lora.LoraMethodConfig(rank=4, dropout=0.0, top_blocks=top, **lora_kw))
    return lora.build(base, spec), tok


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _step(model, batch, context):
    model.zero_grad(set_to_none=True)
    with context:
        out = model(**batch)
        out.loss.backward()
    return out.logits.detach(), _grads(model)


@pytest.mark.parametrize("name, kind", [("tiny-bert", "classification"), ("tiny-llama", "classification"),
                                        ("tiny-llama", "generation")])
def test_cached_logits_and_gradients_match_the_reference_path(name, kind):
    data = _data(kind=kind)
    model, tok = _model(data, name)
    cache = fc.frozen_cache(model, tok, data, 64, 64.0)
    assert cache is not None and cache.k == 2 and len(cache.hidden) == len(data)
    model.eval()   # the reference: no dropout anywhere (the cache has none in the bottom blocks)
    for idx in ([0, 1, 2, 3, 4, 5, 6, 7], [40, 3, 17], [11]):
        batch = encode_batch(tok, data, idx, 64)
        ref_logits, ref_grads = _step(model, batch, torch.enable_grad())
        logits, grads = _step(model, batch, fc.replaying(model, cache, idx, batch["attention_mask"]))
        assert len(find_blocks(model)[2]) == 4   # every block back after the step
        assert ref_grads.keys() == grads.keys() and len(grads) > 0
        if kind == "generation":   # per token: the padding's logits are no one's (labels -100 there)
            real = batch["attention_mask"].bool()
            logits, ref_logits = logits[real], ref_logits[real]
        assert torch.allclose(logits, ref_logits, atol=TOL, rtol=0), (logits - ref_logits).abs().max()
        for k in grads:
            assert torch.allclose(grads[k], ref_grads[k], atol=TOL, rtol=1e-4), (k, (grads[k] - ref_grads[k]).abs().max())


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_a_bf16_cache_is_built_in_bf16_kept_apart_and_matches_the_bf16_reference_path(name):
    """With ``train.precision=bf16`` the bottom blocks run under autocast when the cache is built,
    as they would on the uncached path; such a cache is never replayed in an fp32 run (nor the
    other way round). Tolerance: bf16 rounds each matmul to 8 bits of mantissa (2^-8 ~ 0.4%), and
    the cache's batch widths differ from the step's."""
    from edge_runtime.training.precision import autocast

    data = _data()
    model, tok = _model(data, name)
    c32 = fc.frozen_cache(model, tok, data, 64, 64.0)
    c16 = fc.frozen_cache(model, tok, data, 64, 64.0, "bf16")
    assert c16 is not c32 and c16.key != c32.key and c16.hidden[0].dtype == torch.float32
    assert fc.frozen_cache(model, tok, data, 64, 64.0, "bf16") is c16 and fc.frozen_cache(model, tok, data, 64, 64.0) is c32
    assert max((a - b).abs().max() for a, b in zip(c16.hidden, c32.hidden)) > 0   # computed in bf16 indeed
    model.eval()
    idx = [0, 1, 2, 3, 4, 5, 6, 7]
    batch = encode_batch(tok, data, idx, 64)
    def replayed(cache):
        stack = contextlib.ExitStack()
        stack.enter_context(fc.replaying(model, cache, idx, batch["attention_mask"]))
        stack.enter_context(autocast(model, "bf16"))
        return stack

    ref_logits, ref_grads = _step(model, batch, autocast(model, "bf16"))
    logits, grads = _step(model, batch, replayed(c16))
    assert ref_grads.keys() == grads.keys() and len(grads) > 0
    scale = ref_logits.abs().max()
    assert (logits.float() - ref_logits.float()).abs().max() <= 2e-2 * scale
    for k in grads:
        assert (grads[k] - ref_grads[k]).abs().max() <= 5e-2 * ref_grads[k].abs().max() + 1e-6, k
    # the fp32 cache replayed under bf16 would be a different (fp32-bottom) computation: not the same numbers
    mixed, _ = _step(model, batch, replayed(c32))
    assert not torch.equal(mixed, logits)


def test_a_cached_step_skips_the_bottom_blocks():
    data = _data()
    model, tok = _model(data)
    cache = fc.frozen_cache(model, tok, data, 64, 64.0)
    ran = []
    blocks = find_blocks(model)[2]
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    batch = encode_batch(tok, data, [0, 1], 64)
    with fc.replaying(model, cache, [0, 1], batch["attention_mask"]):
        model(**batch)
    model(**batch)
    for h in hooks:
        h.remove()
    assert ran == [2, 3, 0, 1, 2, 3]


@pytest.mark.parametrize("name, kind", [("tiny-bert", "classification"), ("tiny-llama", "generation")])
def test_cached_evaluation_gives_the_uncached_results_and_runs_only_the_top_blocks(name, kind):
    from edge_runtime.training.evaluate import evaluate

    data = _data(n=40, kind=kind)
    model, tok = _model(data, name)
    ref = evaluate(model, tok, data, batch_size=16, max_seq_len=64)
    ran = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(find_blocks(model)[2])]
    first = evaluate(model, tok, data, batch_size=16, max_seq_len=64, cache_mb=64.0)   # builds the cache
    ran.clear()
    again = evaluate(model, tok, data, batch_size=16, max_seq_len=64, cache_mb=64.0)   # replays it
    for h in hooks:
        h.remove()
    assert set(ran) == {2, 3}                        # blocks 0 and 1 never ran on the replay
    for res in (first, again):
        assert res.correct == ref.correct and res.n == ref.n
        assert res.loss == pytest.approx(ref.loss, abs=TOL)
    # the eval cache is plain tensors (not inference-mode ones): training on the same data may use it
    res, _ = _train(model, tok, data, cache_frozen=True, steps=2) if kind == "classification" else (None, None)
    assert res is None or res.metrics["cache_build_s"] == 0.0


def _train(model, tok, data, cache_frozen, steps=6):
    cfg = TrainConfig(batch_size=8, lr=5e-3, max_steps=steps, cache_frozen=cache_frozen)
    res = train_local(model, tok, data, cfg, seed=3)
    return res, lora.trainable_state(model)


def test_training_with_the_cache_ends_where_training_without_it_does():
    data = _data(64)
    model_a, tok = _model(data)
    model_b, _ = _model(data)
    for m in (model_a, model_b):   # no dropout anywhere: then the two paths are the same computation
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
    res_a, state_a = _train(model_a, tok, data, False)
    res_b, state_b = _train(model_b, tok, data, True)
    assert res_b.metrics["cache_block"] == 2.0 and res_b.metrics["cache_build_s"] > 0 and "cache_block" not in res_a.metrics
    assert abs(res_a.mean_loss - res_b.mean_loss) < 1e-4
    assert max((state_a[k] - state_b[k]).abs().max().item() for k in state_a) < 1e-4
    assert res_b.flops < 0.75 * res_a.flops   # the two bottom blocks' linear layers did not run


def test_the_cache_is_reused_and_rebuilt_when_what_it_depends_on_changes():
    data = _data()
    model, tok = _model(data)
    first = fc.frozen_cache(model, tok, data, 64, 64.0)
    assert fc.frozen_cache(model, tok, data, 64, 64.0) is first and first.uses == 2   # next round: reused
    res, _ = _train(model, tok, data, True, steps=2)                                   # training changes no frozen weight
    assert res.metrics["cache_build_s"] == 0.0 and fc.frozen_cache(model, tok, data, 64, 64.0) is first

    other = dataclasses.replace(data, inputs=data.inputs[:-1] + ("moss moss",))
    second = fc.frozen_cache(model, tok, other, 64, 64.0)
    assert second is not first and second.uses == 1                                 # new data: its own cache
    assert fc.frozen_cache(model, tok, data, 64, 64.0) is first                     # the first one kept
    assert fc.frozen_cache(model, tok, data, 8, 64.0) is not first                  # another max length
    budget = (first.nbytes + second.nbytes) / 2**20 * 1.01                          # room for two caches
    fc.frozen_cache(model, tok, data, 64, budget)
    fc.frozen_cache(model, tok, other, 64, budget)
    assert fc.frozen_cache(model, tok, data, 64, budget) is first                   # the 8-token one went first
    assert list(fc._CACHES[model]) == [second.key, first.key]
    now = fc.frozen_cache(model, tok, data, 64, 64.0)
    emb = model.get_base_model().bert.embeddings.word_embeddings.weight
    with torch.no_grad():
        emb.mul_(1.5)                                                               # the base changed
    rebuilt = fc.frozen_cache(model, tok, data, 64, 64.0)
    assert rebuilt is not now and not torch.equal(rebuilt.hidden[0], now.hidden[0])
    top = find_blocks(model)[2][3].attention.self.query.base_layer.weight
    with torch.no_grad():
        top.mul_(2.0)                                                               # above the cache: no effect
    assert fc.frozen_cache(model, tok, data, 64, 64.0) is rebuilt


def test_the_cache_is_off_where_it_does_not_apply(caplog, monkeypatch):
    data = _data()
    everywhere, tok = _model(data, top=0)                      # LoRA on block 0: nothing to skip
    assert lowest_trained_block(everywhere) == 0 and fc.frozen_cache(everywhere, tok, data, 64, 64.0) is None
    model, _ = _model(data)
    with caplog.at_level(logging.WARNING, "edge_runtime.training"):
        assert fc.frozen_cache(model, tok, data, 64, 0.001) is None          # over the budget
    assert "over train.cache_mb" in caplog.text
    # whatever the manifest allows, a cache never takes more than a quarter of the free memory
    need = fc.frozen_cache(model, tok, data, 64, 64.0).nbytes
    fc._CACHES.pop(model)
    monkeypatch.setattr(fc.psutil, "virtual_memory", lambda: types.SimpleNamespace(available=3 * need))
    with caplog.at_level(logging.WARNING, "edge_runtime.training"):
        assert fc.frozen_cache(model, tok, data, 64, 1e9) is None
    assert "this device has free" in caplog.text
    monkeypatch.undo()
    # a method that runs only some blocks per step: no cache, even when asked
    res = train_local(model, tok, data, TrainConfig(batch_size=8, max_steps=1, cache_frozen=True), seed=0,
                      step_context=lambda i: torch.enable_grad())
    assert "cache_block" not in res.metrics
    # FedPepTAO's deep prompts train in every block, block 0 included
    spec = TrainingSpec(model="tiny-bert", labels=("a", "b", "c"), method="fedpeptao")
    base = build_tiny_model("tiny-bert", "classification", len(tok), 3, layers=4, seed=0)
    prompted = METHODS["fedpeptao"].build(base, spec)
    assert lowest_trained_block(prompted) == 0 and fc.cache_block(prompted) is None
    # something trained outside the blocks and the head (an embedding): the blocks' input moves
    model.get_base_model().bert.embeddings.word_embeddings.weight.requires_grad_(True)
    assert lowest_trained_block(model) is None and fc.cache_block(model) is None


def test_top_blocks_puts_lora_on_the_top_blocks_only():
    data = _data()
    model, _ = _model(data, top=1)
    trained = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    assert trained and all(".layer.3." in n for n in trained)
    assert lowest_trained_block(model) == 3 and fc.cache_block(model) == 3
    with pytest.raises(ConfigError, match="has 4 blocks"):
        _model(data, top=5)
    with pytest.raises(ConfigError, match="do not combine"):
        lora.LoraMethodConfig(top_blocks=2, train_pooler="lora")
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="top_blocks"):
            lora.LoraMethodConfig(top_blocks=bad)
    for bad in (0, -3, "big", True):
        with pytest.raises(ConfigError, match="cache_mb"):
            TrainConfig(cache_mb=bad)
    with pytest.raises(ConfigError, match="cache_frozen"):
        TrainConfig(cache_frozen="yes")
