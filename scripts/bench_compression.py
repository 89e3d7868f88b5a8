"""Bytes per round against accuracy for every update codec: MiniLM-L6 on WordNet supersenses, 8
devices, the same split, seeds and local settings for every arm (only ``compression`` and the
trainable set differ), both ways compressed (the uplink's codec is the downlink's too).

Arms (``--arms`` picks some):

- ``none``: fp32 state up, the whole global down (the reference);
- ``fp16``, ``int8``, ``int4``, ``nf4``: dense deltas, blockwise quantized (64 values a scale);
- ``int4+top25``, ``int4+top25/no-ef``: int4 of each tensor's largest 25% entries, with and
  without error feedback (what the feedback buys);
- ``nf2/b128``, ``nf2/b128/no-ef``: dense 2-bit codes at a normal distribution's Lloyd-Max levels,
  128 values a scale, with and without error feedback;
- ``int4/r8``, ``int4/r32``: int4 codes, and each matrix whose rank-r factors take at most a
  quarter of its entries (MiniLM's 384 x 384 pooler; not the LoRA factors or the head) sent as
  its rank-8 / rank-32 factors, with error feedback (``compression.rank``);
- ``none/no-pooler``, ``int4/no-pooler``: the structural lever: BERT's pooler (147,840 of MiniLM's
  231,578 trainable parameters) frozen instead of trained and shared (``lora.train_pooler=false``);
- ``none/pooler-lora``, ``int8/pooler-lora``, ``int4/pooler-lora``: the pooler trained through a
  rank-8 LoRA on its dense layer (``lora.train_pooler=lora``: 6,144 parameters instead of 147,840).
- ``none/pooler-identity``: the pooler set to the identity and frozen (``lora.train_pooler=identity``:
  the head reads tanh of the [CLS] vector at its own scale; nothing of the pooler on the wire).

Per arm and round: global test accuracy, bytes up and down a device (on the wire), the ratio to
the uncompressed fp32 state (the reference arm's bytes); rounds and cumulative MB to the target
accuracy (``--target``, default 95% of the reference arm's final accuracy at that alpha).

Writes scripts/results/compression.json (after every arm) and compression.png (accuracy after each
round against the cumulative MB a device has sent and received, one panel per alpha; the first
download of the initial global, the same for every arm, is left out).

    python scripts/bench_compression.py                         # both alphas, ~80 min on 2 CPU cores
    python scripts/bench_compression.py --alphas 0.5            # one alpha; results merge into the JSON
    python scripts/bench_compression.py --arms none int4/no-pooler
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

import torch

from edge_runtime.algorithms.compression import CompressionConfig
from edge_runtime.atomic_io import write_json_atomic
from edge_runtime.methods.lora import LoraMethodConfig
from edge_runtime.simulation import SimulationConfig, run_simulation
from edge_runtime.training.trainer import TrainConfig

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = {   # name -> (compression both ways, lora.train_pooler)
    "none": (CompressionConfig(), True),
    "fp16": (CompressionConfig(uplink="fp16", downlink="fp16"), True),
    "int8": (CompressionConfig(uplink="int8", downlink="int8"), True),
    "int4": (CompressionConfig(uplink="int4", downlink="int4"), True),
    "nf4": (CompressionConfig(uplink="nf4", downlink="nf4"), True),
    "int4+top25": (CompressionConfig(uplink="int4", downlink="int4", topk=0.25), True),
    "int4+top25/no-ef": (CompressionConfig(uplink="int4", downlink="int4", topk=0.25, error_feedback=False), True),
    "nf2/b128": (CompressionConfig(uplink="nf2", downlink="nf2", block=128), True),
    "nf2/b128/no-ef": (CompressionConfig(uplink="nf2", downlink="nf2", block=128, error_feedback=False), True),
    "int4/r8": (CompressionConfig(uplink="int4", downlink="int4", rank=8), True),
    "int4/r32": (CompressionConfig(uplink="int4", downlink="int4", rank=32), True),
    "none/no-pooler": (CompressionConfig(), False),
    "int4/no-pooler": (CompressionConfig(uplink="int4", downlink="int4"), False),
    "none/pooler-lora": (CompressionConfig(), "lora"),
    "int8/pooler-lora": (CompressionConfig(uplink="int8", downlink="int8"), "lora"),
    "int4/pooler-lora": (CompressionConfig(uplink="int4", downlink="int4"), "lora"),
    "none/pooler-identity": (CompressionConfig(), "identity"),
}
KEEP = ("round", "global_accuracy", "mean_device_accuracy", "train_loss", "seconds", "bytes_up", "bytes_up_raw",
        "bytes_down", "bytes_down_raw", "accepted", "participants")


def per_device(rows: list[dict]) -> list[dict]:
    """Each training round's bytes up and down a device (on the wire), cumulated."""
    out, up_total, down_total = [], 0.0, 0.0
    for r in rows:
        if r["round"] == 0:
            out.append({"round": 0, "accuracy": r["global_accuracy"], "up": 0, "down": 0, "cum_mb": 0.0})
            continue
        up = r["bytes_up"] / max(1, len(r["accepted"]))
        down = r["bytes_down"] / max(1, len(r["participants"]))
        up_total, down_total = up_total + up, down_total + down
        out.append({"round": r["round"], "accuracy": r["global_accuracy"], "up": up, "down": down,
                    "cum_mb": (up_total + down_total) / 1e6})
    return out


