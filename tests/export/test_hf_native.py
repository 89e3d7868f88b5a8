"""Adapters this runtime writes load in the plain Hugging Face stack and give the runtime's logits."""

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_runtime.simulation import SimulationConfig, run_simulation
from edge_runtime.training.models import resolve_model_source
from edge_runtime.training.trainer import TrainConfig

pytestmark = pytest.mark.integration
TEXTS = ["a domesticated carnivorous mammal", "a tool for driving nails", "the act of running quickly"]


def offline_hub_cache(root: Path, repo_id: str, folder: Path) -> Path:
    """A Hugging Face hub cache holding ``folder`` as ``repo_id`` (what a user with the model cached has)."""
    commit = "0" * 40
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in folder.iterdir():
        (snap / f.name).symlink_to(f.resolve())
    return root


def test_global_adapter_loads_with_automodel_and_reproduces_runtime_logits(tmp_path):
    from edge_runtime.export.onnx import load_with_adapter
    from edge_runtime.export.metadata import read_metadata

    cfg = SimulationConfig(model="minilm-l6", data="wordnet", devices=2, rounds=1, max_examples=300,
                           train=TrainConfig(max_steps=4, batch_size=16, max_seq_len=32))
    run_simulation(cfg, tmp_path, progress=False)
    folder = tmp_path / "global_adapter"

    adapter_cfg = json.loads((folder / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "site-packages" not in (folder / "adapter_config.json").read_text()
    meta = json.loads((folder / "edge_runtime.json").read_text())
    assert meta["num_labels"] == 26 and meta["id2label"]["0"] == meta["labels"][0]
    assert meta["label2id"][meta["labels"][5]] == 5
    card = (folder / "README.md").read_text()
    assert "id2label={int(i): name" in card          # the snippet the test runs below
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card
    assert "| PEFT method | lora |" in card and "| federated rounds | 1 |" in card and "noun.animal" in card
    assert "| final accuracy | " in card and "%" in card.split("| final accuracy |")[1].split("\n")[0]
    for path in [folder, *folder.rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path

    # the runtime's own view of the adapter
    model, tok = load_with_adapter(folder, read_metadata(folder))
    with torch.inference_mode():
        ours = model(**tok(TEXTS, return_tensors="pt", padding=True)).logits.numpy()

    # the plain HF stack, offline, the base from a hub cache: only peft + transformers, the card's snippet
    cache = offline_hub_cache(tmp_path / "hub", "sentence-transformers/all-MiniLM-L6-v2",
                              resolve_model_source("minilm-l6").path)
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np, torch
        from peft import AutoPeftModelForSequenceClassification
        from transformers import AutoTokenizer
        folder = {str(folder)!r}
        meta = json.load(open(f"{{folder}}/edge_runtime.json"))
        model = AutoPeftModelForSequenceClassification.from_pretrained(
            folder, num_labels=meta["num_labels"], label2id=meta["label2id"],
            id2label={{int(i): name for i, name in meta["id2label"].items()}}).eval()
        assert model.config.id2label[3] == meta["labels"][3]
        tok = AutoTokenizer.from_pretrained(folder)
        with torch.inference_mode():
            logits = model(**tok({TEXTS!r}, return_tensors="pt", padding=True)).logits
        np.save(sys.argv[1], logits.numpy())
        assert "edge_runtime" not in sys.modules
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), TRANSFORMERS_OFFLINE="1")
    out = tmp_path / "hf_logits.npy"
    proc = subprocess.run([sys.executable, "-c", script, str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = np.load(out)
    assert theirs.shape == (3, 26)
    assert np.abs(theirs - ours).max() < 1e-4
    assert np.abs(ours).max() > 0.05        # a trained head, not zeros on both sides
