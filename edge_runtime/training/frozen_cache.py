"""The frozen-activation cache (``train.cache_frozen``): the blocks below the lowest trained one
compute the same thing every step, epoch and round (their weights are frozen and a device's data
is fixed), so their output is computed once per example and replayed.

Built once per (model, data) in eval mode (no dropout in those blocks: the one way the cached
path trains differently), kept in memory up to ``train.cache_mb``, and rebuilt when the data, the
sequence length, the lowest trained block or any frozen weight below it changes (a model keeps
one cache per dataset, the least recently used dropped first, all of them within the budget). On the cached
path a training step runs only blocks ``k..n-1`` (``k`` the cached block): the forward pass is
``k/n`` cheaper, and the memory the bottom blocks' activations took in the reference path is gone.

It applies when every trainable parameter lies in the blocks or the head above them (LoRA,
FeDeRA, FDLoRA: yes; FedPepTAO's prompts sit below the blocks: no) and the method does not
change which blocks run (DropPEFT: no); ``lora.top_blocks`` moves the adapter up, and the cache
then skips the blocks below it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import psutil
import torch
from torch import Tensor, nn

from edge_runtime.service import lifecycle
from edge_runtime.training.blocks import block_of, find_blocks, in_head, lowest_trained_block
from edge_runtime.training.data import LocalDataset, encode_batch, example_lengths
from edge_runtime.training.precision import autocast, model_device_type, resolve

log = logging.getLogger("edge_runtime.training")

BUILD_BATCH = 64
FREE_SHARE = 0.25   # the most of the device's free memory a cache may take, whatever train.cache_mb says


class _Captured(Exception):
    """Raised by the capture hook: the rest of the forward pass is not needed."""


@dataclass
class FrozenCache:
    """Block ``k``'s input for every example of one dataset: ``hidden[i]`` is ``(len_i, H)``."""

    key: tuple
    k: int
    hidden: list[Tensor]
    path: str                # where the blocks are (:func:`find_blocks`), found once
    seconds: float = 0.0     # what building it took
    uses: int = 0            # training calls that used it (1: built for the current one)

    @property
    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hidden)

    def batch(self, indices: Sequence[int], attention_mask: Tensor) -> Tensor:
        """The padded ``(B, T, H)`` input of block ``k`` for a batch (zeros on the padding)."""
        lengths = attention_mask.sum(-1).tolist()
        first = self.hidden[indices[0]]
        out = torch.zeros(len(indices), attention_mask.shape[1], first.shape[-1], dtype=first.dtype)
        for j, i in enumerate(indices):
            h = self.hidden[i]
            if h.shape[0] != lengths[j]:
                raise RuntimeError(f"frozen cache: example {i} has {h.shape[0]} cached tokens, the batch {lengths[j]}")
            out[j, : h.shape[0]] = h
        return out


# per model, its caches (one per dataset: a simulation's devices share one model), least recently used first
_CACHES: "weakref.WeakKeyDictionary[nn.Module, OrderedDict[tuple, FrozenCache]]" = weakref.WeakKeyDictionary()


def cache_block(model: nn.Module) -> int | None:
    """The block whose input is cached: the lowest trained one (the last block when only the head
    trains); None when nothing can be skipped."""
    lowest = lowest_trained_block(model)
    if lowest is None or lowest == 0:
        return None
    return min(lowest, len(find_blocks(model)[2]) - 1) or None


def _key(model: nn.Module, tokenizer, data: LocalDataset, max_len: int, k: int, precision: str) -> tuple:
    """What the cached activations depend on: the data, the tokenizer, the length, ``k``, the
    precision they were computed in, and the identity and version of every frozen weight below
    block ``k`` (a reload or in-place change of the base bumps it)."""
    h = hashlib.sha256()
    for text in data.inputs:
        h.update(text.encode("utf-8", "surrogatepass") + b"\0")
    if data.kind != "classification":
        for text in data.targets:
            h.update(str(text).encode("utf-8", "surrogatepass") + b"\0")
    path = find_blocks(model)[3]
    weights = tuple((p.data_ptr(), p._version, tuple(p.shape)) for name, p in model.named_parameters()
                    if not in_head(name) and ((b := block_of(name, path)) is None or b < k))
    return (h.hexdigest(), data.kind, id(tokenizer), max_len, k, precision,
            hashlib.sha256(repr(weights).encode()).hexdigest())


