"""A device's own model as a peft adapter folder, from its agent's state folder.

The agent records what its model is made of in ``<state-dir>/model/`` (the last global adapter
it received, the training spec, and the paths of the run's init payload and its personal state).
:func:`write_device_adapter` rebuilds that model and writes it as a plain LoRA folder for the
untouched base (FDLoRA: the fused personal + global adapter at the device's own (a, b); LoRA /
FeDeRA: the global adapter), with tokenizer and ``edge_runtime.json``, ready for
``edge-runtime export``.
"""

from __future__ import annotations

import json
from pathlib import Path

from edge_runtime.atomic_io import replace_dir_atomic
from edge_runtime.errors import ConfigError
from edge_runtime.export.adapter_folder import finish_adapter_folder
from edge_runtime.methods import METHODS
from edge_runtime.methods.personal import load_personal
from edge_runtime.protocol.codec import decode_tensors
from edge_runtime.training.spec import TrainingSpec, build_model


def write_device_adapter(state_dir: Path, out: Path, which: str = "personal") -> Path:
    """``which="personal"``: the device's own model; ``"global"``: the global adapter it received, in
    the same tensor layout as its personal one (FDLoRA: rank 2r), so both share one ONNX base graph."""
    if which not in ("personal", "global"):
        raise ConfigError(f"which must be 'personal' or 'global', got {which!r}")
    record_path = Path(state_dir) / "model" / "device.json"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{record_path} is missing: this agent has not received a global adapter yet") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{record_path}: unreadable: {exc}") from exc
    spec = TrainingSpec.from_json(record["training"])
    method = METHODS[spec.method]
    model, tokenizer = build_model(spec)
    init = decode_tensors(Path(record["init_file"]).read_bytes()) if record.get("init_file") else None
    method.prepare(model, spec, init)
    method.load_trainable_state(model, decode_tensors((record_path.parent / "global.safetensors").read_bytes()))
    personal = load_personal(Path(record["personal_file"])) if record.get("personal_file") else None

    def save(folder: Path) -> None:
        if which == "personal":
            method.save_personal(model, personal, folder)
        else:
            method.save_global_in_personal_layout(model, personal, folder)
        finish_adapter_folder(folder, model=spec.model, task=spec.task, labels=spec.labels, method=spec.method,
                              tokenizer=tokenizer, card={"run_id": record["run_id"]}, seed=spec.seed,
                              personal=which == "personal" and personal is not None, run_id=record["run_id"],
                       global_round=record["global_round"],
                       fusion={k: personal.meta[k] for k in ("a", "b") if k in personal.meta} if personal else None)

    return replace_dir_atomic(Path(out), save)
