"""Length-grouped batching (``train.group_by_length``) on one device's real data: the padding a
round computes and its training seconds, grouped against shuffled batches, from the same model and
seed.

MiniLM-L6 (LoRA r=8 on q/v, head and pooler) on WordNet supersense glosses, the issue's baseline
settings (batch 32, max length 64, 1 epoch); the arms alternate, ``--repeats`` times each, so
the machine's noise falls on both. Then what it does to learning: the same simulated fleet
(``--devices``, alpha 0.5, ``--rounds``) with and without grouping, global test accuracy after
each round and the run's seconds. Writes scripts/results/length_grouping.json.

    python scripts/bench_length_grouping.py            # ~8 min on 2 CPU cores
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import sys
from pathlib import Path

import torch

from edge_runtime.atomic_io import write_json_atomic
from edge_runtime.training.spec import build_model
from edge_runtime.training.trainer import train_local

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_bench import TRAIN, arguments, fleet, setting  # noqa: E402  (a sibling module)


def main() -> None:
    args = arguments(__doc__.splitlines()[0], "length_grouping.json")
    logging.basicConfig(level=logging.WARNING)
    train = TRAIN
    cfg, devices, spec = setting(args)
    data = devices[0].train
    model, tok = build_model(spec)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    runs: dict[str, list[dict]] = {"shuffled": [], "grouped": []}
    for rep in range(args.repeats + 1):      # the first pass of each warms up and is not kept
        for name, group in (("shuffled", False), ("grouped", True)):
            model.load_state_dict(start)
            res = train_local(model, tok, data, dataclasses.replace(train, group_by_length=group), seed=0)
            if rep:
                runs[name].append({"seconds": res.seconds, "loss": res.mean_loss, "tokens": res.tokens,
                                   "padded_tokens": res.padded_tokens})
                print(f"{name:>8}: {res.seconds:6.2f} s, padding {1 - res.tokens / res.padded_tokens:5.1%}, "
                      f"loss {res.mean_loss:.4f}", flush=True)
    summary = {name: {"median_seconds": statistics.median(r["seconds"] for r in rs),
                      "padding": 1 - rs[0]["tokens"] / rs[0]["padded_tokens"], "tokens": rs[0]["tokens"],
                      "padded_tokens": rs[0]["padded_tokens"], "loss": rs[0]["loss"]} for name, rs in runs.items()}
    speedup = summary["shuffled"]["median_seconds"] / summary["grouped"]["median_seconds"]
    result = {"setting": {"model": "minilm-l6", "data": "wordnet", "examples_on_device": len(data),
                          "train": dataclasses.asdict(train), "threads": torch.get_num_threads()},
              "runs": runs, "summary": summary, "speedup": speedup}
    result["fleet"] = fleet(cfg, {name: dataclasses.replace(train, group_by_length=group)
                                  for name, group in (("shuffled", False), ("grouped", True))}, args.rounds)
    write_json_atomic(args.out, result)
    print(f"{len(data)} examples: padding {summary['shuffled']['padding']:.1%} -> {summary['grouped']['padding']:.1%}, "
          f"training {summary['shuffled']['median_seconds']:.2f} s -> {summary['grouped']['median_seconds']:.2f} s "
          f"({speedup:.2f}x); wrote {args.out}")


if __name__ == "__main__":
    main()
