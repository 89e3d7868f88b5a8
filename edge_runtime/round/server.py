"""The server's part of one round, as pure functions: who takes part, the method's aggregate
(checked), and the history row. The coordinator calls them with what it persisted, the simulation
with what its devices returned; nothing here touches the disk, the network or the clock.

An *accepted* record is what the server keeps of one device's update:
``{"n_samples": int, "metrics": {name: float}, "bytes": int, "raw_bytes": int, "layer_steps": [int], ...}``
(``bytes``: what the upload took on the wire; ``raw_bytes``: its state in fp32, the uncompressed figure).
"""

from __future__ import annotations

import json
import random
from typing import Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from edge_runtime.algorithms.aggregation import Update, check_compatible, finite_number
from edge_runtime.algorithms.dp import dp_mean, privacy_spent
from edge_runtime.algorithms.fedopt import fedopt_step, own_state
from edge_runtime.algorithms.robust import defend, robust_aggregate
from edge_runtime.errors import AggregationError
from edge_runtime.methods.base import Method
from edge_runtime.protocol.messages import protocol1_layer_steps
from edge_runtime.training.spec import TrainingSpec


def select_participants(pool: Sequence[str], round_: int, seed: int, per_round: int, cap: int,
                        rounds_done: Mapping[str, int]) -> list[str]:
    """``pool`` (the eligible devices) sampled to ``per_round`` (0: all) with a seed of the run and the
    round, then capped at ``cap``, keeping the devices that have done the most rounds first."""
    pool = sorted(pool)
    rng = random.Random(seed * 100_003 + round_)
    if per_round and len(pool) > per_round:
        pool = sorted(rng.sample(pool, per_round))
    if len(pool) > cap:
        pool = sorted(sorted(pool, key=lambda d: (-rounds_done.get(d, 0), rng.random()))[:cap])
    return pool


MAX_CONFIGURATOR_BYTES = 16 * 1024 * 1024   # the configurator's JSON state (DropPEFT: ~200 bytes a device)


class Aggregate(NamedTuple):
    global_state: dict[str, Tensor]
    server_state: dict[str, Tensor]
    configurator_state: dict
    defence: dict          # what the bounded-influence step changed (robust.defend's report)


