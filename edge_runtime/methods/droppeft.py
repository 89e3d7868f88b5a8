"""DropPEFT (seed 001): LoRA trained with stochastic transformer-layer dropout, a per-device
bandit that picks each device's dropout configuration, and aggregation that knows who trained what.

1. **Layer dropout** (device): each training step runs only some of the model's blocks (the
   ``ModuleList`` of transformer layers: BERT's ``encoder.layer``, Llama's ``model.layers``, or
   any model's). The dropped blocks are taken out of the list for that step, so they do no
   forward compute, store no activations and get no gradients (AdamW skips them); the hidden
   state passes straight to the next kept block, with no rescaling unless ``rescale`` (a kept
   block's residual branch then counts ``1 / (1 - p_l)`` times, LayerDrop-style). Evaluation and
   export always run every block. Which blocks run is drawn per step from the configuration (mean
   ratio x shape over depth, :mod:`edge_runtime.algorithms.layer_dropout`), with a fixed count
   per step so memory has a hard bound. ``schedule: linear`` scales the ratio down round by round
   (the server sends each round's share as ``round_scale``): more dropout early.
2. **Configurator** (server, :func:`assign`): a discounted-UCB bandit per device
   (:mod:`edge_runtime.algorithms.bandit`) over the arms ``ratios x shapes``; reward = the share
   of the device's validation loss its round removed, ``ln(before / after)``, per second of its
   round (training, the reward's two validation passes, evaluation), divided by the round's median
   (so the reward does not shrink as the model converges; :func:`rewards`). Arms whose predicted peak memory (the
   memory model, at the training profile's plan and the arm's kept-layer count) exceeds the
   device's reported budget are never offered. Each device's choice travels in the round manifest
   as a spec override (``droppeft.ratio`` / ``droppeft.shape``); its statistics are the server's
   configurator state, a JSON document (:func:`learn`, :data:`BANDIT_FORMAT`).
3. **Aggregation** (:func:`aggregate`): block ``l``'s adapter is averaged over the devices that
   trained it, each weighted by ``n_samples x (steps block l ran / steps of the round)`` (the
   update's typed ``layer_steps``, checked on arrival by :func:`check_update`); a block
   nobody trained keeps its value. Tensors outside the blocks (the head) train every step and
   weigh ``n_samples``, as in FedAvg; so at drop ratio 0 this *is* LoRA FedAvg.
4. **Personal layers** (``personal_layers: k``): the adapters of the top ``k`` blocks stay on the
   device (trained there, never uploaded); the global model runs those blocks unadapted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from torch import Tensor, nn

from edge_runtime.algorithms import bandit
from edge_runtime.algorithms.aggregation import Update, check_compatible, finite_number, masked_weighted_mean
from edge_runtime.device.memory_model import load_arch, predict_peak
from edge_runtime.device.planner import plan_of, request_from_spec
from edge_runtime.algorithms.layer_dropout import (SCHEDULES, SHAPES, drop_probabilities, keep_scales, max_kept,
                                                   sample_kept, schedule_scale)
from edge_runtime.errors import AggregationError, ConfigError
from edge_runtime.methods import lora
from edge_runtime.methods.personal import PersonalState
from edge_runtime.training.data import Splits
from edge_runtime.training.evaluate import evaluate
from edge_runtime.training.blocks import find_blocks
from edge_runtime.training.trainer import TrainResult, train_local
from edge_runtime.methods.base import Method, ModelState

if TYPE_CHECKING:
    from edge_runtime.training.spec import TrainingSpec

log = logging.getLogger("edge_runtime.droppeft")

BANDIT = "droppeft_bandit"          # the configurator state's section: {"format", "arms", "devices"}
BANDIT_FORMAT = 1
REWARDS = ("local", "fleet")
MAX_BANDIT_DEVICES = 10_000          # devices the bandit remembers (the least recently trained go first)
LEGACY_BANDIT = "bandit."           # protocol-1 servers kept the statistics as server-state tensors bandit.{n,s}.<device>
# what the server's history keeps of each device's report: the configurator's evidence (the step
# counts that make each round's aggregation reproducible are the row's typed "layer_steps")
ROUND_METRICS = ("drop_ratio", "drop_effective", "drop_shape", "kept_max", "val_loss_before", "val_loss_after", "val_seconds",
                 "train_seconds")


@dataclass(frozen=True)
class DropPEFTConfig:
    ratio: float = 0.5                 # mean drop ratio (the bandit's pick, or fixed with bandit: false)
    shape: str = "uniform"             # uniform | increasing | decreasing (drop probability over depth)
    cap: float = 0.95                  # no block is dropped with a higher probability
    bandit: bool = True                # the server picks (ratio, shape) per device
    ratios: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6)
    shapes: tuple[str, ...] = ("uniform", "increasing")
    gamma: float = 0.9                 # discount of the bandit's statistics per round
    explore: float = 0.1               # UCB exploration bonus (rewards are ~1 after normalisation; 0.5 never settled)
    prior_weight: float = 1.0          # pseudo-pulls of the fleet's mean in a device's estimate
    memory_margin: float = 0.15        # an arm fits when its predicted peak <= budget x (1 - margin)
    personal_layers: int = 0           # top blocks whose adapters stay on the device
    rescale: bool = False              # a kept block's residual branch x 1 / (1 - p_l) in training (LayerDrop-style)
    schedule: str = "constant"         # constant | linear: the ratio falls to 0 over schedule_rounds rounds
    schedule_rounds: int = 4
    round_scale: float = 1.0           # this round's share of the ratio (the server sets it from the schedule)
    reward: str = "local"              # local: per device, its own loss per second | fleet: one arm a round,
                                       # rewarded with the global's loss per second of the round (:func:`fleet_rate`)
    fleet_gamma: float = 0.98          # the fleet bandit's discount per round (one pull a round: 0.9 forgets
                                       # an arm so fast that its bonus re-opens arms 40% apart)

    def __post_init__(self) -> None:
        if not 0 < self.cap <= 1 or not 0 <= self.ratio <= self.cap:
            raise ConfigError(f"droppeft.ratio must be in [0, cap={self.cap}] and cap in (0, 1], got {self.ratio!r}")
        for s in (self.shape, *self.shapes):
            if s not in SHAPES:
                raise ConfigError(f"droppeft: shape must be one of {SHAPES}, got {s!r}")
        if not self.ratios or not self.shapes or any(not 0 <= r <= self.cap for r in self.ratios):
            raise ConfigError(f"droppeft.ratios must be a non-empty list in [0, {self.cap}] and shapes non-empty, "
                              f"got {list(self.ratios)} x {list(self.shapes)}")
        if not 0 < self.gamma <= 1 or not 0 < self.fleet_gamma <= 1 or self.explore < 0 or self.prior_weight < 0:
            raise ConfigError("droppeft needs 0 < gamma, fleet_gamma <= 1, explore >= 0 and prior_weight >= 0")
        if not 0 <= self.memory_margin < 1 or self.personal_layers < 0:
            raise ConfigError("droppeft needs memory_margin in [0, 1) and personal_layers >= 0")
        if self.schedule not in SCHEDULES or self.schedule_rounds < 1:
            raise ConfigError(f"droppeft.schedule must be one of {SCHEDULES} and schedule_rounds >= 1, "
                              f"got {self.schedule!r} over {self.schedule_rounds!r}")
        if self.reward not in REWARDS:
            raise ConfigError(f"droppeft.reward must be one of {REWARDS}, got {self.reward!r}")
        if not (isinstance(self.round_scale, (int, float)) and 0 <= self.round_scale <= 1):
            raise ConfigError(f"droppeft.round_scale must be in [0, 1], got {self.round_scale!r}")

    @property
    def effective_ratio(self) -> float:
        """The mean drop ratio this round trains with: the arm's, times the schedule's share."""
        return float(self.ratio) * float(self.round_scale)

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
@contextlib.contextmanager
def run_only(model: nn.Module, kept: Sequence[int], scales: Mapping[int, float] | None = None):
    """Within the block, the model runs only blocks ``kept`` (in order); all of them again after.
    ``scales``: block -> factor of its residual branch (``x + s (block(x) - x)``; LayerDrop-style
    rescaling). Per training step: the blocks' place is the one :func:`build` found, not searched again."""
    st = STATE.get(model)
    parent, attr, blocks = st.blocks if st is not None else find_blocks(model)[:3]
    handles = [h for l, f in (scales or {}).items() if l in kept for h in _scale_residual(blocks[l], f)]
    setattr(parent, attr, nn.ModuleList([blocks[i] for i in sorted(kept)]))
    try:
        yield
    finally:
        setattr(parent, attr, blocks)
        for h in handles:
            h.remove()


