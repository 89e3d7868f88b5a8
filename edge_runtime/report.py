"""Run reports, the same for a fleet's server and for ``edge-runtime simulate``: ``report.json`` (every
round's row, the devices, rejects and errors), ``report.png`` (accuracy per round) and the final global
adapter in peft format; the simulation adds its ``history.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch

from edge_runtime.atomic_io import (replace_dir_atomic, write_bytes_atomic,
                                    write_json_atomic)
from edge_runtime.export.adapter_folder import finish_adapter_folder
from edge_runtime.methods import METHODS
from edge_runtime.round.phases import PHASES, phase_totals
from edge_runtime.training.spec import TrainingSpec, build_model


def write_history(out_dir: Path, history: Mapping) -> Path:
    return write_json_atomic(Path(out_dir) / "history.json", history)


def _pyplot():
    from edge_runtime.deps import require

    matplotlib = require("matplotlib", "plotting")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    """``fig`` as a PNG at ``path``, written atomically; the figure is closed."""
    import io

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return write_bytes_atomic(path, buf.getvalue())


def plot_accuracy(path: Path, curves: Mapping[str, Sequence[tuple[float, float]]], title: str,
                  xlabel: str = "round", hlines: Mapping[str, float] | None = None) -> Path:
    """Save a line plot of ``{label: [(x, accuracy), ...]}`` (accuracy in [0, 1]) as PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for label, pts in curves.items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, [100 * y for y in ys], marker="o", markersize=3, label=label)
    for label, y in (hlines or {}).items():
        ax.axhline(100 * y, linestyle="--", linewidth=1, color="gray")
        ax.annotate(label, (0, 100 * y), textcoords="offset points", xytext=(4, 3), fontsize=8, color="gray")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_phases(path: Path, history: Sequence[Mapping], title: str) -> Path:
    """A stacked bar per training round: the mean device's seconds in each phase (see
    :mod:`edge_runtime.round.phases`), with the server's aggregation on top."""
    plt = _pyplot()
    rows = [h for h in history if h.get("phases")]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    bottom = [0.0] * len(rows)
    xs = [h["round"] for h in rows]
    for phase in (*PHASES, "aggregate_s"):
        vals = [h["phases"]["server"].get(phase, 0.0) if phase == "aggregate_s" else h["phases"]["mean"].get(phase, 0.0)
                for h in rows]
        if any(vals):
            ax.bar(xs, vals, bottom=bottom, label=phase.removesuffix("_s"))
            bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xlabel("round")
    ax.set_ylabel("seconds (mean device)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    return _save(plt, fig, path)


def last_privacy(history: Sequence[Mapping]) -> dict | None:
    """The privacy spent as of the newest round aggregated with DP (its row's ``privacy``), or None."""
    return next((h["privacy"] for h in reversed(history) if h.get("privacy")), None)


def describe_privacy(privacy: Mapping | None) -> str:
    """One line for ``status``: the run's differential privacy, or that it has none."""
    if not privacy:
        return "differential privacy: off (no dp.clip in the training spec)"
    eps = "infinite (clipping without noise)" if privacy["epsilon"] is None else f"{privacy['epsilon']:.3g}"
    return (f"differential privacy: epsilon {eps} at delta {privacy['delta']:g} after {privacy['rounds']} round(s) "
            f"(noise multiplier {privacy['noise_multiplier']:g}, clip {privacy['clip']:g}; device-level, central)")


def write_report(out_dir: Path, state: dict) -> Path:
    out_dir = Path(out_dir)
    hist = state["history"]
    took_part = {d for h in hist for d in h.get("participants", [])}
    devices = {k: v for k, v in state["devices"].items() if k in took_part}   # not every id that said hello
    report = {"run_id": state["run_id"], "fleet": state["fleet_name"], "training": state["training"],
              "rounds": hist, "devices": devices, "devices_registered": len(state["devices"]),
              "rejects": state["rejects"], "errors": state.get("errors", [])}
    picks = {}   # the configurator's choices (DropPEFT): per device, each round's (ratio, shape, reward)
    for h in hist:
        conf = h.get("configurator") or {}
        for dev, a in conf.get("assignments", {}).items():
            picks.setdefault(dev, []).append({"round": h["round"], "ratio": a["ratio"], "shape": a["shape"],
                                              "reward": conf.get("rewards", {}).get(dev)})
    if picks:
        report["configurator"] = picks
    privacy = last_privacy(hist)
    if privacy:   # DP-FedAvg (spec.dp): epsilon at delta after the rounds so far
        report["privacy"] = privacy
    totals = phase_totals(hist)
    if totals:   # where the rounds' time went (mean device), summed over the run
        report["phase_seconds"] = totals
        plot_phases(out_dir / "phases.png", hist, title=f"where each round's time went, run {state['run_id']}")
    write_json_atomic(out_dir / "report.json", report)
    curves = {"global model, device-weighted test accuracy":
              [(h["round"], h["accuracy"]) for h in hist if h.get("accuracy") is not None]}
    personal = [(h["round"], h["personal_accuracy"]) for h in hist if h.get("personal_accuracy") is not None]
    if personal:   # methods with a personal model (FDLoRA, FedPepTAO): each device's own, on its own test split
        curves["personalised models, device-weighted test accuracy"] = personal
    spec = state["training"]
    plot_accuracy(out_dir / "report.png", curves, title=f"{spec.get('model')} + {spec.get('method')}, run {state['run_id']}")
    return out_dir / "report.json"


def export_adapter(out_dir: Path, spec_json: dict, global_state: dict[str, torch.Tensor],
                   init_state: dict[str, torch.Tensor] | None = None, state: dict | None = None) -> Path:
    """Write the global adapter as a peft folder (``PeftModel.from_pretrained(base, path)`` loads it).

    ``init_state`` is the run's round-0 global, which methods with ``needs_init`` (FeDeRA) set the
    model up from; every method writes a plain LoRA folder for the untouched base model.
    """
    spec = TrainingSpec.from_json(spec_json)
    method = METHODS[spec.method]
    model, tokenizer = build_model(spec)
    method.prepare(model, spec, init_state)
    method.load_trainable_state(model, global_state)

    card = {}
    if state is not None:   # the model card's run facts: rounds, devices, the final global's accuracy
        hist = [h for h in state.get("history", []) if h.get("round", 0) > 0]
        accs = [h["accuracy"] for h in hist if h.get("accuracy") is not None]
        card = {"rounds": len(hist), "devices": len(state.get("devices", {})), "run_id": state.get("run_id"),
                "accuracy": accs[-1] if accs else None,
                "accuracy_on": "the devices' own test splits, weighted by size"}

    def save(folder: Path) -> None:
        method.save_adapter(model, folder)
        finish_adapter_folder(folder, model=spec.model, task=spec.task, labels=spec.labels, method=spec.method,
                              tokenizer=tokenizer, card=card, seed=spec.seed)

    return replace_dir_atomic(Path(out_dir) / "global_adapter", save)
