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

import dataclasses
import logging
import statistics
import sys
from pathlib import Path

import torch

from edge_runtime.atomic_io import write_json_atomic
from edge_runtime.training.precision import native_bf16
from edge_runtime.training.spec import build_model
from edge_runtime.training.trainer import train_local

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_bench import TRAIN, arguments, fleet, setting  # noqa: E402  (a sibling module)

PATHS = {   # name -> (lora.top_blocks, train overrides)
    "plain": (None, {}),
    "fast": (3, {"group_by_length": True, "cache_frozen": True}),
}


def main() -> None:
    args = arguments(__doc__.splitlines()[0], "precision.json")
    logging.basicConfig(level=logging.WARNING)
    train = TRAIN
    cfg, devices, base_spec = setting(args)
    data = devices[0].train
    runs: dict[str, list[dict]] = {}
    for path, (top, extra) in PATHS.items():
        spec = base_spec
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
    result["fleet"] = fleet(cfg, {prec: dataclasses.replace(train, precision=prec) for prec in ("fp32", "bf16")},
                            args.rounds)
    write_json_atomic(args.out, result)
    print(" ".join(f"{p}: {summary[f'{p}/fp32']['median_seconds']:.2f} s -> {summary[f'{p}/bf16']['median_seconds']:.2f} s "
                   f"({speedup[p]:.2f}x);" for p in PATHS) + f" wrote {args.out}")


if __name__ == "__main__":
    main()
