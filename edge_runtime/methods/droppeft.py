"""DropPEFT (seed 001): LoRA trained with stochastic transformer-layer dropout, a per-device
bandit that picks each device's dropout configuration, and aggregation that knows who trained what.

1. **Layer dropout** (device): each training step runs only some of the model's blocks (the
   ``ModuleList`` of transformer layers: BERT's ``encoder.layer``, Llama's ``model.layers``, or
   any model's). The dropped blocks are taken out of the list for that step, so they do no
   forward compute, store no activations and get no gradients (AdamW skips them); the hidden
   state passes straight to the next kept block, with no rescaling. Evaluation and export always
   run every block. Which blocks run is drawn per step from the configuration (mean ratio x
   shape over depth, :mod:`edge_runtime.algorithms.layer_dropout`), with a fixed count per step
   so memory has a hard bound.
2. **Configurator** (server, :func:`assign`): a discounted-UCB bandit per device
   (:mod:`edge_runtime.algorithms.bandit`) over the arms ``ratios x shapes``; reward = the
   device's validation-loss improvement per second of local training, divided by the round's mean
   (so the reward does not shrink as the model converges). Arms whose predicted peak memory (the
   memory model, at the training profile's plan and the arm's kept-layer count) exceeds the
   device's reported budget are never offered. Each device's choice travels in the round manifest
   as a spec override (``droppeft.ratio`` / ``droppeft.shape``); its statistics are server state.
3. **Aggregation** (:func:`aggregate`): block ``l``'s adapter is averaged over the devices that
   trained it, each weighted by ``n_samples x (steps block l ran / steps of the round)``; a block
   nobody trained keeps its value. Tensors outside the blocks (the head) train every step and
   weigh ``n_samples``, as in FedAvg; so at drop ratio 0 this *is* LoRA FedAvg.
4. **Personal layers** (``personal_layers: k``): the adapters of the top ``k`` blocks stay on the
   device (trained there, never uploaded); the global model runs those blocks unadapted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from torch import Tensor, nn

from edge_runtime.algorithms import bandit
from edge_runtime.algorithms.aggregation import Update, check_compatible, masked_weighted_mean
from edge_runtime.device.memory_model import load_arch, predict_peak
from edge_runtime.device.planner import plan_of, request_from_spec
from edge_runtime.algorithms.layer_dropout import SHAPES, drop_probabilities, max_kept, sample_kept
from edge_runtime.errors import AggregationError, ConfigError
from edge_runtime.methods import lora
from edge_runtime.methods.personal import PersonalState
from edge_runtime.training.data import Splits
from edge_runtime.training.evaluate import evaluate
from edge_runtime.training.trainer import TrainResult, train_local
from edge_runtime.methods.base import Method, ModelState

if TYPE_CHECKING:
    from edge_runtime.training.spec import TrainingSpec

log = logging.getLogger("edge_runtime.droppeft")

STEPS_KEY = "layer_steps."          # update metrics: steps each block ran, one key per block
BANDIT = "bandit."                  # server-state keys: bandit.n.<device>, bandit.s.<device>, bandit.arms
# what the server's history keeps of each device's report (keys, or key prefixes ending in "."): the
# configurator's evidence, and the step counts that make each round's aggregation reproducible
ROUND_METRICS = ("drop_ratio", "drop_shape", "kept_max", "val_loss_before", "val_loss_after", "train_seconds",
                 STEPS_KEY)


@dataclass(frozen=True)
class DropPEFTConfig:
    ratio: float = 0.5                 # mean drop ratio (the bandit's pick, or fixed with bandit: false)
    shape: str = "uniform"             # uniform | increasing | decreasing (drop probability over depth)
    cap: float = 0.95                  # no block is dropped with a higher probability
    bandit: bool = True                # the server picks (ratio, shape) per device
    ratios: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6)
    shapes: tuple[str, ...] = ("uniform", "increasing")
    gamma: float = 0.9                 # discount of the bandit's statistics per round
    explore: float = 0.5               # UCB exploration bonus
    prior_weight: float = 1.0          # pseudo-pulls of the fleet's mean in a device's estimate
    memory_margin: float = 0.15        # an arm fits when its predicted peak <= budget x (1 - margin)
    personal_layers: int = 0           # top blocks whose adapters stay on the device

    def __post_init__(self) -> None:
        if not 0 < self.cap <= 1 or not 0 <= self.ratio <= self.cap:
            raise ConfigError(f"droppeft.ratio must be in [0, cap={self.cap}] and cap in (0, 1], got {self.ratio!r}")
        for s in (self.shape, *self.shapes):
            if s not in SHAPES:
                raise ConfigError(f"droppeft: shape must be one of {SHAPES}, got {s!r}")
        if not self.ratios or not self.shapes or any(not 0 <= r <= self.cap for r in self.ratios):
            raise ConfigError(f"droppeft.ratios must be a non-empty list in [0, {self.cap}] and shapes non-empty, "
                              f"got {list(self.ratios)} x {list(self.shapes)}")
        if not 0 < self.gamma <= 1 or self.explore < 0 or self.prior_weight < 0:
            raise ConfigError("droppeft needs 0 < gamma <= 1, explore >= 0 and prior_weight >= 0")
        if not 0 <= self.memory_margin < 1 or self.personal_layers < 0:
            raise ConfigError("droppeft needs memory_margin in [0, 1) and personal_layers >= 0")

    def arms(self) -> list[tuple[float, str]]:
        """The bandit's arms: every (ratio, shape), with ratio 0 once (its shape does not matter)."""
        out: list[tuple[float, str]] = []
        for r in self.ratios:
            for s in (self.shapes[:1] if r == 0 else self.shapes):
                if (float(r), s) not in out:
                    out.append((float(r), s))
        return out

    def bandit_config(self) -> bandit.BanditConfig:
        return bandit.BanditConfig(self.gamma, self.explore, self.prior_weight)


