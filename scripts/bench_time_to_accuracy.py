"""Time and memory to a target accuracy: plain FedAvg-LoRA against each lever alone and their best mix.

Every arm is a whole federation over real MQTT in the demo's process layout: the embedded broker,
the aggregation server and one agent process per device (one thread each, all on this machine), the
same data split, seeds and model initialisation. The processes start as the demo starts them
(``--launch fork``: forked from a zygote that imported torch, transformers and peft once; ``spawn``:
each imports them itself, ~6.5 CPU-s a process, which nine processes pay one after another on two
cores and a real fleet's devices pay in parallel). A GGUF base (SmolLM2) is converted to a model
folder once before the first arm, as a device does at its first start. The **baseline** is ``lora`` with q/v r=8 + head,
batch 32, lr 2e-3, max length 64, 1 local epoch, no extras; each lever is a ``--set`` of the
server's training spec, which it pushes to the devices:

- ``grouped``: ``train.group_by_length`` (batches of similar length, padded to their longest);
- ``top3+cache``: ``lora.top_blocks=3`` + ``train.cache_frozen`` (LoRA on the top 3 blocks, the
  frozen blocks below computed once per example and replayed every later step and round);
- ``eval-sample``: ``eval.sample=32`` (a device evaluates the received global on 32 of its test
  examples instead of all; the final global is evaluated whole);
- ``fedadam``: ``fedopt.optimizer=fedadam`` (server Adam over the round's mean, 2 warm-up rounds);
- ``bf16``: ``train.precision=auto`` (bf16 autocast in training and evaluation where the device's CPU or
  GPU multiplies bf16 natively, fp32 elsewhere);
- ``no-initial-eval``: ``eval.initial=false`` (round 1 does not evaluate the untrained initial global,
  which costs the round its test-split cache build and evaluation);
- ``epochs2``: ``train.epochs=2`` (twice the local work per round);
- ``lr5e-3``: ``train.lr=5e-3`` (a 2.5x larger local learning rate);
- ``micro16``: ``train.micro_batch_size=16`` (each batch of 32 runs forward and backward 16 examples
  at a time, the gradients summed: the same step with half the activations alive);
- ``no-warm-up``: the baseline with the agents' ``--no-warm-up`` (the device profile and the model
  libraries' imports then run in the first round instead of while the device waits for it);
- ``best``: the mix of the levers that paid.

Accuracy is measured by this script, not by the devices: after an arm ends, every round's global
(``server/global/round_*.safetensors``) is loaded into the model and evaluated on held-out examples
no device holds, so every arm is scored on the same examples. A round's time is its global file's
write time from the moment the fleet was launched (start-up and model loading included). The
**target** is the baseline's accuracy after 3 rounds; each other arm runs until 1.1x the baseline's
wall time (an arm that has not reached the target by then is slower than the baseline). ``best`` runs
last: with ``--best auto`` it mixes the levers that reached the target sooner than the baseline
without ending lower at the baseline's wall time. Per arm: wall seconds and device-seconds (the devices' own phases, summed) to the target,
accuracy at the baseline's wall time, each device's peak RSS during training and its training
increment (peak minus the RSS as training began), bytes per round, and the mean device's phases.

    python scripts/bench_time_to_accuracy.py --settings wordnet smollm2 fortunes --arms baseline best \
        --out scripts/results/fork/time_to_accuracy.json          # the README's headline table (29 min, 2 cores)
    python scripts/bench_time_to_accuracy.py --settings wordnet --arms baseline grouped top3+cache eval-sample \
        fedadam bf16 no-initial-eval epochs2 lr5e-3 micro16 droppeft best \
        --out scripts/results/levers/wordnet/time_to_accuracy.json   # each lever alone (48 min)
    python scripts/bench_time_to_accuracy.py --settings fortunes --arms baseline grouped top3+cache eval-sample \
        fedadam bf16 no-initial-eval epochs2 lr5e-3 micro16 best \
        --out scripts/results/levers/fortunes/time_to_accuracy.json  # (59 min)
    python scripts/bench_time_to_accuracy.py --settings smollm2 --arms baseline droppeft \
        --out scripts/results/droppeft_smollm2/time_to_accuracy.json # SmolLM2-135M, smaller (10 min)
    python scripts/bench_time_to_accuracy.py --settings smoke --arms baseline best   # does it run (2 min)

Writes scripts/results/time_to_accuracy.json (``--out``) and, beside it, one accuracy-vs-seconds and one
phase PNG per setting.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from broker_server.demo import (DemoConfig, DemoError, launch_fleet, log_tail,
                                stop_processes, validate)
from edge_runtime.atomic_io import write_json_atomic
from edge_runtime.methods import METHODS
from edge_runtime.round.phases import DEVICE_PHASES
from edge_runtime.training.data import resolve_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_fortunes import build as build_fortunes  # noqa: E402  (a sibling script)

RESULTS = Path(__file__).resolve().parent / "results"
BASELINE: dict[str, str] = {}   # the spec's defaults: LoRA r=8 on q/v (peft's BERT default) + the trained head
LEVERS = {
    "baseline": {},
    "grouped": {"train.group_by_length": "true"},
    "top3+cache": {"lora.top_blocks": "3", "train.cache_frozen": "true"},
    "eval-sample": {"eval.sample": "32"},
    "fedadam": {"fedopt.optimizer": "fedadam", "fedopt.lr": "0.01", "fedopt.warmup_rounds": "2"},
    "bf16": {"train.precision": "auto"},   # bf16 autocast where the CPU has it natively (this one: AVX512-BF16)
    "no-initial-eval": {"eval.initial": "false"},   # round 1 does not evaluate the untrained global 0
    "epochs2": {"train.epochs": "2"},      # more local work per round, fewer rounds
    "lr5e-3": {"train.lr": "0.005"},        # a larger local step
    "micro16": {"train.micro_batch_size": "16"},   # the batch's forward/backward 16 examples at a time
    # DropPEFT in place of LoRA: the fleet's bandit (one arm a round, rewarded with the global's progress
    # per second) over uniform / decreasing shapes (the top blocks, which the head reads, dropped
    # least), the ratio falling to 0 over 3 rounds (more dropout early)
    "droppeft": {"method": "droppeft", "droppeft.reward": "fleet", "droppeft.shapes": "[uniform,decreasing]",
                 "droppeft.schedule": "linear", "droppeft.schedule_rounds": "3"},
}
AGENT_ARMS = {"no-warm-up": ("--no-warm-up",)}   # the baseline with these agent flags: what a default buys
BEST = ("grouped", "top3+cache", "bf16", "lr5e-3", "micro16")    # the levers the README's run chose (see --best)
SETTINGS = {
    "wordnet": dict(data="wordnet", model="minilm-l6", devices=8, max_examples=4000, max_rounds=16),
    "fortunes": dict(data="runs/data/fortunes.jsonl", model="minilm-l6", devices=8, max_examples=4000, max_rounds=16),
    "smollm2": dict(data="wordnet", model="smollm2-135m", devices=4, max_examples=320, max_rounds=8),
    "smoke": dict(data="wordnet", model="minilm-l6", devices=2, max_examples=240, max_rounds=4),   # the script runs
}
HELD_OUT = 1000


def arm_sets(name: str, best: tuple[str, ...]) -> dict[str, str]:
    sets = dict(BASELINE)
    for lever in (best if name == "best" else () if name in AGENT_ARMS else (name,)):
        sets.update(LEVERS[lever])
    return sets


def run_arm(setting: dict, name: str, sets: dict[str, str], out: Path, rounds: int, budget_s: float | None,
            seed: int, launch: str) -> dict:
    """One federation; returns the closing seconds of every round and the server's state document."""
    shutil.rmtree(out, ignore_errors=True)
    server_args = ["--deadline", "3600", "--heartbeat-timeout", "600"]
    for k, v in sets.items():
        if k != "method":   # a lever may swap the method (DropPEFT); the rest are spec settings
            server_args += ["--set", f"{k}={v}"]
    cfg = DemoConfig(out=out, devices=setting["devices"], rounds=rounds, alpha=0.5, max_examples=setting["max_examples"],
                     model=setting["model"], method=sets.get("method", "lora"), data=setting["data"], seed=seed, epochs=1.0, lr=2e-3,
                     batch_size=32, max_seq_len=64, server_args=tuple(server_args), agent_args=AGENT_ARMS.get(name, ()),
                     launch=launch)
    full = validate(cfg)
    out.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    closed: dict[int, float] = {}
    t0 = time.time()
    try:
        _, _, server = launch_fleet(cfg, full, procs, echo=lambda s: None)
        gdir = out / "server" / "global"
        while True:
            for p in gdir.glob("round_*.safetensors") if gdir.exists() else ():
                r = int(p.stem.split("_")[1])
                if r > 0 and r not in closed:
                    closed[r] = p.stat().st_mtime - t0
                    print(f"  {name}: round {r} closed at {closed[r]:.0f} s", flush=True)
            if server.poll() is not None:
                if server.returncode != 0:
                    raise DemoError(f"{name}: the server exited with {server.returncode}:\n"
                                    f"{log_tail(out / 'server.log')}")
                break
            if budget_s is not None and time.time() - t0 > budget_s:
                break
            for p in procs[1:]:
                if p.poll() not in (None, 0):
                    raise DemoError(f"{name}: a process exited with {p.returncode}; see the logs in {out}")
            time.sleep(0.5)
    finally:
        stop_processes(procs, grace_s=20.0)
    state = json.loads((out / "server" / "state.json").read_text())
    return {"closed": closed, "state": state}


