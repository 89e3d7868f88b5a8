"""FDLoRA: a personal and a global LoRA on the same frozen base, fused without gradients.

Each device holds two peft adapters, ``personal`` (P, never leaves the device) and ``global`` (G,
the only thing uploaded and averaged). The device's own model is

    y = W0 x + a * s * B_P A_P x + b * s * B_G A_G x

with (a, b) found on the device's validation split by :func:`edge_runtime.algorithms.fusion.search_fusion`
(forward passes only; never worse on validation loss than P or G alone).

Choices ([choice] in ALGORITHMS.md; fields of :class:`FdloraConfig`):

- The task head (``classifier`` / ``score``, and BERT's ``pooler.dense`` unless
  ``lora.train_pooler: identity`` fixes it) is frozen and each
  adapter owns a full-rank delta of it (:class:`DualDeltaLinear`: W0 + a dW_P + b dW_G, bias
  likewise), so the fused model is exactly the formula above for every layer, and training a
  delta learns exactly as training the head itself would. (A first version put a LoRA
  factorisation on the head instead; its global adapter learned far too slowly: 7.5% WordNet
  accuracy after 3 rounds at alpha 0.1, where LoRA FedAvg reached 61%.)
- Schedule per round on a device: (1) with the freshly received G, search (a, b) and evaluate
  the fused model on the device's test split (``personal_accuracy``); (2) train P alone for
  ``warmup_epochs`` the first time, ``personal_epochs`` afterwards (0 turns it off); (3) train G
  alone (P inactive) for ``train.epochs`` and upload G. Training seconds reported include (2).
- The personal adapter and (a, b) are the device's :class:`~edge_runtime.methods.personal.PersonalState`:
  the agent writes them atomically to its state folder after every change, so they survive restarts.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch
from torch import Tensor

from edge_runtime.algorithms.aggregation import check_compatible, fedavg
from edge_runtime.algorithms.fusion import search_fusion
from edge_runtime.errors import AggregationError, ConfigError
from edge_runtime.methods import lora
from edge_runtime.methods.personal import PersonalState
from edge_runtime.training.data import Splits
from edge_runtime.training.seeding import seeded
from edge_runtime.training.evaluate import evaluate
from edge_runtime.training.trainer import TrainResult, train_local
from edge_runtime.methods.base import Method, ModelState

if TYPE_CHECKING:
    from edge_runtime.training.spec import TrainingSpec

GLOBAL, PERSONAL = "global", "personal"


@dataclass(frozen=True)
class FdloraConfig:
    warmup_epochs: float = 1.0       # personal training the first time a device takes part
    personal_epochs: float = 1.0     # personal training in every later round (0 = warm-up only)
    fusion_evals: int = 40           # validation-loss evaluations per fusion search
    fusion_max: float = 2.0          # a, b searched in [0, fusion_max]
    fusion_l1: float = 0.01          # L1 penalty on (a, b)

    def __post_init__(self) -> None:
        if self.warmup_epochs < 0 or self.personal_epochs < 0:
            raise ConfigError("fdlora.warmup_epochs and fdlora.personal_epochs must be >= 0")
        if not isinstance(self.fusion_evals, int) or self.fusion_evals < 3:
            raise ConfigError(f"fdlora.fusion_evals must be an integer >= 3, got {self.fusion_evals!r}")
        if not self.fusion_max > 0:
            raise ConfigError(f"fdlora.fusion_max must be > 0, got {self.fusion_max!r}")
        if self.fusion_l1 < 0:
            raise ConfigError(f"fdlora.fusion_l1 must be >= 0, got {self.fusion_l1!r}")


# per model: the personal adapter as build() drew it (what a device without a personal state starts from)
STATE: ModelState[dict[str, Tensor]] = ModelState("fdlora")


class DualDeltaLinear(torch.nn.Module):
    """A frozen linear layer plus one full-rank delta per adapter: W0 + sum(scale_k * dW_k) (bias likewise)."""

    def __init__(self, base: torch.nn.Linear) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.weight_delta = torch.nn.ParameterDict(
            {n: torch.nn.Parameter(torch.zeros_like(base.weight)) for n in (GLOBAL, PERSONAL)})
        self.bias_delta = torch.nn.ParameterDict(
            {n: torch.nn.Parameter(torch.zeros_like(base.bias)) for n in (GLOBAL, PERSONAL)}
            if base.bias is not None else {})
        self.scales = {GLOBAL: 1.0, PERSONAL: 1.0}
        self.active: list[str] = [GLOBAL]

    def forward(self, x: Tensor) -> Tensor:
        w = self.base.weight + sum(self.scales[n] * self.weight_delta[n] for n in self.active)
        b = None
        if self.base.bias is not None:
            b = self.base.bias + sum(self.scales[n] * self.bias_delta[n] for n in self.active)
        return torch.nn.functional.linear(x, w, b)

    def delta_state(self, adapter: str) -> dict[str, Tensor]:
        out = {"weight": self.weight_delta[adapter]}
        if self.base.bias is not None:
            out["bias"] = self.bias_delta[adapter]
        return out

    def fused(self, a: float, b: float) -> dict[str, Tensor]:
        """The plain layer's weight (and bias) at scales a (personal), b (global)."""
        out = {"weight": self.base.weight + a * self.weight_delta[PERSONAL] + b * self.weight_delta[GLOBAL]}
        if self.base.bias is not None:
            out["bias"] = self.base.bias + a * self.bias_delta[PERSONAL] + b * self.bias_delta[GLOBAL]
        return out


