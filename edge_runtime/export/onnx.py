"""ONNX export of an adapter merged into its base model, with a parity check, and ONNX inference.

``export_merged``: base model (full precision) + peft adapter -> ``merge_and_unload`` -> the torch
dynamo ONNX exporter (dynamic batch and sequence) -> onnxruntime and PyTorch run the same inputs
and the max absolute difference of the logits is reported; above ``tolerance`` the export fails.
The export folder holds ``model.onnx``, the tokenizer and ``edge_runtime.json``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from edge_runtime.atomic_io import replace_dir_atomic
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.export.metadata import read_metadata, write_metadata
from edge_runtime.training.models import load_model, load_tokenizer, resolve_model_source

log = logging.getLogger("edge_runtime.export")
PARITY_TEXTS = ("a member of the genus Canis that has been domesticated", "a building")


class ExportError(EdgeRuntimeError):
    """The export failed or does not match PyTorch within the tolerance."""


@dataclass(frozen=True)
class ExportResult:
    path: Path                 # the export folder
    max_abs_diff: float        # onnxruntime vs PyTorch logits on the parity inputs
    seconds: float
    onnx_bytes: int            # model.onnx plus its external-data file, if any


class _LogitsOnly(torch.nn.Module):
    """A graph with plain tensor inputs and one output: what ONNX runtimes want."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def load_merged(adapter_dir: Path, meta: dict, tokenizer_corpus: Sequence[str] = ()):
    """The base model in fp32 with the adapter merged in; returns (model, tokenizer)."""
    from peft import PeftModel

    from transformers import AutoTokenizer

    src = resolve_model_source(meta["model"])
    if (Path(adapter_dir) / "tokenizer_config.json").exists():  # saved with the adapter (always, by this runtime)
        tok = AutoTokenizer.from_pretrained(adapter_dir)
    else:
        tok = load_tokenizer(src, tokenizer_corpus)
    base = load_model(src, meta["task"], max(len(meta.get("labels", [])), 2), tok, seed=meta.get("seed", 0))
    model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return model.eval(), tok


def export_merged(adapter_dir: Path, out_dir: Path, tolerance: float = 1e-4) -> ExportResult:
    import onnxruntime as ort

    t0 = time.perf_counter()
    meta = read_metadata(adapter_dir)
    model, tok = load_merged(Path(adapter_dir), meta)
    wrapper = _LogitsOnly(model).eval()
    example = tok(list(PARITY_TEXTS), return_tensors="pt", padding=True)
    args = (example["input_ids"], example["attention_mask"])
    dims = {0: torch.export.Dim("batch", min=1, max=1024), 1: torch.export.Dim("sequence", min=2, max=4096)}

    def write(tmp: Path) -> None:
        try:
            torch.onnx.export(wrapper, args, tmp / "model.onnx", dynamo=True, input_names=["input_ids", "attention_mask"],
                              output_names=["logits"], dynamic_shapes={"input_ids": dims, "attention_mask": dims},
                              verbose=False)
        except Exception as exc:  # the exporter raises many types
            raise ExportError(f"torch.onnx.export failed for {meta['model']}: {exc}") from exc
        tok.save_pretrained(tmp)
        write_metadata(tmp, meta["model"], meta["task"], meta.get("labels", []), format="merged",
                       source_adapter=str(adapter_dir))

    with torch.inference_mode():
        path = replace_dir_atomic(out_dir, write)
        sess = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
        worst = 0.0
        for texts in (PARITY_TEXTS, PARITY_TEXTS[:1]):   # padded batch and batch of one
            enc = tok(list(texts), return_tensors="np", padding=True)
            got = sess.run(None, {"input_ids": enc["input_ids"].astype(np.int64),
                                  "attention_mask": enc["attention_mask"].astype(np.int64)})[0]
            ref = wrapper(torch.from_numpy(enc["input_ids"]).long(), torch.from_numpy(enc["attention_mask"]).long())
            worst = max(worst, float(np.abs(got - ref.numpy()).max()))
    if not worst <= tolerance:
        raise ExportError(f"ONNX and PyTorch disagree: max |diff| {worst:.3g} > tolerance {tolerance:g} ({path})")
    meta_out = read_metadata(path)
    write_metadata(path, **{**meta_out, "max_abs_diff": worst})
    size = sum(f.stat().st_size for f in path.glob("model.onnx*"))  # the graph + its external weights file
    return ExportResult(path, worst, time.perf_counter() - t0, size)


class OnnxPredictor:
    """Runs an export folder with onnxruntime: class probabilities, or greedy generation."""

    def __init__(self, export_dir: Path) -> None:
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.meta = read_metadata(export_dir)
        self.tok = AutoTokenizer.from_pretrained(export_dir)
        self.sess = ort.InferenceSession(str(Path(export_dir) / "model.onnx"), providers=["CPUExecutionProvider"])

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        enc = self.tok(list(texts), return_tensors="np", padding=True)
        return self.sess.run(None, {"input_ids": enc["input_ids"].astype(np.int64),
                                    "attention_mask": enc["attention_mask"].astype(np.int64)})[0]

    def classify(self, texts: Sequence[str]) -> list[tuple[str, float]]:
        z = self.logits(texts).astype(np.float64)
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        labels = self.meta.get("labels") or [str(i) for i in range(z.shape[-1])]
        return [(labels[i], float(p[j, i])) for j, i in enumerate(p.argmax(-1))]

    def generate(self, prompt: str, max_new_tokens: int = 32) -> str:
        """Greedy decoding by full forward passes (the export has no KV cache)."""
        ids = self.tok(prompt)["input_ids"]
        start = len(ids)
        for _ in range(max_new_tokens):
            arr = np.array([ids], dtype=np.int64)
            nxt = int(self.sess.run(None, {"input_ids": arr, "attention_mask": np.ones_like(arr)})[0][0, -1].argmax())
            if nxt == self.tok.eos_token_id:
                break
            ids.append(nxt)
        return self.tok.decode(ids[start:], skip_special_tokens=True)
