"""The frozen-activation cache (``train.cache_frozen``) with LoRA on the top blocks
(``lora.top_blocks``): a round's training seconds and peak training memory on one device, and what
it does to a fleet's accuracy.

MiniLM-L6 (6 blocks; LoRA r=8 on q/v, head and pooler) on WordNet supersense glosses, the issue's
baseline settings (batch 32, lr 2e-3, max length 64, 1 epoch). Arms:

- ``baseline``: LoRA on every block, no cache (issue 20's baseline);
- ``top2``: LoRA on the top 2 blocks, no cache (what the placement alone buys: a shorter backward);
- ``top2+cache`` / ``top3+cache``: the same with the bottom blocks' output cached;
- ``top2+cache+grouped``: and length-grouped batches (``train.group_by_length``).

One device: each arm in a fresh subprocess (``--repeats`` times, arms alternating) trains two
rounds on device 0's data with the real loop (``train_local``): round 1 builds the cache, round 2
reuses it, as an agent's next round does. RSS is sampled every 2 ms; the training increment is
the peak above the loaded model and data (the cache included). Then the same simulated fleet
(``--devices``, alpha 0.5, ``--rounds``) per arm: global test accuracy after each round and the
devices' training seconds. Writes scripts/results/frozen_cache.json.

    python scripts/bench_frozen_cache.py            # ~25 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = {   # name: (lora.top_blocks, train.cache_frozen, train.group_by_length)
    "baseline": (0, False, False),
    "top2": (2, False, False),
    "top2+cache": (2, True, False),
    "top3+cache": (3, True, False),
    "top2+cache+grouped": (2, True, True),
}
FLEET_ARMS = ("baseline", "top2+cache", "top3+cache", "top2+cache+grouped")


def _config(args, arm: str):
    from edge_runtime.methods.lora import LoraMethodConfig
    from edge_runtime.simulation import SimulationConfig
    from edge_runtime.training.trainer import TrainConfig

    top, cache, grouped = ARMS[arm]
    train = TrainConfig(epochs=1, batch_size=32, lr=2e-3, max_seq_len=64, cache_frozen=cache, group_by_length=grouped)
    return SimulationConfig(model="minilm-l6", data="wordnet", devices=args.devices, alpha=0.5,
                            max_examples=args.examples, seed=0, train=train, lora=LoraMethodConfig(top_blocks=top))


def worker(args, arm: str) -> dict:
    """One arm on device 0: two rounds of training, RSS sampled."""
    import torch

    from edge_runtime.device.profiler import PeakRss
    from edge_runtime.simulation import prepare_devices, simulation_spec
    from edge_runtime.training.spec import build_model
    from edge_runtime.training.trainer import train_local

    cfg = _config(args, arm)
    devices = prepare_devices(cfg)
    spec = simulation_spec(cfg, devices)
    data = devices[0].train
    model, tok = build_model(spec)
    rounds = []
    with PeakRss(interval_s=0.002) as rss:
        for r in range(2):
            res = train_local(model, tok, data, cfg.train, seed=r)
            rounds.append({"seconds": res.seconds, "loss": res.mean_loss, "flops": res.flops,
                           "padded_tokens": res.padded_tokens, **res.metrics})
    return {"arm": arm, "examples": len(data), "rss_model": rss.start, "peak": rss.peak,
            "increment": rss.increment, "rounds": rounds, "threads": torch.get_num_threads(),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def measure(args, arm: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", arm, "--examples", str(args.examples), "--devices", str(args.devices)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode or not lines:
        raise RuntimeError(f"{arm}: worker failed ({res.returncode}): {res.stderr[-2000:]}")
    return json.loads(lines[-1])


def fleet(args, arm: str) -> dict:
    from edge_runtime.simulation import run_simulation

    hist = run_simulation(dataclasses.replace(_config(args, arm), rounds=args.rounds), None, progress=False)
    return {"accuracy": [r["global_accuracy"] for r in hist["rounds"]],
            "train_seconds": sum(r["phases"]["mean"].get("train_s", 0.0) * len(r["accepted"])
                                 for r in hist["rounds"] if r.get("phases")),
            "total_seconds": hist["total_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=3200, help="glosses split over --devices; device 0 trains")
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the fleet comparison (0: skip it)")
    ap.add_argument("--out", type=Path, default=RESULTS / "frozen_cache.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.worker:
        print(json.dumps(worker(args, args.worker)), flush=True)
        return
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for rep in range(args.repeats):
        for arm in ARMS:
            m = measure(args, arm)
            runs[arm].append(m)
            r1, r2 = m["rounds"]
            print(f"{arm:>20}: round 1 {r1['seconds']:6.2f} s (cache {r1.get('cache_build_s', 0):.2f} s), "
                  f"round 2 {r2['seconds']:6.2f} s, training increment {m['increment'] / 2**20:6.0f} MiB, "
                  f"peak {m['peak'] / 2**20:.0f} MiB", flush=True)
    summary = {}
    for arm, ms in runs.items():
        summary[arm] = {"round1_seconds": statistics.median(m["rounds"][0]["seconds"] for m in ms),
                        "round2_seconds": statistics.median(m["rounds"][1]["seconds"] for m in ms),
                        "cache_build_seconds": statistics.median(m["rounds"][0].get("cache_build_s", 0.0) for m in ms),
                        "cache_mb": ms[0]["rounds"][0].get("cache_mb", 0.0),
                        "increment_mib": statistics.median(m["increment"] for m in ms) / 2**20,
                        "peak_mib": statistics.median(m["peak"] for m in ms) / 2**20,
                        "gflop_per_round": ms[0]["rounds"][1]["flops"] / 1e9, "trainable": ms[0]["trainable"]}
    base = summary["baseline"]
    for arm, s in summary.items():
        s["speedup_round2"] = base["round2_seconds"] / s["round2_seconds"]
        s["speedup_round1"] = base["round1_seconds"] / s["round1_seconds"]
        s["increment_vs_baseline"] = s["increment_mib"] / base["increment_mib"]
    result = {"setting": {"model": "minilm-l6", "data": "wordnet", "examples_on_device": runs["baseline"][0]["examples"],
                          "train": dataclasses.asdict(_config(args, "baseline").train),
                          "threads": runs["baseline"][0]["threads"], "repeats": args.repeats},
              "arms": {a: {"lora.top_blocks": t, "train.cache_frozen": c, "train.group_by_length": g}
                       for a, (t, c, g) in ARMS.items()},
              "runs": runs, "summary": summary, "fleet": {}}
    for arm in FLEET_ARMS if args.rounds else ():
        result["fleet"][arm] = fleet(args, arm)
        f = result["fleet"][arm]
        print(f"fleet {arm}: accuracy {' / '.join(f'{100 * a:.1f}' for a in f['accuracy'])}, "
              f"device training {f['train_seconds']:.0f} s", flush=True)
    RESULTS.mkdir(exist_ok=True)
    from edge_runtime.atomic_io import write_json_atomic

    write_json_atomic(args.out, result)
    for arm, s in summary.items():
        print(f"{arm:>20}: round 2 {s['round2_seconds']:.2f} s ({s['speedup_round2']:.2f}x), round 1 "
              f"{s['round1_seconds']:.2f} s ({s['speedup_round1']:.2f}x), increment {s['increment_mib']:.0f} MiB "
              f"({s['increment_vs_baseline']:.0%}), cache {s['cache_mb']:.1f} MB")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
