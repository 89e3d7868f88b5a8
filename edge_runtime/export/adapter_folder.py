"""An adapter folder the Hugging Face ecosystem loads as it is: portable base id, labels, model card.

Every adapter this runtime writes (the server's global adapter, the simulation's, a device's own)
goes through :func:`finish_adapter_folder`:

- ``adapter_config.json``'s ``base_model_name_or_path`` is the model's public id
  (``sentence-transformers/all-MiniLM-L6-v2``) or the reference the user gave, never a path into
  this machine's site-packages;
- ``edge_runtime.json`` carries the base, task, labels and ``id2label`` / ``label2id`` /
  ``num_labels`` (peft's ``AutoPeftModelForSequenceClassification`` takes these as keyword
  arguments: it does not read a label map from an adapter folder);
- ``README.md`` is a filled model card (base, task, labels, method, rounds, devices, accuracy);
- files are 0644 and the folder 0755 (temporary files are created 0600).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from edge_runtime.atomic_io import write_bytes_atomic, write_json_atomic
from edge_runtime.export.metadata import write_metadata

# short model names -> their public Hugging Face ids (the packaged copies are these models)
PUBLIC_IDS = {
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
ADAPTER_CONFIG = "adapter_config.json"


def portable_base(model: str) -> str:
    """What ``base_model_name_or_path`` says for ``model`` (a short name, a folder or a .gguf file)."""
    return PUBLIC_IDS.get(model, model)


def label_maps(labels: Sequence[str]) -> dict:
    labels = list(labels)
    return {"num_labels": len(labels), "id2label": {str(i): n for i, n in enumerate(labels)},
            "label2id": {n: i for i, n in enumerate(labels)}}


def hf_load_kwargs(folder: Path) -> dict:
    """The keyword arguments ``AutoPeftModelForSequenceClassification.from_pretrained(folder, **kw)`` needs."""
    meta = json.loads((Path(folder) / "edge_runtime.json").read_text(encoding="utf-8"))
    if meta.get("task") != "classification":
        return {}
    return {"num_labels": meta["num_labels"], "id2label": {int(k): v for k, v in meta["id2label"].items()},
            "label2id": meta["label2id"]}


def _model_card(model: str, task: str, labels: Sequence[str], method: str, card: dict) -> str:
    base = portable_base(model)
    pipeline = "text-classification" if task == "classification" else "text-generation"
    acc = card.get("accuracy")
    rows = [("base model", f"`{base}`" + (f" (edge-runtime name `{model}`)" if base != model else "")),
            ("task", task + (f", {len(labels)} labels" if labels else "")), ("PEFT method", method),
            ("federated rounds", card.get("rounds", "-")), ("devices", card.get("devices", "-")),
            ("final accuracy", f"{100 * acc:.1f}% ({card.get('accuracy_on', 'devices’ test splits')})"
             if isinstance(acc, (int, float)) else "-"),
            ("run", card.get("run_id", "-"))]
    load = ("import json\nfrom peft import AutoPeftModelForSequenceClassification\n\n"
            "meta = json.load(open(f\"{folder}/edge_runtime.json\"))\n"
            "model = AutoPeftModelForSequenceClassification.from_pretrained(\n"
            "    folder, num_labels=meta[\"num_labels\"], label2id=meta[\"label2id\"],\n"
            "    id2label={int(i): name for i, name in meta[\"id2label\"].items()})"
            if task == "classification" else
            "from peft import AutoPeftModelForCausalLM\n\nmodel = AutoPeftModelForCausalLM.from_pretrained(folder)")
    shown = ", ".join(f"`{x}`" for x in list(labels)[:40]) + (" ..." if len(labels) > 40 else "")
    return "\n".join([
        "---", f"base_model: {base}", "library_name: peft", f"pipeline_tag: {pipeline}",
        "tags:", "- edge-runtime", "- federated-learning", f"- {method}", "---", "",
        f"# {method} adapter for {base}, trained by federated fine-tuning with edge-runtime", "",
        "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
        *([f"Labels (id order): {shown}", ""] if labels else []),
        "The training data never left the devices; this adapter is the aggregate of their updates.", "",
        "Load it (the base model from the Hub, or from a local copy named by `base_model_name_or_path`):", "",
        "```python", load.replace("\n\n", "\n\nfolder = \"path/to/this/folder\"\n", 1), "```", "",
        "ONNX for on-device inference: `edge-runtime export FOLDER --out FOLDER-onnx`.", ""])


def finish_adapter_folder(folder: Path, *, model: str, task: str, labels: Sequence[str], method: str,
                          tokenizer=None, card: dict | None = None, **meta) -> Path:
    """Complete an adapter folder written by a method's ``save_adapter`` (see the module doc)."""
    folder = Path(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    cfg_path = folder / ADAPTER_CONFIG
    if cfg_path.exists():   # peft LoRA folders (deep prompts write their own prompt_config.json)
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["base_model_name_or_path"] = portable_base(model)
        write_json_atomic(cfg_path, cfg)
    labels = list(labels) if task == "classification" else []
    write_metadata(folder, model, task, labels, method=method, **(label_maps(labels) if labels else {}), **meta)
    write_bytes_atomic(folder / "README.md", _model_card(model, task, labels, method, card or {}).encode("utf-8"))
    os.chmod(folder, 0o755)
    for path in folder.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    return folder
