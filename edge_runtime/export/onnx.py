"""ONNX export of adapters, with a parity check against PyTorch, and ONNX inference.

``export_merged``: base model (full precision) + peft adapter -> ``merge_and_unload`` -> the torch
dynamo ONNX exporter (dynamic batch and sequence) -> ``model.onnx``.

``export_adapter``: the base model with the adapter *unmerged*, exported once as ``base.onnx`` in
which every adapter tensor (LoRA A / B, the shared head) is an overridable initializer (a graph
input with a default); each adapter becomes an onnxruntime ``.onnx_adapter`` file, and a session
switches between them per run with ``RunOptions.add_active_adapter``: no re-export.

Both run onnxruntime and PyTorch on the same inputs and fail if the logits differ by more than
``tolerance``. An export folder holds the graph, the tokenizer and ``edge_runtime.json``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from edge_runtime.atomic_io import replace_dir_atomic
from edge_runtime.deps import require
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.export.metadata import read_metadata, write_metadata
from edge_runtime.methods import prompt
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
    model, tok = load_with_adapter(adapter_dir, meta, tokenizer_corpus)
    if not hasattr(model, "merge_and_unload"):  # prompts: nothing to merge, the prefixes are part of the graph
        return model.eval(), tok
    return model.merge_and_unload().eval(), tok


def load_with_adapter(adapter_dir: Path, meta: dict, tokenizer_corpus: Sequence[str] = ()):
    """The fp32 base model with the adapter attached (unmerged, tensors as parameters)."""
    from peft import PeftModel

    from transformers import AutoTokenizer

    src = resolve_model_source(meta["model"])
    if (Path(adapter_dir) / "tokenizer_config.json").exists():  # saved with the adapter (always, by this runtime)
        tok = AutoTokenizer.from_pretrained(adapter_dir)
    else:
        tok = load_tokenizer(src, tokenizer_corpus)
    base = load_model(src, meta["task"], max(len(meta.get("labels", [])), 2), tok, seed=meta.get("seed", 0))
    if (Path(adapter_dir) / prompt.CONFIG_FILE).exists():  # deep prompts (prompt, FedPepTAO): prefixes per layer
        model = prompt.load_prompts(base, Path(adapter_dir))
        for p in model.parameters():  # the prefixes and the head are the adapter's (overridable) tensors
            p.requires_grad_(False)
        for p in [*prompt.prompt_parameters(model).values(), *prompt.head_parameters(model).values()]:
            p.requires_grad_(True)
        return model.eval(), tok
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)  # keeps adapter tensors as parameters
    return model.eval(), tok


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's own progress and notices (graph passes, optional torchvision ops) are not ours to show."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnx_ir", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export(wrapper: torch.nn.Module, tok, path: Path, optimize: bool) -> None:
    for module in ("onnx", "onnxscript"):   # the dynamo exporter's own imports, checked with a clear message
        require(module, "ONNX export")
    example = tok(list(PARITY_TEXTS), return_tensors="pt", padding=True)
    # the sequence range stops at the model's position table (torch < 2.8 refuses a range the model's
    # guards cut short, e.g. 4096 for a model with 256 positions: its guards admit 2..255)
    cfg = getattr(getattr(wrapper, "model", None), "config", None)
    positions = getattr(cfg, "max_position_embeddings", None)
    max_seq = min(4096, positions - 1) if isinstance(positions, int) and positions >= 3 else 4096
    dims = {0: torch.export.Dim("batch", min=1, max=1024), 1: torch.export.Dim("sequence", min=2, max=max_seq)}
    try:
        with _quiet_exporter():
            torch.onnx.export(wrapper, (example["input_ids"], example["attention_mask"]), path, dynamo=True,
                              input_names=["input_ids", "attention_mask"], output_names=["logits"],
                              dynamic_shapes={"input_ids": dims, "attention_mask": dims}, optimize=optimize,
                              verbose=False)
    except Exception as exc:  # the exporter raises many types
        raise ExportError(f"torch.onnx.export failed: {exc}") from exc


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # overridable initializers are intended here, not a warning
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _max_diff(sess, wrapper: torch.nn.Module, tok, run_options=None) -> float:
    worst = 0.0
    with torch.inference_mode():
        for texts in (PARITY_TEXTS, PARITY_TEXTS[:1]):   # padded batch and batch of one
            enc = tok(list(texts), return_tensors="np", padding=True)
            got = sess.run(None, {"input_ids": enc["input_ids"].astype(np.int64),
                                  "attention_mask": enc["attention_mask"].astype(np.int64)}, run_options)[0]
            ref = wrapper(torch.from_numpy(enc["input_ids"]).long(), torch.from_numpy(enc["attention_mask"]).long())
            worst = max(worst, float(np.abs(got - ref.numpy()).max()))
    return worst


def _check(worst: float, tolerance: float, path: Path) -> None:
    if not worst <= tolerance:
        raise ExportError(f"ONNX and PyTorch disagree: max |diff| {worst:.3g} > tolerance {tolerance:g} ({path})")


def _onnx_size(path: Path, stem: str) -> int:
    return sum(f.stat().st_size for f in path.glob(f"{stem}*"))  # the graph + its external weights file


def export_merged(adapter_dir: Path, out_dir: Path, tolerance: float = 1e-4, meta: dict | None = None) -> ExportResult:
    """``meta`` (model, task, labels) stands in for the folder's ``edge_runtime.json`` (a peft folder from elsewhere)."""
    t0 = time.perf_counter()
    meta = meta or read_metadata(adapter_dir)
    model, tok = load_merged(Path(adapter_dir), meta)
    wrapper = _LogitsOnly(model).eval()

    def write(tmp: Path) -> None:
        _export(wrapper, tok, tmp / "model.onnx", optimize=True)
        tok.save_pretrained(tmp)
        write_metadata(tmp, meta["model"], meta["task"], meta.get("labels", []), format="merged",
                       source_adapter=str(adapter_dir))

    path = replace_dir_atomic(out_dir, write)
    worst = _max_diff(_session(path / "model.onnx"), wrapper, tok)
    _check(worst, tolerance, path)
    write_metadata(path, **{**read_metadata(path), "max_abs_diff": worst})
    return ExportResult(path, worst, time.perf_counter() - t0, _onnx_size(path, "model.onnx"))