def _scale_residual(block: nn.Module, factor: float) -> list:
    """Hooks that turn ``block``'s output ``y`` (or the first item of its tuple) into ``x + factor (y - x)``,
    ``x`` its hidden-state input (checkpointed recomputation runs both hooks again, in the same order)."""
    inputs: list[Tensor] = []

    def pre(module, args, kwargs):
        inputs.append(args[0] if args else kwargs["hidden_states"])

    def post(module, args, kwargs, out):
        x = inputs.pop()
        y = out[0] if isinstance(out, tuple) else out
        y = x + factor * (y - x)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    return [block.register_forward_pre_hook(pre, with_kwargs=True),
            block.register_forward_hook(post, with_kwargs=True)]


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
    ev = evaluate(model, tokenizer, splits.test, eval_batch_size, spec.train.max_seq_len,
                  precision=spec.train.precision)
    return {"personal_accuracy": ev.accuracy, "personal_loss": ev.loss, "personal_n": ev.n}, personal


def _val_loss(model, tokenizer, splits: Splits, spec: "TrainingSpec") -> float | None:
    if len(splits.val) == 0:
        return None
    return evaluate(model, tokenizer, splits.val, 64, spec.train.max_seq_len, precision=spec.train.precision).loss


def local_train(model, tokenizer, splits: Splits, spec: "TrainingSpec", seed: int,
                personal: PersonalState | None, progress: bool = False,
                desc: str = "train") -> tuple[TrainResult, PersonalState | None]:
    """One round with layer dropout; reports the steps each block ran and the validation loss
    before and after (the configurator's reward)."""
    cfg = _cfg(spec)
    _load_personal(model, personal)
    n = len(STATE.of(model).blocks[2])
    probs = drop_probabilities(n, cfg.effective_ratio, cfg.shape, cfg.cap)
    t0 = time.perf_counter()
    before = _val_loss(model, tokenizer, splits, spec) if cfg.bandit else None
    val_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(seed * 7919 + 17)
    counts = [0] * n

    def step_context(i: int):
        kept = sample_kept(probs, gen)
        for l in kept:
            counts[l] += 1
        return run_only(model, kept, keep_scales(probs, kept) if cfg.rescale else None)

    res = train_local(model, tokenizer, splits.train, spec.train, seed=seed, progress=progress, desc=desc,
                      step_context=step_context)
    metrics: dict[str, float] = {"drop_ratio": cfg.ratio, "drop_effective": cfg.effective_ratio,
                                 "drop_shape": SHAPES.index(cfg.shape),
                                 "kept_max": max_kept(probs)}
    t0 = time.perf_counter()
    # the fleet reward reads the global's loss only (the next round's "before" is this round's "after")
    after = _val_loss(model, tokenizer, splits, spec) if cfg.bandit and cfg.reward == "local" else None
    if before is not None:
        metrics.update(val_loss_before=before, val_seconds=val_s + time.perf_counter() - t0)
    if after is not None:
        metrics.update(val_loss_after=after)
    return dataclasses.replace(res, metrics=metrics, layer_steps=tuple(counts)), _personal_of(model) or personal


