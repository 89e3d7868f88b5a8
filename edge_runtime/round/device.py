"""A device's part of one round: evaluate the received global, personalise, train, build the upload.

:func:`device_round` is the same for every method and every caller: the agent calls it with the
model it built and loaded with the global (and its own out-of-memory fitting as ``train``), the
simulation with its shared model and the plain loop; the seeds come from the run's seed, the round
and the device id only, so the same device trains the same way wherever it runs.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import Tensor

from edge_runtime.device.profiler import PeakRss, release_freed_memory
from edge_runtime.methods.base import Method
from edge_runtime.methods.personal import PersonalState
from edge_runtime.training.data import Splits
from edge_runtime.training.evaluate import evaluate
from edge_runtime.training.spec import TrainingSpec
from edge_runtime.training.throughput import throughput_metrics
from edge_runtime.training.trainer import TrainResult

# train(spec, seed, personal) -> (model as trained, result, personal): the agent's fitting loop steps
# the plan down on out-of-memory and may rebuild the model
Train = Callable[[TrainingSpec, int, "PersonalState | None"], tuple[Any, TrainResult, "PersonalState | None"]]


@dataclass
class DeviceReport:
    """What one device reports for a round (the update manifest's numbers and the upload)."""

    metrics: dict[str, float]             # eval_* of the received global, personal_*, the method's training numbers
    n_samples: int                        # the update's weight: local training examples (0: nothing trained)
    upload: dict[str, Tensor] | None      # the method's trainable state after training (train rounds only)
    personal: PersonalState | None        # the method's device-side state, to keep
    timings: dict[str, float] = field(default_factory=dict)
    train_result: TrainResult | None = None

    @property
    def layer_steps(self) -> tuple[int, ...]:
        """The steps each transformer block ran (the update's ``layer_steps``; () when not recorded)."""
        return tuple(self.train_result.layer_steps) if self.train_result else ()


def device_key(device_id: str) -> int:
    """A small number from the device id (seeds; the same on every platform)."""
    return zlib.crc32(device_id.encode()) % 1000


def train_seed(spec: TrainingSpec, round_: int, device_id: str) -> int:
    """The local training seed of ``device_id`` in ``round_``."""
    return spec.seed * 1_000_003 + round_ * 1009 + device_key(device_id)


def score_seed(spec: TrainingSpec, device_id: str) -> int:
    """The seed of a device's layer scoring (the run's score round)."""
    return spec.seed * 1000 + device_key(device_id)


def phase_metrics(timings: Mapping[str, float]) -> dict[str, float]:
    """A round's phase seconds as update metrics (``t_<phase>``: ``t_eval_s``, ``t_train_s``, ...),
    so the server's history shows where each device's round went."""
    return {f"t_{k}": float(v) for k, v in timings.items() if k.endswith("_s")}


def device_round(method: Method, model, tokenizer, splits: Splits, spec: TrainingSpec, *, action: str, round_: int,
                 device_id: str, personal: PersonalState | None, eval_batch_size: int = 64,
                 train: Train | None = None, keep_personal: Callable[[PersonalState | None], None] | None = None,
                 on_step: Callable[[str], None] = lambda step: None, progress: bool = False) -> DeviceReport:
    """One device's round on ``model`` (built for ``spec``, the global already loaded).

    ``action``: "score" (layer scores from one batch, nothing trained), "evaluate" (the final
    global: metrics only) or "train". ``keep_personal`` is called with the personal state as soon
    as personalisation changed it and again after training (the agent persists it there);
    ``on_step`` with "scoring", "evaluating" and "training" as each starts (the agent's status)."""
    timings: dict[str, float] = {}
    if action == "score":
        on_step("scoring")
        t0 = time.perf_counter()
        metrics = method.score(model, tokenizer, splits, spec, seed=score_seed(spec, device_id))
        timings["score_s"] = time.perf_counter() - t0
        return DeviceReport(dict(metrics), len(splits.train), None, personal, timings)
    metrics: dict[str, float] = {}
    if action != "train" or spec.eval.evaluates(round_ - 1):   # the final global: always, and whole
        on_step("evaluating")
        t0 = time.perf_counter()
        test = splits.test if action != "train" else spec.eval.subset(splits.test, score_seed(spec, device_id))
        ev = evaluate(model, tokenizer, test, eval_batch_size, spec.train.max_seq_len,
                      cache_mb=spec.train.cache_mb if spec.train.cache_frozen else None, precision=spec.train.precision)
        timings["eval_s"] = time.perf_counter() - t0
        metrics.update(eval_accuracy=ev.accuracy, eval_loss=ev.loss, eval_n=ev.n)
    t0 = time.perf_counter()
    personal_metrics, personal = method.personalise(model, tokenizer, splits, spec, personal, eval_batch_size)
    if personal_metrics:
        timings["personalise_s"] = time.perf_counter() - t0
        metrics.update(personal_metrics)
        if keep_personal:
            keep_personal(personal)
    if action != "train":
        return DeviceReport(metrics, 0, None, personal, timings)
    on_step("training")
    seed = train_seed(spec, round_, device_id)
    if train is None:
        def train(s, sd, p):   # noqa: E306 - the plain loop: no fitting
            res, p = method.local_train(model, tokenizer, splits, s, sd, p, progress=progress, desc=f"round {round_}")
            return model, res, p
    release_freed_memory()   # what evaluation and the last round freed: the increment starts from live memory
    with PeakRss() as rss:   # the round's training peak, as the device's memory telemetry
        model, res, personal = train(spec, seed, personal)
    if keep_personal:
        keep_personal(personal)
    metrics.update(res.metrics)
    metrics.update(train_loss=res.mean_loss, train_seconds=res.seconds, train_steps=res.steps,
                   rss_start_mb=rss.start / 2**20, rss_peak_mb=rss.peak / 2**20)
    if res.padded_tokens:
        metrics.update(throughput_metrics(res.tokens, res.padded_tokens, res.flops, res.seconds))
    timings["train_s"] = res.seconds
    metrics.update(phase_metrics(timings))
    return DeviceReport(metrics, len(splits.train), method.trainable_state(model), personal, timings, res)