def _cfg(spec: "TrainingSpec") -> DropPEFTConfig:
    return spec.droppeft


def personal_key(spec: "TrainingSpec") -> list:
    return [dataclasses.asdict(spec.lora), spec.droppeft.personal_layers]


# -- the blocks ------------------------------------------------------------------------------
def find_blocks(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList, str]:
    """``(parent, attribute, blocks, path)`` of the model's transformer blocks: the ``ModuleList``
    of identical modules with ``config.num_hidden_layers`` entries (else the longest such list)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n_cfg = getattr(getattr(base, "config", None), "num_hidden_layers", None)
    found = [(name, m) for name, m in base.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1]
    if not found:
        raise ConfigError(f"droppeft: {type(base).__name__} has no ModuleList of blocks to drop")
    exact = [(n, m) for n, m in found if len(m) == n_cfg]
    name, blocks = (exact or sorted(found, key=lambda nm: -len(nm[1])))[0]
    parent_name, _, attr = name.rpartition(".")
    return base.get_submodule(parent_name) if parent_name else base, attr, blocks, name


@contextlib.contextmanager
def run_only(model: nn.Module, kept: Sequence[int]):
    """Within the block, the model runs only blocks ``kept`` (in order); all of them again after.
    Per training step: the blocks' place is the one :func:`build` found, not searched again."""
    st = STATE.get(model)
    parent, attr, blocks = st.blocks if st is not None else find_blocks(model)[:3]
    setattr(parent, attr, nn.ModuleList([blocks[i] for i in sorted(kept)]))
    try:
        yield
    finally:
        setattr(parent, attr, blocks)


_LAYER = re.compile(r"(?:^|\.)(\d+)\.")


def layer_of(key: str) -> int | None:
    """The block index in an adapter key (``...layer.3.attention...`` -> 3; the first integer
    path component, as peft names blocks); None for tensors outside the blocks (the head)."""
    m = _LAYER.search(key)
    return int(m.group(1)) if m else None


def _personal_blocks(n_layers: int, spec: "TrainingSpec") -> set[int]:
    k = _cfg(spec).personal_layers
    if k >= n_layers:
        raise ConfigError(f"droppeft.personal_layers={k} leaves no shared block of {n_layers}")
    return set(range(n_layers - k, n_layers))


def _is_personal(key: str, personal: set[int]) -> bool:
    l = layer_of(key)
    return l is not None and l in personal


@dataclass
class DropModel:
    """What :func:`build` found in the model it wrapped."""

    blocks: tuple[nn.Module, str, nn.ModuleList]   # the blocks' parent module, its attribute, the blocks
    personal: set[int]                             # blocks whose adapters stay on the device
    init: dict[str, Tensor]                        # those adapters' initial values (the global model's)


STATE: ModelState[DropModel] = ModelState("droppeft")


