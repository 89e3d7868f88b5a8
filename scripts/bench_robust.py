"""What the server's defences cost and what they buy: MiniLM-L6 on WordNet supersenses, every arm in
one run (the same devices, data split and seeds; only the defences, the attack or DP differ).

Arms (``--arms`` picks some):

- ``honest/off``, ``honest/default``, ``honest/median``, ``honest/trimmed_mean``: every device
  honest, with the defences off (no caps, no norm bound), the defaults (sample and share caps,
  adaptive norm bound, FedAvg), and the two robust aggregators: each defence's accuracy cost;
- ``samples/default``, ``samples/off``: the last device declares ``n_samples = 1e9``;
- ``norm/default``, ``norm/off``: the last device sends ``global + 10^6 x`` its honest delta;
- ``dp/clip``, ``dp/z0.3``, ``dp/z1``: DP-FedAvg with a fixed clip (the median delta norm of the
  honest default run's first round, measured here) and noise multipliers 0, 0.3 and 1, with the
  epsilon at delta 1e-5 after the run.

Then the cost of signing: a real Ed25519 identity signs and verifies the messages of one round (the
round manifest with this run's spec, the global announcement, an update manifest, an ack, a
heartbeat, a summary), timed signed against unsigned; the extra seconds per round for a device and
for the server are reported as a share of the honest run's mean round time (a device's share: its
own training seconds per round, as the devices run one after another here).

Writes scripts/results/robust.json and robust.png.

    python scripts/bench_robust.py                        # ~30 min on 2 CPU cores
    python scripts/bench_robust.py --arms honest/default norm/default
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

import torch

from edge_runtime.algorithms.dp import DPConfig
from edge_runtime.algorithms.robust import RobustConfig
from edge_runtime.atomic_io import write_json_atomic
from edge_runtime.report import plot_accuracy
from edge_runtime.simulation import SimulationConfig, run_simulation
from edge_runtime.training.trainer import TrainConfig

RESULTS = Path(__file__).resolve().parent / "results"
OFF = RobustConfig(norm_bound="off", max_share=1.0, weight_multiple=1e12)
ARMS = {   # name -> (attack, robust, dp noise multiplier or None)
    "honest/off": (None, OFF, None),
    "honest/default": (None, RobustConfig(), None),
    "honest/median": (None, RobustConfig(aggregator="median"), None),
    "honest/trimmed_mean": (None, RobustConfig(aggregator="trimmed_mean"), None),
    "samples/default": ("samples", RobustConfig(), None),
    "samples/off": ("samples", OFF, None),
    "norm/default": ("norm", RobustConfig(), None),
    "norm/off": ("norm", OFF, None),
    "dp/clip": (None, RobustConfig(), 0.0),
    "dp/z0.3": (None, RobustConfig(), 0.3),
    "dp/z1": (None, RobustConfig(), 1.0),
}
KEEP = ("round", "global_accuracy", "mean_device_accuracy", "train_loss", "seconds", "weights", "defence", "privacy")


def attack(mode: str | None):
    """The last device's lie, as the server receives it (None: all honest)."""
    if mode is None:
        return None

    def tamper(_round, reports, global_state):
        liar = sorted(reports)[-1]
        rep = reports[liar]
        if mode == "samples":
            reports[liar] = dataclasses.replace(rep, n_samples=10**9)
        else:
            reports[liar] = dataclasses.replace(rep, upload={
                k: global_state[k] + (v - global_state[k]) * 1e6 if v.is_floating_point() else v
                for k, v in rep.upload.items()})
        return reports

    return tamper