def held_out(setting: dict, out: Path, seed: int):
    """``HELD_OUT`` examples of the data set that no device of the run holds."""
    full = resolve_dataset(setting["data"])
    used = {json.loads(line)["text"] for p in (out / "devices").glob("*/data.jsonl") for line in open(p)}
    unused = [i for i in range(len(full)) if full.inputs[i] not in used]
    pick = np.random.default_rng(seed).permutation(len(unused))[:HELD_OUT]
    return full.subset(sorted(unused[i] for i in pick))


def score_globals(out: Path, state: dict, test) -> dict[int, float]:
    """Each round's global, loaded into the model, evaluated on ``test`` (all layers, no dropout)."""
    import torch

    from broker_server.store import Store
    from edge_runtime.training.evaluate import evaluate
    from edge_runtime.training.spec import TrainingSpec, build_model

    torch.set_num_threads(os.cpu_count() or 1)
    spec = TrainingSpec.from_json(state["training"])
    method, store = METHODS[spec.method], Store(out / "server")
    model, tok = build_model(spec)
    method.prepare(model, spec, store.read_tensors(store.global_path(0)) if method.needs_init else None)
    acc = {}
    for path in sorted((out / "server" / "global").glob("round_*.safetensors")):
        method.load_trainable_state(model, store.read_tensors(path))
        acc[int(path.stem.split("_")[1])] = evaluate(model, tok, test, 64, spec.train.max_seq_len).accuracy
    return acc


