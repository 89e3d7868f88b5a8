"""Device classes and training profiles: the YAML files in ``profiles/``, loaded and validated.

A *device class* (``profiles/devices/*.yaml``) describes a kind of board (memory, what the OS
keeps, CPU or CUDA, fp16, whether bitsandbytes runs there) so a plan can be made for it without
the board at hand. A *training profile* (``profiles/training/*.yaml``) is a named training spec
(model, task, method and its settings, local training settings) without the label space, which
comes from the data. Every error names the file, the key and the value; unknown keys are errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from edge_runtime.device.profiler import parse_size
from edge_runtime.errors import ConfigError



def shipped_profiles_dir() -> Path:
    """The shipped ``profiles/`` folder: package data ``edge_runtime.profiles`` (the copy inside the wheel, or
    the repository's top-level ``profiles/`` through an editable install's mapping). A source checkout used
    without installing it (on ``PYTHONPATH``, or shadowing an installed wheel) has no such subpackage: there
    the same folder is the one beside the package."""
    try:
        return Path(str(resources.files("edge_runtime.profiles")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "profiles"


PROFILES_DIR = shipped_profiles_dir()


class ProfileError(ConfigError):
    """A profile file is unreadable or invalid; the message names the file, key and value."""


def read_yaml(path: Path) -> dict:
    """A YAML mapping from ``path``; syntax errors carry the line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ProfileError(f"{path}: not valid YAML: {where}{getattr(exc, 'problem', None) or exc}") from exc
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
    return data


def _check_keys(path: Path, data: dict, allowed: set[str], required: set[str], where: str = "") -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ProfileError(f"{path}: {where}unknown key(s) {unknown} (allowed: {sorted(allowed)})")
    missing = sorted(required - set(data))
    if missing:
        raise ProfileError(f"{path}: {where}missing key(s) {missing}")


def _typed(path: Path, key: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ProfileError(f"{path}: {key}: expected {what}, got {value!r}")
    if not isinstance(value, kind):
        raise ProfileError(f"{path}: {key}: expected {what}, got {value!r}")
    return value


@dataclass(frozen=True)
class DeviceClass:
    name: str
    description: str
    memory: int                       # bytes of RAM (shared with the GPU on Jetson)
    reserved: int                     # bytes the OS and other services keep
    accelerator: str                  # "cuda" or "cpu"
    integrated_gpu: bool
    fp16: bool                        # trains in fp16 (fast half precision on this accelerator)
    bitsandbytes: bool                # NF4 / int8 quantized bases are possible here
    cpu_cores: int
    gflops_fp32: float                # nominal; ranks plans on one class, not across classes
    cuda_capability: tuple[int, int] | None = None
    unsupported: str = ""             # why edge-runtime cannot run on this class (it stays a planning target)
    source: str = ""

    @property
    def budget(self) -> int:
        """Bytes a training plan may use on this class."""
        return self.memory - self.reserved


def load_device_class(path: Path) -> DeviceClass:
    path = Path(path)
    data = read_yaml(path)
    names = {f.name for f in fields(DeviceClass)} - {"source"}
    _check_keys(path, data, names, names - {"cuda_capability", "description", "unsupported"})
    name = _typed(path, "name", data["name"], str, "a string")
    memory = _size(path, "memory", data["memory"])
    reserved = _size(path, "reserved", data["reserved"])
    if reserved >= memory:
        raise ProfileError(f"{path}: reserved: {data['reserved']!r} leaves nothing of memory {data['memory']!r}")
    accel = data["accelerator"]
    if accel not in ("cuda", "cpu"):
        raise ProfileError(f"{path}: accelerator: expected 'cuda' or 'cpu', got {accel!r}")
    cap = data.get("cuda_capability")
    if cap is not None:
        if not (isinstance(cap, list) and len(cap) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                 for x in cap)):
            raise ProfileError(f"{path}: cuda_capability: expected [major, minor], got {cap!r}")
        cap = (cap[0], cap[1])
    elif accel == "cuda":
        raise ProfileError(f"{path}: cuda_capability: required when accelerator is 'cuda'")
    cores = _typed(path, "cpu_cores", data["cpu_cores"], int, "a positive integer")
    gflops = _typed(path, "gflops_fp32", data["gflops_fp32"], (int, float), "a number of GFLOP/s")
    if cores < 1 or gflops <= 0:
        raise ProfileError(f"{path}: cpu_cores and gflops_fp32 must be > 0, got {cores!r}, {gflops!r}")
    return DeviceClass(name=name, description=str(data.get("description", "")), memory=memory, reserved=reserved,
                       accelerator=accel,
                       integrated_gpu=_typed(path, "integrated_gpu", data["integrated_gpu"], bool, "true or false"),
                       fp16=_typed(path, "fp16", data["fp16"], bool, "true or false"),
                       bitsandbytes=_typed(path, "bitsandbytes", data["bitsandbytes"], bool, "true or false"),
                       cpu_cores=cores, gflops_fp32=float(gflops), cuda_capability=cap,
                       unsupported=_typed(path, "unsupported", data.get("unsupported", ""), str, "a string"),
                       source=str(path))


def _size(path: Path, key: str, value: Any) -> int:
    try:
        return parse_size(value)
    except ConfigError as exc:
        raise ProfileError(f"{path}: {key}: {exc}") from exc


@dataclass(frozen=True)
class TrainingProfile:
    name: str
    description: str
    training: dict = field(default_factory=dict)   # a TrainingSpec's JSON without labels / tokenizer corpus
    source: str = ""

    def spec(self, labels: tuple[str, ...] = (), tokenizer_corpus: tuple[str, ...] = ()):
        from edge_runtime.training.spec import TrainingSpec

        return TrainingSpec.from_json({**self.training, "labels": list(labels),
                                       "tokenizer_corpus": list(tokenizer_corpus)})


