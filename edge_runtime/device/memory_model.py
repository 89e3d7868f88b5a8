"""Peak training memory of a plan, predicted from the model's shape alone (no weights loaded).

    peak = runtime + base weights (by quantization) + unquantized parts (embeddings, head, norms)
         + adapter (weights + grads + AdamW moments) + activations of the kept layers for B x T
         + logits (+ their softmax and gradient)

The activation term is ``B*T*(a_d*d + a_f*f) + B*heads*T^2*a_att`` bytes per kept layer that a
backward pass goes through (with ``top_blocks`` the blocks below the adapter keep nothing; fp32
activations; half that in fp16), and with gradient checkpointing only each layer's input is kept
plus one layer's activations during recomputation. ``a_*`` and the runtime constant are
coefficients of :class:`Coefficients`, fitted by ``scripts/bench_memory.py`` against measured
peaks (process RSS on CPU, ``torch.cuda.max_memory_allocated`` on a GPU).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from pathlib import Path

from edge_runtime.errors import ConfigError

QUANTIZATIONS = ("fp32", "fp16", "int8", "nf4")
# bytes per weight of a quantized linear layer: int8 keeps a fp32 scale per row (~0);
# NF4 packs two weights per byte plus a fp32 absmax per 64 weights (double-quantized to ~8 bits)
BYTES_PER_WEIGHT = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "nf4": 0.5 + 1 / 64}


@dataclass(frozen=True)
class Arch:
    """What memory depends on in a transformer: its shape."""

    family: str               # "bert" (encoder) or "llama" (decoder)
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    positions: int
    tied_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def block_linear_params(self) -> int:
        """Weights of one block's linear layers (what quantization shrinks)."""
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_dim
        mlp = (3 if self.family == "llama" else 2) * self.hidden * self.intermediate
        return attn + mlp

    def other_params(self, task: str, num_labels: int) -> int:
        """Everything outside the blocks' linear layers: embeddings, norms, biases, pooler, head."""
        emb = self.vocab * self.hidden + (self.positions * self.hidden + 2 * self.hidden if self.family == "bert" else 0)
        norms = self.layers * 4 * self.hidden + 2 * self.hidden
        biases = self.layers * (4 * self.hidden + self.intermediate) if self.family == "bert" else 0
        if task == "causal-lm":
            head = 0 if self.tied_embeddings else self.vocab * self.hidden
        else:
            head = self.hidden * num_labels + (self.hidden * self.hidden if self.family == "bert" else 0)
        return emb + norms + biases + head


def arch_from_config(cfg) -> Arch:
    """An :class:`Arch` from a transformers config (BERT and Llama families)."""
    model_type = getattr(cfg, "model_type", "")
    family = "bert" if model_type in ("bert", "roberta", "distilbert", "xlm-roberta") else "llama"
    heads = cfg.num_attention_heads
    return Arch(family=family, layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
                intermediate=cfg.intermediate_size, heads=heads,
                kv_heads=getattr(cfg, "num_key_value_heads", None) or heads, vocab=cfg.vocab_size,
                positions=getattr(cfg, "max_position_embeddings", 512),
                tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)))


def load_arch(model: str) -> Arch:
    """The shape of a model spec (short name, folder, ``.gguf``) from its config only.

    Asked every round (the plan, the phase report). Reading a GGUF file's config parses all of its
    metadata, the tokenizer's vocabulary included (3-5 s for SmolLM2 on one core here), so it is read
    from the converted copy when there is one (``gguf_cache``), and once per file and process."""
    from edge_runtime.training.models import resolve_model_source

    src = resolve_model_source(model)
    if src.is_tiny:
        if src.name == "tiny-bert":
            return Arch("bert", 2, 32, 64, 4, 4, 2000, 256, False)
        return Arch("llama", 2, 32, 64, 4, 2, 2000, 256, False)
    if src.gguf_file:
        st = (src.path / src.gguf_file).stat()
        return _arch_of(str(src.path), src.gguf_file, st.st_size, st.st_mtime_ns)
    return _arch_of(str(src.path), None, 0, 0)


@functools.lru_cache(maxsize=16)
def _arch_of(path: str, gguf_file: str | None, size: int, mtime_ns: int) -> Arch:
    """(``size`` and ``mtime_ns`` key the cache: a replaced file is read again.)"""
    from transformers import AutoConfig

    if gguf_file:
        from edge_runtime.training import gguf_cache

        root = gguf_cache.cache_root()
        copy = gguf_cache.copy_folder(Path(path) / gguf_file, root) if root is not None else None
        if copy is not None and gguf_cache.complete(copy):
            return arch_from_config(AutoConfig.from_pretrained(copy))
    return arch_from_config(AutoConfig.from_pretrained(path, gguf_file=gguf_file))


