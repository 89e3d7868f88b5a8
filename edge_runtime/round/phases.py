"""Where a round's time goes, as pure functions over what the server kept.

Each device measures its own phases and sends them with its update as ``t_<phase>`` metrics
(:func:`edge_runtime.round.device.phase_metrics`):

- ``load_s``: building the model (the first round, or when the run's model changes);
- ``fetch_s``: from the manifest naming the device to the global in hand (download or delta rebuild);
- ``decode_s``: loading the global into the model;
- ``eval_s``: evaluating the received global on the local test split;
- ``personalise_s``: the method's personal model (FDLoRA, FedPepTAO);
- ``train_s``: local training;
- ``encode_s``: the delta, its compression and the update file.

The server adds what only it sees, on its own clock: ``transfer_s``, the rest of the time from the
round's start to the update accepted (the manifest reaching the device, the upload, anything the
device did not time), and ``idle_s``, from the update accepted to the round's close (waiting for
slower devices). The seven phases plus these two are the round's wall time for that device.
"""

from __future__ import annotations

from typing import Mapping

DEVICE_PHASES = ("load_s", "fetch_s", "decode_s", "eval_s", "personalise_s", "train_s", "encode_s")
SERVER_PHASES = ("transfer_s", "idle_s")
PHASES = DEVICE_PHASES + SERVER_PHASES
THROUGHPUT = ("train_tokens", "train_tokens_per_s", "train_padding", "train_gflops_per_s", "peak_gflops",
              "train_peak_share", "predicted_train_s",   # the planner's time model (agents with --plan auto)
              "rss_start_mb", "rss_peak_mb")             # the process's RSS as training began, and its peak


def device_phases(metrics: Mapping[str, float], accepted_after: float | None, round_seconds: float | None) -> dict:
    """One device's phases from its update's metrics; with ``accepted_after`` (seconds from the round's
    start to its update accepted) and ``round_seconds``, the server's ``transfer_s`` and ``idle_s``."""
    out = {p: float(metrics.get(f"t_{p}", 0.0)) for p in DEVICE_PHASES}
    if accepted_after is not None:
        out["transfer_s"] = max(0.0, accepted_after - sum(out.values()))
        if round_seconds is not None:
            out["idle_s"] = max(0.0, round_seconds - accepted_after)
    out.update({k: float(metrics[k]) for k in THROUGHPUT if k in metrics})
    return out


def round_phases(accepted: Mapping[str, Mapping], started_at: float | None = None, closed_at: float | None = None,
                 aggregate_s: float | None = None) -> dict:
    """The history row's ``phases``: per device (see :func:`device_phases`), the mean over devices of
    each phase and throughput figure, and the server's ``collect_s`` (start to close) and
    ``aggregate_s`` (checking, aggregating, compressing and writing the new global)."""
    seconds = closed_at - started_at if started_at is not None and closed_at is not None else None
    devices = {}
    for dev, a in sorted(accepted.items()):
        after = a["at"] - started_at if started_at is not None and a.get("at") is not None else None
        devices[dev] = device_phases(a.get("metrics", {}), after, seconds)
    keys = [k for k in PHASES + THROUGHPUT if any(k in d for d in devices.values())]
    mean = {k: sum(d.get(k, 0.0) for d in devices.values()) / len(devices) for k in keys} if devices else {}
    server = {k: v for k, v in (("collect_s", seconds), ("aggregate_s", aggregate_s)) if v is not None}
    return {"devices": devices, "mean": mean, "server": server}


def phase_totals(history: list[Mapping]) -> dict[str, float]:
    """Each phase's mean-device seconds summed over the run's training rounds (``report.json``)."""
    totals: dict[str, float] = {}
    for row in history:
        for k, v in (row.get("phases") or {}).get("mean", {}).items():
            if k in PHASES:
                totals[k] = totals.get(k, 0.0) + v
    return totals


def describe_phases(row: Mapping) -> str:
    """The round line's time: the mean device's biggest phases, its training throughput, and the
    server's aggregation; "" for a row without phases."""
    p = row.get("phases") or {}
    mean = p.get("mean") or {}
    parts = [f"{k.removesuffix('_s')} {mean[k]:.1f} s" for k in sorted(PHASES, key=lambda k: -mean.get(k, 0.0))
             if mean.get(k, 0.0) >= 0.05][:5]
    if not parts:
        return ""
    rate = f", {mean['train_tokens_per_s']:.0f} tokens/s" if "train_tokens_per_s" in mean else ""
    agg = p.get("server", {}).get("aggregate_s")
    return "mean device: " + ", ".join(parts) + rate + (f"; aggregate {agg:.2f} s" if agg is not None else "")