def validate_training(path: Path | str, training: Any):
    """The training section as a :class:`TrainingSpec` (placeholder labels); errors name the file."""
    from edge_runtime.training.spec import TrainingSpec

    if not isinstance(training, dict):
        raise ProfileError(f"{path}: training: expected a mapping, got {training!r}")
    for key in ("labels", "tokenizer_corpus"):
        if key in training:
            raise ProfileError(f"{path}: training.{key}: comes from the data, not from a profile")
    try:
        return TrainingSpec.from_json({**training, "labels": ["label-a", "label-b"]})
    except ConfigError as exc:
        raise ProfileError(f"{path}: {exc}") from exc


def load_training_profile(path: Path) -> TrainingProfile:
    path = Path(path)
    data = read_yaml(path)
    _check_keys(path, data, {"name", "description", "training"}, {"name", "training"})
    name = _typed(path, "name", data["name"], str, "a string")
    validate_training(path, data["training"])
    return TrainingProfile(name, str(data.get("description", "")), dict(data["training"]), str(path))


def _load_all(folder: Path, loader) -> dict:
    out: dict = {}
    for path in sorted(Path(folder).glob("*.yaml")):
        item = loader(path)
        if item.name in out:
            raise ProfileError(f"{path}: name {item.name!r} is also used by {out[item.name].source}")
        out[item.name] = item
    return out


def device_classes(root: Path = PROFILES_DIR) -> dict[str, DeviceClass]:
    return _load_all(Path(root) / "devices", load_device_class)


def training_profiles(root: Path = PROFILES_DIR) -> dict[str, TrainingProfile]:
    return _load_all(Path(root) / "training", load_training_profile)


def _find(name_or_path: str, loader, load_all, what: str):
    """A YAML file by path, or a shipped profile by name."""
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
        return loader(Path(name_or_path))
    known = load_all()
    if name_or_path not in known:
        raise ProfileError(f"no {what} {name_or_path!r}; known: {sorted(known)}")
    return known[name_or_path]


def find_device_class(name_or_path: str, root: Path = PROFILES_DIR) -> DeviceClass:
    return _find(name_or_path, load_device_class, lambda: device_classes(root), "device class")


def find_training_profile(name_or_path: str, root: Path = PROFILES_DIR) -> TrainingProfile:
    return _find(name_or_path, load_training_profile, lambda: training_profiles(root), "training profile")


# -- device profiles (pushed to a running device) -------------------------------------------------
DEVICE_TRAINING_KEYS = ("train", "quantization")   # what may differ between devices of one run
DEVICE_PROFILE_KEYS = ("name", "description", "training")


def validate_device_profile(profile: Any, spec=None, where: str = "profile"):
    """The training overrides of a device profile, checked against ``spec`` (the run's spec, or a
    default one): only local settings that leave the adapter's layout alone (``train.*``,
    ``quantization``) may differ per device; the rest is the server's to decide for the fleet."""
    from edge_runtime.training.spec import TrainingSpec, apply_overrides

    if not isinstance(profile, dict):
        raise ProfileError(f"{where}: expected a mapping, got {type(profile).__name__}")
    unknown = sorted(set(profile) - set(DEVICE_PROFILE_KEYS))
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {unknown} (allowed: {list(DEVICE_PROFILE_KEYS)})")
    name = profile.get("name")
    if not isinstance(name, str) or not name:
        raise ProfileError(f"{where}: name: expected a non-empty string, got {name!r}")
    training = profile.get("training", {})
    if not isinstance(training, dict):
        raise ProfileError(f"{where}: training: expected a mapping, got {training!r}")
    fleet_wide = sorted(set(training) - set(DEVICE_TRAINING_KEYS))
    if fleet_wide:
        raise ProfileError(f"{where}: training.{fleet_wide[0]}: set by the server for the whole fleet (it shapes "
                           f"the adapter every device uploads); a device profile may set only "
                           f"{list(DEVICE_TRAINING_KEYS)}")
    base = spec if spec is not None else TrainingSpec(labels=("label-a", "label-b"))
    if "train" in training and not isinstance(training["train"], dict):
        raise ProfileError(f"{where}: training.train: expected a mapping, got {training['train']!r}")
    items = _override_items(training)
    try:
        result = TrainingSpec.from_json(apply_overrides(base.to_json(), items, where=f"{where}:"))
    except ConfigError as exc:
        raise ProfileError(f"{where}: {exc}") from exc
    from edge_runtime.methods import METHODS

    if result.quantization != "fp32" and not METHODS[result.method].quantized_base:
        raise ProfileError(f"{where}: training.quantization: {result.method} cannot train on a "
                           f"{result.quantization} base (this run's method needs the float weights)")
    return {"train": dict(training.get("train") or {}), **({"quantization": training["quantization"]}
                                                          if "quantization" in training else {})}


def _override_items(overrides: dict) -> list[str]:
    """``{"train": {...}, "quantization": ...}`` as ``--set`` items (values as JSON, which is YAML)."""
    import json

    items = [f"train.{k}={json.dumps(v)}" for k, v in (overrides.get("train") or {}).items()]
    if "quantization" in overrides:
        items.append(f"quantization={json.dumps(overrides['quantization'])}")
    return items


def apply_device_profile(spec, overrides: dict):
    """``spec`` with a validated device profile's overrides applied."""
    from edge_runtime.training.spec import TrainingSpec, apply_overrides

    items = _override_items(overrides)
    return TrainingSpec.from_json(apply_overrides(spec.to_json(), items)) if items else spec
