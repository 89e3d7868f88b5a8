"""Memory-model calibration and fp32 / int8 / nf4 LoRA step time, measured in one run.

Each grid point (model x quantization x batch x sequence length) trains LoRA for a few steps in a
fresh subprocess and measures the peak memory of the training steps (process RSS sampled every
2 ms on CPU; ``torch.cuda.max_memory_allocated`` plus the process RSS baseline on a GPU) and the
median step time; the memory model predicts the same points. The run fits the model's runtime
and activation coefficients to the measurements (least squares), reports the error of the fitted
model (median and worst, per point), and writes scripts/results/memory.json and memory.png
(predicted vs measured).

    python scripts/bench_memory.py                       # the full grid (~15 min on 2 cores)
    python scripts/bench_memory.py --models minilm-l6 --batches 4 --seqs 32   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def worker(point: dict) -> dict:
    """One grid point, in this (fresh) process: load, train ``steps`` steps, measure."""
    import psutil
    import torch

    from edge_runtime.device.profiler import PeakRss
    from edge_runtime.training.data import encode_batch, resolve_dataset
    from edge_runtime.training.spec import TrainingSpec, build_model

    proc = psutil.Process()
    data = resolve_dataset("wordnet")
    task = point["task"]
    spec = TrainingSpec(model=point["model"], task=task, labels=data.label_names if task == "classification" else (),
                        quantization=point["quantization"])
    rss_before_model = proc.memory_info().rss
    model, tok = build_model(spec)
    cuda = torch.cuda.is_available()
    if cuda:
        model.cuda()
        torch.cuda.reset_peak_memory_stats()
    rss_model = proc.memory_info().rss
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    idx = list(range(point["batch"]))
    batch = encode_batch(tok, data, idx, point["seq"])
    batch = {k: v[:, : point["seq"]] if v.dim() == 2 else v for k, v in batch.items()}
    pad_to = point["seq"] - batch["input_ids"].shape[1]
    if pad_to > 0:  # every example as long as the plan's sequence length: the worst case the model prices
        fill = {"input_ids": tok.pad_token_id or 0, "attention_mask": 1, "labels": -100}
        batch = {k: torch.nn.functional.pad(v, (0, pad_to), value=fill.get(k, 0)) if v.dim() == 2 else v
                 for k, v in batch.items()}
    if task == "causal-lm":   # next-token loss on every real token of the gloss
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    if cuda:
        batch = {k: v.cuda() for k, v in batch.items()}
    times = []
    model.train()
    with PeakRss(interval_s=0.002) as rss:
        for _ in range(point["steps"]):
            t0 = time.perf_counter()
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    out = {"rss_before_model": rss_before_model, "rss_model": rss_model, "peak_train": rss.peak,
           "step_seconds": statistics.median(times[1:] or times)}
    if cuda:
        out["cuda_peak"] = torch.cuda.max_memory_allocated()
        out["peak_train"] = rss_before_model + out["cuda_peak"]
    return out


def run_point(point: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(point)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        return {"error": (res.stderr or res.stdout)[-800:]}
    return json.loads(lines[-1])


def fit(points: list[dict]):
    """Least-squares fit of (runtime, a_d, a_f, a_att) to the measured peaks; the rest of the model fixed."""
    import numpy as np

    from edge_runtime.device.memory_model import Coefficients, load_arch, Plan, predict_peak

    rows, target = [], []
    for p in points:
        arch = load_arch(p["model"])
        plan = Plan(quantization=p["quantization"], batch_size=p["batch"], seq_len=p["seq"])
        zero = Coefficients(runtime=0.0, a_d=0.0, a_f=0.0, a_att=0.0, overhead=1.0)
        fixed = predict_peak(arch, plan, p["task"], 26, zero).total
        bt = p["batch"] * p["seq"] * arch.layers
        rows.append([1.0, bt * arch.hidden, bt * arch.intermediate, p["batch"] * arch.heads * p["seq"] ** 2 * arch.layers])
        target.append(p["measured"] - fixed)
    sol, *_ = np.linalg.lstsq(np.array(rows), np.array(target), rcond=None)
    runtime, a_d, a_f, a_att = (max(0.0, float(x)) for x in sol)
    return replace(Coefficients(), runtime=runtime, a_d=a_d, a_f=a_f, a_att=a_att, overhead=1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="+", default=["minilm-l6", "smollm2-135m"])
    ap.add_argument("--quantizations", nargs="+", default=["fp32", "int8", "nf4"])
    ap.add_argument("--batches", nargs="+", type=int, default=[4, 16])
    ap.add_argument("--seqs", nargs="+", type=int, default=[32, 128])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", type=Path, default=RESULTS / "memory.json")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    from edge_runtime.device.memory_model import Coefficients, Plan, load_arch, predict_peak

    points = []
    for model in args.models:
        task = "classification" if model == "minilm-l6" else "causal-lm"
        for q in args.quantizations:
            for b in args.batches:
                for s in args.seqs:
                    point = {"model": model, "task": task, "quantization": q, "batch": b, "seq": s, "steps": args.steps}
                    m = run_point(point, args.timeout)
                    if "error" in m:
                        print(f"{model} {q} b{b} s{s}: FAILED {m['error']}", flush=True)
                        continue
                    points.append({**point, **m, "measured": m["peak_train"]})
                    print(f"{model:13s} {q:5s} batch {b:3d} seq {s:4d}: peak {m['peak_train'] / 2**20:7.0f} MiB, "
                          f"step {m['step_seconds']:.3f} s", flush=True)
    if not points:
        raise SystemExit("no grid point ran")
    fitted = fit(points)
    for p in points:
        arch = load_arch(p["model"])
        plan = Plan(quantization=p["quantization"], batch_size=p["batch"], seq_len=p["seq"])
        p["predicted_default"] = predict_peak(arch, plan, p["task"], 26, Coefficients()).total
        p["predicted"] = predict_peak(arch, plan, p["task"], 26, fitted).total
        p["error"] = (p["predicted"] - p["measured"]) / p["measured"]
    errors = [abs(p["error"]) for p in points]
    summary = {"median_abs_error": statistics.median(errors), "worst_abs_error": max(errors),
               "fitted": asdict(fitted), "points": points,
               "note": "errors of the fitted model on the points it was fitted to; see the README"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 6))
        for model in args.models:
            xs = [p["measured"] / 2**20 for p in points if p["model"] == model]
            ys = [p["predicted"] / 2**20 for p in points if p["model"] == model]
            ax.scatter(xs, ys, label=model)
        top = max(max(p["measured"], p["predicted"]) for p in points) / 2**20 * 1.05
        ax.plot([0, top], [0, top], "k--", lw=1)
        ax.set_xlabel("measured peak (MiB)")
        ax.set_ylabel("predicted peak (MiB)")
        ax.set_title("memory model vs measured training peak")
        ax.legend()
        fig.savefig(args.out.with_suffix(".png"), dpi=120, bbox_inches="tight")
    except ImportError:
        pass
    print(f"median |error| {100 * summary['median_abs_error']:.1f}%, worst {100 * summary['worst_abs_error']:.1f}% "
          f"over {len(points)} points; wrote {args.out}")


if __name__ == "__main__":
    main()