def summarise(run: dict, acc: dict[int, float], target: float, same_wall: float | None) -> dict:
    """Time, device time, memory and bytes of one arm, to ``target`` and at ``same_wall`` seconds."""
    hist = {h["round"]: h for h in run["state"]["history"] if h.get("round", 0) > 0 and h.get("phases")}
    rounds = sorted(r for r in run["closed"] if r in acc and r in hist)
    hit = next((r for r in rounds if acc[r] >= target - 1e-9), None)
    device_s = {r: sum(sum(d.get(p, 0.0) for p in DEVICE_PHASES) for d in hist[r]["phases"]["devices"].values())
                for r in rounds}
    peaks, incs = {}, {}
    for r in rounds:
        for dev, d in hist[r]["phases"]["devices"].items():
            if "rss_peak_mb" in d:
                peaks[dev] = max(peaks.get(dev, 0.0), d["rss_peak_mb"])
                incs[dev] = max(incs.get(dev, 0.0), d["rss_peak_mb"] - d["rss_start_mb"])
    within = [r for r in rounds if same_wall is None or run["closed"][r] <= same_wall + 1e-6]
    phases = {p: float(np.mean([hist[r]["phases"]["mean"].get(p, 0.0) for r in rounds]))
              for p in (*DEVICE_PHASES, "transfer_s", "idle_s")} if rounds else {}
    return {
        "rounds": [{"round": r, "seconds": run["closed"][r], "accuracy": acc[r], "device_seconds": device_s[r],
                    "bytes_up": hist[r]["bytes_up"], "bytes_down": hist[r]["bytes_down"]} for r in rounds],
        "initial_accuracy": acc.get(0),
        "target_round": hit,
        "wall_to_target_s": run["closed"][hit] if hit else None,
        "device_s_to_target": sum(device_s[r] for r in rounds if r <= hit) if hit else None,
        "accuracy_at_baseline_wall": acc[within[-1]] if within else acc.get(0),
        "peak_rss_mib": peaks, "train_increment_mib": incs,
        "max_peak_rss_mib": max(peaks.values(), default=None), "max_train_increment_mib": max(incs.values(), default=None),
        "bytes_per_round": float(np.mean([hist[r]["bytes_up"] + hist[r]["bytes_down"] for r in rounds])) if rounds else None,
        "mean_device_phases_s": phases,
    }


