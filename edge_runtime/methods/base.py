"""The method contract: every hook a PEFT method provides, what each one does, and its default.

A method is one module under ``edge_runtime/methods/`` that ends with ``METHOD = Method(...)``, plus
one ``register`` line in ``edge_runtime/methods/__init__.py``. The simulator, the agent, the server,
the planner and the memory model read only this object: they never probe a module with
``getattr`` / ``hasattr`` and never branch on a method's name.

Device hooks (``model`` is the wrapped model :attr:`Method.build` returned):

- ``build(base, spec) -> model``: wrap the base model, the same on the server and every device;
- ``prepare(model, spec, init)``: once per model, from the run's round-0 global when
  :attr:`needs_init` (FeDeRA's residual base); default: nothing;
- ``trainable_state(model)`` / ``load_trainable_state(model, state)``: the upload, and loading a
  global (keys, shapes and dtypes checked);
- ``personalise(model, tok, splits, spec, personal, eval_batch_size) -> (metrics, personal)``: a
  device's own model from the global, evaluated (FDLoRA's fusion); default: none, ``({}, personal)``;
- ``local_train(model, tok, splits, spec, seed, personal, progress, desc) -> (TrainResult, personal)``;
- ``score(model, tok, splits, spec, seed) -> metrics``: a score round's report (when :attr:`scoring`);
- ``save_adapter(model, folder)`` / ``save_personal_adapter(model, personal, folder)`` /
  ``save_global_like_personal(model, personal, folder)``: adapter folders that load onto the
  untouched base (the global; the device's own model; the global in the personal model's layout).

Server hooks:

- ``initial_global(model, spec) -> state``: once per run, the round-0 global;
- ``aggregate(global, updates, server_state, spec, fleet_size) -> (global, server_state)``:
  default weighted FedAvg with no server state;
- ``select(global, reports, spec) -> (global, info)``: turn the score round's reports into the
  global's layout (when :attr:`scoring`);
- ``assign(configurator_state, profiles, spec, round) -> (overrides, info)``: per-device spec
  overrides at the start of a training round (DropPEFT's bandit); default: none. Only the keys in
  :attr:`assignable` may be set;
- ``learn(configurator_state, updates, spec) -> configurator_state``: after each aggregated
  round, the configurator's new state, a JSON document (persisted by the server beside the
  global, never tensors); default: ``{}``;
- ``migrate_state(server_state) -> (server_state, configurator_state | None)``: a server state
  saved by an older release, moved to the current layout on load; default: unchanged, ``None``;
- ``check_update(update, global, spec)``: raise to refuse an update (an ``Update`` without its
  tensors: steps, ``layer_steps``, metrics) that ``aggregate`` cannot use; default: accept;
- ``rewards(updates) -> {device: reward}``: what the configurator's choices earned; default: ``{}``.

Traits (read by the planner, the memory model, the CLI and the profile validator):
:attr:`needs_init`, :attr:`scoring`, :attr:`quantized_base`, :attr:`prompt_like`,
:attr:`adapter_copies`, :attr:`default_lr`, :attr:`personal_format`, :attr:`round_metrics`,
:attr:`config`, :meth:`layer_dropout` and :attr:`mean_aggregate` (a robust aggregator may replace
its aggregate).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, Mapping, TypeVar

from edge_runtime.algorithms.aggregation import fedavg
from edge_runtime.errors import AggregationError, ConfigError

S = TypeVar("S")


class ModelState(Generic[S]):
    """A method's typed state for each model its ``build`` made (DropPEFT's blocks, FedPepTAO's
    shared layers and control variates, ...): held beside the model in a weak map, so the model
    carries no private attributes and the state goes when the model goes."""

    def __init__(self, method: str) -> None:
        self.method = method
        self._of: "weakref.WeakKeyDictionary[Any, S]" = weakref.WeakKeyDictionary()

    def set(self, model, state: S) -> S:
        self._of[model] = state
        return state

    def get(self, model) -> S | None:
        """The state, or None for a model this method has not set one for (yet)."""
        return self._of.get(model)

    def of(self, model) -> S:
        try:
            return self._of[model]
        except KeyError:
            raise ConfigError(f"this model was not built by the {self.method} method") from None


def _no_prepare(model, spec, init) -> None:
    """LoRA-like methods need nothing but the global adapter."""


def _no_personal(model, tokenizer, splits, spec, personal, eval_batch_size: int = 64):
    return {}, personal


def _no_assignments(configurator_state, profiles, spec, round_) -> tuple[dict, dict]:
    return {}, {}


def _no_configurator(configurator_state, updates, spec) -> dict:
    return {}


def _nothing_to_migrate(server_state) -> tuple[dict, None]:
    return dict(server_state), None


def _accept_update(update, global_state, spec) -> None:
    """Every update with the global's keys and shapes is usable; per-block step counts are refused
    (a method without layer dropout has no use for them, and the round history would keep them)."""
    if update.layer_steps:
        raise AggregationError("this method takes no layer_steps (only layer-dropout methods report them)")


def _no_rewards(updates) -> dict[str, float]:
    return {}


def _no_personal_key(spec) -> list:
    return []


def _no_layer_dropout(spec) -> float:
    return 0.0


def _not_scoring(*_a, **_k):
    raise NotImplementedError("this method has no score round")


@dataclass(frozen=True)
class Method:
    """One PEFT method: its hooks (see the module docstring) and traits. Built once per method
    module as ``METHOD``; the registry in ``edge_runtime.methods`` holds them by :attr:`name`."""

    name: str
    summary: str                       # one line for ``--help`` and the README's table
    # device and server hooks without a sensible default
    build: Callable
    initial_global: Callable
    trainable_state: Callable
    load_trainable_state: Callable
    local_train: Callable
    save_adapter: Callable
    # hooks with defaults
    prepare: Callable = _no_prepare
    personalise: Callable = _no_personal
    aggregate: Callable = fedavg
    save_personal_adapter: Callable | None = None       # None: save_adapter(model, folder)
    save_global_like_personal: Callable | None = None   # None: save_adapter(model, folder)
    score: Callable = _not_scoring
    select: Callable = _not_scoring
    assign: Callable = _no_assignments
    learn: Callable = _no_configurator
    migrate_state: Callable = _nothing_to_migrate
    check_update: Callable = _accept_update
    rewards: Callable = _no_rewards
    personal_key: Callable = _no_personal_key   # the method's settings a saved personal state depends on
    layer_dropout: Callable = _no_layer_dropout  # the share of blocks a device skips under this spec
    # traits
    config: tuple[str, type] | None = None   # (section name, dataclass): its section of the training spec
    needs_init: bool = False          # devices need the round-0 global shipped to set the model up
    scoring: bool = False             # runs open with a score round (reports -> the global's layout)
    quantized_base: bool = True       # may train on an NF4 / int8 base
    prompt_like: bool = False         # trains per-layer prompts (memory: prompt tokens in every layer's KV)
    adapter_copies: int = 1           # LoRA adapters held per target (FDLoRA: global + personal)
    default_lr: float = 1e-3          # the local learning rate when a profile gives none
    personal_format: int = 1          # layout version of the saved personal state (a new one never reads an old)
    assignable: Mapping[str, tuple[str, ...]] = field(default_factory=dict)   # what assign() may set per device
    round_metrics: tuple[str, ...] = ()   # update metrics the round history keeps ("prefix." for a family)

    def __post_init__(self) -> None:
        for name in ("build", "initial_global", "trainable_state", "load_trainable_state", "local_train",
                     "save_adapter", "prepare", "personalise", "aggregate", "assign", "learn", "migrate_state", "check_update", "rewards",
                     "personal_key", "layer_dropout"):
            if not callable(getattr(self, name)):
                raise TypeError(f"method {self.name}: {name} must be callable")
        if self.scoring and (self.score is _not_scoring or self.select is _not_scoring):
            raise TypeError(f"method {self.name}: a scoring method needs score() and select()")
        if self.assignable and self.assign is _no_assignments:
            raise TypeError(f"method {self.name}: assignable settings but no assign()")
        if self.config is not None and (len(self.config) != 2 or not isinstance(self.config[0], str)):
            raise TypeError(f"method {self.name}: config must be (section name, dataclass)")

    def save_personal(self, model, personal, folder: Path) -> None:
        """The device's own model as an adapter folder (the global adapter for methods without one)."""
        (self.save_personal_adapter or (lambda m, _p, f: self.save_adapter(m, f)))(model, personal, folder)

    def save_global_in_personal_layout(self, model, personal, folder: Path) -> None:
        (self.save_global_like_personal or (lambda m, _p, f: self.save_adapter(m, f)))(model, personal, folder)

    @property
    def mean_aggregate(self) -> bool:
        """Its aggregate is the weighted mean of the updates, so a robust aggregator (coordinate-wise
        median, trimmed mean) may take its place."""
        return self.aggregate is fedavg

    def round_metric(self, key: str) -> bool:
        """Whether the round history keeps update metric ``key`` (listed, or under a listed "prefix.")."""
        return key in self.round_metrics or any(p.endswith(".") and key.startswith(p) for p in self.round_metrics)