def save_personal_adapter(model, personal: PersonalState | None, folder: Path) -> None:
    """The device's own model (its personal top blocks in place) as a peft folder."""
    _load_personal(model, personal)
    try:
        model.save_pretrained(folder)
    finally:
        _set(model, STATE.of(model).init)


# -- server ------------------------------------------------------------------------------------
def check_update(update: Update, global_state: Mapping[str, Tensor], spec: "TrainingSpec") -> None:
    """Refuse an update whose per-block step counts are missing or impossible (AggregationError)."""
    layers = sorted({l for k in global_state if (l := layer_of(k)) is not None})
    # one count per block of the model; the global may lack the top ones (personal layers stay on the device)
    if layers and len(update.layer_steps) <= layers[-1]:
        raise AggregationError(f"droppeft update: layer_steps has {len(update.layer_steps)} entries, the model "
                               f"has at least {layers[-1] + 1} blocks (steps each block ran)")
    steps = max(int(update.steps), 0)
    for l, v in enumerate(update.layer_steps):
        if not 0 <= v <= steps:
            raise AggregationError(f"droppeft update: layer_steps[{l}]={v!r} is not a step count in 0..{steps}")


def layer_weights(update: Update, global_state: Mapping[str, Tensor]) -> dict[str, float]:
    """Per-tensor weights of one update: ``n_samples x (steps block l ran / steps)``; ``n_samples``
    outside the blocks."""
    steps = max(1, int(update.steps))
    out = {}
    for k in global_state:
        l = layer_of(k)
        ran = update.layer_steps[l] if l is not None and l < len(update.layer_steps) else 0
        out[k] = update.n_samples * (ran / steps if l is not None else 1.0)
    return out


