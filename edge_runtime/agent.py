"""The device agent: a state machine over protocol messages that trains when the server asks.

connect -> hello (retained) -> wait for a round manifest naming this device -> fetch the global
adapter (retained chunks, sha256-checked; and the run's init adapter once, for methods that need
it) -> evaluate it on the local test split -> build the device's own model where the method has
one (FDLoRA's fusion) -> train on the local train split -> persist the update -> upload (manifest +
chunks) -> wait for the ack, re-sending on timeout or on a retryable reject. Local data never
leaves the device; only the method's upload tensors do.

The agent's own state (last round done, the update awaiting its ack, the run's init adapter, the
method's personal state) lives in ``--state-dir``, so a restarted agent re-sends the same update
(same idempotency key) instead of training again, and keeps its personal adapter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import queue
import random
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_runtime import __version__
from edge_runtime.atomic_io import write_bytes_atomic, write_json_atomic
from edge_runtime.device.profiler import basic_profile
from edge_runtime.device.profiles import apply_device_profile
from edge_runtime.errors import ConfigError, DataError, EdgeRuntimeError
from edge_runtime.methods import METHODS
from edge_runtime.methods.personal import PersonalState, load_personal, save_personal
from edge_runtime.protocol import topics
from edge_runtime.round.device import device_round
from edge_runtime.protocol.chunking import MAX_CHUNK_BYTES, Reassembler, split_payload
from edge_runtime.protocol.codec import decode_message, decode_tensors, encode_message, encode_tensors
from edge_runtime.protocol.messages import (Ack, GlobalAnnouncement, Heartbeat, Hello, ProfileAck, ProfilePush,
                                            ProtocolError, RoundManifest, Status, UpdateManifest, check_id)
from edge_runtime.service import lifecycle
from edge_runtime.service.limits import ManifestLimits, ManifestRefused
from edge_runtime.service.sdnotify import Notifier
from edge_runtime.training.data import Splits, device_splits, resolve_dataset
from edge_runtime.training.spec import TrainingSpec, build_model, with_assignment
from edge_runtime.transport.base import Transport, backoff_delay

log = logging.getLogger("edge_runtime.agent")
RESEND_BACKOFF_BASE_S = 1.0     # re-sends of a refused / unacked update: 0.5-1 s, then doubling ...
RESEND_BACKOFF_CAP_S = 60.0     # ... up to a minute (jittered)
FAULT_ENV = "EDGE_RUNTIME_FAULT"   # test hook: "after_chunk:K" exits the process after sending chunk K


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    data: str
    state_dir: Path
    fleet: str = "default"
    heartbeat_s: float = 10.0
    ack_timeout_s: float = 30.0
    eval_batch_size: int = 64
    chunk_bytes: int = MAX_CHUNK_BYTES   # smaller chunks for links / brokers with small message limits
    exit_when_done: bool = True
    progress: bool = False
    plan: str = "auto"                   # "auto": fit batch / sequence / checkpointing / quantization to memory
    memory_budget: int | None = None     # act as a device with this much memory (bytes)
    test_data: str | None = None         # the device's own held-out test file (else 10% of ``data``)
    val_data: str | None = None          # the device's own validation file (else 10% of ``data``)
    limits: ManifestLimits = field(default_factory=ManifestLimits)   # what a manifest may ask of this device

    def __post_init__(self) -> None:
        check_id("device_id", self.device_id)
        check_id("fleet", self.fleet)
        if self.plan not in ("auto", "off"):
            raise EdgeRuntimeError(f"plan must be 'auto' or 'off', got {self.plan!r}")


class Agent:
    def __init__(self, cfg: AgentConfig, transport: Transport, clock=time.time,
                 notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.transport = transport
        self.clock = clock
        self._status_lock = threading.Lock()   # status.json is written from the loop and the transport thread
        self.notifier = notifier or Notifier({})
        self.inbox: queue.Queue = queue.Queue()
        self.stop_event = threading.Event()
        self._activity = "starting"
        self.state_path = Path(cfg.state_dir) / "agent.json"
        self.status_path = Path(cfg.state_dir) / "status.json"
        self.state = self._load_state()
        self.raw_data = resolve_dataset(cfg.data)          # validated now: a bad file fails at start
        for extra in (cfg.test_data, cfg.val_data):
            if extra:
                resolve_dataset(extra)
        self.manifest: RoundManifest | None = None
        cap = cfg.limits.max_payload_bytes   # one payload under it; unfinished chunks under twice that
        self.globals = Reassembler(cap, ttl_s=3600, max_buffered_bytes=2 * cap, max_per_source_bytes=2 * cap)
        self.global_blobs: dict[str, bytes] = {}           # payload id -> bytes (sha-checked)
        self.inits = Reassembler(cap, ttl_s=3600, max_buffered_bytes=2 * cap, max_per_source_bytes=2 * cap)
        self._init_candidate: tuple[str, bytes] | None = None   # a complete init payload no manifest named yet
        self.refused: dict | None = None                   # the last manifest refused, and why (status shows it)
        self.last_error: dict | None = None                # the last failed round step (status shows it)
        self.bad_messages: dict = {"count": 0, "last": None}   # malformed messages ignored (status shows them)
        self._model_key: str | None = None
        self._model = self._tokenizer = None
        self._personal: PersonalState | None = None
        self._personal_path: Path | None = None
        self._splits: dict[tuple, Splits] = {}
        self._sent_at: float | None = None
        self._retries, self._ack_wait, self._hold_until = 0, None, 0.0   # re-send backoff of the pending update
        self._rng = random.Random()
        self._device = None                                # (capabilities, budget), measured once
        self.plan_choice = None                            # the planner's last choice (status.json shows it)
        self.profile_path = Path(cfg.state_dir) / "profile.json"
        self.profile = self._load_profile()                # the device profile in force (pushed, validated)

    # -- persistence -------------------------------------------------------------------------
    def _load_state(self) -> dict:
        if self.state_path.exists():
            try:
                return json.loads(self.state_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise EdgeRuntimeError(f"{self.state_path}: unreadable agent state: {exc}") from exc
        return {"run_id": None, "last_round_done": -1, "pending": None}

    def _forget_attempt(self) -> None:
        if self.state.pop("attempt", None) is not None:
            self._save_state()

    def _load_profile(self) -> dict | None:
        if not self.profile_path.exists():
            return None
        try:
            return json.loads(self.profile_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise EdgeRuntimeError(f"{self.profile_path}: unreadable device profile: {exc}; move it away "
                                   f"to drop it") from exc

    def _save_state(self) -> None:
        write_json_atomic(self.state_path, self.state)
        self._write_status()

    @property
    def activity(self) -> str:
        return self._activity

    @activity.setter
    def activity(self, value: str) -> None:
        if value != self._activity:
            self._activity = value
            self._write_status()

    def _write_status(self, connected: bool | None = None) -> None:
        """``status.json`` for ``edge-runtime status`` and systemd's STATUS line; never fails the agent."""
        with self._status_lock:   # computed and written under one lock: the last write is the freshest
            m = self.manifest if hasattr(self, "manifest") else None
            spec = (m.training if m else {}) or {}
            acked = (self.state.get("results") or [None])[-1]
            status = {"device_id": self.cfg.device_id, "fleet": self.cfg.fleet, "pid": os.getpid(),
                      "connected": self.transport.wait_connected(0) if connected is None else connected,
                      "activity": self._activity,
                      "run_id": self.state.get("run_id"), "server_round": m.round if m else None,
                      "server_action": m.action if m else None, "last_round_done": self.state.get("last_round_done"),
                      "pending_update": (self.state.get("pending") or {}).get("update_id"),
                      "plan": {k: spec.get(k) for k in ("model", "method", "task")} | {
                          "rank": (spec.get("lora") or {}).get("rank"),
                          "batch_size": (spec.get("train") or {}).get("batch_size"),
                          "max_seq_len": (spec.get("train") or {}).get("max_seq_len")} if spec else None,
                      "last_result": acked, "updated_at": self.clock(),
                      "refused_manifest": ({k: v for k, v in self.refused.items() if k != "key"}
                                           if getattr(self, "refused", None) else None),
                      "last_error": getattr(self, "last_error", None),
                      "bad_messages": ({k: v for k, v in self.bad_messages.items() if k != "written_at"}
                                       if getattr(self, "bad_messages", None) else None),
                      "profile": ({k: self.profile.get(k) for k in ("name", "profile_id", "applies_from_round")}
                                  if getattr(self, "profile", None) else None),
                      "fitted_plan": ({**dataclasses.asdict(self.plan_choice.plan),
                                       "predicted_peak": self.plan_choice.predicted.total,
                                       "budget": self.plan_choice.budget}
                                      if getattr(self, "plan_choice", None) else None)}
            try:
                write_json_atomic(self.status_path, status)
            except OSError as exc:
                log.warning("cannot write %s: %s", self.status_path, exc)
            round_text = f"round {m.round} ({m.action})" if m else "waiting for the server"
            self.notifier.status(f"{self._activity}; {round_text}; last round done {self.state.get('last_round_done')}")

    # -- transport wiring --------------------------------------------------------------------
    def attach(self) -> None:
        f, d = self.cfg.fleet, self.cfg.device_id
        put = lambda t, p: self.inbox.put((t, p))  # noqa: E731
        self.transport.subscribe(topics.round_topic(f), put)
        self.transport.subscribe(topics.global_wildcard(f), put)
        self.transport.subscribe(topics.init_wildcard(f), put)
        self.transport.subscribe(topics.device_topic(f, d, "ack"), put)
        self.transport.subscribe(topics.device_topic(f, d, "profile"), put)
        self.transport.subscribe(topics.fleet_profile_topic(f), put)
        self.transport.on_connect(self._announce)

    def _publish_hello(self) -> None:
        f, d = self.cfg.fleet, self.cfg.device_id
        profile = {**basic_profile(), **({"memory_budget": self.cfg.memory_budget} if self.cfg.memory_budget else {})}
        hello = Hello(d, profile, __version__, len(self.raw_data), self.state["last_round_done"])
        self.transport.publish(topics.device_topic(f, d, "hello"), encode_message(hello), retain=True)

    def _announce(self) -> None:
        f, d = self.cfg.fleet, self.cfg.device_id
        self._publish_hello()
        self.transport.publish(topics.device_topic(f, d, "status"), encode_message(Status(d, True)), retain=True)
        self._heartbeat()   # at once: the server selects only devices whose heartbeats it hears
        self._write_status(connected=True)   # called on connect: the flag may not be set yet

    def _heartbeat(self) -> None:
        f, d = self.cfg.fleet, self.cfg.device_id
        round_ = self.manifest.round if self.manifest else -1
        self.transport.publish(topics.device_topic(f, d, "heartbeat"),
                               encode_message(Heartbeat(d, self.activity, round_, self.clock())), qos=0)

    def _heartbeats(self) -> None:
        """Heartbeats; and while no manifest names this device, the hello again now and then: a broker
        drops messages past a client's queue limit (a flood of retained hellos replayed to a restarted
        server), and a repeated hello of a known device costs the server nothing."""
        every = max(5.0, 5 * self.cfg.heartbeat_s)
        last_hello = time.monotonic()
        while not self.stop_event.wait(self.cfg.heartbeat_s):
            self._heartbeat()
            m = self.manifest
            if time.monotonic() - last_hello >= every and (m is None or self.cfg.device_id not in m.participants):
                last_hello = time.monotonic()
                self._publish_hello()

    # -- main loop ---------------------------------------------------------------------------
    def run(self) -> None:
        self.attach()
        # READY before the transport starts: its on-connect callback sends STATUS from its own thread,
        # and a STATUS must not beat the READY (a race one test run in three lost)
        self.notifier.ready(f"device {self.cfg.device_id} in fleet {self.cfg.fleet}: waiting for the server")
        self.transport.start()
        threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True).start()
        self.activity = "idle"
        # the watchdog pings while the main loop (or a training / evaluation step in it) makes progress
        self.notifier.start_watchdog(lambda: lifecycle.seconds_since_progress() < (self.notifier.watchdog_s or 1),
                                     self.stop_event)
        try:
            while not self.stop_event.is_set() and not lifecycle.STOP.is_set():
                lifecycle.touch()
                try:
                    topic, payload = self.inbox.get(timeout=0.2)
                    self.handle(topic, payload)
                except queue.Empty:
                    pass
                try:
                    if self.step():
                        break
                except lifecycle.Interrupted:
                    self._forget_attempt()   # a clean stop is not a failed try
                    log.info("stop requested: abandoned round %s's local work (nothing of it was persisted or "
                             "sent; the round is redone after a restart if it is still open)",
                             self.manifest.round if self.manifest else "-")
                    break
                except Exception as exc:  # loop boundary: log, back off, keep serving the fleet
                    try:
                        self._forget_attempt()
                    except OSError:   # (a full disk) the attempt counter is only advice
                        pass
                    log.exception("round step failed; retrying in 5 s")
                    self.last_error = {"error": f"{type(exc).__name__}: {exc}"[:500], "at": self.clock(),
                                       "round": self.manifest.round if self.manifest else None}
                    self._write_status()
                    self.stop_event.wait(5.0)
        finally:
            self.stop_event.set()

    def handle(self, topic: str, payload: bytes) -> None:
        """One inbound message; a malformed one is logged and ignored."""
        try:
            t = topics.parse_topic(topic)
            if t.kind == "global/chunk":
                if payload:
                    ref, whole = self.globals.add("server", payload, self.clock())
                    if whole is not None:
                        self.global_blobs[ref.payload_id] = whole
                        while len(self.global_blobs) > 2:
                            self.global_blobs.pop(next(iter(self.global_blobs)))
            elif t.kind == "init/chunk":
                if payload:
                    ref, whole = self.inits.add("server", payload, self.clock())
                    if whole is not None:  # on disk only once the run's manifest names it
                        self._init_candidate = (ref.payload_id, whole)
                        self._keep_init()
            elif t.kind == "round" and payload:
                m = decode_message(payload, RoundManifest)
                try:
                    self._vet(m)
                except ManifestRefused as exc:
                    self._refuse(m, str(exc))
                    return
                before = (self.manifest.round, self.manifest.action) if self.manifest else None
                self.manifest = m
                self._keep_init()
                if before != (self.manifest.round, self.manifest.action):
                    self._write_status()
            elif t.kind == "global" and payload:
                decode_message(payload, GlobalAnnouncement)  # validated; the manifest names the payload
            elif t.kind == "dev/ack" and payload:
                self._on_ack(decode_message(payload, Ack))
            elif t.kind in ("profile", "dev/profile") and payload:
                self._on_profile(decode_message(payload, ProfilePush))
        except ProtocolError as exc:
            log.warning("ignored a bad message on %s: %s", topic, exc)
            self._bad_message(topic, str(exc))
        except Exception as exc:  # loop guard: one message never stops the agent
            log.exception("failed to handle a message on %s (%d bytes); ignored", topic, len(payload))
            self._bad_message(topic, f"internal error handling it: {type(exc).__name__}: {exc}")

    def _bad_message(self, topic: str, reason: str) -> None:
        """Counted, and the last one kept for status.json (written at most every 5 s for a flood)."""
        b = self.bad_messages
        b["count"] += 1
        b["last"] = {"topic": topic[:200], "reason": reason[:300], "at": self.clock()}
        if self.clock() - b.get("written_at", 0) >= 5:
            b["written_at"] = self.clock()
            self._write_status()

    def _vet(self, m: RoundManifest) -> None:
        """Refuse a manifest that asks for more than this device's limits allow (any training setting,
        the payload sizes, the model)."""
        if m.action not in ("train", "score", "evaluate") or self.cfg.device_id not in m.participants:
            return   # nothing to do for this device: nothing to check
        sizes = {"global": m.global_payload.size if m.global_payload else 0,
                 "init": m.init_payload.size if m.init_payload else 0}
        training = m.training if isinstance(m.training, dict) else {}
        self.cfg.limits.check(training, sizes, len(self.raw_data))
        assignment = (m.assignments or {}).get(self.cfg.device_id)
        if assignment:
            self.cfg.limits.check({**training, **assignment, "train": {**(training.get("train") or {}),
                                                                       **(assignment.get("train") or {})}},
                                  {}, len(self.raw_data))

    def _refuse(self, m: RoundManifest, reason: str) -> None:
        key = (m.run_id, m.round, m.action, reason)
        if self.refused is None or self.refused.get("key") != list(key):
            log.warning("refused the manifest of run %s round %d (%s): %s; this device does not take part",
                        m.run_id, m.round, m.action, reason)
            self.refused = {"key": list(key), "run_id": m.run_id, "round": m.round, "reason": reason,
                            "at": self.clock()}
            self._write_status()

    def _keep_init(self) -> None:
        """Write the init payload the manifest in force names (once), and only that one."""
        m, cand = self.manifest, self._init_candidate
        if m is None or m.init_payload is None or cand is None or cand[0] != m.init_payload.payload_id:
            return
        path = self._init_path(cand[0])
        if not path.exists():
            write_bytes_atomic(path, cand[1])   # kept: a restarted device needs no retained copy
        for other in path.parent.glob("*.safetensors"):
            if other != path:
                other.unlink(missing_ok=True)
        self._init_candidate = None

    def _on_profile(self, push: ProfilePush) -> None:
        """A pushed device profile: validated against the run's spec, persisted, in force from the next
        round; a bad one is refused with the reason and the profile in force stays."""
        from edge_runtime.device.profiles import ProfileError, validate_device_profile

        current = self.profile or {}
        if current.get("profile_id") == push.profile_id:
            accepted, reason, applies = True, "already in force", current.get("applies_from_round", 0)
        elif current and push.sent_at < current.get("sent_at", 0):
            accepted, reason, applies = False, "older than the profile in force", 0
        else:
            try:
                spec = TrainingSpec.from_json(self.manifest.training) if self.manifest else None
                overrides = validate_device_profile(push.profile, spec, where=f"profile {push.profile_id}")
            except (ProfileError, EdgeRuntimeError) as exc:
                log.warning("refused device profile %s: %s (the profile in force stays)", push.profile_id, exc)
                accepted, reason, applies = False, str(exc), 0
            else:
                applies = (self.manifest.round + 1) if self.manifest else 0
                self.profile = {"profile_id": push.profile_id, "name": push.profile["name"], "overrides": overrides,
                                "applies_from_round": applies, "sent_at": push.sent_at, "received_at": self.clock()}
                write_json_atomic(self.profile_path, self.profile)
                self._write_status()
                log.info("device profile %s (%s) accepted: %s from round %d", push.profile["name"], push.profile_id,
                         overrides, applies)
                accepted, reason = True, ""
        ack = ProfileAck(self.cfg.device_id, push.profile_id, accepted, reason[:500], applies)
        self.transport.publish(topics.device_topic(self.cfg.fleet, self.cfg.device_id, "profile/ack"),
                               encode_message(ack))

    def step(self) -> bool:
        """Advance the state machine once; True when the run is over and the agent should exit."""
        m, s = self.manifest, self.state
        if m is None:
            return False
        if s["run_id"] != m.run_id:  # a new run: forget the old one's progress
            log.info("joining run %s", m.run_id)
            s.update(run_id=m.run_id, last_round_done=-1, pending=None)
            self._save_state()
        pending = s["pending"]
        if pending is not None:
            if pending["round"] != m.round:
                log.info("dropping the unacked update for round %d: the server is at round %d", pending["round"],
                         m.round)
                s["pending"] = None
                self._save_state()
            elif self.clock() >= self._hold_until and (self._sent_at is None
                                                       or self.clock() - self._sent_at > self._resend_after):
                if self._sent_at is not None:
                    log.warning("no ack for update %s after %.0f s; re-sending", pending["update_id"],
                                self._resend_after)
                    self._backoff(timeout=True)
                self._upload(pending)
            return False
        if m.action == "done":
            return self.cfg.exit_when_done
        if self.cfg.device_id not in m.participants or m.round <= s["last_round_done"]:
            return False
        blob = self.global_blobs.get(m.global_payload.payload_id) if m.global_payload else None
        init = self._init_blob(m)
        if blob is None or (m.init_payload is not None and init is None):
            self.activity = "fetching"
            return False
        self._work(m, blob, init)
        return False

    def _init_path(self, payload_id: str) -> Path:
        return Path(self.cfg.state_dir) / "init" / f"{check_id('payload_id', payload_id)}.safetensors"

    def _init_blob(self, m: RoundManifest) -> bytes | None:
        """The run's init adapter named by the manifest, from disk, if it is there and intact."""
        if m.init_payload is None:
            return None
        path = self._init_path(m.init_payload.payload_id)
        if not path.exists():
            return None
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != m.init_payload.sha256:
            log.warning("%s does not match the manifest's init payload; fetching it again", path)
            path.unlink(missing_ok=True)
            return None
        return data

    # -- the work of one round ---------------------------------------------------------------
    def _prepare(self, spec: TrainingSpec, init: bytes | None):
        shape = {k: v for k, v in spec.to_json().items() if k != "train"}   # local settings do not shape the model
        for section, keys in METHODS[spec.method].assignable.items():   # nor per-round assignments
            shape[section] = {k: v for k, v in shape[section].items() if k not in keys}
        key = json.dumps(shape, sort_keys=True) + (hashlib.sha256(init).hexdigest() if init else "")
        if key != self._model_key:
            log.info("loading %s + %s", spec.model, spec.method)
            self._model, self._tokenizer = build_model(spec)
            METHODS[spec.method].prepare(self._model, spec, decode_tensors(init) if init else None)
            self._model_key = key
            # the personal state belongs to the model's shape (not to one run): it outlives runs
            version = METHODS[spec.method].personal_format  # a new layout never reads an old file
            extra = METHODS[spec.method].personal_key(spec)  # the method's own settings
            digest = hashlib.sha256(json.dumps([spec.model, spec.task, spec.labels, spec.method, spec.lora.__dict__,
                                                version, *extra], sort_keys=True, default=str).encode()).hexdigest()[:16]
            self._personal_path = Path(self.cfg.state_dir) / "personal" / f"{spec.method}-{digest}.safetensors"
            self._personal = load_personal(self._personal_path)
            if self._personal is not None:
                log.info("personal state loaded from %s", self._personal_path)
        skey = (tuple(spec.labels), spec.split, spec.seed)
        if skey not in self._splits:
            labels = spec.labels if spec.task == "classification" else None
            data = resolve_dataset(self.cfg.data, labels)
            own = {k: resolve_dataset(getattr(self.cfg, f"{k}_data"), labels) if getattr(self.cfg, f"{k}_data")
                   else None for k in ("test", "val")}
            for k, d in own.items():
                if d is not None and d.kind != data.kind:
                    raise DataError(f"{d.source}: {d.kind} rows, but --data holds {data.kind} rows")
            rng = np.random.default_rng([spec.seed, zlib.crc32(self.cfg.device_id.encode())])
            self._splits[skey] = device_splits(data, spec.split, rng, **own)
        return self._model, self._tokenizer, self._splits[skey]

    def _keep_model_record(self, m: RoundManifest, blob: bytes, init: bytes | None) -> None:
        """What this device's own model is made of (``edge-runtime device-adapter`` exports it)."""
        folder = Path(self.cfg.state_dir) / "model"
        write_bytes_atomic(folder / "global.safetensors", blob)
        write_json_atomic(folder / "device.json", {
            "run_id": m.run_id, "global_round": max(m.round - 1, 0), "training": m.training,
            "init_file": str(self._init_path(m.init_payload.payload_id)) if init is not None else None,
            "personal_file": str(self._personal_path) if self._personal_path else None})

    def _keep_personal(self, personal: PersonalState | None) -> None:
        if personal is not None and self._personal_path is not None:
            save_personal(self._personal_path, personal)
        self._personal = personal

    def _work(self, m: RoundManifest, blob: bytes, init: bytes | None) -> None:
        timings: dict[str, float] = {}
        try:
            spec = TrainingSpec.from_json(m.training)
            if self.profile and m.round >= self.profile.get("applies_from_round", 0):
                spec = apply_device_profile(spec, self.profile["overrides"])
            spec = self._assigned(spec, m)
            spec = self._plan(spec, m)
            self.cfg.limits.check(spec.to_json(), {}, len(self.raw_data))   # with the profile and the assignment
            model, tok, splits = self._prepare(spec, init)
            method = METHODS[spec.method]
            t0 = time.perf_counter()
            method.load_trainable_state(model, decode_tensors(blob))
            timings["decode_s"] = time.perf_counter() - t0
            self._keep_model_record(m, blob, init)
        except (EdgeRuntimeError, ProtocolError) as exc:
            log.error("round %d: cannot set up training: %s; waiting for the next manifest", m.round, exc)
            self.state["last_round_done"] = m.round  # do not spin on a round we cannot do
            self._save_state()
            return
        try:
            report = device_round(method, model, tok, splits, spec, action=m.action, round_=m.round,
                                  device_id=self.cfg.device_id, personal=self._personal,
                                  eval_batch_size=self.cfg.eval_batch_size, keep_personal=self._keep_personal,
                                  train=lambda s, seed, personal: self._train_fitting(m, s, init, blob, seed),
                                  on_step=lambda step: setattr(self, "activity", step))
        except EdgeRuntimeError as exc:
            if m.action != "score":
                raise
            log.error("round %d: cannot score layers: %s", m.round, exc)
            self.state["last_round_done"] = m.round
            self._save_state()
            return
        timings.update(report.timings)
        metrics = report.metrics
        if m.action == "score":
            log.info("score round: %d layer scores from one batch in %.1f s", len(metrics), timings["score_s"])
            self._set_pending(m, None, report.n_samples, metrics, timings)
            return
        if "personal_accuracy" in metrics:
            log.info("round %d: personalised acc %.3f", m.round, metrics["personal_accuracy"])
        update_id = f"u{uuid.uuid4().hex[:20]}"
        file = None
        if report.upload is not None:
            t0 = time.perf_counter()
            file = Path(self.cfg.state_dir) / "pending" / f"{update_id}.safetensors"
            write_bytes_atomic(file, encode_tensors(report.upload))
            timings["encode_s"] = time.perf_counter() - t0
            res = report.train_result
            log.info("round %d: global acc %.3f on %d local test examples; trained %d steps in %.1f s "
                     "(loss %.3f)", m.round, metrics["eval_accuracy"], metrics["eval_n"], res.steps, res.seconds,
                     res.mean_loss)
        self._set_pending(m, file, report.n_samples, metrics, timings, update_id)

    # -- fitting the device ------------------------------------------------------------------------
    def _assigned(self, spec: TrainingSpec, m: RoundManifest) -> TrainingSpec:
        """The spec with the server's assignment for this device this round (DropPEFT's dropout
        configuration); a bad one is logged and ignored (the profile's own values train)."""
        assignment = m.assignments.get(self.cfg.device_id)
        if not assignment or m.action != "train":
            return spec
        try:
            out = with_assignment(spec, assignment)
        except ConfigError as exc:
            log.warning("round %d: ignoring the server's assignment: %s", m.round, exc)
            return spec
        log.info("round %d: the server assigned %s", m.round, assignment)
        return out

    def _capabilities(self):
        if self._device is None:
            from edge_runtime.device.planner import Capabilities
            from edge_runtime.device.profiler import profile_device
            from edge_runtime.training.models import bitsandbytes_problem

            prof = profile_device(memory_budget=self.cfg.memory_budget, disk_path=self.cfg.state_dir)
            caps = Capabilities("cuda" if prof.cuda else "cpu", False, bitsandbytes_problem() is None,
                                prof.gflops_fp32 or 50.0)   # fp16 training is not a plan option yet
            self._device = (caps, prof.training_memory)
        return self._device

    def _plan(self, spec: TrainingSpec, m: RoundManifest) -> TrainingSpec:
        """The spec with the local settings that fit this device (``--plan auto``), a step below the
        last try if that try died during this very round (the OOM killer leaves no exception)."""
        from edge_runtime.device.memory_model import load_arch
        from edge_runtime.device.planner import PlanError, choose_plan, plan_of, plan_overrides, request_from_spec
        from edge_runtime.device.planner import step_down

        attempt = self.state.get("attempt")
        if attempt and attempt.get("run_id") == m.run_id and attempt.get("round") == m.round:
            caps, _ = self._capabilities()
            last = apply_device_profile(spec, attempt["overrides"])
            smaller = step_down(plan_of(last, METHODS[spec.method]), caps)
            if smaller is not None:
                log.warning("round %d: the last try (%s) did not finish; stepping down to %s", m.round,
                            attempt["overrides"], plan_overrides(smaller))
                return apply_device_profile(spec, plan_overrides(smaller))
        if self.cfg.plan == "off" or m.action != "train":
            return spec
        caps, budget = self._capabilities()
        try:
            choice = choose_plan(load_arch(spec.model), budget, request_from_spec(spec, METHODS[spec.method]), caps)
        except (PlanError, EdgeRuntimeError, OSError) as exc:
            log.warning("no plan fits this device (%s); training as asked", exc)
            return spec
        if self.plan_choice is None or choice.plan != self.plan_choice.plan:
            log.info("plan: %s", "; ".join(choice.reasons))
        self.plan_choice = choice
        return apply_device_profile(spec, plan_overrides(choice.plan))

    def _train_fitting(self, m: RoundManifest, spec: TrainingSpec, init: bytes | None, blob: bytes, seed: int):
        """Local training (``device_round``'s ``train``); an out-of-memory error steps the plan down and
        retries the round. Returns (the model as trained, the spec as trained, the result, the personal state)."""
        import gc

        import torch

        from edge_runtime.device.planner import plan_of, plan_overrides, step_down

        oom = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), MemoryError) if t is not None)
        while True:
            model, tok, splits = self._prepare(spec, init)
            method = METHODS[spec.method]
            self.state["attempt"] = {"run_id": m.run_id, "round": m.round, "overrides": plan_overrides(plan_of(spec, METHODS[spec.method]))}
            self._save_state()   # a try the OOM killer ends is stepped down after the restart
            try:
                res, personal = method.local_train(model, tok, splits, spec, seed, self._personal,
                                                   progress=self.cfg.progress, desc=f"round {m.round}")
                self.state.pop("attempt", None)
                return model, spec, res, personal
            except oom as exc:
                smaller = step_down(plan_of(spec, METHODS[spec.method]), self._capabilities()[0])
                if smaller is None:
                    raise EdgeRuntimeError(f"round {m.round}: out of memory even at the smallest plan") from exc
                log.warning("round %d: out of memory (%s) with %s; retrying with %s", m.round,
                            str(exc)[:120], plan_overrides(plan_of(spec, METHODS[spec.method])), plan_overrides(smaller))
                spec = apply_device_profile(spec, plan_overrides(smaller))
                gc.collect()
                model, _, _ = self._prepare(spec, init)
                METHODS[spec.method].load_trainable_state(model, decode_tensors(blob))   # undo the partial steps

    @property
    def _resend_after(self) -> float:
        """Seconds to wait for the ack of a sent update before sending it again."""
        return self._ack_wait if self._ack_wait is not None else self.cfg.ack_timeout_s

    def _backoff(self, timeout: bool = False) -> float:
        """Jittered exponential backoff for re-sends, capped, so a busy or refusing server is not hammered.
        After a retryable reject the next send waits that long; after an ack timeout the update goes again
        now and the wait for its ack grows (never below the ack timeout). Returns the wait."""
        self._retries += 1
        wait = backoff_delay(self._retries - 1, self._rng, base=RESEND_BACKOFF_BASE_S, cap=RESEND_BACKOFF_CAP_S)
        if timeout:
            self._ack_wait = wait = max(wait, self.cfg.ack_timeout_s)
        else:
            self._hold_until, self._sent_at = self.clock() + wait, None
        return wait

    def _set_pending(self, m: RoundManifest, file: Path | None, n_samples: int, metrics: dict, timings: dict,
                     update_id: str | None = None) -> None:
        self.state["pending"] = {"run_id": m.run_id, "round": m.round,
                                 "update_id": update_id or f"u{uuid.uuid4().hex[:20]}",
                                 "file": str(file) if file else None, "n_samples": n_samples, "metrics": metrics,
                                 "timings": timings, "action": m.action}
        self._save_state()
        self._sent_at = None
        self._retries, self._ack_wait, self._hold_until = 0, None, 0.0

    def _upload(self, pending: dict) -> None:
        self.activity = "uploading"
        pending.setdefault("timings", {}).setdefault("first_send_at", self.clock())
        f, d = self.cfg.fleet, self.cfg.device_id
        frames, ref = [], None
        if pending["file"]:
            data = Path(pending["file"]).read_bytes()
            ref, frames = split_payload(pending["update_id"], data, self.cfg.chunk_bytes)
        m = UpdateManifest(pending["run_id"], d, pending["round"], pending["update_id"], ref,
                           pending["n_samples"], pending["metrics"])
        self.transport.publish(topics.device_topic(f, d, "update"), encode_message(m), qos=1)
        fault = os.environ.get(FAULT_ENV, "")
        for i, frame in enumerate(frames):
            self.transport.publish(topics.device_topic(f, d, "update/chunk"), frame, qos=1)
            if fault == f"after_chunk:{i}":
                self.transport.flush(5.0)
                log.error("fault injection: exiting after chunk %d", i)
                os._exit(17)
        self._sent_at = self.clock()

    def _on_ack(self, ack: Ack) -> None:
        pending = self.state["pending"]
        if pending is None or ack.update_id != pending["update_id"] or ack.device_id != self.cfg.device_id:
            return
        what = {"evaluate": "final evaluation", "score": "layer scores"}.get(pending.get("action"), "update")
        if ack.accepted:
            log.info("round %d: %s %s accepted%s", ack.round, what, ack.update_id,
                     " (duplicate)" if ack.reason == "duplicate" else "")
        elif ack.retry:
            wait = self._backoff()
            log.warning("round %d: update %s rejected (%s); re-sending in %.1f s", ack.round, ack.update_id,
                        ack.reason, wait)
            return
        else:
            log.error("round %d: update %s rejected: %s", ack.round, ack.update_id, ack.reason)
        if pending["file"]:
            Path(pending["file"]).unlink(missing_ok=True)
        t = pending.get("timings", {})
        if "first_send_at" in t:  # seconds from the first send of the update to its ack (re-sends included)
            t["upload_to_ack_s"] = self.clock() - t.pop("first_send_at")
        self.state.setdefault("timings", []).append({"round": pending["round"], **t})
        del self.state["timings"][:-100]
        self.state.setdefault("results", []).append({"round": pending["round"], "accepted": ack.accepted,
                                                     "reason": ack.reason, **pending.get("metrics", {})})
        del self.state["results"][:-20]
        self.state.update(last_round_done=pending["round"], pending=None)
        self._save_state()
        self.activity = "idle"

    def shutdown(self, timeout: float = 5.0) -> None:
        """Tell the server this device is leaving (retained offline status), persist, disconnect."""
        self.stop_event.set()
        self.notifier.stopping("leaving the fleet")
        self.activity = "stopped"
        self._save_state()
        f, d = self.cfg.fleet, self.cfg.device_id
        self.transport.publish(topics.device_topic(f, d, "status"), encode_message(Status(d, False)), retain=True)
        self.transport.stop(timeout)