# -- hooks -------------------------------------------------------------------------------------
def build(model: nn.Module, spec: "TrainingSpec"):
    model = lora.build(model, spec)
    parent, attr, blocks, path = find_blocks(model)
    personal = _personal_blocks(len(blocks), spec)
    full = lora.trainable_state(model)
    STATE.set(model, DropModel((parent, attr, blocks), personal,
                               {k: v for k, v in full.items() if _is_personal(k, personal)}))
    log.debug("droppeft: %d blocks at %s, personal %s", len(blocks), path, sorted(personal))
    return model


def initial_global(model, spec: "TrainingSpec") -> dict[str, Tensor]:
    return trainable_state(model)


def trainable_state(model) -> dict[str, Tensor]:
    """The upload: every adapter tensor except the personal blocks'."""
    return {k: v for k, v in lora.trainable_state(model).items() if not _is_personal(k, STATE.of(model).personal)}


def _set(model, tensors: Mapping[str, Tensor]) -> None:
    """Overwrite some adapter tensors (peft wants the whole state: the rest is rewritten as it is)."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, {**lora.trainable_state(model), **tensors})


def load_trainable_state(model, state: Mapping[str, Tensor]) -> None:
    """Load a global: the shared adapters, and the personal blocks back to their (unadapted) init."""
    check_compatible(trainable_state(model), state, where="global adapter")
    _set(model, {**state, **STATE.of(model).init})


def _load_personal(model, personal: PersonalState | None) -> None:
    if STATE.of(model).init:
        own = personal.tensors if personal is not None else {}
        _set(model, {k: own.get(k, v) for k, v in STATE.of(model).init.items()})


def _personal_of(model) -> PersonalState | None:
    if not STATE.of(model).init:
        return None
    full = lora.trainable_state(model)
    return PersonalState({k: full[k] for k in STATE.of(model).init}, {"personal_layers": sorted(STATE.of(model).personal)})


def personalise(model, tokenizer, splits: Splits, spec: "TrainingSpec", personal: PersonalState | None,
                eval_batch_size: int = 64) -> tuple[dict[str, float], PersonalState | None]:
    """With personal layers: the device's own model (global + its top blocks), on its test split."""
    if not STATE.of(model).init or len(splits.test) == 0:
        return {}, personal
    _load_personal(model, personal)
    ev = evaluate(model, tokenizer, splits.test, eval_batch_size, spec.train.max_seq_len)
    return {"personal_accuracy": ev.accuracy, "personal_loss": ev.loss, "personal_n": ev.n}, personal


def _val_loss(model, tokenizer, splits: Splits, spec: "TrainingSpec") -> float | None:
    if len(splits.val) == 0:
        return None
    return evaluate(model, tokenizer, splits.val, 64, spec.train.max_seq_len).loss


def local_train(model, tokenizer, splits: Splits, spec: "TrainingSpec", seed: int,
                personal: PersonalState | None, progress: bool = False,
                desc: str = "train") -> tuple[TrainResult, PersonalState | None]:
    """One round with layer dropout; reports the steps each block ran and the validation loss
    before and after (the configurator's reward)."""
    cfg = _cfg(spec)
    _load_personal(model, personal)
    n = len(STATE.of(model).blocks[2])
    probs = drop_probabilities(n, cfg.ratio, cfg.shape, cfg.cap)
    before = _val_loss(model, tokenizer, splits, spec) if cfg.bandit else None
    gen = torch.Generator().manual_seed(seed * 7919 + 17)
    counts = [0] * n

    def step_context(i: int):
        kept = sample_kept(probs, gen)
        for l in kept:
            counts[l] += 1
        return run_only(model, kept)

    res = train_local(model, tokenizer, splits.train, spec.train, seed=seed, progress=progress, desc=desc,
                      step_context=step_context)
    metrics: dict[str, float] = {"drop_ratio": cfg.ratio, "drop_shape": SHAPES.index(cfg.shape),
                                 "kept_max": max_kept(probs), **{f"{STEPS_KEY}{l}": c for l, c in enumerate(counts)}}
    after = _val_loss(model, tokenizer, splits, spec) if cfg.bandit else None
    if before is not None and after is not None:
        metrics.update(val_loss_before=before, val_loss_after=after)
    return dataclasses.replace(res, metrics=metrics), _personal_of(model) or personal


def save_personal_adapter(model, personal: PersonalState | None, folder: Path) -> None:
    """The device's own model (its personal top blocks in place) as a peft folder."""
    _load_personal(model, personal)
    try:
        model.save_pretrained(folder)
    finally:
        _set(model, STATE.of(model).init)


