"""``edge_runtime.json`` beside an adapter / export: which base model, task and labels it belongs to."""

from __future__ import annotations

import json
from pathlib import Path

from edge_runtime.atomic_io import write_json_atomic
from edge_runtime.errors import ConfigError

FILE = "edge_runtime.json"


def write_metadata(folder: Path, model: str, task: str, labels: list[str] | tuple[str, ...], **extra) -> Path:
    return write_json_atomic(Path(folder) / FILE, {"model": model, "task": task, "labels": list(labels), **extra})


def read_metadata(folder: Path) -> dict:
    path = Path(folder) / FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path} is missing: not an edge-runtime adapter or export folder (for a peft "
                          f"folder from elsewhere, `edge-runtime export` takes --model, --task and --labels)") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable: {exc}") from exc
    if not isinstance(meta, dict) or "model" not in meta or "task" not in meta:
        raise ConfigError(f"{path}: needs 'model' and 'task'")
    return meta
