"""The round's work on the device: the model (built once per shape, with the method's personal
state), the training plan that fits the device (stepping down on out-of-memory), the data
splits, and :func:`edge_runtime.round.device.device_round`.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from edge_runtime.agent.probe import DeviceProbe
from edge_runtime.agent.residual import load_residual, stage_residual
from edge_runtime.atomic_io import write_bytes_atomic, write_json_atomic
from edge_runtime.device.memory_model import load_arch
from edge_runtime.device.planner import (TRAIN_EFFICIENCY, PlanError, calibrate_efficiency,
                                         choose_plan, plan_of, plan_overrides, predict_train_seconds,
                                         request_from_spec, step_down)
from edge_runtime.device.profiler import release_freed_memory
from edge_runtime.device.profiles import apply_device_profile
from edge_runtime.errors import ConfigError, DataError, EdgeRuntimeError
from edge_runtime.methods import METHODS
from edge_runtime.methods.personal import PersonalState, load_personal, save_personal
from edge_runtime.protocol.codec import decode_tensors
from edge_runtime.protocol.messages import ProtocolError, RoundManifest
from edge_runtime.round.device import device_round, phase_metrics
from edge_runtime.round.wire import encode_update
from edge_runtime.training.data import Splits, local_splits, resolve_dataset
from edge_runtime.training.spec import TrainingSpec, build_model, with_assignment

if TYPE_CHECKING:
    from edge_runtime.agent.core import Agent

log = logging.getLogger("edge_runtime.agent")


class RoundWorker:
    def __init__(self, agent: "Agent") -> None:
        self.agent = agent
        self._model_key: str | None = None
        self.model = self.tokenizer = None
        self.personal: PersonalState | None = None
        self.personal_path: Path | None = None
        self.splits: dict[tuple, Splits] = {}
        self.probe = DeviceProbe(agent.cfg)                # capabilities, matmul peak, the warm-up
        self.plan_choice = None                            # the planner's last choice (status.json shows it)
        self.load_s = 0.0                                  # seconds the last prepare() spent building the model

    def prepare(self, spec: TrainingSpec, init: bytes | None):
        shape = {k: v for k, v in spec.to_json().items() if k != "train"}   # local settings do not shape the model
        for section, keys in METHODS[spec.method].assignable.items():   # nor per-round assignments
            shape[section] = {k: v for k, v in shape[section].items() if k not in keys}
        key = json.dumps(shape, sort_keys=True) + (hashlib.sha256(init).hexdigest() if init else "")
        self.load_s = 0.0
        if key != self._model_key:
            log.info("loading %s + %s", spec.model, spec.method)
            t0 = time.perf_counter()
            self.model, self.tokenizer = build_model(spec)
            METHODS[spec.method].prepare(self.model, spec, decode_tensors(init) if init else None)
            self._model_key = key
            self.load_s = time.perf_counter() - t0
            # the personal state belongs to the model's shape (not to one run): it outlives runs
            version = METHODS[spec.method].personal_format  # a new layout never reads an old file
            extra = METHODS[spec.method].personal_key(spec)  # the method's own settings
            digest = hashlib.sha256(json.dumps([spec.model, spec.task, spec.labels, spec.method, spec.lora.__dict__,
                                                version, *extra], sort_keys=True, default=str).encode()
                                    ).hexdigest()[:16]
            self.personal_path = Path(self.agent.cfg.state_dir) / "personal" / f"{spec.method}-{digest}.safetensors"
            self.personal = load_personal(self.personal_path)
            if self.personal is not None:
                log.info("personal state loaded from %s", self.personal_path)
        skey = (tuple(spec.labels), spec.split, spec.seed)
        if skey not in self.splits:
            labels = spec.labels if spec.task == "classification" else None
            data = resolve_dataset(self.agent.cfg.data, labels)
            cfg = self.agent.cfg
            own = {k: resolve_dataset(getattr(cfg, f"{k}_data"), labels) if getattr(cfg, f"{k}_data")
                   else None for k in ("test", "val")}
            for k, d in own.items():
                if d is not None and d.kind != data.kind:
                    raise DataError(f"{d.source}: {d.kind} rows, but --data holds {data.kind} rows")
            self.splits[skey] = local_splits(data, spec.split, spec.seed, self.agent.cfg.device_id, **own)
        return self.model, self.tokenizer, self.splits[skey]

    def keep_model_record(self, m: RoundManifest, blob: bytes, init: bytes | None) -> None:
        """What this device's own model is made of (``edge-runtime device-adapter`` exports it)."""
        folder = Path(self.agent.cfg.state_dir) / "model"
        write_bytes_atomic(folder / "global.safetensors", blob)
        write_json_atomic(folder / "device.json", {
            "run_id": m.run_id, "global_round": max(m.round - 1, 0), "training": m.training,
            "init_file": str(self.agent.fetcher.init_path(m.init_payload.payload_id)) if init is not None else None,
            "personal_file": str(self.personal_path) if self.personal_path else None})

    def keep_personal(self, personal: PersonalState | None) -> None:
        if personal is not None and self.personal_path is not None:
            save_personal(self.personal_path, personal)
        self.personal = personal

    def work(self, m: RoundManifest, blob: bytes, init: bytes | None, fetch_s: float = 0.0) -> None:
        """The round of manifest ``m`` on global ``blob``; ``fetch_s``: seconds from the manifest naming
        this device to the global in hand (the download, or a delta's rebuild)."""
        timings: dict[str, float] = {"fetch_s": fetch_s}
        self.probe.wait()   # a running warm-up does what the round would do first
        try:
            spec = TrainingSpec.from_json(m.training)
            if self.agent.profile and m.round >= self.agent.profile.get("applies_from_round", 0):
                spec = apply_device_profile(spec, self.agent.profile["overrides"])
            spec = self.assigned(spec, m)
            spec = self.plan(spec, m)
            # again with the profile and the assignment applied
            self.agent.cfg.limits.check(spec.to_json(), {}, len(self.agent.raw_data))
            model, tok, splits = self.prepare(spec, init)
            timings["load_s"] = self.load_s
            method = METHODS[spec.method]
            t0 = time.perf_counter()
            base = decode_tensors(blob)
            method.load_trainable_state(model, base)
            timings["decode_s"] = time.perf_counter() - t0
            self.keep_model_record(m, blob, init)
        except (EdgeRuntimeError, ProtocolError) as exc:
            log.error("round %d: cannot set up training: %s; waiting for the next manifest", m.round, exc)
            self.agent.state["last_round_done"] = m.round  # do not spin on a round we cannot do
            self.agent.save_state()
            return
        try:
            report = device_round(method, model, tok, splits, spec, action=m.action, round_=m.round,
                                  device_id=self.agent.cfg.device_id, personal=self.personal,
                                  eval_batch_size=self.agent.cfg.eval_batch_size, keep_personal=self.keep_personal,
                                  train=lambda s, seed, personal: self.train_fitting(m, s, init, blob, seed),
                                  on_step=lambda step: setattr(self.agent, "activity", step))
        except EdgeRuntimeError as exc:
            if m.action != "score":
                raise
            log.error("round %d: cannot score layers: %s", m.round, exc)
            self.agent.state["last_round_done"] = m.round
            self.agent.save_state()
            return
        timings.update(report.timings)
        metrics = report.metrics
        if m.action == "score":
            log.info("score round: %d layer scores from one batch in %.1f s", len(metrics), timings["score_s"])
            self.agent.uploader.set_pending(m, None, report.n_samples, metrics, timings)
            return
        if "personal_accuracy" in metrics:
            log.info("round %d: personalised acc %.3f", m.round, metrics["personal_accuracy"])
        update_id = f"u{uuid.uuid4().hex[:20]}"
        file = staged = None
        if report.upload is not None:
            t0 = time.perf_counter()
            file, staged = self.write_upload(m, spec, report.upload, base, update_id)
            timings["encode_s"] = time.perf_counter() - t0
            self.add_timings(metrics, timings, spec)
            res = report.train_result
            log.info("round %d: global acc %s on %d local test examples; trained %d steps in %.1f s "
                     "(loss %.3f)", m.round, f"{metrics['eval_accuracy']:.3f}" if "eval_accuracy" in metrics
                     else "(not evaluated)", metrics.get("eval_n", 0), res.steps, res.seconds, res.mean_loss)
        self.agent.uploader.set_pending(m, file, report.n_samples, metrics, timings, update_id,
                                        layer_steps=report.layer_steps, residual_file=staged)
        release_freed_memory()   # the round's activations: the system's again while the device waits

    def write_upload(self, m: RoundManifest, spec: TrainingSpec, upload: dict, base: dict,
                     update_id: str) -> tuple[Path, str | None]:
        """The update's bytes under ``pending/`` (compressed as the run says, from ``base``, the global
        it trained from), and the error-feedback residual staged beside it (None without one)."""
        file = Path(self.agent.cfg.state_dir) / "pending" / f"{update_id}.safetensors"
        feedback = spec.compression.error_feedback and spec.compression.compresses_uplink
        residual = load_residual(self.agent.cfg.state_dir, m.run_id, upload) if feedback else None
        data, residual = encode_update(upload, base, spec.compression, residual)
        write_bytes_atomic(file, data)
        return file, (str(stage_residual(file, residual, m.run_id)) if residual is not None else None)

    def assigned(self, spec: TrainingSpec, m: RoundManifest) -> TrainingSpec:
        """The spec with the server's assignment for this device this round (DropPEFT's dropout
        configuration); a bad one is logged and ignored (the profile's own values train)."""
        assignment = m.assignments.get(self.agent.cfg.device_id)
        if not assignment or m.action != "train":
            return spec
        try:
            out = with_assignment(spec, assignment)
        except ConfigError as exc:
            log.warning("round %d: ignoring the server's assignment: %s", m.round, exc)
            return spec
        log.info("round %d: the server assigned %s", m.round, assignment)
        return out

    def add_timings(self, metrics: dict, timings: dict, spec: TrainingSpec | None = None) -> None:
        """The round's phase seconds into the update's metrics, and where the device profiled itself
        (``--plan auto``: the probe is not run just for this; the warm-up runs it before the first round)
        the training's share of its measured fp32 matmul peak and the time model's prediction of the
        training seconds (``predicted_train_s``, at the efficiency the device's last round measured)."""
        metrics.update(phase_metrics(timings))
        peak = self.probe.peak
        if peak and "train_gflops_per_s" in metrics:
            metrics.update(peak_gflops=peak, train_peak_share=metrics["train_gflops_per_s"] / peak)
        if self.probe.device is not None and spec is not None and metrics.get("train_padded_tokens"):
            arch, plan = load_arch(spec.model), plan_of(spec, METHODS[spec.method])
            efficiency = self.agent.state.get("train_efficiency")
            efficiency = efficiency if isinstance(efficiency, dict) else {}
            last = efficiency.get(spec.model)
            tokens = metrics["train_padded_tokens"]
            metrics["predicted_train_s"] = predict_train_seconds(
                arch, plan, self.probe.device[0], tokens, last if isinstance(last, float) and last > 0 else TRAIN_EFFICIENCY)
            steps_s = metrics["train_seconds"] - metrics.get("cache_build_s", 0.0)   # the cache is built once, not per round
            efficiency[spec.model] = calibrate_efficiency(arch, plan, self.probe.device[0], tokens, steps_s)
            self.agent.state["train_efficiency"] = efficiency   # saved with the pending update

    def capabilities(self):
        """(what this device can run, its training memory), profiled once."""
        return self.probe.capabilities()

    def plan(self, spec: TrainingSpec, m: RoundManifest) -> TrainingSpec:
        """The spec with the local settings that fit this device (``--plan auto``), a step below the
        last try if that try died during this very round (the OOM killer leaves no exception)."""
        attempt = self.agent.state.get("attempt")
        if attempt and attempt.get("run_id") == m.run_id and attempt.get("round") == m.round:
            caps, _ = self.capabilities()
            last = apply_device_profile(spec, attempt["overrides"])
            smaller = step_down(plan_of(last, METHODS[spec.method]), caps)
            if smaller is not None:
                log.warning("round %d: the last try (%s) did not finish; stepping down to %s", m.round,
                            attempt["overrides"], plan_overrides(smaller))
                return apply_device_profile(spec, plan_overrides(smaller))
        if self.agent.cfg.plan == "off" or m.action != "train":
            return spec
        caps, budget = self.capabilities()
        try:
            choice = choose_plan(load_arch(spec.model), budget, request_from_spec(spec, METHODS[spec.method]), caps)
        except (PlanError, EdgeRuntimeError, OSError) as exc:
            log.warning("no plan fits this device (%s); training as asked", exc)
            return spec
        if self.plan_choice is None or choice.plan != self.plan_choice.plan:
            log.info("plan: %s", "; ".join(choice.reasons))
        self.plan_choice = choice
        return apply_device_profile(spec, plan_overrides(choice.plan))

    def train_fitting(self, m: RoundManifest, spec: TrainingSpec, init: bytes | None, blob: bytes, seed: int):
        """Local training (``device_round``'s ``train``); an out-of-memory error steps the plan down and
        retries the round. Returns (the model as trained, the result, the personal state)."""
        oom = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), MemoryError) if t is not None)
        while True:
            model, tok, splits = self.prepare(spec, init)
            method = METHODS[spec.method]
            self.agent.state["attempt"] = {"run_id": m.run_id, "round": m.round,
                                           "overrides": plan_overrides(plan_of(spec, method))}
            self.agent.save_state()   # a try the OOM killer ends is stepped down after the restart
            try:
                res, personal = method.local_train(model, tok, splits, spec, seed, self.personal,
                                                   progress=self.agent.cfg.progress, desc=f"round {m.round}")
                self.agent.state.pop("attempt", None)
                return model, res, personal
            except oom as exc:
                smaller = step_down(plan_of(spec, METHODS[spec.method]), self.capabilities()[0])
                if smaller is None:
                    raise EdgeRuntimeError(f"round {m.round}: out of memory even at the smallest plan") from exc
                log.warning("round %d: out of memory (%s) with %s; retrying with %s", m.round,
                            str(exc)[:120], plan_overrides(plan_of(spec, method)), plan_overrides(smaller))
                spec = apply_device_profile(spec, plan_overrides(smaller))
                gc.collect()
                model, _, _ = self.prepare(spec, init)
                METHODS[spec.method].load_trainable_state(model, decode_tensors(blob))   # undo the partial steps
