"""The local training loop: one readable loop that trains a device's adapter on its own data."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Sequence

import torch

from edge_runtime.errors import ConfigError
from edge_runtime.service import lifecycle
from edge_runtime.training.data import LocalDataset, encode_batch, example_lengths
from edge_runtime.training.frozen_cache import frozen_cache, replaying
from edge_runtime.training.precision import PRECISIONS, autocast, model_device_type, resolve
from edge_runtime.training.seeding import seeded, stochastic
from edge_runtime.training.throughput import count_linear_flops

log = logging.getLogger("edge_runtime.training")


@dataclass(frozen=True)
class TrainConfig:
    """Local-training hyper-parameters of one round on one device."""

    epochs: float = 1.0              # passes over the local train split (fractions allowed)
    max_steps: int | None = None     # hard cap on optimizer steps per round
    batch_size: int = 16
    micro_batch_size: int = 0        # examples per forward/backward, gradients summed to the batch's; 0 = the batch
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_seq_len: int = 64            # tokens
    grad_clip: float = 1.0           # max global grad norm; 0 disables
    gradient_checkpointing: bool = False   # recompute activations in backward: less memory, ~1/3 more compute
    group_by_length: bool = False    # batches of similar lengths (less padding), see epoch_order
    cache_frozen: bool = False       # replay the frozen bottom blocks' output (edge_runtime.training.frozen_cache)
    cache_mb: float = 256.0          # the most memory that cache may take; over it, training runs uncached
    precision: str = "fp32"          # fp32 | bf16 | auto: bf16 autocast where native (edge_runtime.training.precision)

    def __post_init__(self) -> None:
        for name in ("epochs", "lr", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"train.{name} must be a finite number, got {v!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(f"train.weight_decay and train.grad_clip must be >= 0 (grad_clip 0: no clipping), "
                              f"got {self.weight_decay!r} and {self.grad_clip!r}")
        if not self.epochs > 0:
            raise ConfigError(f"train.epochs must be > 0, got {self.epochs!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1, got {self.max_steps!r}")
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size must be >= 1, got {self.batch_size!r}")
        if isinstance(self.micro_batch_size, bool) or not isinstance(self.micro_batch_size, int) \
                or self.micro_batch_size < 0:
            raise ConfigError(f"train.micro_batch_size must be an integer >= 0 (0: the whole batch), "
                              f"got {self.micro_batch_size!r}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr!r}")
        if self.max_seq_len < 4:
            raise ConfigError(f"train.max_seq_len must be >= 4, got {self.max_seq_len!r}")
        if isinstance(self.cache_mb, bool) or not isinstance(self.cache_mb, (int, float)) or not self.cache_mb > 0:
            raise ConfigError(f"train.cache_mb must be a number of MB > 0, got {self.cache_mb!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        for flag in ("gradient_checkpointing", "group_by_length", "cache_frozen"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"train.{flag} must be true or false, got {getattr(self, flag)!r}")

    def steps_for(self, n_examples: int) -> int:
        steps = math.ceil(self.epochs * n_examples / self.batch_size)
        return max(1, min(steps, self.max_steps) if self.max_steps else steps)


@dataclass(frozen=True)
class TrainResult:
    steps: int
    examples: int        # examples seen (with repeats)
    mean_loss: float
    seconds: float
    metrics: dict = field(default_factory=dict)   # method-specific numbers reported with the update
    layer_steps: tuple[int, ...] = ()   # steps each transformer block ran, when the method drops layers
    tokens: int = 0          # real (attended) tokens trained on
    padded_tokens: int = 0   # tokens computed, padding included
    flops: float = 0.0       # linear layers' training FLOPs (see edge_runtime.training.throughput)


def train_local(model: torch.nn.Module, tokenizer, data: LocalDataset, cfg: TrainConfig,
                seed: int, progress: bool = False, desc: str = "train",
                optimizer: torch.optim.Optimizer | None = None,
                after_step: Callable[[int], None] | None = None,
                step_context: Callable[[int], ContextManager] | None = None) -> TrainResult:
    """Train ``model``'s trainable parameters on ``data`` for ``cfg.steps_for(len(data))`` steps.

    A fresh AdamW each call unless the method passes its own ``optimizer`` (one whose state
    persists across rounds); ``after_step(i)`` runs after each optimizer step (a method's
    correction, e.g. control variates); ``step_context(i)`` wraps step ``i``'s forward and backward
    (DropPEFT runs only some blocks). Batches come from a seeded shuffle, reshuffled per epoch.
    With ``cfg.micro_batch_size``, a batch runs forward and backward that many examples at a time
    (each padded to its own longest) and the gradients add up to the whole batch's: the same step,
    with the activations of one micro-batch alive at a time.
    With ``cfg.cache_frozen`` (and no ``step_context``), the blocks below the lowest trained one
    run once per example, not per step (:mod:`edge_runtime.training.frozen_cache`).
    """
    if len(data) == 0:
        raise ConfigError("train_local: the device has no training examples")
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n_steps = cfg.steps_for(len(data))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_steps, desc=desc, leave=False, unit="step")
    start = time.perf_counter()
    cache, metrics = None, {}
    if cfg.cache_frozen and step_context is None:
        cache = frozen_cache(model, tokenizer, data, cfg.max_seq_len, cfg.cache_mb, cfg.precision)
        if cache is not None:
            metrics = {"cache_block": float(cache.k), "cache_mb": cache.nbytes / 2**20,
                       "cache_build_s": cache.seconds if cache.uses == 1 else 0.0}
    precision = resolve(cfg.precision, model_device_type(model))   # resolved once for the whole round
    metrics["train_bf16"] = float(precision == "bf16")
    model.train()
    _set_checkpointing(model, cfg.gradient_checkpointing)
    # dropout masks: the same seed trains the same way (and a dropout-free model never touches the
    # global generator, so devices sharing a process neither wait for nor disturb each other)
    masks = seeded(seed) if stochastic(model) else contextlib.nullcontext()
    with masks, count_linear_flops(model) as flops:
        losses, seen, tokens = _run_steps(model, tokenizer, data, cfg, optimizer, params, gen, n_steps, bar,
                                          after_step, step_context, cache, precision)
    if bar is not None:
        bar.close()
    if not losses:
        log.warning("train_local: no batch of this round had a token to predict (every prompt fills "
                    "train.max_seq_len=%d); nothing was trained", cfg.max_seq_len)
    return TrainResult(n_steps, seen, sum(losses) / len(losses) if losses else 0.0, time.perf_counter() - start, metrics,
                       tokens=tokens[0], padded_tokens=tokens[1], flops=flops.flops)


GROUP_POOL = 16   # batches per length-sorted pool (group_by_length)


def epoch_order(n: int, batch_size: int, gen: torch.Generator, lengths: Sequence[int] | None = None) -> list[int]:
    """One epoch's example order, taken ``batch_size`` at a time: a seeded shuffle of ``range(n)``.

    With ``lengths`` (tokens per example), length-grouped: the shuffle is cut into pools of
    ``GROUP_POOL`` batches, each pool sorted by length (longest first, ties in shuffle order) and
    its batches shuffled again. A batch then pads to similar lengths, and which examples share a
    pool stays random. Every example still comes once an epoch."""
    perm = torch.randperm(n, generator=gen).tolist()
    if lengths is None:
        return perm
    out: list[int] = []
    pool = batch_size * GROUP_POOL
    for start in range(0, n, pool):
        chunk = sorted(perm[start:start + pool], key=lambda i: -lengths[i])
        batches = [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
        for b in torch.randperm(len(batches), generator=gen).tolist():
            out += batches[b]
    return out


def _set_checkpointing(model: torch.nn.Module, on: bool) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "gradient_checkpointing_enable"):
        return
    flag = "is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"   # renamed in transformers 5
    active = bool(getattr(base, flag, False))
    if on and not active:
        # non-reentrant: works with a frozen embedding (no input that requires grad) and with peft
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif not on and active:
        base.gradient_checkpointing_disable()


def loss_shares(labels: Sequence[torch.Tensor]) -> list[float]:
    """Each micro-batch's share of its batch's mean loss: its examples (classification, ``labels``
    of shape ``(B,)``) or its predicted tokens (generation: the shifted labels that are not -100),
    over the whole batch's. Weighting each micro-batch's mean loss by its share gives the batch's
    mean, so the summed gradients are the batch's gradient. A micro-batch with nothing to predict
    (every prompt fills the length) has share 0 and is skipped: its mean loss would be 0 / 0."""
    counts = [int((lab[..., 1:] != -100).sum()) if lab.dim() > 1 else lab.numel() for lab in labels]
    total = sum(counts)
    return [c / total if total else 0.0 for c in counts]


def _run_steps(model, tokenizer, data, cfg, optimizer, params, gen, n_steps, bar,
               after_step=None, step_context=None, cache=None, precision="fp32") -> tuple[list[float], int, tuple[int, int]]:
    """The steps; returns (losses, examples seen, (real tokens, padded tokens))."""
    order: list[int] = []
    losses: list[float] = []
    seen = real = padded = 0
    lengths = example_lengths(tokenizer, data, cfg.max_seq_len) if cfg.group_by_length else None
    size = cfg.micro_batch_size or cfg.batch_size
    for i in range(n_steps):
        lifecycle.progress()  # watchdog liveness; raises Interrupted once a stop was requested
        if len(order) < cfg.batch_size:
            order += epoch_order(len(data), cfg.batch_size, gen, lengths)
        batch_idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
        optimizer.zero_grad(set_to_none=True)
        micro = [batch_idx[j:j + size] for j in range(0, len(batch_idx), size)]
        batches = [encode_batch(tokenizer, data, m, cfg.max_seq_len) for m in micro]
        shares = loss_shares([b["labels"] for b in batches])
        step_loss = 0.0
        with step_context(i) if step_context is not None else contextlib.nullcontext():
            for m, batch, share in zip(micro, batches, shares):
                real += int(batch["attention_mask"].sum())
                padded += batch["attention_mask"].numel()
                if share == 0:
                    continue   # nothing to predict: no loss term, no gradient
                replay = replaying(model, cache, m, batch["attention_mask"]) if cache is not None \
                    else contextlib.nullcontext()   # (a step_context never comes with a cache)
                with replay:
                    with autocast(model, precision):   # the forward only: backward runs in the forward's dtypes
                        loss = model(**batch).loss
                    (loss if len(micro) == 1 else loss * share).backward()
                step_loss += loss.item() * share
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        if after_step is not None:
            after_step(i)
        if any(shares):   # a batch with nothing to predict moves nothing and reports no loss
            losses.append(step_loss)
        seen += len(batch_idx)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses, seen, (real, padded)