def to_target(points: list[dict], target: float) -> dict | None:
    hit = next((p for p in points if p["accuracy"] >= target), None)
    return {"round": hit["round"], "cum_mb": hit["cum_mb"]} if hit else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.1])
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--max-examples", type=int, default=3200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", type=float, default=None, help="accuracy to reach (default: 95%% of the reference's final)")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--out", type=Path, default=RESULTS / "compression.json")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON")
    args = ap.parse_args()
    if args.plot_only:
        import json

        plot(args.out.with_suffix(".png"), json.loads(args.out.read_text()))
        return
    logging.basicConfig(level=logging.WARNING)
    train = TrainConfig(epochs=1, batch_size=16, lr=1e-3, max_seq_len=64)
    result = {}
    if args.out.exists():   # other alphas measured before are kept
        import json

        result = json.loads(args.out.read_text())
    result.update(setting={"model": "minilm-l6", "data": "wordnet", "devices": args.devices, "rounds": args.rounds,
                           "max_examples": args.max_examples, "seed": args.seed, "train": train.__dict__},
                  threads=torch.get_num_threads())
    order = ["none"] + [a for a in args.arms if a != "none"]   # the reference first: ratios and the target
    for alpha in args.alphas:
        key = f"alpha={alpha:g}"
        res = result.setdefault("alphas", {}).setdefault(key, {"arms": {}})
        for name in order:
            comp, pooler = ARMS[name]
            t0 = time.perf_counter()
            cfg = SimulationConfig(model="minilm-l6", data="wordnet", devices=args.devices, rounds=args.rounds,
                                   alpha=alpha, max_examples=args.max_examples, seed=args.seed, train=train,
                                   lora=LoraMethodConfig(train_pooler=pooler), compression=comp)
            hist = run_simulation(cfg, None, progress=False,
                                  on_round=lambda r, name=name: print(
                                      f"alpha {alpha:g} {name} round {r['round']}: {100 * r['global_accuracy']:.1f}%",
                                      flush=True))
            rows = [{k: r[k] for k in KEEP if k in r} for r in hist["rounds"]]
            res["arms"][name] = {"compression": dataclasses.asdict(comp), "train_pooler": pooler, "rounds": rows,
                                 "points": per_device(rows), "final_accuracy": rows[-1]["global_accuracy"],
                                 "seconds": time.perf_counter() - t0}
            summarise(res, args.target)
            write_json_atomic(args.out, result)   # after every arm: a long benchmark keeps what it measured
    plot(args.out.with_suffix(".png"), result)
    for key, res in result["alphas"].items():
        print(f"\n{key}: target {100 * res['target']:.1f}%")
        for name, a in res["arms"].items():
            hit = a["to_target"]
            print(f"  {name:<18} final {100 * a['final_accuracy']:5.1f}% ({a['vs_reference_points']:+.1f})  "
                  f"up {a['up_ratio']:5.1f}x  down {a['down_ratio']:5.1f}x  "
                  f"{'target at round %d, %.2f MB' % (hit['round'], hit['cum_mb']) if hit else 'target not reached'}")


def summarise(res: dict, target: float | None) -> None:
    """Ratios against the reference arm's bytes (fp32 state, pooler trained) and the target."""
    ref = res["arms"].get("none")
    if ref is None:
        return
    res["target"] = target if target is not None else 0.95 * ref["final_accuracy"]
    ref_up = sum(p["up"] for p in ref["points"][1:])
    ref_down = sum(p["down"] for p in ref["points"][1:])
    for a in res["arms"].values():
        up = sum(p["up"] for p in a["points"][1:])
        down = sum(p["down"] for p in a["points"][1:])
        a.update(up_ratio=ref_up / up, down_ratio=ref_down / down, bytes_ratio=(ref_up + ref_down) / (up + down),
                 vs_reference_points=100 * (a["final_accuracy"] - ref["final_accuracy"]),
                 to_target=to_target(a["points"], res["target"]))


def plot(path: Path, result: dict) -> None:
    from edge_runtime.deps import require

    matplotlib = require("matplotlib", "plotting")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = result["alphas"]
    fig, axes = plt.subplots(1, len(alphas), figsize=(6.0 * len(alphas), 4.2), dpi=110, squeeze=False)
    colours = {name: plt.get_cmap("tab20")(i % 20) for i, name in enumerate(ARMS)}   # one per arm, in every panel
    for ax, (key, res) in zip(axes[0], alphas.items()):
        for name, a in res["arms"].items():
            pts = [p for p in a["points"] if p["cum_mb"] > 0]   # after each training round
            ax.plot([p["cum_mb"] for p in pts], [100 * p["accuracy"] for p in pts], color=colours.get(name),
                    marker="o", markersize=3, label=f"{name} ({a.get('bytes_ratio', 1):.1f}x)")
        if "target" in res:
            ax.axhline(100 * res["target"], linestyle="--", linewidth=1, color="gray")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())   # decade labels only
        ax.set_xlabel("cumulative MB a device (up + down)")
        ax.set_ylabel("global accuracy (%)")
        ax.set_title(f"MiniLM-L6, WordNet, {result['setting']['devices']} devices, {key}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
