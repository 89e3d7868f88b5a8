"""LoRA (Hu et al.) through peft: the baseline PEFT method every other method is compared with.

Trainable part: LoRA A/B on the attention projections (peft's default targets for the
architecture unless ``target_modules`` is set) plus, for classification, the task head
(and BERT's pooler), which must be shared too or devices would disagree on the label space.
The pooler is trained whole (``train_pooler: true``), through a rank-r LoRA on its dense layer
(``"lora"``: 2*r*h parameters on the wire instead of h*h + h), frozen as the checkpoint has it
(``false``), or set to the identity and frozen (``"identity"``: the head reads tanh of the [CLS]
vector at its own scale; nothing of the pooler on the wire, and every adapter folder ships the
identity pooler so that it loads onto the untouched base).
Upload: the whole trainable state. Server: weighted FedAvg (samples as weights).

Every method module has the same functions (see ``edge_runtime.methods``); this one is the
reference, and the others reuse what they do not change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch
from torch import Tensor

from edge_runtime.algorithms.aggregation import check_compatible, fedavg
from edge_runtime.atomic_io import write_json_atomic
from edge_runtime.errors import AggregationError, ConfigError
from edge_runtime.training.data import Splits
from edge_runtime.training.seeding import seeded
from edge_runtime.training.trainer import TrainResult, train_local
from edge_runtime.methods.base import Method

if TYPE_CHECKING:
    from edge_runtime.methods.personal import PersonalState
    from edge_runtime.training.spec import TrainingSpec

HEAD_MODULES = ("classifier", "score", "pooler")  # BERT head + pooler, Llama's score head


@dataclass(frozen=True)
class LoraMethodConfig:
    """LoRA hyper-parameters (``rank`` r, scaling ``alpha / r``)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None
    # BERT's pooler (147,840 of MiniLM's 231,578 trainable parameters): trained whole and shared (true),
    # LoRA on pooler.dense ("lora": 6,144 at r=8), frozen as the checkpoint has it (false) or set to
    # the identity and frozen ("identity"); the last two put nothing of it on the wire
    train_pooler: bool | str = True
    # LoRA on the top ``top_blocks`` transformer blocks only (0: all); the blocks below then run
    # frozen, and ``train.cache_frozen`` computes them once per example instead of every step
    top_blocks: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.top_blocks, bool) or not isinstance(self.top_blocks, int) or self.top_blocks < 0:
            raise ConfigError(f"lora.top_blocks must be an integer >= 0 (0: every block), got {self.top_blocks!r}")
        if self.top_blocks and self.train_pooler == "lora":
            raise ConfigError("lora.top_blocks and lora.train_pooler=lora do not combine (the pooler is in no block); "
                              "train the pooler whole or freeze it")
        if not (isinstance(self.train_pooler, bool) or self.train_pooler in ("lora", "identity")):
            raise ConfigError(f"lora.train_pooler must be true, false, \"lora\" or \"identity\", got {self.train_pooler!r}")
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")


def head_module_names(model: torch.nn.Module) -> list[str]:
    """Top-level task-head modules present in ``model`` (``classifier``, ``score``, ``pooler``)."""
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    return [h for h in HEAD_MODULES if h in names]


def target_modules(model: torch.nn.Module, cfg: LoraMethodConfig, pooler_lora: bool) -> list[str] | None:
    """The LoRA targets: the configured ones (peft's defaults for the architecture when unset),
    plus ``pooler.dense`` when the pooler is trained through LoRA."""
    targets = list(cfg.target_modules) if cfg.target_modules else None
    if not pooler_lora:
        return targets
    if targets is None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULTS:
            raise ConfigError(f"lora.train_pooler=lora: peft has no default targets for {model_type!r}; "
                              f"set lora.target_modules")
        targets = list(DEFAULTS[model_type])
    return targets + ["pooler.dense"]


def layers_to_transform(model: torch.nn.Module, cfg: LoraMethodConfig) -> list[int] | None:
    """The blocks LoRA adapts: the top ``cfg.top_blocks`` of them (None: all)."""
    if not cfg.top_blocks:
        return None
    from edge_runtime.training.blocks import find_blocks

    n = len(find_blocks(model)[2])
    if cfg.top_blocks > n:
        raise ConfigError(f"lora.top_blocks={cfg.top_blocks}, and {type(model).__name__} has {n} blocks")
    return list(range(n - cfg.top_blocks, n))


def build(model: torch.nn.Module, spec: "TrainingSpec"):
    """Wrap ``model`` in a peft LoRA model; only LoRA weights (and the head) are trainable.

    LoRA A's random init is drawn from ``spec.seed`` (the server's init is what devices start
    from, but a reproducible init makes runs repeatable).
    """
    from peft import LoraConfig, TaskType, get_peft_model

    cfg = spec.lora
    task_type = TaskType.SEQ_CLS if spec.task == "classification" else TaskType.CAUSAL_LM
    heads = head_module_names(model) if spec.task == "classification" else []
    if "pooler" in heads and cfg.train_pooler == "identity":
        set_identity_pooler(model)
    peft_cfg = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_modules(model, cfg, pooler_lora="pooler" in heads and cfg.train_pooler == "lora"),
        modules_to_save=[h for h in heads if h != "pooler" or cfg.train_pooler is True] or None,
        layers_to_transform=layers_to_transform(model, cfg),
        task_type=task_type,
    )
    try:
        with seeded(spec.seed):
            return get_peft_model(model, peft_cfg)
    except ValueError as exc:
        raise ConfigError(f"{spec.method}: cannot apply LoRA to {type(model).__name__}: {exc}") from exc


