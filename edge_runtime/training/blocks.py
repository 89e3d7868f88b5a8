"""Where a model's transformer blocks are, and which of them an adapter trains.

Shared by DropPEFT (which runs only some blocks per step) and the frozen-activation cache (which
skips the blocks below the lowest trained one): both find the blocks once, the same way.
"""

from __future__ import annotations

from torch import nn

from edge_runtime.errors import ConfigError

# what sits after the blocks: BERT's head and pooler, Llama's score head and LM head
HEAD_MODULES = ("classifier", "score", "pooler", "lm_head")


def find_blocks(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList, str]:
    """``(parent, attribute, blocks, path)`` of the model's transformer blocks: the ``ModuleList``
    of identical modules with ``config.num_hidden_layers`` entries (else the longest such list);
    ``path`` is relative to the base model (peft's wrapper removed)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n_cfg = getattr(getattr(base, "config", None), "num_hidden_layers", None)
    found = [(name, m) for name, m in base.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1]
    if not found:
        raise ConfigError(f"{type(base).__name__} has no ModuleList of transformer blocks")
    exact = [(n, m) for n, m in found if len(m) == n_cfg]
    name, blocks = (exact or sorted(found, key=lambda nm: -len(nm[1])))[0]
    parent_name, _, attr = name.rpartition(".")
    return base.get_submodule(parent_name) if parent_name else base, attr, blocks, name


def block_of(name: str, path: str) -> int | None:
    """The block index of parameter ``name`` (a full name, peft's prefixes included) when it lies
    in the blocks at ``path`` (``bert.encoder.layer``), else None."""
    prefix = path + "."
    at = name.find(prefix)
    while at > 0 and name[at - 1] != ".":
        at = name.find(prefix, at + 1)
    if at < 0:
        return None
    return int(name[at + len(prefix):].split(".", 1)[0])


def in_head(name: str) -> bool:
    return any(part in HEAD_MODULES for part in name.split("."))


def lowest_trained_block(model: nn.Module) -> int | None:
    """The index of the lowest block with a trainable parameter, when every trainable parameter
    lies in a block or in the head above them (``len(blocks)`` when only the head trains); None
    when something below or beside the blocks trains (embeddings, a soft prompt, ...), so the
    blocks' input is not fixed."""
    _, _, blocks, path = find_blocks(model)
    lowest = len(blocks)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        b = block_of(name, path)
        if b is not None:
            lowest = min(lowest, b)
        elif not in_head(name):
            return None
    return lowest
