"""Run reports: ``history.json`` (atomic) and an accuracy-per-round PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from edge_runtime.atomic_io import write_bytes_atomic, write_json_atomic


def write_history(out_dir: Path, history: Mapping) -> Path:
    return write_json_atomic(Path(out_dir) / "history.json", history)


def plot_accuracy(path: Path, curves: Mapping[str, Sequence[tuple[float, float]]], title: str,
                  xlabel: str = "round", hlines: Mapping[str, float] | None = None) -> Path:
    """Save a line plot of ``{label: [(x, accuracy), ...]}`` (accuracy in [0, 1]) as PNG."""
    import io

    from edge_runtime.deps import require

    matplotlib = require("matplotlib", "plotting")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return write_bytes_atomic(path, buf.getvalue())
