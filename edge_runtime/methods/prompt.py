"""Deep prompt tuning (P-tuning v2): trainable key/value prefixes in every attention layer.

Each transformer layer ``l`` gets a parameter of shape ``[P, 2, H_kv]`` (P prefix positions,
key and value, ``H_kv`` = key/value heads x head size): the layer's attention sees P extra
keys and values before the sequence's own, which every token may attend to (in causal models
too: a prefix is "earlier" than every token). The base model is frozen; the prefixes and, for
classification, the task head are trained. The whole model is ``[P, L, 2, H]`` in the paper's
notation, kept per layer here so layers can be shared or kept personal one by one (FedPepTAO).

Why not peft's prefix tuning: peft feeds prefixes through ``past_key_values``, which the ONNX
exporter does not take as a parameter of the graph, cannot leave one layer without prefixes
(FedPepTAO's "masked" layers: zeroing a prefix is *not* the same as masking it, since zero keys
still take softmax mass), and ties the prefix layout to each model's cache class. Here the
prefix is injected by an attention function registered with transformers'
``AttentionInterface`` (``edge_prefix``: the SDPA kernel with the layer's prefix concatenated
to K and V and the mask widened), so any model whose attention goes through that interface
(BERT, Llama and most current families) works, and export puts the prefixes in the graph.

As a method (``method: prompt``): every layer's prefix and the head are shared and averaged
with FedAvg; it is the baseline FedPepTAO is measured against.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

import torch
from torch import Tensor, nn

from edge_runtime.algorithms.aggregation import check_compatible, fedavg
from edge_runtime.errors import AggregationError, ConfigError
from edge_runtime.methods import lora
from edge_runtime.methods.base import Method

if TYPE_CHECKING:
    from edge_runtime.methods.personal import PersonalState
    from edge_runtime.training.spec import TrainingSpec

ATTN_IMPL = "edge_prefix"
PARAM = "edge_prompt"               # the per-layer prefix parameter, on the attention module
HEAD_MODULES = ("classifier", "score")
CONFIG_FILE = "prompt_config.json"  # an adapter folder of prompts (instead of peft's adapter_config.json)
WEIGHTS_FILE = "prompts.safetensors"
DEFAULT_LR = 4e-2                   # the FedPepTAO authors' device lr; prompts need far more than LoRA


@dataclass(frozen=True)
class PromptConfig:
    """Deep-prompt hyper-parameters: ``length`` prefix positions per layer (None: 20 for encoders,
    5 for decoders, the authors' settings), initial values ~ N(0, ``init_std``)."""

    length: int | None = None
    init_std: float = 0.5

    def __post_init__(self) -> None:
        if self.length is not None and (not isinstance(self.length, int) or not 1 <= self.length <= 512):
            raise ConfigError(f"prompt.length must be an integer in [1, 512], got {self.length!r}")
        if not self.init_std > 0:
            raise ConfigError(f"prompt.init_std must be > 0, got {self.init_std!r}")

    def length_for(self, model: nn.Module) -> int:
        if self.length is not None:
            return self.length
        return 5 if getattr(model.config, "is_decoder", False) or _is_causal_family(model) else 20


def _is_causal_family(model: nn.Module) -> bool:
    return any(getattr(m, "is_causal", False) for m in attention_modules(model))


# -- the attention function ----------------------------------------------------------------
def _prefix_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    prompt = getattr(module, PARAM, None)
    if prompt is None or not getattr(module, "edge_prompt_on", True):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bsz, kv_heads, kv_len, head_dim = key.shape
    n = prompt.shape[0]
    pk = prompt[:, 0].reshape(n, kv_heads, head_dim).transpose(0, 1).to(key.dtype)   # [kv_heads, P, d]
    pv = prompt[:, 1].reshape(n, kv_heads, head_dim).transpose(0, 1).to(value.dtype)
    key = torch.cat([pk.unsqueeze(0).expand(bsz, -1, -1, -1), key], dim=2)
    value = torch.cat([pv.unsqueeze(0).expand(bsz, -1, -1, -1), value], dim=2)
    q_len = query.shape[2]
    causal = kwargs.pop("is_causal", None)
    causal = getattr(module, "is_causal", False) if causal is None else causal
    if attention_mask is None:
        if causal and q_len > 1:  # SDPA's is_causal aligns top-left, wrong once K is longer: spell it out
            own = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
            attention_mask = torch.cat([own.new_ones(q_len, n), own], dim=1)[None, None]
    elif attention_mask.dtype == torch.bool:
        pad = attention_mask.new_ones(*attention_mask.shape[:-1], n)
        attention_mask = torch.cat([pad, attention_mask], dim=-1)
    else:  # additive float mask: 0 = attend
        pad = attention_mask.new_zeros(*attention_mask.shape[:-1], n)
        attention_mask = torch.cat([pad, attention_mask], dim=-1)
    return sdpa_attention_forward(module, query, key, value, attention_mask, is_causal=False, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_IMPL, _prefix_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPL, sdpa_mask)   # the same masks SDPA gets


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of each transformer layer, in layer order."""
    found = [m for n, m in model.named_modules()
             if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "config")
             and "crossattention" not in n.lower() and any(isinstance(c, nn.Linear) for c in m.children())]
    found.sort(key=lambda m: m.layer_idx)
    if not found or [m.layer_idx for m in found] != list(range(len(found))):
        raise ConfigError(f"deep prompts: cannot find one self-attention module per layer in {type(model).__name__}")
    return found


def _kv_dim(module: nn.Module) -> int:
    cfg = module.config
    head_dim = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None) \
        or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return int(kv_heads * head_dim)


def attach(model: nn.Module, length: int, init_std: float, seed: int, layers: Iterable[int] | None = None) -> None:
    """Add a ``[length, 2, H_kv]`` prefix to the attention of each layer in ``layers`` (all by
    default) and route attention through ``edge_prefix``. Same ``seed``, same prefixes."""
    _register()
    mods = attention_modules(model)
    wanted = set(range(len(mods)) if layers is None else layers)
    dtype = model.get_input_embeddings().weight.dtype   # not a quantized block's uint8 storage
    for i, (mod, values) in enumerate(zip(mods, draw_prompts(model, length, init_std, seed))):
        if i in wanted:
            setattr(mod, PARAM, nn.Parameter(values.to(dtype)))
            mod.edge_prompt_on = True
    model.set_attn_implementation(ATTN_IMPL)


def draw_prompts(model: nn.Module, length: int, init_std: float, seed: int) -> list[Tensor]:
    """The seeded initial prefix of every layer (all are drawn, so a layer's values do not depend on
    which others get a prefix)."""
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    return [torch.randn(length, 2, _kv_dim(mod), generator=gen) * init_std for mod in attention_modules(model)]


def set_active(model: nn.Module, active: Iterable[int]) -> None:
    """Layers outside ``active`` attend without their prefix (masked out, not zeroed)."""
    keep = set(active)
    for i, mod in enumerate(attention_modules(model)):
        mod.edge_prompt_on = i in keep


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The task head's parameters (``classifier`` / ``score``) by their names in the model."""
    return {n: p for n, p in model.named_parameters() if n.split(".")[0] in HEAD_MODULES}


def prompt_parameters(model: nn.Module) -> dict[int, nn.Parameter]:
    return {i: getattr(m, PARAM) for i, m in enumerate(attention_modules(model)) if hasattr(m, PARAM)}


def state_of(model: nn.Module, layers: Iterable[int] | None = None, head: bool = True) -> dict[str, Tensor]:
    """``{"prompt.<l>": [P, 2, H_kv], "head.<name>": ...}``, detached copies."""
    prompts = prompt_parameters(model)
    chosen = sorted(prompts) if layers is None else sorted(layers)
    out = {f"prompt.{i}": prompts[i].detach().clone() for i in chosen}
    if head:
        out.update({f"head.{n}": p.detach().clone() for n, p in head_parameters(model).items()})
    return out


def load_state(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy ``prompt.<l>`` / ``head.<name>`` tensors in (shapes checked; keys must exist)."""
    prompts, head = prompt_parameters(model), head_parameters(model)
    with torch.no_grad():
        for key, value in state.items():
            kind, _, rest = key.partition(".")
            if kind == "prompt" and rest.isdigit() and int(rest) in prompts:
                target = prompts[int(rest)]
            elif kind == "head" and rest in head:
                target = head[rest]
            else:
                raise AggregationError(f"prompt state: unexpected key {key!r}")
            if tuple(value.shape) != tuple(target.shape):
                raise AggregationError(f"prompt state: {key} has shape {tuple(value.shape)}, "
                                       f"the model expects {tuple(target.shape)}")
            target.copy_(value.to(target.dtype))


def prompt_layers_in(state: Mapping[str, Tensor]) -> list[int]:
    return sorted(int(k.split(".", 1)[1]) for k in state if k.startswith("prompt."))


# -- method hooks (``method: prompt``: every layer shared, FedAvg) --------------------------
def build(model: nn.Module, spec: "TrainingSpec"):
    for p in model.parameters():
        p.requires_grad_(False)
    attach(model, spec.prompt.length_for(model), spec.prompt.init_std, spec.seed)
    for p in head_parameters(model).values():
        p.requires_grad_(True)
    return model


def initial_global(model, spec: "TrainingSpec") -> dict[str, Tensor]:
    return trainable_state(model)


def prepare(model, spec: "TrainingSpec", init: Mapping[str, Tensor] | None) -> None:
    """Nothing to set up: every device draws the same prefixes from the spec's seed."""


def trainable_state(model) -> dict[str, Tensor]:
    return state_of(model)


def load_trainable_state(model, state: Mapping[str, Tensor]) -> None:
    check_compatible(trainable_state(model), state, where="global prompts")
    load_state(model, state)




def save_prompts(model: nn.Module, folder: Path, active: Iterable[int] | None = None,
                 extra: dict | None = None) -> None:
    """An adapter folder of prompts: ``prompts.safetensors`` + ``prompt_config.json``. Layers not in
    ``active`` (default: every layer with a prefix) are left out and attend without one."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = sorted(prompt_parameters(model)) if active is None else sorted(active)
    state = {k: v.float().contiguous() for k, v in state_of(model, layers).items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    length = next(iter(prompt_parameters(model).values())).shape[0]
    (folder / CONFIG_FILE).write_text(json.dumps({
        "kind": "deep_prompt", "length": int(length), "layers": layers,
        "num_layers": len(attention_modules(model)), **(extra or {})}, indent=2), encoding="utf-8")


def load_prompts(base: nn.Module, folder: Path) -> nn.Module:
    """Attach the prompts saved in ``folder`` to an untouched ``base`` model (for export / inference)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        cfg = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        state = load_file(str(folder / WEIGHTS_FILE))
        length, layers = int(cfg["length"]), [int(i) for i in cfg["layers"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{folder}: not a readable prompt adapter ({exc})") from exc
    if len(attention_modules(base)) != int(cfg.get("num_layers", -1)):
        raise ConfigError(f"{folder}: prompts for {cfg.get('num_layers')} layers, the model has "
                          f"{len(attention_modules(base))}")
    attach(base, length, 1.0, 0, layers=layers)
    load_state(base, state)
    return base


def save_adapter(model, folder: Path) -> None:
    save_prompts(model, folder)


def save_personal_adapter(model, personal: "PersonalState | None", folder: Path) -> None:
    save_adapter(model, folder)


METHOD = Method(
    name="prompt", summary="deep prompt tuning: a learnt prefix in every attention layer, FedAvg",
    build=build, initial_global=initial_global, trainable_state=trainable_state,
    load_trainable_state=load_trainable_state, local_train=lora.local_train, save_adapter=save_adapter,
    prepare=prepare, save_personal_adapter=save_personal_adapter, aggregate=fedavg,
    config=("prompt", PromptConfig), prompt_like=True, default_lr=DEFAULT_LR)