def paying_levers(results: dict) -> tuple[str, ...]:
    """The levers that reached the target sooner than the baseline and ended no lower at its wall time."""
    base = results["baseline"]
    return tuple(n for n, r in results.items() if n in LEVERS and n != "baseline" and r.get("wall_to_target_s")
                 and r["wall_to_target_s"] < base["wall_to_target_s"] / 1.05
                 and r["accuracy_at_baseline_wall"] >= base["accuracy_at_baseline_wall"] - 0.005)


def convert_once(model: str) -> None:
    """A GGUF base converted before the first arm (as on a device after its first start), so that no
    arm pays the conversion and each reads the copy."""
    from edge_runtime.training import gguf_cache
    from edge_runtime.training.models import resolve_model_source

    src = resolve_model_source(model)
    if src.gguf_file and gguf_cache.converted(src.path / src.gguf_file) is None:
        print(f"  (no converted copy of {src.gguf_file}: every process reads the GGUF)", flush=True)


def run_setting(key: str, setting: dict, arms: list[str], best: tuple[str, ...], work: Path, seed: int,
                plots: Path, launch: str) -> dict:
    print(f"== {key}: {setting}, launch {launch}", flush=True)
    convert_once(setting["model"])
    runs, accs, results = {}, {}, {}
    order = ["baseline", *[a for a in arms if a not in ("baseline", "best")], *(["best"] if "best" in arms else [])]
    for name in order:
        base = results.get("baseline")
        if name == "best" and best == ("auto",):
            best = paying_levers(results) or BEST
            print(f"  best = {' + '.join(best)}", flush=True)
        budget = None if name == "baseline" else 1.1 * base["wall_s"]
        t = time.perf_counter()
        runs[name] = run_arm(setting, name, arm_sets(name, best), work / key / name,
                             3 if name == "baseline" else setting["max_rounds"], budget, seed, launch)
        test = held_out(setting, work / key / name, seed)
        accs[name] = score_globals(work / key / name, runs[name]["state"], test)
        if name == "baseline":
            target = accs[name][3]
            results[name] = {"wall_s": runs[name]["closed"][3]}
        row = summarise(runs[name], accs[name], target, results["baseline"]["wall_s"])
        results[name] = {**results.get(name, {}), **row, "sets": arm_sets(name, best),
                         "bench_seconds": time.perf_counter() - t}
        print(f"  {name}: accuracy by round {[round(100 * r['accuracy'], 1) for r in row['rounds']]}; to "
              f"{100 * target:.1f}%: {row['wall_to_target_s'] or float('nan'):.0f} s wall, "
              f"{row['device_s_to_target'] or float('nan'):.0f} device-s; peak {row['max_peak_rss_mib'] or 0:.0f} MiB, "
              f"increment {row['max_train_increment_mib'] or 0:.0f} MiB", flush=True)
    b = results["baseline"]
    for name, r in results.items():
        if r["wall_to_target_s"]:
            r["speedup_wall"] = b["wall_to_target_s"] / r["wall_to_target_s"]
            r["speedup_device_s"] = b["device_s_to_target"] / r["device_s_to_target"]
        if r["max_train_increment_mib"] and b["max_train_increment_mib"]:
            r["increment_vs_baseline"] = r["max_train_increment_mib"] / b["max_train_increment_mib"]
    plot(key, setting, results, target, plots)
    return {"setting": setting, "launch": launch, "held_out": HELD_OUT, "target_accuracy": target, "best": list(best),
            "arms": results}


