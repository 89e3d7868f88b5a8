"""bf16 autocast (``train.precision``) on one device's real data: a round's training seconds in fp32
and in bf16, from the same model and seed, on the plain baseline and on the fast path (length-grouped
batches, LoRA on the top 3 blocks, frozen-activation cache); then what it does to learning.

MiniLM-L6 (LoRA r=8 on q/v, head and pooler) on WordNet supersense glosses, batch 32, lr 2e-3,
max length 64, 1 epoch. The arms alternate, ``--repeats`` times each after one warm-up pass, so the
machine's noise falls on all of them. Then the same simulated fleet (``--devices``, alpha 0.5,
``--rounds``) in fp32 and in bf16: global test accuracy after each round and the devices' training
seconds. bf16 needs a CPU or GPU that multiplies it natively (``native_bf16`` is recorded; elsewhere
the bf16 arms measure emulation). Writes scripts/results/precision.json.

    python scripts/bench_precision.py            # ~7 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
from pathlib import Path

import torch

from edge_runtime.atomic_io import write_json_atomic
from edge_runtime.simulation import SimulationConfig, prepare_devices, run_simulation, simulation_spec
from edge_runtime.training.precision import native_bf16
from edge_runtime.training.spec import build_model
from edge_runtime.training.trainer import TrainConfig, train_local

RESULTS = Path(__file__).resolve().parent / "results"
PATHS = {   # name -> (lora.top_blocks, train overrides)
    "plain": (None, {}),
    "fast": (3, {"group_by_length": True, "cache_frozen": True}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=3200, help="glosses split over --devices; device 0 trains")
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the fleet comparison (0: skip it)")
    ap.add_argument("--out", type=Path, default=RESULTS / "precision.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    train = TrainConfig(epochs=1, batch_size=32, lr=2e-3, max_seq_len=64)
    cfg = SimulationConfig(model="minilm-l6", data="wordnet", devices=args.devices, alpha=0.5,
                           max_examples=args.examples, seed=0, train=train)
    devices = prepare_devices(cfg)
    data = devices[0].train
    runs: dict[str, list[dict]] = {}
    for path, (top, extra) in PATHS.items():
        spec = simulation_spec(cfg, devices)
        if top:
            spec = dataclasses.replace(spec, lora=dataclasses.replace(spec.lora, top_blocks=top))
        model, tok = build_model(spec)
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for rep in range(args.repeats + 1):      # the first pass of each arm warms up (and builds the cache)
            for prec in ("fp32", "bf16"):
                model.load_state_dict(start)
                res = train_local(model, tok, data, dataclasses.replace(train, precision=prec, **extra), seed=0)
                if rep:
                    runs.setdefault(f"{path}/{prec}", []).append({"seconds": res.seconds, "loss": res.mean_loss})
                    print(f"{path:>5} {prec}: {res.seconds:6.2f} s, loss {res.mean_loss:.4f}", flush=True)
    summary = {name: {"median_seconds": statistics.median(r["seconds"] for r in rs), "loss": rs[0]["loss"]}
               for name, rs in runs.items()}
    speedup = {path: summary[f"{path}/fp32"]["median_seconds"] / summary[f"{path}/bf16"]["median_seconds"]
               for path in PATHS}
    result = {"setting": {"model": "minilm-l6", "data": "wordnet", "examples_on_device": len(data),
                          "train": dataclasses.asdict(train), "threads": torch.get_num_threads(),
                          "native_bf16": native_bf16("cpu"), "repeats": args.repeats},
              "runs": runs, "summary": summary, "speedup": speedup}
    fleet = {}
    for prec in ("fp32", "bf16") if args.rounds else ():
        hist = run_simulation(dataclasses.replace(cfg, rounds=args.rounds, train=dataclasses.replace(train, precision=prec)),
                              None, progress=False)
        fleet[prec] = {"accuracy": [r["global_accuracy"] for r in hist["rounds"]],
                       "train_seconds": sum(r["phases"]["mean"].get("train_s", 0.0) * len(r["accepted"])
                                            for r in hist["rounds"] if r.get("phases")),
                       "total_seconds": hist["total_seconds"]}
        print(f"fleet {prec}: accuracy {' / '.join(f'{100 * a:.1f}' for a in fleet[prec]['accuracy'])}, "
              f"device training {fleet[prec]['train_seconds']:.0f} s", flush=True)
    result["fleet"] = fleet
    write_json_atomic(args.out, result)
    print(" ".join(f"{p}: {summary[f'{p}/fp32']['median_seconds']:.2f} s -> {summary[f'{p}/bf16']['median_seconds']:.2f} s "
                   f"({speedup[p]:.2f}x);" for p in PATHS) + f" wrote {args.out}")


if __name__ == "__main__":
    main()