def round_seconds(metrics: Mapping[str, float]) -> float | None:
    """What a device's round cost it, as its reward counts it: local training, the two validation
    passes the reward needs, and the evaluation / personalisation phases every arm pays (the
    one-off model load and the transfers are left out); None without a positive training time."""
    parts = [metrics.get(k) for k in ("train_seconds", "val_seconds", "t_eval_s", "t_personalise_s")]
    if not (finite_number(parts[0]) and parts[0] > 0):
        return None
    if not all(p is None or (finite_number(p) and p >= 0) for p in parts):
        return None
    total = float(sum(p for p in parts if p is not None))
    return total if math.isfinite(total) else None


def rewards(updates: Sequence[Update]) -> dict[str, float]:
    """Each device's reward: the share of its validation loss the round removed, ``ln(before /
    after)``, per second of its round (:func:`round_seconds`), divided by the round's median
    absolute rate (devices without a validation split get none).

    Under geometric convergence (each round takes a fixed share off the loss) the time to a target
    loss is ``ln(start / target)`` over this rate, so the arm with the highest rate reaches the
    target first; counting the round's other phases keeps an arm's saving on training in
    proportion to the round (a ratio that halves training time does not halve the round)."""
    raw = {}
    for u in updates:
        m = u.metrics
        before, after, seconds = m.get("val_loss_before"), m.get("val_loss_after"), round_seconds(m)
        if seconds is None or not all(finite_number(v) and v > 0 for v in (before, after)):
            continue   # a hostile or broken report (negative, 0, 1e308 + 1e308 seconds) earns nothing, fails nothing
        r = (math.log(before) - math.log(after)) / seconds   # not log(before / after): 1e-200 / 1e200 is 0
        if math.isfinite(r):
            raw[u.device_id] = r
    # the median, not the mean: one device's wild report cannot shrink everyone else's reward
    scale = statistics.median(abs(v) for v in raw.values()) if raw else 0.0
    return {d: (v / scale if scale > 0 else 0.0) for d, v in raw.items()}


# -- the configurator's state: {"droppeft_bandit": {"format", "arms": [[ratio, shape]], "devices": {id: {n, s}}}},
#    devices in the order they last trained (oldest first; at most MAX_BANDIT_DEVICES)
def _arms_json(cfg: DropPEFTConfig) -> list[list]:
    return [[r, s] for r, s in cfg.arms()]


