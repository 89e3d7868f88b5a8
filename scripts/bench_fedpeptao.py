"""FedPepTAO vs FedAvg over full deep-prompt tuning, on WordNet supersenses, in one process.

Both runs use the same data split, seeds, prompt length and local settings; they differ only in
the method:

- ``prompt``: every layer's prefixes and the head shared, plain AdamW (fresh each round), FedAvg;
- ``fedpeptao``: a score round, then only the top ``share_ratio`` layers' prefixes shared (the
  others stay on the device), persistent AdamW with control variates, the adaptive server update.

Per round: global test accuracy, mean accuracy of the global model on each device's own test
split, FedPepTAO's mean personalised accuracy (shared + personal prefixes), bytes uploaded.
MiniLM-L6 at the issue's setting (8 devices, alpha 0.5) and SmolLM2-135M in a smaller one.
Writes scripts/results/fedpeptao.json and fedpeptao_<model>.png.

    python scripts/bench_fedpeptao.py                     # ~60 min on 2 CPU cores
    python scripts/bench_fedpeptao.py --models minilm-l6  # MiniLM only
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from edge_runtime.atomic_io import write_json_atomic
from edge_runtime.methods.fedpeptao import FedPepTAOConfig
from edge_runtime.methods.prompt import PromptConfig
from edge_runtime.report import plot_accuracy
from edge_runtime.simulation import SimulationConfig, run_simulation
from edge_runtime.training.trainer import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_federa_fdlora import KEEP, to_target  # noqa: E402  (a sibling script)

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = {  # model -> (devices, rounds, max_examples, max_seq_len, batch_size)
    "minilm-l6": (8, 5, 4000, 64, 16),
    "smollm2-135m": (4, 3, 1000, 32, 8),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(SETTINGS), choices=sorted(SETTINGS))
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=4e-2, help="device learning rate (the authors' 4e-2)")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--share-ratio", type=float, default=0.5)
    ap.add_argument("--target", type=float, default=0.5, help="accuracy for rounds-to-target")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "fedpeptao.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    result = {"alpha": args.alpha, "lr": args.lr, "weight_decay": args.weight_decay, "share_ratio": args.share_ratio,
              "target": args.target, "threads": torch.get_num_threads(), "runs": {}}
    if args.out.exists():  # other models' runs measured before are kept
        result["runs"] = json.loads(args.out.read_text()).get("runs", {})
    t_all = time.perf_counter()
    for model in args.models:
        devices, rounds, max_examples, seq, bs = SETTINGS[model]
        train = TrainConfig(epochs=1, batch_size=bs, lr=args.lr, weight_decay=args.weight_decay, max_seq_len=seq)
        base = dict(model=model, data="wordnet", devices=devices, rounds=rounds, max_examples=max_examples,
                    alpha=args.alpha, seed=args.seed, train=train, prompt=PromptConfig(),
                    fedpeptao=FedPepTAOConfig(share_ratio=args.share_ratio))
        variants = [("prompt", "prompt", {}), ("fedpeptao", "fedpeptao", {})]
        if model == "minilm-l6":  # what the control variates cost in bytes and buy in accuracy
            variants.append(("fedpeptao-nocv", "fedpeptao", {"control_variates": False}))
        for label, method, extra in variants:
            name = f"{label}@{model}"

            def show(r: dict, name=name) -> None:
                personal = (f"  personalised {100 * r['mean_personal_accuracy']:.1f}%"
                            if "mean_personal_accuracy" in r else "")
                print(f"{name} round {r['round']}: global {100 * r['global_accuracy']:.1f}%  device mean "
                      f"{100 * r['mean_device_accuracy']:.1f}%{personal}  up {r['bytes_up'] / 1e3:.0f} kB  "
                      f"{r['seconds']:.0f} s", flush=True)

            t0 = time.perf_counter()
            cfg = SimulationConfig(**{**base, "fedpeptao": FedPepTAOConfig(share_ratio=args.share_ratio, **extra)},
                                   method=method)
            hist = run_simulation(cfg, None, progress=False, on_round=show)
            rounds_kept = [{k: r[k] for k in (*KEEP, "bytes_down") if k in r} for r in hist["rounds"]]
            run = {"method": method, "variant": extra, "model": model,
                   "setting": {"devices": devices, "rounds": rounds, "max_examples": max_examples,
                               "train": train.__dict__},
                   "rounds": rounds_kept, "selection": hist["selection"],
                   "trainable_params": hist["trainable_params"], "seconds": time.perf_counter() - t0,
                   "bytes_up_per_round": rounds_kept[-1]["bytes_up"],
                   "to_target_global": to_target(rounds_kept, "global_accuracy", args.target)}
            if method == "fedpeptao":
                run["to_target_personal"] = to_target(rounds_kept, "mean_personal_accuracy", args.target)
            result["runs"][name] = run
            result["total_seconds"] = time.perf_counter() - t_all
            write_json_atomic(args.out, result)
        runs = result["runs"]
        curves = {"full deep-prompt FedAvg, global": [(r["round"], r["global_accuracy"])
                                                      for r in runs[f"prompt@{model}"]["rounds"]],
                  "FedPepTAO, global": [(r["round"], r["global_accuracy"]) for r in runs[f"fedpeptao@{model}"]["rounds"]]}
        if f"fedpeptao-nocv@{model}" in runs:
            curves["FedPepTAO without control variates, global"] = [
                (r["round"], r["global_accuracy"]) for r in runs[f"fedpeptao-nocv@{model}"]["rounds"]]
        if "mean_personal_accuracy" in runs[f"fedpeptao@{model}"]["rounds"][0]:
            curves["FedPepTAO, personalised (own test split)"] = [
                (r["round"], r["mean_personal_accuracy"]) for r in runs[f"fedpeptao@{model}"]["rounds"]]
        plot_accuracy(args.out.parent / f"fedpeptao_{model}.png", curves,
                      title=f"FedPepTAO vs deep-prompt FedAvg, {model}, WordNet, {devices} devices, alpha={args.alpha}",
                      hlines={f"target {100 * args.target:.0f}%": args.target})
    print()
    for name, run in result["runs"].items():
        last = run["rounds"][-1]
        extra = (f", personalised {100 * last['mean_personal_accuracy']:.1f}%"
                 if "mean_personal_accuracy" in last else "")
        shared = run["selection"]["shared_layers"] if run["selection"] else "all"
        print(f"{name:24s} final global {100 * last['global_accuracy']:.1f}%{extra}; up "
              f"{run['bytes_up_per_round'] / 1e3:.0f} kB/round; shared layers {shared}; target at round "
              f"{run['to_target_global']['round']}")
    print(f"wrote {args.out} in {result['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