# -- server ------------------------------------------------------------------------------------
def check_update(metrics: Mapping[str, float], steps: int, global_state: Mapping[str, Tensor],
                 spec: "TrainingSpec") -> None:
    """Refuse an update whose per-block step counts are missing or impossible (AggregationError)."""
    layers = sorted({l for k in global_state if (l := layer_of(k)) is not None})
    for l in layers:
        v = metrics.get(f"{STEPS_KEY}{l}")
        if v is None:
            raise AggregationError(f"droppeft update lacks {STEPS_KEY}{l} (steps block {l} ran)")
        if not (isinstance(v, (int, float)) and 0 <= v <= max(steps, 0) and float(v).is_integer()):
            raise AggregationError(f"droppeft update: {STEPS_KEY}{l}={v!r} is not a step count in 0..{steps}")


def layer_weights(update: Update, global_state: Mapping[str, Tensor]) -> dict[str, float]:
    """Per-tensor weights of one update: ``n_samples x (steps block l ran / steps)``; ``n_samples``
    outside the blocks."""
    steps = max(1, int(update.steps))
    out = {}
    for k in global_state:
        l = layer_of(k)
        out[k] = update.n_samples * (float(update.metrics.get(f"{STEPS_KEY}{l}", 0)) / steps
                                     if l is not None else 1.0)
    return out


def rewards(updates: Sequence[Update]) -> dict[str, float]:
    """Each device's reward: validation-loss improvement per second of local training, divided by
    the round's mean absolute improvement rate (devices without a validation split get none)."""
    raw = {}
    for u in updates:
        m = u.metrics
        if all(k in m for k in ("val_loss_before", "val_loss_after", "train_seconds")) and m["train_seconds"] > 0:
            raw[u.device_id] = (float(m["val_loss_before"]) - float(m["val_loss_after"])) / float(m["train_seconds"])
    scale = sum(abs(v) for v in raw.values()) / len(raw) if raw else 0.0
    return {d: (v / scale if scale > 0 else 0.0) for d, v in raw.items()}


def _stats(server_state: Mapping[str, Tensor], n_arms: int) -> dict[str, bandit.ArmStats]:
    out = {}
    for k, v in server_state.items():
        if k.startswith(BANDIT + "n.") and v.numel() == n_arms:
            dev = k[len(BANDIT + "n."):]
            s = server_state.get(BANDIT + "s." + dev)
            if s is not None and s.numel() == n_arms:
                out[dev] = bandit.ArmStats(v.double().tolist(), s.double().tolist())
    return out


def _arms_tensor(cfg: DropPEFTConfig) -> Tensor:
    return torch.tensor([[r, SHAPES.index(s)] for r, s in cfg.arms()], dtype=torch.float64)


def bandit_state(server_state: Mapping[str, Tensor] | None, spec: "TrainingSpec") -> dict[str, bandit.ArmStats]:
    """The per-device statistics in the server state (empty if the arm set changed since)."""
    state = server_state or {}
    arms = _arms_tensor(_cfg(spec))
    saved = state.get(BANDIT + "arms")
    if saved is None or saved.shape != arms.shape or not torch.equal(saved.double(), arms):
        if saved is not None:
            log.warning("droppeft: the arm set changed; the bandit starts afresh")
        return {}
    return _stats(state, len(arms))


def _to_state(stats: Mapping[str, bandit.ArmStats], spec: "TrainingSpec") -> dict[str, Tensor]:
    out = {BANDIT + "arms": _arms_tensor(_cfg(spec))}
    for dev, st in stats.items():
        out[f"{BANDIT}n.{dev}"] = torch.tensor(st.n, dtype=torch.float64)
        out[f"{BANDIT}s.{dev}"] = torch.tensor(st.s, dtype=torch.float64)
    return out