def signing_cost(spec_json: dict, n_devices: int, repeats: int = 200) -> dict:
    """Seconds one round's signatures add on a device and on the server (signed minus unsigned
    encode + decode of each message it sends and receives)."""
    from edge_runtime.protocol import topics
    from edge_runtime.protocol.codec import decode_message, encode_message
    from edge_runtime.protocol.messages import (Ack, GlobalAnnouncement,
                                                Heartbeat, PayloadRef,
                                                RoundManifest, RoundSummary,
                                                UpdateManifest)
    from edge_runtime.protocol.signing import Identity, PinnedKey

    fleet, dev = "bench", "dev00"
    ref = PayloadRef("p" * 16, 300_000, "0" * 64, 5)
    devs = tuple(f"dev{k:02d}" for k in range(n_devices))
    msgs = {   # name -> (message, topic, sent by the server)
        "round manifest": (RoundManifest("run1", 3, "train", devs, ref, 600.0, spec_json, time.time()),
                           topics.round_topic(fleet), True),
        "global announcement": (GlobalAnnouncement("run1", 3, ref), topics.global_topic(fleet), True),
        "ack": (Ack(dev, 3, "u" * 16, True), topics.device_topic(fleet, dev, "ack"), True),
        "summary": (RoundSummary("run1", 3, devs, n_devices, 0.7, 1.1, 0.9, 60.0, 10**6, 10**6),
                    topics.summary_topic(fleet), True),
        "update manifest": (UpdateManifest("run1", dev, 3, "u" * 16, ref, 400,
                                           {"eval_accuracy": 0.7, "eval_loss": 1.0, "train_loss": 0.9,
                                            "train_seconds": 12.0, "train_steps": 25}),
                            topics.device_topic(fleet, dev, "update"), False),
        "heartbeat": (Heartbeat(dev, "training", 3, time.time()), topics.device_topic(fleet, dev, "heartbeat"), False),
    }
    ident = Identity.generate()
    keys = PinnedKey(ident.public)
    per = {}
    for name, (msg, topic, _) in msgs.items():
        t0 = time.perf_counter()
        for _ in range(repeats):
            decode_message(encode_message(msg), type(msg))
        plain = (time.perf_counter() - t0) / repeats
        t0 = time.perf_counter()
        for _ in range(repeats):
            decode_message(encode_message(msg, ident, topic), type(msg), keys, topic)
        per[name] = max(0.0, (time.perf_counter() - t0) / repeats - plain)
    return {"per_message_s": per, "messages": {n: "server" if s else "device" for n, (_, _, s) in msgs.items()}}