def _numbers(v: object, n: int) -> list[float] | None:
    if not isinstance(v, list) or len(v) != n:
        return None
    if not all(finite_number(x) and x >= -1e12 for x in v):
        return None
    return [float(x) for x in v]


def bandit_state(config_state: Mapping | None, spec: "TrainingSpec") -> dict[str, bandit.ArmStats]:
    """The per-device statistics in the configurator state (empty if the arm set changed since;
    entries that are not two finite vectors of the arm count are dropped with a warning)."""
    doc = (config_state or {}).get(BANDIT)
    if not isinstance(doc, Mapping):
        return {}
    arms = _arms_json(_cfg(spec))
    if doc.get("format") != BANDIT_FORMAT or doc.get("arms") != arms:
        log.warning("droppeft: the arm set (or the state's format) changed; the bandit starts afresh")
        return {}
    out, devices = {}, doc.get("devices")
    for dev, st in (devices.items() if isinstance(devices, Mapping) else ()):
        n = _numbers(st.get("n"), len(arms)) if isinstance(st, Mapping) else None
        s_ = _numbers(st.get("s"), len(arms)) if isinstance(st, Mapping) else None
        if n is None or s_ is None:
            log.warning("droppeft: dropped unreadable bandit statistics of %.64s", dev)
            continue
        out[str(dev)] = bandit.ArmStats(n, s_)
    return out


def _to_json(stats: Mapping[str, bandit.ArmStats], spec: "TrainingSpec") -> dict:
    return {BANDIT: {"format": BANDIT_FORMAT, "arms": _arms_json(_cfg(spec)),
                     "devices": {d: {"n": list(st.n), "s": list(st.s)} for d, st in stats.items()}}}


def migrate_state(server_state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict | None]:
    """A protocol-1 server state: the ``bandit.*`` tensors become the configurator's JSON state (the
    arms are read back from ``bandit.arms``); ``None`` when there is nothing to migrate."""
    legacy = {k: v for k, v in server_state.items() if k.startswith(LEGACY_BANDIT)}
    rest = {k: v for k, v in server_state.items() if not k.startswith(LEGACY_BANDIT)}
    arms_t = legacy.get(LEGACY_BANDIT + "arms")
    if arms_t is None or arms_t.dim() != 2 or arms_t.shape[1] != 2:
        return rest, None
    arms = [[float(r), SHAPES[int(s)]] for r, s in arms_t.double().tolist() if 0 <= int(s) < len(SHAPES)]
    devices = {}
    for k, v in legacy.items():
        if k.startswith(LEGACY_BANDIT + "n."):
            dev = k[len(LEGACY_BANDIT + "n."):]
            s_ = legacy.get(LEGACY_BANDIT + "s." + dev)
            if s_ is not None and v.numel() == s_.numel() == len(arms):
                devices[dev] = {"n": v.double().tolist(), "s": s_.double().tolist()}
    return rest, {BANDIT: {"format": BANDIT_FORMAT, "arms": arms, "devices": devices}}


