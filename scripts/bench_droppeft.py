"""DropPEFT vs LoRA FedAvg on WordNet supersenses: time to a target accuracy and peak training memory.

Both runs use the same devices, data split, seeds, LoRA rank and local settings; they differ only
in the method. DropPEFT's server-side bandit picks every device's layer-dropout configuration
each round (arms: mean drop ratio x shape over depth, the defaults of ``droppeft``); LoRA FedAvg
trains every block every step.

Measured in one run, per model:

- per round: global test accuracy, mean accuracy on the devices' own test splits, the seconds
  of the round (every device's local training run one after another, plus aggregation; for
  DropPEFT also the two validation passes its reward needs), and the bandit's picks and rewards;
- rounds and seconds to the target accuracy; final accuracy at the same number of rounds and
  after DropPEFT's extra rounds (it runs ``--extra-rounds`` more, so it is also compared at
  about LoRA's total seconds);
- peak training memory per device: for LoRA, and for each configuration the bandit settled on
  (the last round's picks), a fresh subprocess trains that configuration for a few steps on the
  run's batch and sequence length and samples its RSS every 2 ms (the same probe as
  ``bench_memory.py``); reported as the whole process peak and as the training increment above
  the loaded model (activations, gradients, optimizer: what layer dropout can reduce), next to
  the memory model's prediction.

Writes scripts/results/droppeft.json and droppeft_<model>.png.

    python scripts/bench_droppeft.py                      # MiniLM and SmolLM2 (~35 min on 2 CPU cores)
    python scripts/bench_droppeft.py --models minilm-l6   # MiniLM only
    python scripts/bench_droppeft.py --arms-only          # every arm's memory and step time (~4 min)
    python scripts/bench_droppeft.py --models minilm-l6 --fixed 0.4 0.6   # fixed ratios, no bandit (~10 min)
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from edge_runtime.atomic_io import write_json_atomic
from edge_runtime.methods.droppeft import DropPEFTConfig
from edge_runtime.report import plot_accuracy
from edge_runtime.simulation import SimulationConfig, run_simulation
from edge_runtime.training.trainer import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_federa_fdlora import KEEP, to_target  # noqa: E402  (a sibling script)

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = {  # model -> (devices, rounds, max_examples, max_seq_len, batch_size, target accuracy)
    "minilm-l6": (8, 5, 4000, 64, 16, 0.6),
    "smollm2-135m": (4, 3, 1000, 32, 8, 0.45),
}


def memory_worker(point: dict) -> dict:
    """In a fresh process: build the model as the method does, train ``steps`` steps on one fixed
    batch running ``kept`` blocks (all for LoRA), sample the RSS."""
    from edge_runtime.algorithms.layer_dropout import drop_probabilities, sample_kept
    from edge_runtime.device.profiler import PeakRss
    from edge_runtime.methods import METHODS
    from edge_runtime.methods.droppeft import find_blocks, run_only
    from edge_runtime.training.data import encode_batch, resolve_dataset
    from edge_runtime.training.spec import TrainingSpec, build_model

    data = resolve_dataset("wordnet")
    spec = TrainingSpec(model=point["model"], labels=data.label_names, method=point["method"],
                        droppeft=DropPEFTConfig(ratio=point["ratio"], shape=point["shape"], bandit=False))
    model, tok = build_model(spec)
    model = METHODS[spec.method].build(model, spec)
    batch = encode_batch(tok, data, list(range(point["batch"])), point["seq"])
    pad = point["seq"] - batch["input_ids"].shape[1]
    if pad > 0:   # every example as long as the plan's sequence length (the worst case)
        fill = {"input_ids": tok.pad_token_id or 0, "attention_mask": 1}
        batch = {k: torch.nn.functional.pad(v, (0, pad), value=fill.get(k, 0)) if v.dim() == 2 else v
                 for k, v in batch.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    n_blocks = len(find_blocks(model)[2])
    probs = drop_probabilities(n_blocks, point["ratio"], point["shape"])
    gen = torch.Generator().manual_seed(0)
    model.train()
    times = []
    with PeakRss(interval_s=0.002) as rss:
        for _ in range(point["steps"]):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with run_only(model, sample_kept(probs, gen)):
                model(**batch).loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
    return {"rss_model": rss.start, "peak": rss.peak, "increment": rss.increment,
            "step_seconds": statistics.median(times[1:] or times)}


def measure(point: dict) -> dict:
    res = subprocess.run([sys.executable, __file__, "--worker", json.dumps(point)], capture_output=True, text=True,
                         timeout=900)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        return {"error": (res.stderr or res.stdout)[-800:]}
    return json.loads(lines[-1])


def predicted_peak(model: str, ratio: float, batch: int, seq: int) -> int:
    from edge_runtime.device.memory_model import Plan, load_arch, predict_peak

    return predict_peak(load_arch(model), Plan(batch_size=batch, seq_len=seq, layer_drop=ratio)).total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="+", default=list(SETTINGS), choices=sorted(SETTINGS))
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--extra-rounds", type=int, default=2, help="DropPEFT rounds beyond LoRA's")
    ap.add_argument("--memory-steps", type=int, default=6)
    ap.add_argument("--arms-only", action="store_true",
                    help="only measure every arm's peak memory and step time (no federated runs)")
    ap.add_argument("--fixed", type=float, nargs="+", default=None, metavar="RATIO",
                    help="only federated runs of DropPEFT at these fixed ratios (uniform, no bandit), "
                         "LoRA's number of rounds: what a ratio costs in accuracy and buys in seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "droppeft.json")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(memory_worker(json.loads(args.worker))))
        return
    logging.basicConfig(level=logging.WARNING)
    result = {"alpha": args.alpha, "threads": torch.get_num_threads(), "runs": {}, "memory": {}}
    if args.out.exists():  # other models' runs measured before are kept
        old = json.loads(args.out.read_text())
        result.update({k: v for k, v in old.items() if k not in ("alpha", "threads", "total_seconds")})
    t_all = time.perf_counter()
    if args.arms_only:
        result.setdefault("arms", {})
        for model in args.models:
            result["arms"][model] = measure_arms(model, SETTINGS[model][4], SETTINGS[model][3], args.memory_steps)
        result["total_seconds"] = time.perf_counter() - t_all
        write_json_atomic(args.out, result)
        return
    for model in args.models:
        devices, rounds, max_examples, seq, bs, target = SETTINGS[model]
        train = TrainConfig(epochs=1, batch_size=bs, lr=1e-3, max_seq_len=seq)
        if args.fixed:
            for ratio in args.fixed:
                cfg = SimulationConfig(model=model, data="wordnet", devices=devices, max_examples=max_examples,
                                       alpha=args.alpha, seed=args.seed, train=train, method="droppeft",
                                       rounds=rounds, droppeft=DropPEFTConfig(ratio=ratio, bandit=False))
                hist = run_simulation(cfg, None, progress=False)
                kept = [{k: r[k] for k in KEEP if k in r} for r in hist["rounds"]]
                result.setdefault("fixed", {})[f"{ratio}@{model}"] = {
                    "ratio": ratio, "rounds": kept, "to_target_global": to_target(kept, "global_accuracy", target)}
                print(f"fixed {ratio} {model}: " + " / ".join(f"{100 * r['global_accuracy']:.1f}" for r in kept)
                      + "  seconds " + " / ".join(f"{r['seconds']:.0f}" for r in kept[1:]), flush=True)
                result["total_seconds"] = time.perf_counter() - t_all
                write_json_atomic(args.out, result)
            continue
        base = dict(model=model, data="wordnet", devices=devices, max_examples=max_examples, alpha=args.alpha,
                    seed=args.seed, train=train)
        for method, n_rounds in (("lora", rounds), ("droppeft", rounds + args.extra_rounds)):
            name = f"{method}@{model}"

            def show(r: dict, name=name) -> None:
                picks = ""
                if r.get("configurator"):
                    c = collections.Counter(f"{a['ratio']:.1f}/{a['shape'][:3]}"
                                            for a in r["configurator"]["assignments"].values())
                    picks = "  picks " + ", ".join(f"{k} x{v}" for k, v in sorted(c.items()))
                print(f"{name} round {r['round']}: global {100 * r['global_accuracy']:.1f}%  device mean "
                      f"{100 * r['mean_device_accuracy']:.1f}%  {r['seconds']:.0f} s{picks}", flush=True)

            t0 = time.perf_counter()
            hist = run_simulation(SimulationConfig(**base, method=method, rounds=n_rounds), None, progress=False,
                                  on_round=show)
            kept = [{k: r[k] for k in (*KEEP, "configurator") if k in r} for r in hist["rounds"]]
            run = {"method": method, "model": model, "target": target,
                   "setting": {"devices": devices, "rounds": n_rounds, "max_examples": max_examples,
                               "train": train.__dict__},
                   "rounds": kept, "seconds": time.perf_counter() - t0,
                   "to_target_global": to_target(kept, "global_accuracy", target)}
            result["runs"][name] = run
            result["total_seconds"] = time.perf_counter() - t_all
            write_json_atomic(args.out, result)
        lora_run, dp_run = result["runs"][f"lora@{model}"], result["runs"][f"droppeft@{model}"]
        # peak memory: LoRA, and each configuration the bandit settled on (the last round's picks)
        last = dp_run["rounds"][-1]["configurator"]["assignments"]
        configs = sorted({(a["ratio"], a["shape"]) for a in last.values()})
        mem = {"lora": {**measure({"model": model, "method": "lora", "ratio": 0.0, "shape": "uniform", "batch": bs,
                                   "seq": seq, "steps": args.memory_steps}),
                        "predicted": predicted_peak(model, 0.0, bs, seq)}}
        for ratio, shape in configs:
            mem[f"droppeft {ratio:.1f}/{shape}"] = {
                **measure({"model": model, "method": "droppeft", "ratio": ratio, "shape": shape, "batch": bs,
                           "seq": seq, "steps": args.memory_steps}),
                "predicted": predicted_peak(model, ratio, bs, seq), "ratio": ratio, "shape": shape,
                "devices": sorted(d for d, a in last.items() if (a["ratio"], a["shape"]) == (ratio, shape))}
        result["memory"][model] = mem
        result["summary_" + model] = summarise(lora_run, dp_run, mem)
        result["total_seconds"] = time.perf_counter() - t_all
        write_json_atomic(args.out, result)
        curves = {"LoRA FedAvg, global": [(r["round"], r["global_accuracy"]) for r in lora_run["rounds"]],
                  "DropPEFT, global": [(r["round"], r["global_accuracy"]) for r in dp_run["rounds"]]}
        plot_accuracy(args.out.parent / f"droppeft_{model}.png", curves,
                      title=f"DropPEFT vs LoRA FedAvg, {model}, WordNet, {devices} devices, alpha={args.alpha}",
                      hlines={f"target {100 * target:.0f}%": target})
        plot_time(args.out.parent / f"droppeft_{model}_seconds.png", lora_run, dp_run, target, model)
        print(json.dumps(result["summary_" + model], indent=2))
    print(f"wrote {args.out} in {result['total_seconds']:.0f} s")


def measure_arms(model: str, bs: int, seq: int, steps: int) -> list[dict]:
    """Every arm of the default arm set: measured peak, training increment and step time, against
    LoRA (every block), one fresh process each."""
    rows = []
    lora_point = {"model": model, "method": "lora", "ratio": 0.0, "shape": "uniform", "batch": bs, "seq": seq,
                  "steps": steps}
    base = measure(lora_point)
    for ratio, shape in DropPEFTConfig().arms():
        m = measure({**lora_point, "method": "droppeft", "ratio": ratio, "shape": shape}) if ratio else base
        row = {"ratio": ratio, "shape": shape, **m, "predicted": predicted_peak(model, ratio, bs, seq)}
        if "peak" in m and "peak" in base:
            row.update(peak_vs_lora=m["peak"] / base["peak"], increment_vs_lora=m["increment"] / base["increment"],
                       step_speedup=base["step_seconds"] / m["step_seconds"])
        rows.append(row)
        print(f"{model} {ratio:.1f}/{shape}: peak {m.get('peak', 0) / 2**20:.0f} MiB, training increment "
              f"{m.get('increment', 0) / 2**20:.0f} MiB, step {m.get('step_seconds', 0):.3f} s", flush=True)
    return rows


def summarise(lora_run: dict, dp_run: dict, mem: dict) -> dict:
    n = len(lora_run["rounds"]) - 1
    lt, dt = lora_run["to_target_global"], dp_run["to_target_global"]
    lora_seconds = sum(r["seconds"] for r in lora_run["rounds"])
    spent, at_equal_time = 0.0, None
    for r in dp_run["rounds"]:   # DropPEFT's accuracy once its seconds reach LoRA's total (or its last round)
        spent += r["seconds"]
        at_equal_time = {"round": r["round"], "seconds": spent, "global_accuracy": r["global_accuracy"]}
        if spent >= lora_seconds:
            break
    dp_mem = {k: v for k, v in mem.items() if k != "lora" and "peak" in v}
    worst = max(dp_mem.values(), key=lambda v: v["peak"]) if dp_mem else None
    out = {"rounds_to_target": {"lora": lt["round"], "droppeft": dt["round"]},
           "seconds_to_target": {"lora": lt["train_seconds"], "droppeft": dt["train_seconds"]},
           "speedup_to_target": (lt["train_seconds"] / dt["train_seconds"]
                                 if lt["train_seconds"] and dt["train_seconds"] else None),
           "final_accuracy_same_rounds": {"rounds": n, "lora": lora_run["rounds"][n]["global_accuracy"],
                                          "droppeft": dp_run["rounds"][n]["global_accuracy"]},
           "seconds_same_rounds": {"lora": lora_seconds, "droppeft": sum(r["seconds"] for r in dp_run["rounds"][:n + 1])},
           "droppeft_at_lora_seconds": at_equal_time}
    if worst is not None and "peak" in mem["lora"]:
        out["peak_memory"] = {"lora": mem["lora"]["peak"], "droppeft_worst_settled": worst["peak"],
                              "reduction": 1 - worst["peak"] / mem["lora"]["peak"],
                              "training_increment_lora": mem["lora"]["increment"],
                              "training_increment_droppeft_worst": worst["increment"],
                              "increment_reduction": 1 - worst["increment"] / mem["lora"]["increment"]}
    return out


def plot_time(path: Path, lora_run: dict, dp_run: dict, target: float, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, run in (("LoRA FedAvg", lora_run), ("DropPEFT", dp_run)):
        t, xs, ys = 0.0, [], []
        for r in run["rounds"]:
            t += r["seconds"]
            xs.append(t)
            ys.append(r["global_accuracy"])
        ax.plot(xs, ys, marker="o", label=label)
    ax.axhline(target, ls="--", c="grey", label=f"target {100 * target:.0f}%")
    ax.set_xlabel("device training seconds (all devices, one after another)")
    ax.set_ylabel("global test accuracy")
    ax.set_title(f"DropPEFT vs LoRA FedAvg over time, {model}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