def plot(key: str, setting: dict, results: dict, target: float, plots: Path) -> None:
    from edge_runtime.report import _pyplot, _save, plot_accuracy

    curves = {name: [(0.0, r["initial_accuracy"] or 0.0)] + [(x["seconds"], x["accuracy"]) for x in r["rounds"]]
              for name, r in results.items()}
    plot_accuracy(plots / f"time_to_accuracy_{key}.png", curves,
                  title=f"{setting['model']} on {key}, {setting['devices']} devices over MQTT: held-out accuracy",
                  xlabel="wall seconds from launch", hlines={"target (baseline, round 3)": target})
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.0), dpi=110)
    names = list(results)
    bottom = np.zeros(len(names))
    for p in (*DEVICE_PHASES, "transfer_s", "idle_s"):
        vals = np.array([results[n]["mean_device_phases_s"].get(p, 0.0) for n in names])
        if vals.any():
            ax.bar(names, vals, bottom=bottom, label=p.removesuffix("_s"))
            bottom += vals
    ax.set_ylabel("seconds per round (mean device)")
    ax.set_title(f"where a round's time goes: {setting['model']} on {key}", fontsize=10)
    ax.legend(fontsize=7)
    ax.tick_params(axis="x", labelsize=8)
    _save(plt, fig, plots / f"time_to_accuracy_{key}_phases.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", default=["wordnet", "fortunes"], choices=sorted(SETTINGS))
    ap.add_argument("--arms", nargs="+", default=[*LEVERS, *AGENT_ARMS, "best"], choices=[*LEVERS, *AGENT_ARMS, "best"])
    ap.add_argument("--best", nargs="+", default=list(BEST), choices=["auto", *[k for k in LEVERS if k != "baseline"]],
                    help="the levers the best arm mixes; auto: those that paid in this setting's run")
    ap.add_argument("--work", type=Path, default=Path("runs/bench_tta"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--launch", default="fork", choices=["fork", "spawn"],
                    help="how the fleet's processes start (the demo's --launch): forked from one that imported "
                         "the libraries once, or each importing them")
    ap.add_argument("--out", type=Path, default=RESULTS / "time_to_accuracy.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if "fortunes" in args.settings and not Path(SETTINGS["fortunes"]["data"]).exists():
        build_fortunes(Path(SETTINGS["fortunes"]["data"]))
    t0 = time.perf_counter()
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result.setdefault("settings", {})
    for key in args.settings:
        result["settings"][key] = run_setting(key, SETTINGS[key], args.arms, tuple(args.best), args.work, args.seed,
                                              args.out.parent, args.launch)
        result.update(cpu_count=os.cpu_count(), seconds=time.perf_counter() - t0)
        write_json_atomic(args.out, result)     # each setting kept as soon as it is done
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