def aggregate(global_state: Mapping[str, Tensor], updates: Sequence[Update], server_state: Mapping[str, Tensor] | None,
              spec: "TrainingSpec", fleet_size: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Dropout-aware FedAvg (no server tensors: the bandit's statistics are :func:`learn`'s)."""
    for u in updates:
        check_update(u, global_state, spec)
    return masked_weighted_mean(global_state, [(u.tensors, layer_weights(u, global_state)) for u in updates]), {}


def _arm_of(update: Update, arms: Sequence[tuple[float, str]]) -> int | None:
    """The arm an update trained with (None: a configuration outside the arm set, or no report)."""
    try:
        return arms.index((float(update.metrics["drop_ratio"]), SHAPES[int(update.metrics["drop_shape"])]))
    except (KeyError, ValueError, IndexError, TypeError, OverflowError):
        return None


def learn(config_state: Mapping | None, updates: Sequence[Update], spec: "TrainingSpec") -> dict:
    """The configurator state after a round: each device's bandit updated with its reward (the
    fleet's bandit with ``reward: fleet``, :func:`learn_fleet`)."""
    cfg = _cfg(spec)
    if not cfg.bandit:
        return dict(config_state or {})
    if cfg.reward == "fleet":
        return learn_fleet(config_state, updates, spec)
    arms = cfg.arms()
    stats = bandit_state(config_state, spec)
    earned = rewards(updates)
    for u in updates:
        r = earned.get(u.device_id)
        arm = _arm_of(u, arms)
        if arm is None:
            continue   # trained with a configuration outside the arm set: no evidence for the bandit
        if r is not None:   # re-inserted: the devices stay in the order they last trained, oldest first
            stats[u.device_id] = bandit.update(stats.pop(u.device_id, bandit.ArmStats.empty(len(arms))), arm, r,
                                               cfg.gamma)
    if len(stats) > MAX_BANDIT_DEVICES:   # bounded whatever the churn: the longest idle are forgotten
        stats = dict(list(stats.items())[-MAX_BANDIT_DEVICES:])
    return _to_json(stats, spec)


# -- the fleet's bandit (reward: fleet) ----------------------------------------------------------
# A device's own loss is the wrong witness for a dropout arm: on MiniLM a device trained with blocks
# dropped lowers its own validation loss about as fast per second as one with every block, but the
# average of such updates lowers the global's loss far less (README, DropPEFT). With reward: fleet
# every participant trains with the same arm in a round, and the arm is rewarded with what the
# round did to the *global*: the next round's "before" losses (each device's validation loss of the
# global it receives) against this round's, per second of the round.
def fleet_rate(before: Mapping[str, float], after: Mapping[str, float], seconds: float) -> float | None:
    """The global's rate of progress over one round: the median, over the devices that reported
    both, of ``ln(loss before / loss after)``, per second of the round (None without a device in
    common or a positive round time). The median: one lying device cannot move it."""
    rates = [math.log(before[d]) - math.log(after[d]) for d in before.keys() & after.keys()
             if _positive(before[d]) and _positive(after[d])]
    if not rates or not (finite_number(seconds) and seconds > 0):
        return None
    r = statistics.median(rates) / seconds
    return r if math.isfinite(r) else None


def _positive(v: object) -> bool:
    return finite_number(v) and v > 0


def fleet_state(config_state: Mapping | None, spec: "TrainingSpec") -> tuple[bandit.ArmStats, dict | None, float | None]:
    """The fleet bandit's statistics, the round awaiting its reward (``{"arm", "loss", "seconds"}``)
    and the reward scale (the first round's rate), each reset when unreadable or the arm set changed."""
    doc = (config_state or {}).get(BANDIT)
    n_arms = len(_cfg(spec).arms())
    if not isinstance(doc, Mapping) or doc.get("format") != BANDIT_FORMAT or doc.get("arms") != _arms_json(_cfg(spec)):
        return bandit.ArmStats.empty(n_arms), None, None
    fleet = doc.get("fleet")
    n = _numbers(fleet.get("n"), n_arms) if isinstance(fleet, Mapping) else None
    s_ = _numbers(fleet.get("s"), n_arms) if isinstance(fleet, Mapping) else None
    stats = bandit.ArmStats(n, s_) if n is not None and s_ is not None else bandit.ArmStats.empty(n_arms)
    pending, p = None, doc.get("pending")
    if (isinstance(p, Mapping) and isinstance(p.get("arm"), int) and 0 <= p["arm"] < n_arms
            and _positive(p.get("seconds")) and isinstance(p.get("loss"), Mapping)):
        loss = {str(d): float(v) for d, v in p["loss"].items() if _positive(v)}
        pending = {"arm": p["arm"], "seconds": float(p["seconds"]), "loss": loss} if loss else None
    scale = float(doc["scale"]) if _positive(doc.get("scale")) else None
    return stats, pending, scale


def learn_fleet(config_state: Mapping | None, updates: Sequence[Update], spec: "TrainingSpec") -> dict:
    """The fleet bandit after a round: the previous round's arm rewarded with :func:`fleet_rate`
    (its losses against this round's "before" losses), divided by the first such rate (so rewards
    are ~1 and the exploration bonus keeps its meaning); this round's arm then awaits its reward."""
    cfg = _cfg(spec)
    arms = cfg.arms()
    stats, pending, scale = fleet_state(config_state, spec)
    now = {u.device_id: float(u.metrics["val_loss_before"]) for u in updates
           if _positive(u.metrics.get("val_loss_before"))}
    if pending is not None:
        rate = fleet_rate(pending["loss"], now, pending["seconds"])
        if rate is not None:
            scale = scale or (abs(rate) if rate != 0 else None)
            if scale:
                stats = bandit.update(stats, pending["arm"], rate / scale, cfg.fleet_gamma)
    # this round's arm: the one most participants trained with (those that could not fit it took another)
    pulled = [a for u in updates if (a := _arm_of(u, arms)) is not None]
    seconds = [t for u in updates if (t := round_seconds(u.metrics)) is not None]
    nxt = None
    if pulled and seconds and now:
        arm = max(set(pulled), key=lambda a: (pulled.count(a), -a))
        nxt = {"arm": arm, "seconds": statistics.median(seconds),
               "loss": dict(list(now.items())[:MAX_BANDIT_DEVICES])}
    doc = {"format": BANDIT_FORMAT, "arms": _arms_json(cfg), "devices": {},
           "fleet": {"n": list(stats.n), "s": list(stats.s)}}
    if nxt is not None:
        doc["pending"] = nxt
    if scale:
        doc["scale"] = scale
    return {BANDIT: doc}


def assign_fleet(config_state: Mapping | None, feasible: Mapping[str, Sequence[int]], peaks: Sequence[int],
                 spec: "TrainingSpec") -> int:
    """The fleet's arm this round: the bandit's pick among the arms every participant fits
    (``feasible``: participant -> the arms it fits; else those that most participants fit)."""
    cfg = _cfg(spec)
    fits = {a: sum(a in f for f in feasible.values()) for a in range(len(peaks))}
    best_fit = max(fits.values(), default=0)
    common = [a for a, k in fits.items() if k == best_fit and k > 0] or [min(range(len(peaks)), key=peaks.__getitem__)]
    stats, pending, _ = fleet_state(config_state, spec)
    # the last round's arm earns its reward only at the end of this one: it counts as tried, so that
    # round 2 explores another arm instead of repeating round 1's
    untried = [a for a in common if stats.n[a] <= 1e-12 and (pending is None or a != pending["arm"])]
    if untried:
        return untried[0]
    if pending is not None and stats.n[pending["arm"]] > 1e-12:   # its pull, at its mean so far (no repeat
        a = pending["arm"]                                          # for want of the result on its way)
        stats = bandit.ArmStats([n + (k == a) for k, n in enumerate(stats.n)],
                                [s_ + (k == a) * stats.s[a] / stats.n[a] for k, s_ in enumerate(stats.s)])
    return bandit.choose(stats, [None] * len(peaks), common, cfg.bandit_config())


def device_budget(profile: Mapping) -> int | None:
    """The memory a device says training may use (its hello): ``memory_budget``, else available."""
    for key in ("memory_budget", "memory_available"):
        v = profile.get(key) if isinstance(profile, Mapping) else None
        if isinstance(v, (int, float)) and v > 0:
            return int(v)
    return None


def arm_peaks(spec: "TrainingSpec", scale: float = 1.0) -> list[int]:
    """The memory model's predicted training peak (bytes) of each arm at the profile's plan, its
    ratio times ``scale`` (the schedule's share this round: less dropout, more memory)."""
    arch, req, base = load_arch(spec.model), request_from_spec(spec, METHOD), plan_of(spec, METHOD)
    # the kept count per step is ceil(L (1 - ratio)) whatever the shape (the shapes keep the mean)
    return [predict_peak(arch, dataclasses.replace(base, layer_drop=ratio * scale), req.task, req.num_labels).total
            for ratio, _ in _cfg(spec).arms()]


def feasible_arms(peaks: Sequence[int], budget: int | None, margin: float) -> list[int]:
    """Arms whose predicted peak fits ``budget x (1 - margin)`` (all of them when the budget is unknown)."""
    if budget is None:
        return list(range(len(peaks)))
    limit = budget * (1 - margin)
    return [a for a, p in enumerate(peaks) if p <= limit]


def assign(config_state: Mapping | None, devices: Mapping[str, Mapping], spec: "TrainingSpec",
           round_: int) -> tuple[dict[str, dict], dict[str, dict]]:
    """Server, at the start of a training round: each participant's dropout configuration.

    ``devices``: participant -> its hello profile (memory). Returns ``(overrides, info)``:
    ``{device: {"droppeft": {"ratio", "shape"}}}`` (a spec override the device applies; with a
    schedule also ``"round_scale"``, this round's share of the ratio, the only override when the
    bandit is off) and, per
    device, what was chosen and why (arm, feasible arms, predicted peak, budget)."""
    cfg = _cfg(spec)
    scale = schedule_scale(cfg.schedule, round_, cfg.schedule_rounds)
    timed = {"round_scale": scale} if cfg.schedule != "constant" else {}
    if not cfg.bandit:
        return ({dev: {"droppeft": timed} for dev in devices} if timed else {}), {}
    arms = cfg.arms()
    stats = bandit_state(config_state, spec)
    prior = bandit.fleet_means(stats, len(arms))
    peaks = arm_peaks(spec, scale)
    budgets = {dev: device_budget(devices[dev]) for dev in devices}
    fits = {dev: feasible_arms(peaks, budgets[dev], cfg.memory_margin) for dev in devices}
    fleet_arm = assign_fleet(config_state, fits, peaks, spec) if cfg.reward == "fleet" else None
    overrides, info = {}, {}
    for pos, dev in enumerate(sorted(devices)):
        budget, feasible = budgets[dev], fits[dev]
        note = ""
        if not feasible:   # nothing fits at the profile's plan: the lightest arm; the device's planner shrinks the rest
            feasible = [min(range(len(arms)), key=lambda a: peaks[a])]
            note = "no arm fits the budget at the profile's plan: lightest offered"
        if fleet_arm is not None:   # the fleet's arm; where it does not fit, the heaviest that does
            arm = fleet_arm if fleet_arm in feasible else max(feasible, key=lambda a: (peaks[a], -a))
        else:
            arm = bandit.choose(stats.get(dev, bandit.ArmStats.empty(len(arms))), prior, feasible,
                                cfg.bandit_config(), spread=pos)
        ratio, shape = arms[arm]
        overrides[dev] = {"droppeft": {"ratio": ratio, "shape": shape, **timed}}
        info[dev] = {"arm": arm, "ratio": ratio, "shape": shape, "predicted_peak": peaks[arm], "budget": budget,
                     "feasible": feasible, **({"note": note} if note else {})}
    return overrides, info


METHOD = Method(
    name="droppeft", summary="LoRA with stochastic layer dropout, ratios chosen per device by a bandit (DropPEFT)",
    build=build, initial_global=initial_global, trainable_state=trainable_state,
    load_trainable_state=load_trainable_state, local_train=local_train, save_adapter=lora.save_adapter,
    prepare=lora.prepare, personalise=personalise, save_personal_adapter=save_personal_adapter,
    aggregate=aggregate, assign=assign, learn=learn, migrate_state=migrate_state, check_update=check_update, rewards=rewards, personal_key=personal_key,
    layer_dropout=lambda spec: float(spec.droppeft.ratio), config=("droppeft", DropPEFTConfig),
    assignable={"droppeft": ("ratio", "shape", "round_scale")}, round_metrics=ROUND_METRICS)
