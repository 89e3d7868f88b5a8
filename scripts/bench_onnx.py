"""Benchmark ONNX inference: onnxruntime vs PyTorch latency, file sizes, adapter switch time.

For MiniLM-L6 and SmolLM2-135M (sequence-classification heads, 26 WordNet labels, LoRA r 8):
batch 1 latency at sequence 64 and 128 for PyTorch (merged model), onnxruntime on the merged
export, and onnxruntime on the adapter export (base graph + active .onnx_adapter); the merged
model's size vs the .onnx_adapter file's; and the time to switch adapters (load + activate).

    python scripts/bench_onnx.py                  # ~5 min on 2 cores
    python scripts/bench_onnx.py --models minilm-l6 --runs 10

Writes scripts/results/onnx.json.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge_runtime.atomic_io import write_json_atomic  # noqa: E402
from edge_runtime.export.metadata import write_metadata  # noqa: E402
from edge_runtime.export.onnx import OnnxPredictor, export_adapter, export_merged, load_merged  # noqa: E402
from edge_runtime.training.data import load_builtin  # noqa: E402
from edge_runtime.training.spec import TrainingSpec, build_model  # noqa: E402


def _median_ms(fn, runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_model(name: str, tmp: Path, runs: int, seqs: list[int]) -> dict:
    labels = load_builtin("wordnet").label_names
    spec = TrainingSpec(model=name, labels=labels)
    model, tok = build_model(spec)
    with torch.no_grad():  # a non-zero B so the adapter changes the output (as a trained one does)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    adapter = tmp / name / "adapter"
    model.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    write_metadata(adapter, name, "classification", labels)
    t0 = time.perf_counter()
    merged = export_merged(adapter, tmp / name / "merged")
    t_merged = time.perf_counter() - t0
    t0 = time.perf_counter()
    ad = export_adapter(adapter, tmp / name / "adapter-export")
    t_adapter = time.perf_counter() - t0
    pt_model, _ = load_merged(adapter, {"model": name, "task": "classification", "labels": list(labels)})
    ort_merged = OnnxPredictor(merged.path)
    ort_adapter = OnnxPredictor(ad.path, "global")
    out = {"model": name, "export_seconds": {"merged": t_merged, "adapter": t_adapter},
           "max_abs_diff": {"merged": merged.max_abs_diff, "adapter": ad.max_abs_diff},
           "merged_onnx_bytes": merged.onnx_bytes, "adapter_file_bytes": ad.onnx_bytes, "latency_ms": {}}
    rng = np.random.default_rng(0)
    for seq in seqs:
        ids = rng.integers(100, min(len(tok), 20000), size=(1, seq)).astype(np.int64)
        mask = np.ones_like(ids)
        tids, tmask = torch.from_numpy(ids), torch.from_numpy(mask)
        with torch.inference_mode():
            pt = _median_ms(lambda: pt_model(input_ids=tids, attention_mask=tmask), runs)
        om = _median_ms(lambda: ort_merged._run(ids, mask), runs)
        oa = _median_ms(lambda: ort_adapter._run(ids, mask), runs)
        out["latency_ms"][str(seq)] = {"pytorch": pt, "onnxruntime_merged": om, "onnxruntime_adapter": oa}
        print(f"{name} batch 1 seq {seq}: pytorch {pt:.1f} ms, onnxruntime merged {om:.1f} ms "
              f"({pt / om:.2f}x), adapter graph {oa:.1f} ms", flush=True)
    out["adapter_switch_ms"] = _median_ms(lambda: ort_adapter.use_adapter("global"), runs, warmup=1)
    print(f"{name}: merged ONNX {merged.onnx_bytes / 1e6:.1f} MB vs .onnx_adapter {ad.onnx_bytes / 1e6:.2f} MB "
          f"({merged.onnx_bytes / ad.onnx_bytes:.0f}x smaller); adapter switch {out['adapter_switch_ms']:.1f} ms; "
          f"export {t_merged:.0f} s merged, {t_adapter:.0f} s adapter", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["minilm-l6", "smollm2-135m"])
    ap.add_argument("--seqs", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", type=Path, default=REPO / "scripts" / "results" / "onnx.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    result = {"threads": torch.get_num_threads(), "runs": args.runs, "models": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            result["models"].append(bench_model(name, Path(tmp), args.runs, args.seqs))
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
