"""What the one-device benchmarks share (``bench_length_grouping``, ``bench_precision``): the
issue's baseline settings, the WordNet fleet whose device 0 trains alone, and the fleet comparison
that follows (the same simulated fleet per variant: global test accuracy after each round and the
devices' training seconds)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from edge_runtime.simulation import SimulationConfig, prepare_devices, run_simulation, simulation_spec
from edge_runtime.training.trainer import TrainConfig

RESULTS = Path(__file__).resolve().parent / "results"
TRAIN = TrainConfig(epochs=1, batch_size=32, lr=2e-3, max_seq_len=64)   # MiniLM-L6, LoRA r=8 on q/v, head, pooler


def arguments(description: str, out: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--examples", type=int, default=3200, help="glosses split over --devices; device 0 trains")
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the fleet comparison (0: skip it)")
    ap.add_argument("--out", type=Path, default=RESULTS / out)
    return ap.parse_args()


def setting(args: argparse.Namespace):
    """(the fleet's config, its devices' data, the spec a server would send)."""
    cfg = SimulationConfig(model="minilm-l6", data="wordnet", devices=args.devices, alpha=0.5,
                           max_examples=args.examples, seed=0, train=TRAIN)
    devices = prepare_devices(cfg)
    return cfg, devices, simulation_spec(cfg, devices)


def fleet(cfg: SimulationConfig, variants: dict[str, TrainConfig], rounds: int) -> dict:
    """Each variant's fleet for ``rounds`` rounds (nothing when ``rounds`` is 0)."""
    out = {}
    for name, train in variants.items() if rounds else ():
        hist = run_simulation(dataclasses.replace(cfg, rounds=rounds, train=train), None, progress=False)
        out[name] = {"accuracy": [r["global_accuracy"] for r in hist["rounds"]],
                     "train_seconds": sum(r["phases"]["mean"].get("train_s", 0.0) * len(r["accepted"])
                                          for r in hist["rounds"] if r.get("phases")),
                     "total_seconds": hist["total_seconds"]}
        print(f"fleet {name}: accuracy {' / '.join(f'{100 * a:.1f}' for a in out[name]['accuracy'])}, "
              f"device training {out[name]['train_seconds']:.0f} s", flush=True)
    return out