def _heads(model: torch.nn.Module) -> dict[str, DualDeltaLinear]:
    """{module path in the base model: head layer}."""
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, DualDeltaLinear)}


def _wrap_heads(model: torch.nn.Module, pooler: bool = True) -> None:
    """Replace the task head's linear layers (``pooler``: BERT's pooler too) by :class:`DualDeltaLinear` (in place)."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and (n in ("classifier", "score") or (pooler and n.endswith("pooler.dense")))]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, DualDeltaLinear(getattr(parent, child)))


def build(model: torch.nn.Module, spec: "TrainingSpec"):
    from peft import LoraConfig, get_peft_model

    if spec.task == "classification":
        identity = spec.lora.train_pooler == "identity" and "pooler" in lora.head_module_names(model)
        if identity:   # frozen, off the wire, shipped with every adapter folder
            lora.set_identity_pooler(model)
        _wrap_heads(model, pooler=not identity)
    peft_cfg = LoraConfig(r=spec.lora.rank, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                          target_modules=list(spec.lora.target_modules) if spec.lora.target_modules else None,
                          layers_to_transform=lora.layers_to_transform(model, spec.lora))
    try:
        with seeded(spec.seed):
            peft_model = get_peft_model(model, peft_cfg, adapter_name=GLOBAL)
            torch.manual_seed(spec.seed + 1)
            peft_model.add_adapter(PERSONAL, copy.deepcopy(peft_cfg))
    except ValueError as exc:
        raise ConfigError(f"fdlora: cannot apply LoRA to {type(model).__name__}: {exc}") from exc
    _activate(peft_model, GLOBAL)
    STATE.set(peft_model, _adapter_state(peft_model, PERSONAL))   # a device's first personal adapter
    return peft_model


def _activate(model, adapters: str | list[str]) -> None:
    """Active adapters (their parameters trainable, the others frozen); scales back to 1."""
    from peft.tuners.lora import LoraLayer

    model.base_model.set_adapter(adapters)
    active = [adapters] if isinstance(adapters, str) else list(adapters)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in (GLOBAL, PERSONAL):
                module.set_scale(name, 1.0)
        elif isinstance(module, DualDeltaLinear):
            module.active = active
            module.scales = {GLOBAL: 1.0, PERSONAL: 1.0}
            for name in (GLOBAL, PERSONAL):
                for p in module.delta_state(name).values():
                    p.requires_grad_(name in active)


def _set_scales(model, a: float, b: float) -> None:
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_scale(PERSONAL, a)
            module.set_scale(GLOBAL, b)
        elif isinstance(module, DualDeltaLinear):
            module.scales = {PERSONAL: a, GLOBAL: b}


HEAD_PREFIX = "head_delta."   # state keys of the head deltas: head_delta.<module path>.<weight|bias>


def _adapter_state(model, adapter: str) -> dict[str, Tensor]:
    """One adapter's tensors: its LoRA A / B (peft names, adapter name stripped) and its head deltas."""
    from peft import get_peft_model_state_dict

    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}
    for name, head in _heads(model).items():
        for kind, v in head.delta_state(adapter).items():
            state[f"{HEAD_PREFIX}{name}.{kind}"] = v.detach().clone()
    return state