def aggregate(global_state: Mapping[str, Tensor], updates: Sequence[Update], server_state: Mapping[str, Tensor] | None,
              spec: "TrainingSpec", fleet_size: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Dropout-aware FedAvg, and the bandit's statistics updated with this round's rewards."""
    for u in updates:
        check_update(u.metrics, u.steps, global_state, spec)
    new_global = masked_weighted_mean(global_state, [(u.tensors, layer_weights(u, global_state)) for u in updates])
    cfg = _cfg(spec)
    if not cfg.bandit:
        return new_global, dict(server_state or {})
    arms = cfg.arms()
    stats = bandit_state(server_state, spec)
    earned = rewards(updates)
    for u in updates:
        r = earned.get(u.device_id)
        try:
            arm = arms.index((float(u.metrics["drop_ratio"]), SHAPES[int(u.metrics["drop_shape"])]))
        except (KeyError, ValueError, IndexError):
            continue   # trained with a configuration outside the arm set: no evidence for the bandit
        if r is not None:
            stats[u.device_id] = bandit.update(stats.get(u.device_id, bandit.ArmStats.empty(len(arms))), arm, r,
                                               cfg.gamma)
    return new_global, _to_state(stats, spec)


def device_budget(profile: Mapping) -> int | None:
    """The memory a device says training may use (its hello): ``memory_budget``, else available."""
    for key in ("memory_budget", "memory_available"):
        v = profile.get(key) if isinstance(profile, Mapping) else None
        if isinstance(v, (int, float)) and v > 0:
            return int(v)
    return None


def arm_peaks(spec: "TrainingSpec") -> list[int]:
    """The memory model's predicted training peak (bytes) of each arm at the profile's plan."""
    arch, req, base = load_arch(spec.model), request_from_spec(spec, METHOD), plan_of(spec, METHOD)
    # the kept count per step is ceil(L (1 - ratio)) whatever the shape (the shapes keep the mean)
    return [predict_peak(arch, dataclasses.replace(base, layer_drop=ratio), req.task, req.num_labels).total
            for ratio, _ in _cfg(spec).arms()]


def feasible_arms(peaks: Sequence[int], budget: int | None, margin: float) -> list[int]:
    """Arms whose predicted peak fits ``budget x (1 - margin)`` (all of them when the budget is unknown)."""
    if budget is None:
        return list(range(len(peaks)))
    limit = budget * (1 - margin)
    return [a for a, p in enumerate(peaks) if p <= limit]


def assign(server_state: Mapping[str, Tensor] | None, devices: Mapping[str, Mapping], spec: "TrainingSpec",
           round_: int) -> tuple[dict[str, dict], dict[str, dict]]:
    """Server, at the start of a training round: each participant's dropout configuration.

    ``devices``: participant -> its hello profile (memory). Returns ``(overrides, info)``:
    ``{device: {"droppeft": {"ratio", "shape"}}}`` (a spec override the device applies) and, per
    device, what was chosen and why (arm, feasible arms, predicted peak, budget)."""
    cfg = _cfg(spec)
    if not cfg.bandit:
        return {}, {}
    arms = cfg.arms()
    stats = bandit_state(server_state, spec)
    prior = bandit.fleet_means(stats, len(arms))
    peaks = arm_peaks(spec)
    overrides, info = {}, {}
    for pos, dev in enumerate(sorted(devices)):
        budget = device_budget(devices[dev])
        feasible = feasible_arms(peaks, budget, cfg.memory_margin)
        note = ""
        if not feasible:   # nothing fits at the profile's plan: the lightest arm; the device's planner shrinks the rest
            feasible = [min(range(len(arms)), key=lambda a: peaks[a])]
            note = "no arm fits the budget at the profile's plan: lightest offered"
        arm = bandit.choose(stats.get(dev, bandit.ArmStats.empty(len(arms))), prior, feasible, cfg.bandit_config(),
                            spread=pos)
        ratio, shape = arms[arm]
        overrides[dev] = {"droppeft": {"ratio": ratio, "shape": shape}}
        info[dev] = {"arm": arm, "ratio": ratio, "shape": shape, "predicted_peak": peaks[arm], "budget": budget,
                     "feasible": feasible, **({"note": note} if note else {})}
    return overrides, info


METHOD = Method(
    name="droppeft", summary="LoRA with stochastic layer dropout, ratios chosen per device by a bandit (DropPEFT)",
    build=build, initial_global=initial_global, trainable_state=trainable_state,
    load_trainable_state=load_trainable_state, local_train=local_train, save_adapter=lora.save_adapter,
    prepare=lora.prepare, personalise=personalise, save_personal_adapter=save_personal_adapter,
    aggregate=aggregate, assign=assign, check_update=check_update, rewards=rewards, personal_key=personal_key,
    layer_dropout=lambda spec: float(spec.droppeft.ratio), config=("droppeft", DropPEFTConfig),
    assignable={"droppeft": ("ratio", "shape")}, round_metrics=ROUND_METRICS)