@dataclass(frozen=True)
class Plan:
    """A training plan: what the planner chooses and the memory model prices."""

    quantization: str = "fp32"
    prompt_like: bool = False     # the adapter is per-layer prompts (the method's trait), else LoRA
    adapter_copies: int = 1       # LoRA adapters per target (the method's trait; FDLoRA: 2)
    rank: int = 8                 # LoRA rank
    lora_targets: int = 2         # adapted projections per block (q, v)
    prompt_length: int = 20
    batch_size: int = 16
    micro_batch: int = 0          # examples per forward/backward (train.micro_batch_size); 0: the whole batch
    seq_len: int = 64
    layer_drop: float = 0.0       # fraction of blocks skipped per step (DropPEFT)
    checkpointing: bool = False
    top_blocks: int = 0           # the adapter on the top N blocks only (lora.top_blocks; 0: all)
    cached: bool = False          # the frozen blocks below them replayed from the cache (train.cache_frozen)

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"plan.quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.batch_size < 1 or self.seq_len < 1 or self.rank < 1 or not 0 <= self.layer_drop < 1 \
                or self.micro_batch < 0:
            raise ConfigError(f"bad plan: {self}")

    @property
    def step_batch(self) -> int:
        """Examples whose activations are alive at once: a micro-batch, or the batch."""
        return min(self.micro_batch or self.batch_size, self.batch_size)

    def kept_layers(self, arch: Arch) -> int:
        return max(1, math.ceil(arch.layers * (1 - self.layer_drop) - 1e-9))   # 1e-9: 30 x 0.4 is 12.000...02

    def trained_layers(self, arch: Arch) -> int:
        """Blocks a backward pass goes through: from the lowest adapted block up."""
        return min(self.top_blocks or arch.layers, self.kept_layers(arch))


@dataclass(frozen=True)
class Coefficients:
    """Constants (bytes) fitted by ``scripts/bench_memory.py`` to 24 measured training peaks (MiniLM and
    SmolLM2 x fp32 / int8 / nf4 x batch 4, 8 x sequence 32, 96; process RSS on a 2-core x86 CPU, torch
    2.13, transformers 5.23, bitsandbytes 0.50): median error 5.1%, worst 18.8% (int8 SmolLM2, under)."""

    runtime: float = 506e6        # interpreter + torch + transformers + bitsandbytes + tokenizer + data
    a_d: float = 92.6             # activation bytes per token per layer, per unit of hidden size
    a_f: float = 32.4             # ... per unit of intermediate size
    a_att: float = 2.57           # ... per head per (query, key) pair
    logits_copies: float = 3.0    # logits, their log-softmax and gradient (causal LM)
    overhead: float = 1.0         # allocator slack (absorbed by the fit)


@dataclass(frozen=True)
class Breakdown:
    runtime: int
    base_weights: int
    other_weights: int
    adapter: int
    activations: int
    logits: int
    total: int

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def adapter_params(arch: Arch, plan: Plan, task: str, num_labels: int) -> int:
    if plan.prompt_like:
        n = arch.layers * plan.prompt_length * 2 * arch.kv_dim
    else:
        per_proj = plan.rank * (arch.hidden + arch.hidden)  # A: r x d_in, B: d_out x r (q / v are d x d)
        n = min(plan.top_blocks or arch.layers, arch.layers) * plan.lora_targets * per_proj * plan.adapter_copies
    if task == "classification":
        n += arch.hidden * num_labels + num_labels
    return n


def predict_peak(arch: Arch, plan: Plan, task: str = "classification", num_labels: int = 26,
                 coef: Coefficients = Coefficients()) -> Breakdown:
    """Predicted peak bytes of one local training step under ``plan``."""
    act_bytes = 0.5 if plan.quantization in ("fp16",) else 1.0   # fp16 activations halve the fp32 figures
    other_dtype = 2 if plan.quantization == "fp16" else 4         # unquantized parts stay in fp32 (or fp16)
    base = int(arch.layers * arch.block_linear_params() * BYTES_PER_WEIGHT[plan.quantization])
    other = arch.other_params(task, num_labels) * other_dtype
    adapter = adapter_params(arch, plan, task, num_labels) * 16    # fp32 weight + grad + two AdamW moments
    kv_len = plan.seq_len + (plan.prompt_length if plan.prompt_like else 0)
    b = plan.step_batch   # micro-batching keeps one micro-batch's activations alive at a time
    per_layer = (b * plan.seq_len * (coef.a_d * arch.hidden + coef.a_f * arch.intermediate)
                 + b * arch.heads * plan.seq_len * kv_len * coef.a_att) * act_bytes
    kept = plan.trained_layers(arch)   # the blocks below the adapter save nothing for a backward pass
    if plan.checkpointing:
        activations = kept * b * plan.seq_len * arch.hidden * 4 * act_bytes + per_layer
    else:
        activations = kept * per_layer
    if task == "causal-lm":
        logits = b * plan.seq_len * arch.vocab * 4 * coef.logits_copies
    else:
        logits = b * num_labels * 4 * coef.logits_copies
    core = base + other + adapter + activations + logits
    total = coef.runtime + core * coef.overhead
    return Breakdown(int(coef.runtime), base, other, adapter, int(activations), int(logits), int(total))


def with_coefficients(coef: Coefficients, **changes) -> Coefficients:
    return replace(coef, **changes)
