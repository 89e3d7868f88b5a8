"""Evaluation: loss and accuracy (label accuracy, or response-token accuracy for generation).

Batches are formed from examples of similar length (each padded only to its batch's longest), and
the per-example results come back in data order; with the frozen-activation cache on, only the
blocks above the cached one run. :class:`EvalConfig` (the spec's ``eval`` section)
says how much of a round's evaluation of the received global a device does: every ``every``-th
global (the untrained global 0 too, unless ``initial`` is false), on a fixed random ``sample`` of its
test split; the final global is always evaluated whole.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch

from edge_runtime.errors import ConfigError
from edge_runtime.service import lifecycle
from edge_runtime.training.data import LocalDataset, encode_batch, example_lengths
from edge_runtime.training.frozen_cache import frozen_cache, replaying
from edge_runtime.training.precision import autocast


@dataclass(frozen=True)
class EvalConfig:
    """How a device evaluates the global it receives before training on it (its round's first phase)."""

    every: int = 1     # evaluate global 0, every, 2 * every, ... (a round that skips reports no eval_*)
    sample: int = 0    # at most this many examples of the test split, the same ones each round; 0 = all
    initial: bool = True   # evaluate global 0 (the untrained start, in round 1); false: skip it

    def __post_init__(self) -> None:
        for name in ("every", "sample"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "every" else 0):
                raise ConfigError(f"eval.{name} must be an integer >= {1 if name == 'every' else 0}, got {v!r}")
        if not isinstance(self.initial, bool):
            raise ConfigError(f"eval.initial must be true or false, got {self.initial!r}")

    def evaluates(self, global_round: int) -> bool:
        return global_round % self.every == 0 and (global_round > 0 or self.initial)

    def subset(self, test: LocalDataset, seed: int) -> LocalDataset:
        """The examples a round evaluates: all, or ``sample`` of them drawn once with ``seed``."""
        if not self.sample or self.sample >= len(test):
            return test
        keep = np.random.default_rng(seed).permutation(len(test))[: self.sample]
        return test.subset(sorted(int(i) for i in keep))


@dataclass(frozen=True)
class EvalResult:
    loss: float                 # mean cross-entropy per example (classification) or token (generation)
    accuracy: float             # in [0, 1]
    n: int                      # examples evaluated
    correct: tuple[float, ...] = field(default=(), repr=False)  # per-example accuracy, in data order


@torch.inference_mode()
def evaluate(model: torch.nn.Module, tokenizer, data: LocalDataset, batch_size: int = 64,
             max_seq_len: int = 64, cache_mb: float | None = None, precision: str = "fp32") -> EvalResult:
    """Evaluate ``model`` on every example of ``data`` (all layers, no dropout), in batches of
    similar length; ``correct`` is in data order. With ``cache_mb`` (``train.cache_frozen``), the
    frozen blocks below the lowest trained one replay their cached output for ``data``
    (:mod:`edge_runtime.training.frozen_cache`: built on the first call, the same numbers).
    ``precision``: the device's ``train.precision`` (bf16 autocast where it resolves to bf16)."""
    if len(data) == 0:
        return EvalResult(float("nan"), float("nan"), 0)
    cache = None
    if cache_mb is not None:
        with torch.inference_mode(False):   # plain tensors: a cache may serve training too
            cache = frozen_cache(model, tokenizer, data, max_seq_len, cache_mb, precision)
    model.eval()
    total_loss, total_tokens = 0.0, 0
    lengths = example_lengths(tokenizer, data, max_seq_len)
    order = sorted(range(len(data)), key=lambda i: lengths[i])
    per_example: list[float] = []
    for start in range(0, len(data), batch_size):
        lifecycle.progress()
        idx = order[start: start + batch_size]
        batch = encode_batch(tokenizer, data, idx, max_seq_len)
        labels = batch.pop("labels")
        with replaying(model, cache, idx, batch["attention_mask"]) if cache else contextlib.nullcontext(), \
                autocast(model, precision):
            logits = model(**batch).logits.float()
        if data.kind == "classification":
            total_loss += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            total_tokens += len(idx)
            per_example += (logits.argmax(-1) == labels).float().tolist()
        else:
            # token t predicts token t+1
            logits, labels = logits[:, :-1], labels[:, 1:]
            mask = labels != -100
            total_loss += torch.nn.functional.cross_entropy(
                logits[mask], labels[mask], reduction="sum").item()
            total_tokens += int(mask.sum())
            hits = ((logits.argmax(-1) == labels) & mask).sum(-1).float()
            per_example += (hits / mask.sum(-1).clamp(min=1)).tolist()
    loss = total_loss / max(total_tokens, 1)
    correct = [0.0] * len(data)
    for i, c in zip(order, per_example):
        correct[i] = c
    return EvalResult(loss, sum(correct) / len(correct), len(correct), tuple(correct))
