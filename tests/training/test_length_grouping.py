"""Length-grouped batching (``train.group_by_length``): less padding, the same examples, the same loss."""

import random

import pytest
import torch

from edge_runtime.errors import ConfigError
from edge_runtime.methods import lora
from edge_runtime.training.data import LocalDataset, encode_batch, example_lengths
from edge_runtime.training.models import load_model, load_tokenizer, resolve_model_source
from edge_runtime.training.spec import TrainingSpec
from edge_runtime.training.trainer import GROUP_POOL, TrainConfig, epoch_order, train_local

WORDS = "oak fern moss kelp rose pine lily reed ivy sage mint thyme".split()


def _data(n=160, seed=0) -> LocalDataset:
    rng = random.Random(seed)   # 1 to 24 words: lengths that vary as glosses do
    texts = tuple(" ".join(rng.choices(WORDS, k=rng.choice([1, 2, 3, 6, 12, 24]))) for _ in range(n))
    return LocalDataset("classification", texts, tuple(rng.randrange(3) for _ in range(n)), ("a", "b", "c"))


def _model(data):
    src = resolve_model_source("tiny-bert")
    tok = load_tokenizer(src, data.inputs)
    spec = TrainingSpec(model="tiny-bert", labels=("a", "b", "c"), lora=lora.LoraMethodConfig(rank=4))
    return lora.build(load_model(src, "classification", 3, tok), spec), tok


def _batches(order, size):
    return [order[i:i + size] for i in range(0, len(order), size)]


def test_epoch_order_groups_lengths_and_keeps_every_example_once():
    lengths = [random.Random(i).randrange(1, 64) for i in range(1000)]
    plain = epoch_order(1000, 8, torch.Generator().manual_seed(5))
    grouped = epoch_order(1000, 8, torch.Generator().manual_seed(5), lengths)
    assert plain == torch.randperm(1000, generator=torch.Generator().manual_seed(5)).tolist()   # off: as before
    assert sorted(grouped) == list(range(1000)) and grouped != plain
    assert grouped == epoch_order(1000, 8, torch.Generator().manual_seed(5), lengths)            # seeded
    # each pool of GROUP_POOL batches holds the same examples as the plain shuffle's
    pool = 8 * GROUP_POOL
    assert all(sorted(grouped[i:i + pool]) == sorted(plain[i:i + pool]) for i in range(0, 1000, pool))

    def padded(order):
        return sum(len(b) * max(lengths[i] for i in b) for b in _batches(order, 8))

    assert padded(grouped) < 0.7 * padded(plain)


def test_grouped_batches_give_the_same_loss_as_shuffled_ones():
    data = _data()
    model, tok = _model(data)
    model.eval()
    lengths = example_lengths(tok, data, 64)
    assert lengths == [int(encode_batch(tok, data, [i], 64)["attention_mask"].sum()) for i in range(len(data))]

    def total_loss(order):
        total, pad = 0.0, 0
        with torch.no_grad():
            for b in _batches(order, 16):
                batch = encode_batch(tok, data, b, 64)
                total += float(model(**batch).loss) * len(b)
                pad += int((batch["attention_mask"] == 0).sum())
        return total / len(order), pad

    plain, plain_pad = total_loss(epoch_order(len(data), 16, torch.Generator().manual_seed(1)))
    grouped, grouped_pad = total_loss(epoch_order(len(data), 16, torch.Generator().manual_seed(1), lengths))
    assert grouped == pytest.approx(plain, rel=1e-5, abs=1e-6)   # padding to a batch's longest changes no loss
    assert grouped_pad < plain_pad / 2


def test_training_with_grouped_batches_pads_less():
    data = _data()
    results = {}
    for group in (False, True):
        model, tok = _model(data)
        results[group] = train_local(model, tok, data, TrainConfig(epochs=1, batch_size=16, lr=1e-2, max_seq_len=64,
                                                                   group_by_length=group), seed=0)
    assert results[True].tokens == results[False].tokens            # the same examples, once each
    assert results[True].padded_tokens < 0.7 * results[False].padded_tokens
    with pytest.raises(ConfigError, match="group_by_length"):
        TrainConfig(group_by_length="yes")
