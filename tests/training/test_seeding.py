"""Devices that share a process (threads of an in-process fleet) still get the weights and the
dropout masks their seeds promise: seeded use of torch's global generator is serialised."""

import random
import threading

import torch

from edge_runtime.methods import lora
from edge_runtime.training.data import LocalDataset
from edge_runtime.training.models import build_tiny_model, load_model, load_tokenizer, resolve_model_source
from edge_runtime.training.seeding import RNG_LOCK, stochastic
from edge_runtime.training.spec import TrainingSpec
from edge_runtime.training.trainer import TrainConfig, train_local

WORDS = "oak fern moss kelp rose pine lily reed ivy sage mint thyme".split()
SPEC = TrainingSpec(model="tiny-bert", labels=("a", "b", "c"), lora=lora.LoraMethodConfig(rank=4, dropout=0.3))
CFG = TrainConfig(epochs=1, batch_size=8, lr=1e-2, max_seq_len=24)


def _data(n=64) -> LocalDataset:
    rng = random.Random(0)
    texts = tuple(" ".join(rng.choices(WORDS, k=rng.randint(2, 12))) for _ in range(n))
    return LocalDataset("classification", texts, tuple(rng.randrange(3) for _ in range(n)), ("a", "b", "c"))


def _device(tok):
    """What a device builds: the seeded base, LoRA on it (seeded A), ready to train."""
    return lora.build(load_model(resolve_model_source("tiny-bert"), "classification", 3, tok), SPEC)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _concurrently(fns) -> list:
    out, start = [None] * len(fns), threading.Barrier(len(fns))

    def run(i):
        start.wait()
        out[i] = fns[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_models_built_and_trained_on_threads_match_those_built_and_trained_alone():
    data = _data()
    tok = load_tokenizer(resolve_model_source("tiny-bert"), data.inputs)
    built_alone = _state(_device(tok))
    model = _device(tok)
    assert stochastic(model)          # LoRA dropout 0.3 and BERT's own: training draws masks
    train_local(model, tok, data, CFG, seed=3)
    trained_alone = _state(model)

    def build():
        return _state(_device(tok))

    def train():
        m = _device(tok)
        train_local(m, tok, data, CFG, seed=3)
        return _state(m)

    # four devices build while two others train with dropout, all at once, as a fleet's threads do
    # on a round's first manifest; then every one of them trains at once
    results = _concurrently([build] * 4 + [train] * 2)
    assert all(_equal(r, built_alone) for r in results[:4])
    assert all(_equal(r, trained_alone) for r in results[4:])
    assert all(_equal(r, trained_alone) for r in _concurrently([train] * 4))


def test_a_model_without_dropout_trains_without_waiting_for_the_generator():
    data = _data()
    tok = load_tokenizer(resolve_model_source("tiny-bert"), data.inputs)
    base = build_tiny_model("tiny-llama", "classification", len(tok), 3, seed=0)
    quiet = lora.build(base, TrainingSpec(model="tiny-llama", labels=("a", "b", "c"),
                                          lora=lora.LoraMethodConfig(rank=4, dropout=0.0)))
    assert not stochastic(quiet)
    done = threading.Event()
    with RNG_LOCK:      # another device holds the generator (building its model): this one still trains
        t = threading.Thread(target=lambda: (train_local(quiet, tok, data, CFG, seed=3), done.set()))
        t.start()
        t.join(120)
        assert done.is_set()
