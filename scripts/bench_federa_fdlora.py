"""FeDeRA vs LoRA and FDLoRA vs FedAvg on WordNet supersenses with MiniLM-L6, 8 simulated devices.

One process, one data split per alpha, the same seeds for every method:

- alpha in --alphas (default 0.1 and 0.5): LoRA FedAvg and FeDeRA (SVD init, residual form), global
  test accuracy per round; rounds and training seconds to --target;
- alpha = --fdlora-alpha (0.1): FDLoRA, each device's fused personal model on its own test split,
  against the LoRA FedAvg global model on the same split (the LoRA run's ``mean_device_accuracy``).

Writes scripts/results/federa_fdlora.json (+ .png) and prints a summary. ``seconds`` are the
sum of every device's local training time in a round (devices run one after another here), so
they compare methods' compute, not a fleet's wall clock.

    python scripts/bench_federa_fdlora.py            # ~55 min on 2 CPU cores
    python scripts/bench_federa_fdlora.py --runs fdlora@0.1   # redo one run, keep the others in the JSON
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from edge_runtime.atomic_io import write_json_atomic
from edge_runtime.methods.lora import LoraMethodConfig
from edge_runtime.report import plot_accuracy
from edge_runtime.simulation import SimulationConfig, run_simulation
from edge_runtime.training.trainer import TrainConfig

RESULTS = Path(__file__).resolve().parent / "results"
KEEP = ("round", "global_accuracy", "mean_device_accuracy", "device_accuracy", "loss", "train_loss", "seconds",
        "bytes_up", "mean_personal_accuracy", "device_personal_accuracy", "fusion", "personalise_seconds")


def to_target(rounds: list[dict], key: str, target: float) -> dict:
    """First round whose ``key`` reaches ``target``, and the training seconds spent until then."""
    spent = 0.0
    for r in rounds:
        spent += r.get("seconds") or 0.0
        if r.get(key) is not None and r[key] >= target:
            return {"round": r["round"], "train_seconds": spent}
    return {"round": None, "train_seconds": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-examples", type=int, default=4000)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5])
    ap.add_argument("--fdlora-alpha", type=float, default=0.1)
    ap.add_argument("--target", type=float, default=0.6, help="accuracy for rounds-to-target")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "federa_fdlora.json")
    ap.add_argument("--runs", nargs="+", default=None, metavar="METHOD@ALPHA",
                    help="only these runs (e.g. fdlora@0.1); the others are kept from --out (same setting)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    train = TrainConfig(epochs=1, batch_size=16, lr=1e-3, max_seq_len=64)
    base = dict(model="minilm-l6", data="wordnet", devices=args.devices, rounds=args.rounds,
                max_examples=args.max_examples, seed=args.seed, train=train, lora=LoraMethodConfig())
    result = {"setting": {**{k: v for k, v in base.items() if k not in ("train", "lora")}, "train": train.__dict__,
                          "lora": LoraMethodConfig().__dict__, "target": args.target},
              "threads": torch.get_num_threads(), "runs": {}}
    t_all = time.perf_counter()
    plan = [(a, m) for a in args.alphas for m in ("lora", "federa")]
    plan.append((args.fdlora_alpha, "fdlora"))
    if args.fdlora_alpha not in args.alphas:
        plan.append((args.fdlora_alpha, "lora"))
    if args.runs:
        import json

        previous = json.loads(args.out.read_text())
        if previous["setting"] != result["setting"]:
            raise SystemExit(f"{args.out} was measured with another setting; run all of it again")
        result["runs"] = previous["runs"]
        result["rerun"] = {name: time.strftime("%Y-%m-%d %H:%M") for name in args.runs}
        plan = [(a, m) for a, m in plan if f"{m}@{a}" in args.runs]
    for alpha, method in plan:
        name = f"{method}@{alpha}"

        def show(r: dict, name=name) -> None:
            personal = (f"  personalised {100 * r['mean_personal_accuracy']:.1f}%"
                        if "mean_personal_accuracy" in r else "")
            print(f"{name} round {r['round']}: global {100 * r['global_accuracy']:.1f}%  "
                  f"device mean {100 * r['mean_device_accuracy']:.1f}%{personal}  {r['seconds']:.0f} s", flush=True)

        hist = run_simulation(SimulationConfig(**base, alpha=alpha, method=method), None, progress=False,
                              on_round=show)
        rounds = [{k: r[k] for k in KEEP if k in r} for r in hist["rounds"]]
        run = {"method": method, "alpha": alpha, "rounds": rounds, "update_bytes": hist["update_bytes"],
               "trainable_params": hist["trainable_params"], "total_seconds": hist["total_seconds"],
               "to_target_global": to_target(rounds, "global_accuracy", args.target)}
        if method == "fdlora":
            run["to_target_personal"] = to_target(rounds, "mean_personal_accuracy", args.target)
        result["runs"][name] = run
        result["total_seconds"] = time.perf_counter() - t_all
        write_json_atomic(args.out, result)  # after every run: a long benchmark keeps what it measured

    runs = result["runs"]
    fig_dir = args.out.parent
    for alpha in args.alphas:
        plot_accuracy(fig_dir / f"federa_vs_lora_alpha{alpha}.png",
                      {f"{m} global": [(r["round"], r["global_accuracy"]) for r in runs[f"{m}@{alpha}"]["rounds"]]
                       for m in ("lora", "federa")},
                      title=f"FeDeRA vs LoRA, MiniLM-L6, WordNet, {args.devices} devices, alpha={alpha}",
                      hlines={f"target {100 * args.target:.0f}%": args.target})
    a = args.fdlora_alpha
    plot_accuracy(fig_dir / "fdlora_personal.png",
                  {"FDLoRA personalised (own test split)":
                       [(r["round"], r["mean_personal_accuracy"]) for r in runs[f"fdlora@{a}"]["rounds"]],
                   "FedAvg LoRA global (own test split)":
                       [(r["round"], r["mean_device_accuracy"]) for r in runs[f"lora@{a}"]["rounds"]],
                   "FDLoRA global adapter alone (own test split)":
                       [(r["round"], r["mean_device_accuracy"]) for r in runs[f"fdlora@{a}"]["rounds"]]},
                  title=f"FDLoRA vs FedAvg, MiniLM-L6, WordNet, {args.devices} devices, alpha={a}",
                  hlines={f"target {100 * args.target:.0f}%": args.target})
    print()
    for name, run in runs.items():
        last = run["rounds"][-1]
        extra = (f", personalised {100 * last['mean_personal_accuracy']:.1f}% "
                 f"(target at round {run['to_target_personal']['round']})" if "to_target_personal" in run else "")
        print(f"{name:12s} final global {100 * last['global_accuracy']:.1f}%, device mean "
              f"{100 * last['mean_device_accuracy']:.1f}%{extra}; global target at round "
              f"{run['to_target_global']['round']} ({run['to_target_global']['train_seconds']} s)")
    print(f"wrote {args.out} in {result['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