def aggregate_checked(method: Method, global_state: Mapping[str, Tensor], updates: Sequence[Update],
                      server_state: Mapping[str, Tensor], configurator_state: Mapping, spec: TrainingSpec,
                      fleet_size: int, round_: int, sample_caps: Mapping[str, int | None] | None = None
                      ) -> Aggregate:
    """The updates' influence bounded (``spec.robust``: weight caps, with ``sample_caps`` per device
    from the enrolment, and the norm bound), then the method's aggregate (or the robust aggregator
    that replaces a weighted mean, or DP-FedAvg's noised mean when ``spec.dp`` is on: its report is
    the defence's ``dp``), the server optimizer's step toward it (``spec.fedopt``, its state kept in
    the server state) and the configurator's new state, refused (AggregationError)
    unless the aggregate has the global's keys, shapes and dtypes and only finite values, and the
    state is a JSON object (finite numbers) under :data:`MAX_CONFIGURATOR_BYTES`."""
    updates, defence = defend(global_state, updates, spec.robust, sample_caps)
    if spec.dp.enabled:
        new_global, defence["dp"] = dp_mean(global_state, updates, spec.dp)
        new_server = {}
    elif spec.robust.aggregator != "fedavg":
        new_global, new_server = robust_aggregate(updates, spec.robust), {}
    else:
        new_global, new_server = method.aggregate(global_state, updates, server_state, spec, fleet_size)
    if spec.fedopt.enabled:   # the mean above is the pseudo-gradient's target: FedAdam / FedYogi / FedAvgM
        new_global, opt_state = fedopt_step(global_state, new_global, own_state(server_state), spec.fedopt)
        new_server = {**new_server, **opt_state}
    check_compatible(global_state, new_global, where=f"round {round_}'s aggregate")
    if not all(torch.isfinite(t).all() for t in new_global.values() if t.is_floating_point()):
        raise AggregationError("the aggregate holds NaN or infinite values")
    new_config = method.learn(configurator_state, updates, spec)
    try:
        size = len(json.dumps(new_config, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise AggregationError(f"the configurator's state is not JSON: {exc}") from exc
    if not isinstance(new_config, dict) or size > MAX_CONFIGURATOR_BYTES:
        raise AggregationError(f"the configurator's state must be a JSON object of at most "
                               f"{MAX_CONFIGURATOR_BYTES} bytes, got {type(new_config).__name__} of {size}")
    return Aggregate(new_global, new_server, new_config, defence)


def finite_metrics(metrics: Mapping) -> dict[str, float]:
    """The numbers of an update's metrics worth keeping (finite ints and floats under str keys; a
    JSON integer too large for a float, 10**400, is dropped like a NaN, not an OverflowError)."""
    return {k: v for k, v in metrics.items() if isinstance(k, str) and finite_number(v)}


def as_update(device_id: str, accepted: Mapping, tensors: dict[str, Tensor]) -> Update:
    """The aggregation's view of one accepted record and its tensors (weight: ``n_samples``)."""
    return Update(device_id, tensors, float(accepted["n_samples"]), int(accepted["metrics"].get("train_steps", 0)),
                  accepted["metrics"], tuple(accepted["layer_steps"]) if "layer_steps" in accepted
                  else protocol1_layer_steps(accepted["metrics"]))   # a record accepted before protocol 2


def score_reports(accepted: Mapping[str, Mapping]) -> list[tuple[Mapping, float]]:
    """A score round's ``(metrics, weight)`` reports in device order: what the method's ``select`` takes."""
    return [(a["metrics"], float(a["n_samples"])) for _, a in sorted(accepted.items())]


def weighted(accepted: Mapping[str, Mapping], key: str, weight: str = "n_samples") -> float | None:
    """The mean of metric ``key`` over the accepted updates, weighted by ``n_samples`` or by another metric."""
    pairs = []
    for a in accepted.values():
        v = a["metrics"].get(key)
        w = a["metrics"].get(weight, a.get(weight, 0)) if weight != "n_samples" else a["n_samples"]
        if v is not None and w:
            pairs.append((float(v), float(w)))
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def round_row(round_: int, participants: Sequence[str], accepted: Mapping[str, Mapping], global_bytes: int,
              seconds: float, configurator: dict | None = None, defence: dict | None = None,
              delta_bytes: int | None = None) -> dict:
    """The history row of a training round that was aggregated (its accuracy is filled in by
    :func:`record_eval` once devices have evaluated the new global). ``delta_bytes``: the new
    global's compressed delta, what an in-sync device downloads instead of ``global_bytes``."""
    return {"round": round_, "participants": list(participants), "accepted": sorted(accepted),
            "weights": {d: a["n_samples"] for d, a in accepted.items()},
            "steps": {d: int(a["metrics"].get("train_steps", 0)) for d, a in accepted.items()},
            "bytes_up": sum(a["bytes"] for a in accepted.values()),
            "bytes_up_raw": sum(a.get("raw_bytes", a["bytes"]) for a in accepted.values()),
            "bytes_down": (delta_bytes or global_bytes) * len(participants),
            "bytes_down_raw": global_bytes * len(participants),
            "seconds": seconds, "train_loss": weighted(accepted, "train_loss"),
            "train_seconds": weighted(accepted, "train_seconds"), "accuracy": None, "loss": None, "final": False,
            **({"layer_steps": {d: list(a["layer_steps"]) for d, a in accepted.items() if a.get("layer_steps")}}
               if any(a.get("layer_steps") for a in accepted.values()) else {}),
            **({"configurator": configurator} if configurator else {}),
            **({"defence": defence} if defence else {})}


def describe_bytes(row: Mapping) -> str:
    """A round's traffic for the round lines: bytes up and down a device, and how much smaller than
    uncompressed."""
    def one(bytes_: int, raw: int, n: int) -> str:
        return f"{bytes_ / max(1, n) / 1e3:.1f} kB a device" + (f" ({raw / bytes_:.1f}x smaller)" if bytes_ and raw > bytes_ else "")

    up = one(row.get("bytes_up", 0), row.get("bytes_up_raw") or 0, len(row.get("accepted") or ()))
    down = one(row.get("bytes_down", 0), row.get("bytes_down_raw") or 0, len(row.get("participants") or ()))
    return f"up {up}, down {down}"


def note_privacy(history: list[dict], spec: TrainingSpec) -> None:
    """The privacy the run has spent, on the newest row when it was aggregated with DP (``spec.dp``)."""
    if history and (history[-1].get("defence") or {}).get("dp"):
        history[-1]["privacy"] = privacy_spent(history, spec.dp)


def failed_row(round_: int, participants: Sequence[str], accepted: Mapping[str, Mapping], seconds: float,
               error: str, global_from: str) -> dict:
    """The history row of a round whose aggregate failed: the global stays ``global_from``."""
    return {**round_row(round_, participants, {}, 0, seconds), "accepted": sorted(accepted),
            "bytes_up": sum(a["bytes"] for a in accepted.values()), "failed": error[:500], "global_from": global_from}


def initial_row() -> dict:
    """Row 0: the initial global, before any training (its accuracy comes from round 1's devices)."""
    return {"round": 0, "participants": [], "accepted": [], "bytes_up": 0, "bytes_down": 0, "seconds": 0.0,
            "train_loss": None, "train_seconds": None, "accuracy": None, "loss": None, "final": False}


def configurator_row(method: Method, offered: dict, updates: Sequence[Update]) -> dict:
    """What the configurator offered this round, what each device reported and what it earned."""
    return {"assignments": offered, "rewards": method.rewards(updates),
            "reports": {u.device_id: {k: v for k, v in u.metrics.items() if method.round_metric(k)}
                        for u in updates}}


def record_eval(history: list[dict], global_round: int, accepted: Mapping[str, Mapping]) -> dict | None:
    """Devices evaluated the global after ``global_round``: fill that row's accuracy and loss (each
    weighted by the examples evaluated) and the personalised accuracy where the method has one."""
    if global_round == 0 and not history:
        history.append(initial_row())
    row = next((h for h in history if h["round"] == global_round), None)
    if row is None:
        return None
    row["accuracy"] = weighted(accepted, "eval_accuracy", weight="eval_n")
    row["loss"] = weighted(accepted, "eval_loss", weight="eval_n")
    personal = weighted(accepted, "personal_accuracy", weight="personal_n")
    if personal is not None:   # methods with a personal model (FDLoRA): each device's own model
        row["personal_accuracy"] = personal
    return row