def round_shares(cost: dict, round_seconds: float, n_devices: int, heartbeat_s: float = 10.0) -> dict:
    """The signing seconds of one round and their share of it: a device signs its update and its
    heartbeats and checks the server's manifest, announcement, ack and summary; the server signs
    those and checks every device's update and heartbeats (one signer, one verifier each)."""
    per = cost["per_message_s"]
    device_round = round_seconds / n_devices   # the devices train one after another here
    beats = max(1.0, device_round / heartbeat_s)
    server_msgs = per["round manifest"] + per["global announcement"] + per["summary"]
    device_s = server_msgs + per["ack"] + per["update manifest"] + beats * per["heartbeat"]
    server_s = server_msgs + n_devices * (per["ack"] + per["update manifest"] + beats * per["heartbeat"])
    return {"device_s": device_s, "server_s": server_s, "device_round_s": device_round,
            "server_round_s": round_seconds, "device_share": device_s / device_round,
            "server_share": server_s / round_seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-examples", type=int, default=1600)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--out", type=Path, default=RESULTS / "robust.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    train = TrainConfig(epochs=1, batch_size=16, lr=1e-3, max_seq_len=64)
    base = dict(model="minilm-l6", data="wordnet", devices=args.devices, rounds=args.rounds, alpha=args.alpha,
                max_examples=args.max_examples, seed=args.seed, train=train)
    result = {"setting": {**{k: v for k, v in base.items() if k != "train"}, "train": train.__dict__},
              "threads": torch.get_num_threads(), "arms": {}}
    t_all = time.perf_counter()
    clip = None
    order = sorted(args.arms, key=lambda a: a != "honest/default")   # the DP clip comes from honest/default
    for name in order:
        mode, robust, z = ARMS[name]
        dp = DPConfig()
        if z is not None:
            if clip is None:
                raise SystemExit("the dp arms need honest/default in the same run (their clip is its median norm)")
            dp = DPConfig(clip=clip, noise_multiplier=z, delta=1e-5)

        seen: list[dict] = []

        def show(r: dict, name=name) -> None:
            seen.append(r)
            eps = (r.get("privacy") or {}).get("epsilon")
            print(f"{name} round {r['round']}: global {100 * r['global_accuracy']:.1f}%  "
                  f"{r['seconds']:.0f} s{f'  epsilon {eps:.3g}' if eps else ''}", flush=True)

        t0, failed = time.perf_counter(), None
        try:
            run_simulation(SimulationConfig(**base, robust=robust, dp=dp), None, progress=False, on_round=show,
                           tamper=attack(mode))
        except Exception as exc:   # noqa: BLE001 - an undefended run may be wrecked past aggregating (NaN)
            failed = f"{type(exc).__name__}: {exc}"[:300]
            print(f"{name} stopped: {failed}", flush=True)
        rounds = [{k: r[k] for k in KEEP if k in r} for r in seen]
        if name == "honest/default":
            clip = rounds[1]["defence"]["median_norm"]
        result["arms"][name] = {"attack": mode, "robust": dataclasses.asdict(robust), "dp": dataclasses.asdict(dp),
                                "rounds": rounds, "final_accuracy": rounds[-1]["global_accuracy"], "failed": failed,
                                "privacy": next((r["privacy"] for r in reversed(rounds) if r.get("privacy")), None),
                                "total_seconds": time.perf_counter() - t0}
        result["total_seconds"] = time.perf_counter() - t_all
        write_json_atomic(args.out, result)   # after every arm: a long benchmark keeps what it measured
    arms = result["arms"]
    ref = arms.get("honest/default")
    if ref:
        train_rounds = [r["seconds"] for r in ref["rounds"][1:]]
        cost = signing_cost(_spec_json(base), args.devices)
        result["signing"] = {**cost, **round_shares(cost, sum(train_rounds) / len(train_rounds), args.devices)}
        result["dp_clip"] = clip
        for a in arms.values():
            a["vs_honest_default_points"] = 100 * (a["final_accuracy"] - ref["final_accuracy"])
    write_json_atomic(args.out, result)
    plot_accuracy(args.out.with_suffix(".png"),
                  {name: [(r["round"], r["global_accuracy"]) for r in a["rounds"]] for name, a in arms.items()},
                  title=f"Defences, MiniLM-L6, WordNet, {args.devices} devices (1 lying), alpha={args.alpha}")
    print()
    for name, a in arms.items():
        eps = (a["privacy"] or {}).get("epsilon")
        print(f"{name:20s} final {100 * a['final_accuracy']:5.1f}%  "
              f"{a.get('vs_honest_default_points', 0):+6.1f} points vs honest/default"
              f"{f'  epsilon {eps:.3g} at delta 1e-5' if eps else ''}")
    if "signing" in result:
        s = result["signing"]
        print(f"signing: {1e3 * s['device_s']:.2f} ms a round on a device ({100 * s['device_share']:.4f}% of "
              f"{s['device_round_s']:.0f} s), {1e3 * s['server_s']:.2f} ms on the server "
              f"({100 * s['server_share']:.4f}% of {s['server_round_s']:.0f} s)")
    print(f"wrote {args.out} in {result['total_seconds']:.0f} s")


def _spec_json(base: dict) -> dict:
    """The training spec this run's round manifests carry (WordNet's 26 labels, the run's settings)."""
    from edge_runtime.training.data import resolve_dataset
    from edge_runtime.training.spec import TrainingSpec

    return TrainingSpec(model=base["model"], labels=tuple(resolve_dataset("wordnet").label_names),
                        train=base["train"], seed=base["seed"]).to_json()


if __name__ == "__main__":
    main()
