"""What to train, as the server tells every device: model, task, label space, method, configs.

It travels inside each round manifest as JSON, so every device builds the same model, and it is
validated on arrival (unknown keys and bad values are errors naming the field).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from edge_runtime.errors import ConfigError
from edge_runtime.methods import METHODS
from edge_runtime.methods.lora import LoraMethodConfig
from edge_runtime.training.models import TASKS, load_model, load_tokenizer, resolve_model_source
from edge_runtime.training.trainer import TrainConfig


@dataclass(frozen=True)
class TrainingSpec:
    model: str = "minilm-l6"
    task: str = "classification"
    labels: tuple[str, ...] = ()
    method: str = "lora"
    lora: LoraMethodConfig = field(default_factory=LoraMethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)   # a device's own train / val / test
    seed: int = 0
    tokenizer_corpus: tuple[str, ...] = ()   # tiny test models only: texts their word tokenizer is built from

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"training.task must be one of {TASKS}, got {self.task!r}")
        if self.method not in METHODS:
            raise ConfigError(f"training.method must be one of {sorted(METHODS)}, got {self.method!r}")
        if self.task == "classification" and len(self.labels) < 2:
            raise ConfigError(f"training.labels must list >= 2 labels for classification, got {list(self.labels)}")

    def to_json(self) -> dict[str, Any]:
        return json_ready(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, d: Any) -> "TrainingSpec":
        if not isinstance(d, dict):
            raise ConfigError("training must be an object")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"training: unknown keys {unknown}")
        kw = dict(d)
        try:
            if "lora" in kw:
                kw["lora"] = LoraMethodConfig(**{k: tuple(v) if k == "target_modules" and v else v
                                                 for k, v in kw["lora"].items()})
            if "train" in kw:
                kw["train"] = TrainConfig(**kw["train"])
        except TypeError as exc:
            raise ConfigError(f"training: {exc}") from exc
        for key in ("labels", "split", "tokenizer_corpus"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)


def json_ready(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


def build_model(spec: TrainingSpec):
    """Load the base model + tokenizer and wrap it with the spec's method; returns (model, tokenizer).

    Identical on every device and on the server for the same spec (seeded head / tiny weights).
    """
    source = resolve_model_source(spec.model)
    tokenizer = load_tokenizer(source, texts_for_tiny=spec.tokenizer_corpus)
    base = load_model(source, spec.task, max(len(spec.labels), 2), tokenizer, seed=spec.seed)
    return METHODS[spec.method].build(base, spec.lora, spec.task, seed=spec.seed), tokenizer