def frozen_cache(model: nn.Module, tokenizer, data: LocalDataset, max_len: int, budget_mb: float,
                 precision: str = "fp32") -> FrozenCache | None:
    """The model's cache for ``data`` (built now if missing or stale); None, with the reason
    logged, when the model trains its lowest block or something below the blocks, or the cache
    would pass ``budget_mb`` or a quarter of the memory the device has free. The bottom blocks run
    in ``precision`` (``train.precision``), as the uncached path would run them."""
    k = cache_block(model)
    if k is None:
        log.info("frozen cache: off (the model trains its lowest block or something below the blocks)")
        return None
    precision = resolve(precision, model_device_type(model))
    key = _key(model, tokenizer, data, max_len, k, precision)
    held = _CACHES.setdefault(model, OrderedDict())
    if key in held:
        held.move_to_end(key)
        held[key].uses += 1
        _trim(held, budget_mb)
        return held[key]
    lengths = example_lengths(tokenizer, data, max_len)
    hidden_size = getattr(getattr(model, "config", None), "hidden_size", None) or 0
    need_mb = sum(lengths) * hidden_size * 4 / 2**20
    if need_mb > budget_mb:
        log.warning("frozen cache: off (%.1f MB of activations for %d examples, over train.cache_mb=%g)",
                    need_mb, len(data), budget_mb)
        return None
    free_mb = psutil.virtual_memory().available / 2**20
    if need_mb > FREE_SHARE * free_mb:   # whatever the manifest allows: never the device's last memory
        log.warning("frozen cache: off (%.1f MB of activations, over %.0f%% of the %.0f MB this device has free)",
                    need_mb, 100 * FREE_SHARE, free_mb)
        return None
    _trim(held, budget_mb - need_mb, keep=0)
    start = time.perf_counter()
    cache = FrozenCache(key, k, _build(model, tokenizer, data, max_len, k, lengths, precision),
                        find_blocks(model)[3], uses=1)
    cache.seconds = time.perf_counter() - start
    held[key] = cache
    log.info("frozen cache: block %d's input for %d examples, %.1f MB, built in %.2f s",
             k, len(data), cache.nbytes / 2**20, cache.seconds)
    return cache


def _trim(held: "OrderedDict[tuple, FrozenCache]", budget_mb: float, keep: int = 1) -> None:
    """Drop the least recently used caches (another dataset's, or one for weights since changed)
    until the rest fit ``budget_mb``; the ``keep`` most recent ones stay."""
    while len(held) > keep and sum(c.nbytes for c in held.values()) / 2**20 > budget_mb:
        held.popitem(last=False)


def _build(model: nn.Module, tokenizer, data: LocalDataset, max_len: int, k: int,
           lengths: list[int], precision: str) -> list[Tensor]:
    blocks = find_blocks(model)[2]
    captured: list[Tensor] = []

    def capture(module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise _Captured

    hidden: list[Tensor | None] = [None] * len(data)
    order = sorted(range(len(data)), key=lambda i: -lengths[i])   # little padding
    was_training = model.training
    model.eval()
    handle = blocks[k].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():   # not inference_mode: the tensors become autograd inputs later
            for start in range(0, len(order), BUILD_BATCH):
                lifecycle.progress()
                idx = order[start:start + BUILD_BATCH]
                batch = encode_batch(tokenizer, data, idx, max_len)
                batch.pop("labels")
                captured.clear()
                with contextlib.suppress(_Captured), autocast(model, precision):
                    model(**batch)
                out = captured[0]
                for j, i in enumerate(idx):
                    hidden[i] = out[j, : lengths[i]].clone()
    finally:
        handle.remove()
        model.train(was_training)
    return hidden  # type: ignore[return-value]


@contextlib.contextmanager
def replaying(model: nn.Module, cache: FrozenCache, indices: Sequence[int], attention_mask: Tensor):
    """Within the block, the model runs blocks ``k..n-1`` only, block ``k`` reading the cached input
    of examples ``indices`` (the batch's rows, in order) instead of what the embeddings give it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parent_path, _, attr = cache.path.rpartition(".")
    parent = base.get_submodule(parent_path) if parent_path else base
    blocks = getattr(parent, attr)
    cached = cache.batch(indices, attention_mask)

    def feed(module, args, kwargs):
        if args:
            return (cached, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": cached}

    handle = blocks[cache.k].register_forward_pre_hook(feed, with_kwargs=True)
    setattr(parent, attr, nn.ModuleList(list(blocks)[cache.k:]))
    try:
        yield
    finally:
        setattr(parent, attr, blocks)
        handle.remove()