def _pooler_dense(model: torch.nn.Module) -> tuple[str, torch.nn.Linear] | None:
    """(its module path, BERT's ``pooler.dense``) in ``model`` (plain or peft-wrapped), or None."""
    for name, m in model.named_modules():
        if name.endswith("pooler.dense") and isinstance(m, torch.nn.Linear) and m.in_features == m.out_features:
            return name, m
    return None


def set_identity_pooler(model: torch.nn.Module) -> None:
    """Make BERT's pooler the identity (tanh of the [CLS] vector), frozen, in place."""
    found = _pooler_dense(model)
    if found is None:
        raise ConfigError(f"lora.train_pooler=identity: {type(model).__name__} has no square pooler.dense")
    dense = found[1]
    with torch.no_grad():
        dense.weight.copy_(torch.eye(dense.in_features, dtype=dense.weight.dtype))
        if dense.bias is not None:
            dense.bias.zero_()
    dense.requires_grad_(False)


def identity_pooler_tensors(model: torch.nn.Module) -> dict[str, Tensor]:
    """The pooler's tensors under peft's saved names when it is a frozen identity (``train_pooler:
    identity``), else {}: an adapter folder must carry them, the untouched base has its own pooler."""
    found = _pooler_dense(model)
    if found is None or ".modules_to_save." in found[0] or found[1].weight.requires_grad:
        return {}
    name, dense = found
    eye = torch.eye(dense.in_features, dtype=dense.weight.dtype)
    if not torch.equal(dense.weight, eye) or (dense.bias is not None and bool(dense.bias.any())):
        return {}
    path = name.removeprefix("base_model.model.")
    out = {f"base_model.model.{path}.weight": dense.weight.detach().clone()}
    if dense.bias is not None:
        out[f"base_model.model.{path}.bias"] = dense.bias.detach().clone()
    return out


def ship_identity_pooler(model: torch.nn.Module, folder: Path) -> None:
    """Add a frozen identity pooler to the peft folder ``folder`` (as ``modules_to_save``), if any."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    extra = identity_pooler_tensors(model)
    if not extra:
        return
    folder = Path(folder)
    cfg_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["modules_to_save"] = sorted(set(cfg.get("modules_to_save") or []) | {"pooler"})
    write_json_atomic(cfg_path, cfg)
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    save_file({**load_file(str(weights)), **extra}, str(weights), metadata=metadata)


def initial_global(model, spec: "TrainingSpec") -> dict[str, Tensor]:
    """Server, once per run: the round-0 global adapter (may set up ``model`` as devices will)."""
    return trainable_state(model)


def prepare(model, spec: "TrainingSpec", init: Mapping[str, Tensor] | None) -> None:
    """Device, once per model: apply the run's shipped initialisation (LoRA needs none)."""


def trainable_state(model) -> dict[str, Tensor]:
    """The shareable state ``{name: tensor}`` (detached copies, adapter name stripped)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_trainable_state(model, state: Mapping[str, Tensor]) -> None:
    """Overwrite the model's trainable state with ``state`` (keys, shapes, dtypes checked first)."""
    from peft import set_peft_model_state_dict

    check_compatible(trainable_state(model), state, where="global adapter")
    result = set_peft_model_state_dict(model, dict(state))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise AggregationError(f"global adapter: peft did not accept keys {unexpected[:5]}")


def personalise(model, tokenizer, splits: Splits, spec: "TrainingSpec", personal: "PersonalState | None",
                eval_batch_size: int = 64) -> tuple[dict[str, float], "PersonalState | None"]:
    """Device: build and evaluate the device's own model from the global one (LoRA has none)."""
    return {}, personal


def local_train(model, tokenizer, splits: Splits, spec: "TrainingSpec", seed: int,
                personal: "PersonalState | None", progress: bool = False,
                desc: str = "train") -> tuple[TrainResult, "PersonalState | None"]:
    """Device: one round of local training; afterwards ``trainable_state(model)`` is the upload."""
    return train_local(model, tokenizer, splits.train, spec.train, seed=seed, progress=progress, desc=desc), personal


def save_adapter(model, folder: Path) -> None:
    """Write the adapter as a peft folder that loads onto the untouched base model."""
    model.save_pretrained(folder)
    ship_identity_pooler(model, folder)


def save_personal_adapter(model, personal: "PersonalState | None", folder: Path) -> None:
    """The device's own model as a peft folder: for LoRA, the global adapter itself."""
    save_adapter(model, folder)


METHOD = Method(
    name="lora", summary="LoRA on the attention projections (+ the task head), weighted FedAvg",
    build=build, initial_global=initial_global, trainable_state=trainable_state,
    load_trainable_state=load_trainable_state, local_train=local_train, save_adapter=save_adapter,
    aggregate=fedavg, config=("lora", LoraMethodConfig))
