"""FDLoRA: a personal and a global LoRA on the same frozen base, fused without gradients.

Each device holds two peft adapters, ``personal`` (P, never leaves the device) and ``global`` (G,
the only thing uploaded and averaged). The device's own model is

    y = W0 x + a * s * B_P A_P x + b * s * B_G A_G x

with (a, b) found on the device's validation split by :func:`edge_runtime.algorithms.fusion.search_fusion`
(forward passes only; never worse on validation loss than P or G alone).

Choices ([choice] in ALGORITHMS.md; fields of :class:`FdloraConfig`):

- The task head is adapted like every other layer: both adapters put LoRA on the attention
  projections *and* on the head (``classifier`` / ``score``, at full rank ``num_labels``, and
  BERT's ``pooler.dense``) over a frozen, seeded head, instead of training the head itself. That
  keeps the fused model exactly the formula above (a trained head could not be scaled by a or b).
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

from edge_runtime.algorithms.aggregation import check_compatible
from edge_runtime.algorithms.fusion import search_fusion
from edge_runtime.errors import AggregationError, ConfigError
from edge_runtime.methods.personal import PersonalState
from edge_runtime.training.data import Splits
from edge_runtime.training.evaluate import evaluate
from edge_runtime.training.trainer import TrainResult, train_local

if TYPE_CHECKING:
    from edge_runtime.training.spec import TrainingSpec

NEEDS_INIT = False
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


def _targets(model: torch.nn.Module, spec: "TrainingSpec") -> tuple[list[str], dict[str, int], dict[str, float]]:
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    cfg = spec.lora
    targets = list(cfg.target_modules or defaults.get(model.config.model_type, []))
    if not targets:
        raise ConfigError(f"fdlora: no default LoRA targets for model type {model.config.model_type!r}; "
                          "set lora.target_modules")
    ranks, alphas = {}, {}
    if spec.task == "classification":
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            if name in ("classifier", "score"):  # the head's delta at full rank
                targets.append(name)
                ranks[name] = module.out_features
                alphas[name] = cfg.alpha * module.out_features / cfg.rank
            elif name.endswith("pooler.dense"):
                targets.append(name)
    return targets, ranks, alphas


def build(model: torch.nn.Module, spec: "TrainingSpec"):
    from peft import LoraConfig, get_peft_model

    targets, ranks, alphas = _targets(model, spec)
    peft_cfg = LoraConfig(r=spec.lora.rank, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                          target_modules=targets, rank_pattern=ranks, alpha_pattern=alphas)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(spec.seed)
            peft_model = get_peft_model(model, peft_cfg, adapter_name=GLOBAL)
            torch.manual_seed(spec.seed + 1)
            peft_model.add_adapter(PERSONAL, copy.deepcopy(peft_cfg))
    except ValueError as exc:
        raise ConfigError(f"fdlora: cannot apply LoRA to {type(model).__name__}: {exc}") from exc
    _activate(peft_model, GLOBAL)
    peft_model._fdlora_personal_init = _adapter_state(peft_model, PERSONAL)
    return peft_model


def _activate(model, adapters: str | list[str]) -> None:
    """Active adapters (their parameters trainable, the others frozen); scales back to 1."""
    from peft.tuners.lora import LoraLayer

    model.base_model.set_adapter(adapters)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in (GLOBAL, PERSONAL):
                module.set_scale(name, 1.0)


def _set_scales(model, a: float, b: float) -> None:
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_scale(PERSONAL, a)
            module.set_scale(GLOBAL, b)


def _adapter_state(model, adapter: str) -> dict[str, Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}


def _load_adapter(model, adapter: str, state: Mapping[str, Tensor], where: str) -> None:
    from peft import set_peft_model_state_dict

    check_compatible(_adapter_state(model, adapter), state, where=where)
    result = set_peft_model_state_dict(model, dict(state), adapter_name=adapter)
    if getattr(result, "unexpected_keys", []):
        raise AggregationError(f"{where}: peft did not accept keys {result.unexpected_keys[:5]}")


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
        personal = PersonalState(dict(model._fdlora_personal_init), {"trained": False, "a": 1.0, "b": 1.0})
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
                return evaluate(model, tokenizer, splits.val, eval_batch_size, seq).loss

            fusion = search_fusion(val_loss, cfg.fusion_evals, cfg.fusion_max, cfg.fusion_l1, seed=spec.seed)
            a, b = fusion.a, fusion.b
            extra = {"fusion_val_loss": fusion.loss, "personal_val_loss": fusion.personal_loss,
                     "global_val_loss": fusion.global_loss, "fusion_evals": float(fusion.evaluations)}
        else:  # nothing to tune on: the plain sum
            a, b, extra = 1.0, 1.0, {}
        _set_scales(model, a, b)
        res = evaluate(model, tokenizer, splits.test, eval_batch_size, seq)
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
                       g_res.seconds + p_res.seconds), personal


def _write_peft_folder(folder: Path, cfg, state: dict[str, Tensor], **meta: str) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(cfg)
    cfg.save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt", **meta})


def save_adapter(model, folder: Path) -> None:
    """The global adapter alone, as a plain peft LoRA folder for the untouched base."""
    _write_peft_folder(folder, model.peft_config[GLOBAL], trainable_state(model), **{"edge_runtime.method": "fdlora"})


def fused_lora_state(model, personal: PersonalState) -> tuple[dict[str, Tensor], object]:
    """The device's fused model as one plain LoRA: B' = [a B_P, b B_G], A' = [A_P; A_G], ranks and alphas x2."""
    a, b = float(personal.meta.get("a", 1.0)), float(personal.meta.get("b", 1.0))
    g = trainable_state(model)
    check_compatible(g, personal.tensors, where="personal adapter")
    state = {}
    for k, vg in g.items():
        vp = personal.tensors[k]
        if k.endswith("lora_A.weight"):
            state[k] = torch.cat([vp, vg], dim=0)
        elif k.endswith("lora_B.weight"):
            state[k] = torch.cat([a * vp, b * vg], dim=1)
        else:
            raise AggregationError(f"fdlora: unexpected adapter tensor {k}")
    cfg = copy.deepcopy(model.peft_config[GLOBAL])
    cfg.r, cfg.lora_alpha = 2 * cfg.r, 2 * cfg.lora_alpha
    cfg.rank_pattern = {k: 2 * v for k, v in (cfg.rank_pattern or {}).items()}
    cfg.alpha_pattern = {k: 2 * v for k, v in (cfg.alpha_pattern or {}).items()}
    return state, cfg


def save_personal_adapter(model, personal: PersonalState, folder: Path) -> None:
    """The device's own (fused) model as a plain peft LoRA folder for the untouched base."""
    state, cfg = fused_lora_state(model, personal)
    _write_peft_folder(folder, cfg, state, **{"edge_runtime.method": "fdlora-personal"})