def _adapter_tensors(wrapper: torch.nn.Module) -> dict[str, np.ndarray]:
    """The adapter's tensors by their ONNX initializer names (the wrapper's parameter names)."""
    return {n: p.detach().float().numpy().copy() for n, p in wrapper.named_parameters() if p.requires_grad}


def write_adapter_file(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """Write ``tensors`` as an onnxruntime ``.onnx_adapter`` file (atomically)."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({n: ort.OrtValue.ortvalue_from_numpy(v) for n, v in tensors.items()})
    tmp = path.with_name(f".{path.name}.tmp")
    fmt.export_adapter(str(tmp))
    os.replace(tmp, path)
    return path


def export_adapter(adapter_dir: Path, out_dir: Path, name: str = "global", tolerance: float = 1e-4,
                   meta: dict | None = None) -> ExportResult:
    """Write ``<name>.onnx_adapter`` into ``out_dir``; export ``base.onnx`` there first unless it exists
    for the same base model and adapter layout (then nothing is re-exported)."""
    from edge_runtime.protocol.messages import check_id

    onnx = require("onnx", "ONNX adapter export")
    ort = require("onnxruntime", "ONNX adapter export")

    check_id("adapter name", name)
    t0 = time.perf_counter()
    meta = meta or read_metadata(adapter_dir)
    model, tok = load_with_adapter(Path(adapter_dir), meta)
    wrapper = _LogitsOnly(model).eval()
    tensors = _adapter_tensors(wrapper)
    out_dir = Path(out_dir)
    existing = None
    if (out_dir / "base.onnx").exists():
        existing = read_metadata(out_dir)
        if existing.get("model") != meta["model"] or sorted(existing.get("adapter_parameters", [])) != sorted(tensors):
            raise ExportError(f"{out_dir} holds a base graph for {existing.get('model')} with another adapter layout; "
                              f"export this adapter into a new folder")
    else:
        def write(tmp: Path) -> None:
            _export(wrapper, tok, tmp / "base.onnx", optimize=False)   # keep A / B as named initializers
            graph = onnx.load(str(tmp / "base.onnx"))
            inits = {i.name: i for i in graph.graph.initializer}
            missing = sorted(set(tensors) - set(inits))
            if missing:
                raise ExportError(f"the exported graph lost adapter tensors {missing[:3]}")
            for n in sorted(tensors):  # an initializer that is also a graph input can be overridden per run
                graph.graph.input.append(onnx.helper.make_tensor_value_info(n, inits[n].data_type, list(inits[n].dims)))
            (tmp / "base.onnx.data").unlink(missing_ok=True)  # loaded into memory above; onnx.save appends
            onnx.save(graph, str(tmp / "base.onnx"), save_as_external_data=True, location="base.onnx.data")
            tok.save_pretrained(tmp)
            write_metadata(tmp, meta["model"], meta["task"], meta.get("labels", []), format="adapter",
                           adapter_parameters=sorted(tensors), adapters=[])
        replace_dir_atomic(out_dir, write)
    path = write_adapter_file(out_dir / f"{name}.onnx_adapter", tensors)
    lora = ort.LoraAdapter()
    lora.Load(str(path))
    ro = ort.RunOptions()
    ro.add_active_adapter(lora)
    worst = _max_diff(_session(out_dir / "base.onnx"), wrapper, tok, ro)
    _check(worst, tolerance, path)
    meta_out = read_metadata(out_dir)
    meta_out["adapters"] = sorted(set(meta_out.get("adapters", [])) | {name})
    meta_out.setdefault("max_abs_diff", {})[name] = worst
    write_metadata(out_dir, **meta_out)
    return ExportResult(out_dir, worst, time.perf_counter() - t0, path.stat().st_size)


class OnnxPredictor:
    """Runs an export folder with onnxruntime: class probabilities, or greedy generation."""

    def __init__(self, export_dir: Path, adapter: str | None = None) -> None:
        from transformers import AutoTokenizer

        self.dir = Path(export_dir)
        if not self.dir.is_dir():
            raise ExportError(f"{self.dir}: no such export folder")
        if not any((self.dir / f).exists() for f in ("model.onnx", "base.onnx")):
            hint = (f" (it is an adapter folder: export it first with edge-runtime export {self.dir} "
                    f"--out {self.dir}-onnx)") if (self.dir / "edge_runtime.json").exists() else ""
            raise ExportError(f"{self.dir} is not an ONNX export: no model.onnx or base.onnx in it{hint}")
        self.meta = read_metadata(export_dir)
        self.tok = AutoTokenizer.from_pretrained(export_dir)
        adapter_format = self.meta.get("format") == "adapter"
        self.sess = _session(self.dir / ("base.onnx" if adapter_format else "model.onnx"))
        self.run_options = None
        if adapter is not None or adapter_format:
            self.use_adapter(adapter or self.meta["adapters"][0])

    def use_adapter(self, name: str) -> None:
        """Make ``<name>.onnx_adapter`` the active adapter for the following runs (no re-export, no reload)."""
        import onnxruntime as ort

        if self.meta.get("format") != "adapter":
            raise ExportError(f"{self.dir} is a merged export; adapters need --format adapter")
        path = self.dir / f"{name}.onnx_adapter"
        if not path.exists():
            raise ExportError(f"no adapter {name!r} in {self.dir} (have {self.meta.get('adapters')})")
        lora = ort.LoraAdapter()
        lora.Load(str(path))
        ro = ort.RunOptions()
        ro.add_active_adapter(lora)
        self._lora, self.run_options = lora, ro

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.sess.run(None, {"input_ids": input_ids.astype(np.int64),
                                    "attention_mask": attention_mask.astype(np.int64)}, self.run_options)[0]

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        enc = self.tok(list(texts), return_tensors="np", padding=True)
        return self._run(enc["input_ids"], enc["attention_mask"])

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
            nxt = int(self._run(arr, np.ones_like(arr))[0, -1].argmax())
            if nxt == self.tok.eos_token_id:
                break
            ids.append(nxt)
        return self.tok.decode(ids[start:], skip_special_tokens=True)