def _load_adapter(model, adapter: str, state: Mapping[str, Tensor], where: str) -> None:
    from peft import set_peft_model_state_dict

    check_compatible(_adapter_state(model, adapter), state, where=where)
    lora_part = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    result = set_peft_model_state_dict(model, lora_part, adapter_name=adapter)
    if getattr(result, "unexpected_keys", []):
        raise AggregationError(f"{where}: peft did not accept keys {result.unexpected_keys[:5]}")
    heads = _heads(model)
    with torch.no_grad():
        for k, v in state.items():
            if k.startswith(HEAD_PREFIX):
                name, _, kind = k.removeprefix(HEAD_PREFIX).rpartition(".")
                heads[name].delta_state(adapter)[kind].copy_(v)


def initial_global(model, spec: "TrainingSpec") -> dict[str, Tensor]:
    return trainable_state(model)


def prepare(model, spec: "TrainingSpec", init: Mapping[str, Tensor] | None) -> None:
    """Nothing to ship: the global adapter's seeded init is the same everywhere."""


def trainable_state(model) -> dict[str, Tensor]:
    """The upload: the global adapter only (the personal one never leaves the device)."""
    return _adapter_state(model, GLOBAL)


def load_trainable_state(model, state: Mapping[str, Tensor]) -> None:
    _load_adapter(model, GLOBAL, state, "global adapter")


def _use_personal(model, personal: PersonalState | None) -> PersonalState:
    """Load the device's personal adapter (a fresh one the first time) into the model."""
    if personal is None:
        personal = PersonalState(dict(STATE.of(model)), {"trained": False, "a": 1.0, "b": 1.0})
    _load_adapter(model, PERSONAL, personal.tensors, "personal adapter")
    return personal


def personalise(model, tokenizer, splits: Splits, spec: "TrainingSpec", personal: PersonalState | None,
                eval_batch_size: int = 64) -> tuple[dict[str, float], PersonalState]:
    """Search (a, b) on the validation split with the loaded global adapter; evaluate the fused model."""
    cfg = spec.fdlora
    personal = _use_personal(model, personal)
    seq = spec.train.max_seq_len
    _activate(model, [PERSONAL, GLOBAL])
    try:
        if len(splits.val):
            def val_loss(a: float, b: float) -> float:
                _set_scales(model, a, b)
                return evaluate(model, tokenizer, splits.val, eval_batch_size, seq, precision=spec.train.precision).loss

            fusion = search_fusion(val_loss, cfg.fusion_evals, cfg.fusion_max, cfg.fusion_l1, seed=spec.seed)
            a, b = fusion.a, fusion.b
            extra = {"fusion_val_loss": fusion.loss, "personal_val_loss": fusion.personal_loss,
                     "global_val_loss": fusion.global_loss, "fusion_evals": float(fusion.evaluations)}
        else:  # nothing to tune on: the plain sum
            a, b, extra = 1.0, 1.0, {}
        _set_scales(model, a, b)
        res = evaluate(model, tokenizer, splits.test, eval_batch_size, seq, precision=spec.train.precision)
    finally:
        _activate(model, GLOBAL)
    personal = PersonalState(personal.tensors, {**personal.meta, "a": a, "b": b})
    return {"personal_accuracy": res.accuracy, "personal_loss": res.loss, "personal_n": float(res.n),
            "fusion_a": a, "fusion_b": b, **extra}, personal


def local_train(model, tokenizer, splits: Splits, spec: "TrainingSpec", seed: int, personal: PersonalState | None,
                progress: bool = False, desc: str = "train") -> tuple[TrainResult, PersonalState]:
    """Train P (warm-up / personal epochs), then G with P inactive; the upload is G."""
    cfg = spec.fdlora
    personal = _use_personal(model, personal)
    epochs = cfg.personal_epochs if personal.meta.get("trained") else cfg.warmup_epochs
    p_res = None
    if epochs > 0:
        _activate(model, PERSONAL)
        try:
            p_res = train_local(model, tokenizer, splits.train, dataclasses.replace(spec.train, epochs=epochs),
                                seed=seed + 7919, progress=progress, desc=f"{desc} personal")
        finally:
            _activate(model, GLOBAL)
        personal = PersonalState(_adapter_state(model, PERSONAL), {**personal.meta, "trained": True})
    g_res = train_local(model, tokenizer, splits.train, spec.train, seed=seed, progress=progress, desc=desc)
    if p_res is None:
        return g_res, personal
    return TrainResult(g_res.steps + p_res.steps, g_res.examples + p_res.examples, g_res.mean_loss,
                       g_res.seconds + p_res.seconds, tokens=g_res.tokens + p_res.tokens,
                       padded_tokens=g_res.padded_tokens + p_res.padded_tokens,
                       flops=g_res.flops + p_res.flops, metrics=g_res.metrics), personal


