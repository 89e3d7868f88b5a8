"""What to train, as the server tells every device: model, task, label space, method, configs.

It travels inside each round manifest as JSON, so every device builds the same model, and it is
validated on arrival (unknown keys and bad values are errors naming the field).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from dataclasses import field
from typing import Any, Sequence

from edge_runtime.algorithms.compression import CompressionConfig
from edge_runtime.algorithms.dp import DPConfig
from edge_runtime.algorithms.fedopt import FedOptConfig
from edge_runtime.algorithms.robust import RobustConfig
from edge_runtime.errors import ConfigError
from edge_runtime.methods import METHODS, config_sections
from edge_runtime.training.models import (QUANTIZATIONS, TASKS,
                                          bitsandbytes_problem, load_model,
                                          load_tokenizer, resolve_model_source)
from edge_runtime.training.evaluate import EvalConfig
from edge_runtime.training.trainer import TrainConfig

log = logging.getLogger("edge_runtime.training")


class _SpecMethods:
    """The behaviour of :class:`TrainingSpec` (its fields are built below, from the method registry)."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"training.task must be one of {TASKS}, got {self.task!r}")
        if self.method not in METHODS:
            raise ConfigError(f"training.method must be one of {sorted(METHODS)}, got {self.method!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"training.quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.task == "classification" and len(self.labels) < 2:
            raise ConfigError(f"training.labels must list >= 2 labels for classification, got {list(self.labels)}")
        if self.robust.aggregator != "fedavg" and not METHODS[self.method].mean_aggregate:
            raise ConfigError(f"robust.aggregator {self.robust.aggregator} replaces a weighted mean, and "
                              f"{self.method} aggregates otherwise; use the norm bound and weight caps with it")
        if self.dp.enabled and (self.robust.aggregator != "fedavg" or not METHODS[self.method].mean_aggregate):
            raise ConfigError(f"dp (DP-FedAvg) replaces a mean of the updates; it works with robust.aggregator "
                              f"fedavg and a method that averages (not {self.method} with {self.robust.aggregator})")
        if self.fedopt.enabled and not METHODS[self.method].mean_aggregate:
            raise ConfigError(f"fedopt.optimizer {self.fedopt.optimizer} steps along a mean of the updates, and "
                              f"{self.method} aggregates otherwise (its own server update, if any, is in its section)")

    def to_json(self) -> dict[str, Any]:
        return json_ready(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, d: Any) -> "TrainingSpec":
        return dataclass_from_json(cls, d, "training")


# What to train: the common fields, then one section per registered method (``lora``, ``federa``,
# ... in registration order, each that method's config dataclass), then the local training loop.
# Built from the registry so that a new method adds its section by registering; the JSON on the
# wire is the same object as when these fields were written out by hand.
TrainingSpec = dataclasses.make_dataclass("TrainingSpec", [
    ("model", str, field(default="minilm-l6")),
    ("task", str, field(default="classification")),
    ("labels", tuple, field(default=())),
    ("method", str, field(default="lora")),
    ("quantization", str, field(default="fp32")),   # the frozen base's linear weights: fp32, nf4 or int8
    *[(name, cls, field(default_factory=cls)) for name, cls in config_sections().items()],
    ("robust", RobustConfig, field(default_factory=RobustConfig)),   # the server's defences (bounded influence)
    ("dp", DPConfig, field(default_factory=DPConfig)),   # DP-FedAvg on the server (off unless dp.clip is set)
    ("fedopt", FedOptConfig, field(default_factory=FedOptConfig)),   # the server optimizer over the mean (off)
    ("compression", CompressionConfig, field(default_factory=CompressionConfig)),   # how updates travel (off by default)
    ("train", TrainConfig, field(default_factory=TrainConfig)),
    ("eval", EvalConfig, field(default_factory=EvalConfig)),   # the devices' evaluation of each received global
    ("split", tuple, field(default=(0.8, 0.1, 0.1))),   # a device's own train / val / test
    ("seed", int, field(default=0)),
    ("tokenizer_corpus", tuple, field(default=())),    # tiny test models only: texts their word tokenizer is built from
], bases=(_SpecMethods,), frozen=True)
TrainingSpec.__module__ = __name__
TrainingSpec.__doc__ = "What to train, as the server tells every device (see the module docstring)."


def with_assignment(spec: "TrainingSpec", assignment: dict | None) -> "TrainingSpec":
    """``spec`` with the server's per-device assignment applied (a method's ``assign`` output for
    one device). Only the keys the method lists in ``assignable`` may change; anything else, or a
    bad value, is a ConfigError naming the key."""
    if not assignment:
        return spec
    allowed = METHODS[spec.method].assignable
    d = spec.to_json()
    if not isinstance(assignment, dict):
        raise ConfigError(f"assignment: expected a mapping, got {type(assignment).__name__}")
    for section, values in assignment.items():
        if section not in allowed or not isinstance(values, dict) or set(values) - set(allowed[section]):
            raise ConfigError(f"assignment {section}: {values!r} is not something the server may set per device "
                              f"for {spec.method} (allowed: {dict(allowed)})")
        d[section] = {**d[section], **values}
    return TrainingSpec.from_json(d)


def dataclass_from_json(cls, d: Any, where: str):
    """Build the frozen dataclass ``cls`` from JSON: nested configs recursively, lists to tuples,
    unknown keys and wrong types rejected with the dotted path of the field."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be an object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}")
    kw = {}
    for key, value in d.items():
        default = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
        if default is not None and dataclasses.is_dataclass(default):
            kw[key] = dataclass_from_json(default, value, f"{where}.{key}")
        elif isinstance(value, list):
            kw[key] = tuple(value)
        else:
            kw[key] = value
    try:
        return cls(**kw)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def json_ready(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


_BUILD_LOCK = threading.Lock()


def build_model(spec: TrainingSpec):
    """Load the base model + tokenizer and wrap it with the spec's method; returns (model, tokenizer).

    Identical on every device and on the server for the same spec (seeded head / tiny weights).
    Seeded initialisation uses torch's global RNG, so builds in one process are serialised:
    two threads building at once (in-process fleets) would otherwise draw each other's numbers.
    """
    with _BUILD_LOCK:
        source = resolve_model_source(spec.model)
        tokenizer = load_tokenizer(source, texts_for_tiny=spec.tokenizer_corpus)
        quantization = spec.quantization
        if quantization != "fp32" and (problem := bitsandbytes_problem()):
            log.warning("%s: training %s with an fp32 base instead of %s", problem, spec.model, quantization)
            quantization = "fp32"   # same adapter shapes: the device still takes part in the round
        base = load_model(source, spec.task, max(len(spec.labels), 2), tokenizer, seed=spec.seed,
                          quantization=quantization)
        return METHODS[spec.method].build(base, spec), tokenizer


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def apply_overrides(d: dict[str, Any], items: Sequence[str], where: str = "--set") -> dict[str, Any]:
    """``["fdlora.personal_epochs=2", "federa.residual=false"]`` applied to a spec's JSON (values parsed as YAML).

    Returns a new dict; the result still goes through :meth:`TrainingSpec.from_json` validation.
    """
    import copy

    import yaml

    out = copy.deepcopy(d)
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{where} {item!r}: expected KEY=VALUE, e.g. fdlora.personal_epochs=2")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where} {item!r}: the value is not valid YAML: {exc}") from exc
        if isinstance(value, str) and _FLOAT_RE.fullmatch(raw.strip()):   # unquoted only: "1e5" stays text
            value = float(value)   # YAML 1.1 reads 5e-3 (no dot) as a string; a user means the number
        *path, last = key.strip().split(".")
        node = out
        for part in path:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"{where} {item!r}: {part!r} is not a section of the training spec")
            node = node[part]
        node[last] = value
    return out
