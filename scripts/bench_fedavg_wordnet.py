"""Benchmark: centralized LoRA (upper bound) vs federated LoRA FedAvg on WordNet supersenses.

MiniLM-L6 + LoRA, 8 devices, Dirichlet alpha 0.5 and 0.1, same data subset, model init and
seeds for every arm. Centralized = the union of the devices' train splits, one epoch per
"round"; federated = one local epoch per device per round. Accuracy is on the union of the
devices' test splits after every round/epoch.

    python scripts/bench_fedavg_wordnet.py                      # full setting (~20 min, 2 cores)
    python scripts/bench_fedavg_wordnet.py --rounds 1 --max-examples 800   # smoke run

Writes scripts/results/fedavg_wordnet.json and .png.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from edge_runtime.atomic_io import write_json_atomic
from edge_runtime.methods import lora
from edge_runtime.report import plot_accuracy
from edge_runtime.simulation import SimulationConfig, prepare_devices, run_simulation
from edge_runtime.training.data import concat_datasets
from edge_runtime.training.evaluate import evaluate
from edge_runtime.training.spec import TrainingSpec, build_model
from edge_runtime.training.trainer import TrainConfig, train_local

RESULTS = Path(__file__).resolve().parent / "results"


def run_centralized(cfg: SimulationConfig) -> list[dict]:
    devices = prepare_devices(cfg)
    train, test = concat_datasets([d.train for d in devices]), concat_datasets([d.test for d in devices])
    model, tok = build_model(TrainingSpec(model=cfg.model, labels=train.label_names, lora=cfg.lora, seed=cfg.seed))
    res = evaluate(model, tok, test, cfg.eval_batch_size, cfg.train.max_seq_len)
    rows = [{"epoch": 0, "accuracy": res.accuracy, "loss": res.loss, "seconds": 0.0}]
    for epoch in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        train_local(model, tok, train, cfg.train, seed=cfg.seed + epoch, progress=True, desc=f"central epoch {epoch}")
        res = evaluate(model, tok, test, cfg.eval_batch_size, cfg.train.max_seq_len)
        rows.append({"epoch": epoch, "accuracy": res.accuracy, "loss": res.loss, "seconds": time.perf_counter() - t0})
        print(f"centralized epoch {epoch}: accuracy {100 * res.accuracy:.1f}%  loss {res.loss:.3f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-examples", type=int, default=6000)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.1])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "fedavg_wordnet.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    train = TrainConfig(epochs=1, batch_size=16, lr=1e-3, max_seq_len=64)
    base = dict(model="minilm-l6", data="wordnet", devices=args.devices, rounds=args.rounds,
                max_examples=args.max_examples, seed=args.seed, train=train)
    t0 = time.perf_counter()
    result = {"setting": {**base, "train": train.__dict__, "lora": lora.LoraMethodConfig().__dict__},
              "threads": torch.get_num_threads(), "federated": {}}
    # The centralized arm sees the same examples (the devices' train splits pooled).
    result["centralized"] = run_centralized(SimulationConfig(**base, alpha=args.alphas[0]))
    for alpha in args.alphas:
        hist = run_simulation(SimulationConfig(**base, alpha=alpha), None, progress=True,
                              on_round=lambda r, a=alpha: print(
                                  f"alpha {a} round {r['round']}: global {100 * r['global_accuracy']:.1f}%  "
                                  f"device mean {100 * r['mean_device_accuracy']:.1f}%  {r['seconds']:.0f} s",
                                  flush=True))
        result["federated"][str(alpha)] = {
            "rounds": [{k: r[k] for k in ("round", "global_accuracy", "mean_device_accuracy", "loss", "seconds",
                                          "bytes_up")} for r in hist["rounds"]],
            "label_histogram": hist["label_histogram"],
            "update_bytes": hist["update_bytes"],
        }
    result["total_seconds"] = time.perf_counter() - t0
    write_json_atomic(args.out, result)
    curves = {"centralized LoRA (per epoch)": [(r["epoch"], r["accuracy"]) for r in result["centralized"]]}
    for alpha, fed in result["federated"].items():
        curves[f"FedAvg LoRA, alpha={alpha}"] = [(r["round"], r["global_accuracy"]) for r in fed["rounds"]]
    plot_accuracy(args.out.with_suffix(".png"), curves,
                  title=f"MiniLM-L6 + LoRA, WordNet supersenses (26 classes), {args.devices} devices",
                  xlabel="round (federated) / epoch (centralized)")
    print(f"\ncentralized final: {100 * result['centralized'][-1]['accuracy']:.1f}%")
    for alpha, fed in result["federated"].items():
        print(f"federated alpha={alpha} final: {100 * fed['rounds'][-1]['global_accuracy']:.1f}% "
              f"(device mean {100 * fed['rounds'][-1]['mean_device_accuracy']:.1f}%)")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {result['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