def _write_plain_lora(model, lora_state: dict[str, Tensor], rank: int, alpha: float,
                      heads: dict[str, dict[str, Tensor]], folder: Path, method: str) -> None:
    """A peft folder for the untouched base: LoRA on the attention, the (fused) head as modules_to_save."""
    from safetensors.torch import save_file

    cfg = copy.deepcopy(model.peft_config[GLOBAL])
    cfg.r, cfg.lora_alpha = rank, alpha
    state = dict(lora_state)
    if heads:
        cfg.modules_to_save = sorted({"pooler" if n.endswith("pooler.dense") else n for n in heads})
        for name, tensors in heads.items():
            for kind, v in tensors.items():
                state[f"base_model.model.{name}.{kind}"] = v.detach()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt", "edge_runtime.method": method})
    lora.ship_identity_pooler(model, folder)


def save_adapter(model, folder: Path) -> None:
    """The global adapter alone, as a plain peft LoRA folder for the untouched base."""
    lora_state = {k: v for k, v in trainable_state(model).items() if not k.startswith(HEAD_PREFIX)}
    cfg = model.peft_config[GLOBAL]
    with torch.no_grad():
        heads = {n: h.fused(0.0, 1.0) for n, h in _heads(model).items()}
    _write_plain_lora(model, lora_state, cfg.r, cfg.lora_alpha, heads, folder, "fdlora")


def fused_lora_state(model, personal: PersonalState) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """The device's fused model as one plain LoRA (B' = [a B_P, b B_G], A' = [A_P; A_G]) plus its fused head."""
    a, b = float(personal.meta.get("a", 1.0)), float(personal.meta.get("b", 1.0))
    g = _adapter_state(model, GLOBAL)
    check_compatible(g, personal.tensors, where="personal adapter")
    state = {}
    for k, vg in g.items():
        vp = personal.tensors[k]
        if k.startswith(HEAD_PREFIX):
            continue
        if k.endswith("lora_A.weight"):
            state[k] = torch.cat([vp, vg], dim=0)
        elif k.endswith("lora_B.weight"):
            state[k] = torch.cat([a * vp, b * vg], dim=1)
        else:
            raise AggregationError(f"fdlora: unexpected adapter tensor {k}")
    heads: dict[str, dict[str, Tensor]] = {}
    with torch.no_grad():
        for name, head in _heads(model).items():
            heads[name] = {}
            for kind, vg in head.delta_state(GLOBAL).items():
                base = getattr(head.base, kind)
                heads[name][kind] = base + a * personal.tensors[f"{HEAD_PREFIX}{name}.{kind}"] + b * vg
    return state, heads


def save_global_adapter_like_personal(model, personal: PersonalState | None, folder: Path) -> None:
    """The global adapter alone in the personal adapter's rank-2r layout (B' = [0, B_G], the head at
    W0 + dW_G): with the same tensor shapes, both export into one ``--format adapter`` base graph,
    so a device serves its personal model and the global one from one base file."""
    if personal is None:
        save_adapter(model, folder)
        return
    state, heads = fused_lora_state(model, PersonalState(personal.tensors, {**personal.meta, "a": 0.0, "b": 1.0}))
    cfg = model.peft_config[GLOBAL]
    _write_plain_lora(model, state, 2 * cfg.r, 2 * cfg.lora_alpha, heads, folder, "fdlora-global")


def save_personal_adapter(model, personal: PersonalState | None, folder: Path) -> None:
    """The device's own (fused) model as a plain peft LoRA folder for the untouched base (rank 2r)."""
    if personal is None:
        save_adapter(model, folder)
        return
    state, heads = fused_lora_state(model, personal)
    cfg = model.peft_config[GLOBAL]
    _write_plain_lora(model, state, 2 * cfg.r, 2 * cfg.lora_alpha, heads, folder, "fdlora-personal")


METHOD = Method(
    name="fdlora", summary="a global and a personal LoRA per device, fused by a searched mix (FDLoRA)",
    build=build, initial_global=initial_global, trainable_state=trainable_state,
    load_trainable_state=load_trainable_state, local_train=local_train, save_adapter=save_adapter,
    prepare=prepare, personalise=personalise, save_personal_adapter=save_personal_adapter,
    save_global_like_personal=save_global_adapter_like_personal, aggregate=fedavg,
    config=("fdlora", FdloraConfig),
    adapter_copies=2,       # the global and the personal adapter on every target
    personal_format=2)      # layout of the saved personal state (2: full-rank head deltas)
