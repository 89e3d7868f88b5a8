"""The round coordinator: register devices, run rounds, validate and count updates, aggregate, persist.

Single-threaded by design: the transport's thread only enqueues ``(topic, payload)``; the loop in
:meth:`Coordinator.serve` handles one message at a time and calls :meth:`tick` for deadlines.
Every accepted update is on disk and listed in ``state.json`` before its ack goes out, so a
server killed at any instant neither loses an acked update nor counts one twice.

Hostile or unlucky inputs never stop the loop: a bad message is rejected with its reason; a failed
step (a full disk, a method's ``aggregate`` raising) is logged, recorded in ``state["errors"]`` for
``broker-server status``, and the in-memory state is reloaded from disk (what was persisted is the
truth) before the step is retried. Hellos wait in their own queue behind updates, and registering a
device appends one line to the registry journal instead of rewriting the state. After a restart the
server gives devices ``restart_grace_s`` to reappear before it decides anything about the open round.
"""

from __future__ import annotations

import errno
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from broker_server.fleet import Fleet, RegistryFull
from broker_server.publisher import Publisher
from broker_server.store import Store
from edge_runtime.algorithms.aggregation import Update, check_compatible
from edge_runtime.errors import AggregationError, ConfigError, EdgeRuntimeError
from edge_runtime.methods import METHODS
from edge_runtime.protocol import topics
from edge_runtime.round.server import (aggregate_checked, configurator_row, finite_metrics, record_eval, round_row,
                                        select_participants)
from edge_runtime.protocol.chunking import Reassembler, parse_chunk
from edge_runtime.protocol.codec import decode_message, decode_tensors, encode_message, encode_tensors
from edge_runtime.protocol.messages import Ack, Heartbeat, Hello, ProtocolError, Status, UpdateManifest, check_id
from edge_runtime.service import lifecycle
from edge_runtime.service.faults import crash_point
from edge_runtime.service.sdnotify import Notifier
from edge_runtime.training.spec import TrainingSpec
from edge_runtime.transport.base import Transport

log = logging.getLogger("broker_server.coordinator")


@dataclass(frozen=True)
class ServerConfig:
    fleet: str = "default"
    rounds: int = 3
    min_devices: int = 2              # online devices needed before round 1 starts
    devices_per_round: int = 0        # 0 = every online device
    quorum: float = 0.5               # share of participants that lets a round close at its deadline
    deadline_s: float = 600.0         # seconds a training round waits for updates
    eval_deadline_s: float = 120.0    # seconds the final evaluation waits for reports
    max_update_bytes: int = 64 * 1024 * 1024
    heartbeat_timeout_s: float = 90.0
    seed: int = 0
    max_participants: int = 1000      # a hard cap on one round's participants (also with devices_per_round 0)
    max_devices: int = 10_000         # registry slots; past it a new device evicts an idle one or is refused
    restart_grace_s: float = 30.0     # after a restart: time for devices to reappear before deciding anything
    max_failed_rounds: int = 3        # consecutive rounds whose aggregation failed before the run is failed
    training: dict = field(default_factory=dict)   # TrainingSpec.to_json()

    def __post_init__(self) -> None:
        check_id("fleet", self.fleet)
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        if self.min_devices < 1:
            raise ConfigError(f"min_devices must be >= 1, got {self.min_devices}")
        if not 0 < self.quorum <= 1:
            raise ConfigError(f"quorum must be in (0, 1], got {self.quorum}")
        if self.deadline_s <= 0 or self.eval_deadline_s <= 0:
            raise ConfigError("deadlines must be > 0 seconds")
        if self.max_participants < 1 or self.max_devices < 1 or self.max_failed_rounds < 1:
            raise ConfigError("max_participants, max_devices and max_failed_rounds must be >= 1")
        if self.restart_grace_s < 0:
            raise ConfigError(f"restart_grace_s must be >= 0, got {self.restart_grace_s}")


class Coordinator:
    def __init__(self, cfg: ServerConfig, store: Store, transport: Transport,
                 initial_global: Callable[[], dict[str, torch.Tensor]],
                 on_done: Callable[[dict, dict[str, torch.Tensor]], None] | None = None,
                 clock: Callable[[], float] = time.time, run_id: str | None = None,
                 notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.notifier = notifier or Notifier({})
        self.store = store
        self.transport = transport
        self.clock = clock
        self.on_done = on_done
        self.inbox: queue.Queue = queue.Queue()
        self.hellos: queue.Queue = queue.Queue()   # served when the inbox is empty: updates never wait on them
        self.reassembler = Reassembler(cfg.max_update_bytes, ttl_s=max(600.0, cfg.deadline_s))
        self.pending: dict[tuple[str, str], UpdateManifest] = {}   # (device, update id) -> manifest
        self.orphans: dict[tuple[str, str], bytes] = {}            # payloads that beat their manifest
        self.dropped_payloads: set[tuple[str, str]] = set()
        self._flushed_at = 0.0
        self._retry_at = 0.0                 # after a failed step: when to try again
        self._ticked_at = self._expired_at = 0.0
        self._eligible_since: float | None = None   # waiting for a later round: since when anyone is eligible
        self._new_devices = [0, 0.0]         # hellos of new devices since the last log line, its time
        self.publisher = Publisher(transport, cfg.fleet, clock)
        store.clean_stale_temp()
        state = store.load()
        self.grace_until = 0.0
        if state is None:
            state = self._fresh_state(run_id or f"run-{int(clock())}", initial_global())
        elif state["fleet_name"] != cfg.fleet:
            raise ConfigError(f"{store.root} holds fleet {state['fleet_name']!r}, not {cfg.fleet!r}")
        else:
            log.info("resuming run %s at round %d (%s), %d update(s) already accepted",
                     state["run_id"], state["round"], state["phase"], len(state["accepted"]))
            self.grace_until = clock() + cfg.restart_grace_s
            if not store.journal_path.exists():   # a state from before the journal: move the registry out
                store.rewrite_devices(state["devices"])
        self._load(state)

    def _load(self, state: dict) -> None:
        """Build the in-memory view of a persisted state (at start, and after a failed step)."""
        cfg, store = self.cfg, self.store
        old = getattr(self, "fleet", None)
        self.state = state
        self.fleet = Fleet(cfg.heartbeat_timeout_s, state.pop("devices", {}), cfg.max_devices)
        for rec in self.fleet.devices.values():  # presence is re-learnt from retained status / heartbeats
            was = old.devices.get(rec.device_id) if old else None
            rec.online, rec.last_seen, rec.last_heartbeat, rec.state = (
                (was.online, was.last_seen, was.last_heartbeat, was.state) if was else (False, 0.0, 0.0, "unknown"))
        self.global_state = store.read_tensors(store.resolve(state["global_file"]))
        self.global_blob = encode_tensors(self.global_state)
        self.method = METHODS[state["training"].get("method", "lora")]
        self.spec = TrainingSpec.from_json(state["training"])
        # the round-0 global doubles as the run's init payload for methods whose devices need it
        self.init_blob = store.global_path(0).read_bytes() if self.method.needs_init else None
        # server-side optimiser state of the method (FedPepTAO's momentum, control variates): per round, like globals
        self.server_state = store.read_tensors(store.resolve(state["server_file"])) if state.get("server_file") else {}

    # -- state -------------------------------------------------------------------------------
    def _fresh_state(self, run_id: str, init: dict[str, torch.Tensor]) -> dict:
        path = self.store.global_path(0)
        self.store.write_tensors(path, init)
        state = {"run_id": check_id("run_id", run_id), "fleet_name": self.cfg.fleet, "round": 0, "phase": "waiting",
                 "participants": [], "round_started_at": None, "deadline_at": None,
                 "global_file": self.store.relative(path), "accepted": {}, "history": [], "devices": {},
                 "rejects": [], "errors": [], "failed_rounds": 0, "training": self.cfg.training, "config": {k: v for k, v in vars(self.cfg).items()
                                                                          if k != "training"}}
        self.store.save(state)
        log.info("new run %s: %d rounds, waiting for %d device(s)", run_id, self.cfg.rounds, self.cfg.min_devices)
        return state

    def _save(self) -> None:
        self._flush_registry()
        self.store.save(self.state)

    def _flush_registry(self) -> None:
        """Append the registry's changed records to the journal (compacting it when it has grown)."""
        recs, gone = self.fleet.take_dirty()
        try:
            if self.store.needs_compaction(len(self.fleet.devices)):
                self.store.rewrite_devices(self.fleet.to_json())
            else:
                self.store.append_devices(recs, gone)
        except BaseException:
            self.fleet.dirty.update(r["device_id"] for r in recs)   # written next time
            self.fleet.removed.update(gone)
            raise
        self._flushed_at = self.clock()

    def _record_error(self, what: str, exc: BaseException) -> None:
        """A failed step, where ``broker-server status`` shows it (persisted with the next save)."""
        errors = self.state.setdefault("errors", [])
        errors.append({"what": what, "error": f"{type(exc).__name__}: {exc}"[:500], "round": self.state["round"],
                       "phase": self.state["phase"], "at": self.clock()})
        del errors[:-20]
        self.notifier.status(f"{self._status_line()}; last error: {what}: {type(exc).__name__}")

    def _step_failed(self, what: str, exc: BaseException) -> None:
        """Log, reload what is on disk (the persisted state is the truth), retry in a while."""
        disk_full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        if disk_full:
            log.error("%s failed: the disk is full (%s); nothing persisted is lost, retrying in 5 s", what, exc)
        else:
            log.exception("%s failed; reloading the persisted state and retrying in 5 s", what)
        errors = self.state.get("errors", [])
        try:
            state = self.store.load()
            if state is not None:
                self._load(state)
        except Exception:  # noqa: BLE001 - keep the in-memory state, still retry later
            log.exception("cannot reload the state from %s", self.store.root)
        self.state["errors"] = errors
        self._record_error(what, exc)
        self._retry_at = self.clock() + 5.0

    def _status_line(self) -> str:
        s = self.state
        return (f"run {s['run_id']}: round {s['round']} ({s['phase']}), {len(s['accepted'])}/"
                f"{len(s['participants'])} updates, {len(self.fleet.online_ids())} device(s) online")

    @property
    def run_id(self) -> str:
        return self.state["run_id"]

    @property
    def phase(self) -> str:
        return self.state["phase"]

    # -- transport wiring --------------------------------------------------------------------
    def attach(self) -> None:
        """Subscribe to device topics; every message and reconnect goes through the inbox."""
        f = self.cfg.fleet
        for kind in ("status", "heartbeat", "update", "update/chunk"):
            self.transport.subscribe(topics.device_wildcard(f, kind), lambda t, p: self.inbox.put((t, p)))
        self.transport.subscribe(topics.device_wildcard(f, "hello"), lambda t, p: self.hellos.put((t, p, False)))
        self.transport.on_connect(lambda: self.inbox.put(("__connected__", b"")))

    def serve(self, stop: threading.Event | None = None, exit_when_done: bool = True) -> None:
        stop = stop or threading.Event()
        self.attach()
        self.transport.start()
        self.notifier.ready(self._status_line())
        self.notifier.start_watchdog(lambda: lifecycle.seconds_since_progress() < (self.notifier.watchdog_s or 1), stop)
        try:
            while not stop.is_set():
                lifecycle.touch()
                self.serve_once()
                if exit_when_done and self.phase in ("done", "failed") and self.inbox.empty():
                    self.transport.flush(10.0)
                    return
        finally:
            try:
                self._flush_registry()   # the last second's registrations
            except OSError as exc:
                log.error("cannot write the fleet registry on the way out: %s", exc)

    def serve_once(self, wait_s: float = 0.2) -> None:
        """One message (updates, chunks and presence first; hellos when none is waiting), then deadlines."""
        try:
            item = self.inbox.get(timeout=wait_s if self.hellos.empty() else 0)
        except queue.Empty:
            item = None
        if item is not None:
            self.handle(*item)
        elif not self.hellos.empty():
            for _ in range(64):   # a batch: a flood of hellos drains fast, updates still come first
                try:
                    self.handle(*self.hellos.get_nowait())
                except queue.Empty:
                    break
        if self.clock() < self._retry_at:
            return
        try:
            self.tick()
        except Exception as exc:  # loop guard: a failed step is recorded and retried, it never stops the server
            self._step_failed(f"round step of round {self.state['round']} ({self.state['phase']})", exc)

    # -- inbound -----------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes, deferred: bool = False) -> None:
        """Handle one inbound message; a bad message is logged (and rejected) and changes nothing.

        Presence (heartbeat, status) of a device not registered yet goes behind the hellos once
        (``deferred``): its hello may still wait in the hello queue."""
        if topic == "__connected__":
            self.publish_retained()
            return
        try:
            t = topics.parse_topic(topic)
            if t.fleet != self.cfg.fleet or t.device_id is None:
                return
            if t.kind == "dev/update/chunk":
                self._on_chunk(t.device_id, payload)
                return
            if not payload:
                return  # a cleared retained message
            if t.kind == "dev/hello":
                self._on_hello(t.device_id, decode_message(payload, Hello))
            elif t.kind == "dev/status":
                if self.fleet.known(t.device_id):
                    self._on_status(t.device_id, decode_message(payload, Status))
                elif not deferred:
                    self.hellos.put((topic, payload, True))
            elif t.kind == "dev/heartbeat":
                hb = decode_message(payload, Heartbeat)
                if hb.device_id != t.device_id:
                    raise ProtocolError(f"heartbeat on {t.device_id}'s topic names {hb.device_id}")
                if not self.fleet.known(t.device_id):
                    if not deferred:
                        self.hellos.put((topic, payload, True))
                elif self.fleet.seen(t.device_id, self.clock(), (hb.state or "alive")[:32]):
                    log.info("device %s is back online", t.device_id)
            elif t.kind == "dev/update":
                self._on_update_manifest(t.device_id, payload)
        except ProtocolError as exc:
            log.warning("bad message on %s: %s", topic, exc)
            self._record_reject(topic, "-", -1, str(exc))
        except Exception as exc:  # loop guard: one message never stops the server; the operator sees it
            self._step_failed(f"handling a message on {topic} ({len(payload)} bytes)", exc)
            self._record_reject(topic, "-", -1, f"internal error handling it: {type(exc).__name__}: {exc}"[:500])

    def _on_hello(self, device_id: str, hello: Hello) -> None:
        if hello.device_id != device_id:
            raise ProtocolError(f"hello from topic device {device_id} names device {hello.device_id}")
        protected = set(self.state["participants"]) | set(self.state["accepted"])
        try:
            new = self.fleet.hello(device_id, hello.profile, hello.n_samples, hello.runtime_version, self.clock(),
                                   protected)
        except (ValueError, RegistryFull) as exc:
            raise ProtocolError(f"hello from {device_id} refused: {exc}") from exc
        if not new:
            log.debug("known device %s said hello (%d samples)", device_id, hello.n_samples)
            return
        self._new_devices[0] += 1
        if self._new_devices[0] <= 20:
            log.info("new device %s (%d samples, last round done %d)", device_id, hello.n_samples,
                     hello.last_round_done)
        elif self.clock() - self._new_devices[1] >= 10:   # a flood logs a count every 10 s, not a line each
            log.info("%d new devices since the start (%d registered)", self._new_devices[0], len(self.fleet.devices))
            self._new_devices[1] = self.clock()

    def _on_status(self, device_id: str, status: Status) -> None:
        if status.client_id != device_id:
            raise ProtocolError(f"status on {device_id}'s topic names {status.client_id}")
        if self.fleet.set_online(device_id, status.online, self.clock()):
            log.info("device %s is %s", device_id, "online" if status.online else "offline")

    def _reply(self, device_id: str, round_: int, update_id: str, accepted: bool, reason: str = "",
               retry: bool = False) -> None:
        ack = Ack(device_id, round_, update_id, accepted, reason, retry)
        self.transport.publish(topics.device_topic(self.cfg.fleet, device_id, "ack"), encode_message(ack), qos=1)
        if not accepted:
            log.warning("rejected update %s of %s for round %d: %s", update_id, device_id, round_, reason)
            self._record_reject(device_id, update_id, round_, reason)

    def _record_reject(self, who: str, update_id: str, round_: int, reason: str) -> None:
        rejects = self.state["rejects"]
        rejects.append({"from": who, "update_id": update_id, "round": round_, "reason": reason, "at": self.clock()})
        del rejects[:-100]

    def _on_update_manifest(self, device_id: str, payload: bytes) -> None:
        try:
            m = decode_message(payload, UpdateManifest)
        except ProtocolError as exc:
            raise ProtocolError(f"update manifest from {device_id}: {exc}") from exc
        if m.device_id != device_id:
            raise ProtocolError(f"update manifest on {device_id}'s topic names device {m.device_id}")
        verdict = self._check_manifest(m)
        if verdict is not None:
            accepted, reason = verdict
            self._reply(device_id, m.round, m.update_id, accepted, reason)
            if m.payload is not None:
                self._drop_payload(device_id, m.payload.payload_id)
            return
        if m.payload is None:  # evaluation report: metrics only
            self._accept(m, None)
            return
        key = (device_id, m.update_id)
        self.pending[key] = m
        if key in self.orphans:
            self._ingest(m, self.orphans.pop(key))

    def _check_manifest(self, m: UpdateManifest) -> tuple[bool, str] | None:
        """None if the update may proceed, else (accepted, reason) to answer right away."""
        s = self.state
        prev = s["accepted"].get(m.device_id)
        if prev is not None and prev["update_id"] == m.update_id and m.round == s["round"]:
            return True, "duplicate"
        if m.run_id != self.run_id:
            return False, f"update is for run {m.run_id}, this server runs {self.run_id}"
        if not self.fleet.known(m.device_id):
            return False, f"unknown device {m.device_id}: send hello first"
        if s["phase"] not in ("score", "train", "evaluate"):
            return False, f"no round is open (phase {s['phase']})"
        if m.round < s["round"]:
            return False, f"stale update: round {m.round} is over, the current round is {s['round']}"
        if m.round > s["round"]:
            return False, f"update for future round {m.round}; the current round is {s['round']}"
        if m.device_id not in s["participants"]:
            return False, f"{m.device_id} is not a participant of round {m.round}"
        if prev is not None:
            return False, f"round {m.round} already has update {prev['update_id']} from {m.device_id}"
        if s["phase"] == "train":
            if m.payload is None:
                return False, "a training round needs an adapter payload"
            if m.payload.payload_id != m.update_id:
                return False, f"payload id {m.payload.payload_id} must equal the update id {m.update_id}"
            if m.payload.size > self.cfg.max_update_bytes:
                return False, f"update declares {m.payload.size} bytes, over the {self.cfg.max_update_bytes}-byte limit"
            if m.n_samples < 1:
                return False, f"n_samples must be >= 1 for a training update, got {m.n_samples}"
            try:   # numbers the method's aggregation needs (DropPEFT's steps)
                self.method.check_update(m.metrics, int(m.metrics.get("train_steps", 0) or 0), self.global_state,
                                         self.spec)
            except (AggregationError, ConfigError, TypeError, ValueError) as exc:
                return False, f"bad update metrics: {exc}"
        elif m.payload is not None:
            return False, f"a{'n evaluation' if s['phase'] == 'evaluate' else ' score'} round takes metrics only, no payload"
        elif s["phase"] == "score":
            if m.n_samples < 1:
                return False, f"a score report needs n_samples >= 1 (its weight), got {m.n_samples}"
            try:  # refused here, with a reason, rather than failing the round at close
                self.method.select(self.global_state, [(m.metrics, float(m.n_samples))], self.spec)
            except (AggregationError, ConfigError) as exc:
                return False, f"bad score report: {exc}"
        return None

    def _drop_payload(self, device_id: str, payload_id: str) -> None:
        self.reassembler.discard(device_id, payload_id)
        self.orphans.pop((device_id, payload_id), None)
        self.dropped_payloads.add((device_id, payload_id))

    def _on_chunk(self, device_id: str, frame: bytes) -> None:
        try:
            header, data = parse_chunk(frame)
        except ProtocolError as exc:
            log.warning("dropped a bad chunk from %s: %s", device_id, exc)
            self._record_reject(device_id, "-", self.state["round"], f"bad chunk: {exc}")
            self._retry_pending(device_id, str(exc))
            return
        key = (device_id, header.payload.payload_id)
        if key in self.dropped_payloads:
            return
        if not self.fleet.known(device_id):
            self._drop_payload(*key)
            self._reply(device_id, self.state["round"], header.payload.payload_id, False,
                        f"unknown device {device_id}: send hello first")
            return
        try:
            ref, whole = self.reassembler.add_parsed(device_id, header, data, self.clock())
        except ProtocolError as exc:
            m = self.pending.pop(key, None)
            self._drop_payload(*key)
            self.dropped_payloads.discard(key)  # a re-send with the same id may follow
            self._reply(device_id, m.round if m else self.state["round"], header.payload.payload_id, False,
                        str(exc), retry=True)
            return
        if whole is None:
            return
        m = self.pending.pop(key, None)
        if m is None:  # chunks that beat their manifest: one payload per device, bounded in bytes in total
            for k in [k for k in self.orphans if k[0] == device_id]:
                del self.orphans[k]
            self.orphans[key] = whole
            while sum(map(len, self.orphans.values())) > 2 * self.cfg.max_update_bytes:
                self.orphans.pop(next(iter(self.orphans)))
            return
        if m.payload != ref:
            self._reply(device_id, m.round, m.update_id, False, "chunks do not match the manifest's payload", retry=True)
            return
        self._ingest(m, whole)

    def _retry_pending(self, device_id: str, reason: str) -> None:
        """A chunk too broken to name its payload: ask the device to re-send whatever it has pending."""
        for (dev, uid), m in list(self.pending.items()):
            if dev == device_id:
                self.pending.pop((dev, uid))
                self.reassembler.discard(dev, uid)
                self._reply(dev, m.round, uid, False, f"bad chunk: {reason}", retry=True)

    def _ingest(self, m: UpdateManifest, data: bytes) -> None:
        verdict = self._check_manifest(m)  # the round may have moved on while chunks arrived
        if verdict is not None:
            self._reply(m.device_id, m.round, m.update_id, *verdict)
            return
        try:
            tensors = decode_tensors(data)
            check_compatible(self.global_state, tensors, where=f"update {m.update_id} from {m.device_id}")
        except (ProtocolError, AggregationError) as exc:
            self._reply(m.device_id, m.round, m.update_id, False, str(exc))
            return
        path = self.store.update_path(m.round, m.device_id, m.update_id)
        crash_point("update:before_write")
        try:
            self.store.write_bytes(path, data)
        except OSError as exc:
            self._cannot_store(m, exc)
            return
        self._accept(m, path)

    def _cannot_store(self, m: UpdateManifest, exc: OSError) -> None:
        """A write failed (disk full): nothing changed; the device is told to back off and re-send."""
        log.error("cannot store update %s of %s: %s", m.update_id, m.device_id, exc)
        self._record_error(f"storing update {m.update_id} of {m.device_id}", exc)
        self._reply(m.device_id, m.round, m.update_id, False,
                    f"the server cannot store updates right now ({exc.strerror or exc}); back off and re-send",
                    retry=True)

    def _accept(self, m: UpdateManifest, path: Path | None) -> None:
        self.state["accepted"][m.device_id] = {
            "update_id": m.update_id, "n_samples": m.n_samples, "metrics": finite_metrics(m.metrics),
            "file": self.store.relative(path) if path else None, "bytes": m.payload.size if m.payload else 0,
            "at": self.clock()}
        self.fleet.seen(m.device_id, self.clock())
        crash_point("update:before_save")
        try:
            self._save()  # persisted before the ack: an acked update survives a crash
        except OSError as exc:   # not persisted, so not accepted: undo, the device re-sends later
            del self.state["accepted"][m.device_id]
            if path is not None:
                path.unlink(missing_ok=True)
            self._cannot_store(m, exc)
            return
        crash_point("update:before_ack")
        self._reply(m.device_id, m.round, m.update_id, True)
        log.info("accepted %s from %s for round %d (%d/%d)", "report" if path is None else "update", m.device_id,
                 m.round, len(self.state["accepted"]), len(self.state["participants"]))
        self.tick(force=True)

    # -- round lifecycle ---------------------------------------------------------------------
    def tick(self, force: bool = False) -> None:
        """Deadlines, presence, registry writes and round decisions. They walk the whole registry, so
        between messages they run at most every 0.1 s (``force``: now, after an accepted update)."""
        now = self.clock()
        if not force and now - self._ticked_at < 0.1:
            return
        self._ticked_at = now
        if now - self._expired_at >= 1.0:   # heartbeat timeouts are tens of seconds: once a second is enough
            self._expired_at = now
            gone = self.fleet.expire(now)
            if gone:
                log.info("no heartbeat from %s: marked offline", gone if len(gone) <= 10 else f"{len(gone)} devices")
        if self.fleet.dirty and now - self._flushed_at >= 1.0:   # registry changes: one append a second at most
            self._flush_registry()
        s = self.state
        if now < self.grace_until:   # just restarted: let the devices reappear before deciding anything
            eligible = set(self.fleet.eligible_ids(now))
            expected = s["participants"] or (s["history"][-1]["participants"] if s["history"] else [])
            if expected and not set(expected) <= eligible:
                return
            log.info("restart: every device of round %d is back; resuming", s["round"])
            self.grace_until = 0.0
        if s["phase"] == "waiting":
            nxt = s.get("next")
            eligible = self.fleet.eligible_ids(now)
            # a later round: as soon as --min-devices are back, or fewer once they have been back for the
            # grace period (a fleet that shrank below --min-devices still finishes its run)
            self._eligible_since = (self._eligible_since or now) if eligible else None
            if nxt and eligible and (len(eligible) >= self.cfg.min_devices
                                     or now - self._eligible_since >= self.cfg.restart_grace_s):
                self._start_round(nxt["round"], nxt["phase"])
            elif not nxt and len(eligible) >= self.cfg.min_devices:
                # methods that score layers first (FedPepTAO) open with a score round 0
                self._start_round(0, "score") if self.method.scoring else self._start_round(1, "train")
        elif s["phase"] in ("score", "train", "evaluate"):
            self._maybe_close(now)

    def _quorum_count(self) -> int:
        return max(1, math.ceil(self.cfg.quorum * len(self.state["participants"])))

    def _maybe_close(self, now: float) -> None:
        s = self.state
        accepted, participants = s["accepted"], s["participants"]
        if not participants:   # (a state saved by an older version) a round never runs without participants
            self._start_round(s["round"], s["phase"])
            return
        online = set(self.fleet.online_ids())
        waiting_on = [p for p in participants if p not in accepted and p in online]
        everyone = len(accepted) == len(participants)
        enough = len(accepted) >= self._quorum_count()
        if everyone or (enough and not waiting_on) or (enough and now >= s["deadline_at"]):
            self._close_round(now)
        elif now >= s["deadline_at"] and accepted and any(p not in accepted and p not in online
                                                          for p in participants):
            # participants that went offline do not hold the round hostage: they leave it, the quorum
            # is taken over those still in it (the next tick closes the round if that is enough)
            gone = [p for p in participants if p not in accepted and p not in online]
            s["participants"] = [p for p in participants if p not in gone]
            log.warning("round %d: %s offline at the deadline; they leave the round (%d/%d updates)", s["round"],
                        gone, len(accepted), len(s["participants"]))
            self._save()
            self._publish_manifest()
        elif now >= s["deadline_at"]:
            # not enough updates: keep what was accepted, open the round to every eligible device again
            eligible = set(self.fleet.eligible_ids(now))
            room = max(0, self.cfg.max_participants - len(participants))
            extra = sorted(eligible - set(participants))[:room]
            s["participants"] = sorted(set(participants) | set(extra))
            self._assign(extra)
            s["deadline_at"] = now + (self.cfg.eval_deadline_s if s["phase"] == "evaluate" else self.cfg.deadline_s)
            log.warning("round %d: %d/%d updates at the deadline; extending, adding %s", s["round"], len(accepted),
                        self._quorum_count(), extra)
            self._save()
            self._publish_manifest()

    def _select(self, round_: int) -> list[str]:
        """Eligible devices (online and heartbeating), sampled to ``devices_per_round``, capped at
        ``max_participants`` (keeping the devices that have done rounds first)."""
        pool = self.fleet.eligible_ids(self.clock())
        return select_participants(pool, round_, self.cfg.seed, self.cfg.devices_per_round, self.cfg.max_participants,
                                   {d: self.fleet.devices[d].rounds_done for d in pool})

    def _start_round(self, round_: int, phase: str) -> None:
        self.dropped_payloads.clear()  # ids of the last round's refused payloads: their chunks are stale now
        s = self.state
        participants = self._select(round_)
        if not participants:   # nobody to run it: wait (persisted) until a device is eligible
            s.update(phase="waiting", next={"round": round_, "phase": phase}, participants=[], accepted={})
            self._save()
            log.warning("round %d (%s) cannot start: no device is online and heartbeating; waiting", round_, phase)
            return
        s.pop("next", None)
        s.update(round=round_, phase=phase, participants=participants, accepted={},
                 round_started_at=self.clock(), assignments={}, configurator={},
                 deadline_at=self.clock() + (self.cfg.eval_deadline_s if phase == "evaluate" else self.cfg.deadline_s))
        if phase == "train":
            self._assign(s["participants"])
        self._save()
        crash_point("round:after_save")
        self.notifier.status(self._status_line())
        log.info("round %d (%s) started: participants %s", round_, phase,
                 s["participants"] if len(s["participants"]) <= 20 else f"{len(s['participants'])} devices")
        self.publish_retained()

    def _assign(self, devices: list[str]) -> None:
        """The method's per-device settings for ``devices`` this round (DropPEFT's bandit: dropout
        configurations that fit each device's memory); earlier assignments of the round stay."""
        s = self.state
        if s["phase"] != "train" or not devices:
            return
        profiles = {d: (self.fleet.devices[d].profile if d in self.fleet.devices else {}) for d in devices}
        try:
            overrides, info = self.method.assign(self.server_state, profiles, self.spec, s["round"])
        except (EdgeRuntimeError, OSError, ValueError) as exc:   # e.g. the model's config unreadable for the memory model
            log.error("round %d: the configurator failed (%s); devices train with the profile's own settings",
                      s["round"], exc)
            return
        s["assignments"] = {**overrides, **s.get("assignments", {})}
        s["configurator"] = {**info, **s.get("configurator", {})}
        for d in devices:
            if d in info:
                log.info("round %d: %s gets %s", s["round"], d, overrides[d])

    def _close_round(self, now: float) -> None:
        s = self.state
        r, accepted = s["round"], s["accepted"]
        if s["phase"] == "score":
            self._close_score_round(accepted)
            return
        self._record_eval(r - 1, accepted)
        if s["phase"] == "evaluate":
            s["history"][-1]["final"] = True
            if self.on_done:  # outputs first: a crash before "done" is saved just redoes them
                self.on_done({**s, "devices": self.fleet.to_json()}, self.global_state)
            crash_point("done:before_save")
            s["phase"] = "done"
            self._save()
            self._publish_summary(s["history"][-1])
            self._publish_manifest()
            log.info("run %s done after %d rounds", self.run_id, self.cfg.rounds)
            return
        updates = [Update(dev, self.store.read_tensors(self.store.resolve(a["file"])), float(a["n_samples"]),
                          int(a["metrics"].get("train_steps", 0)), a["metrics"]) for dev, a in sorted(accepted.items())]
        crash_point("close:before_aggregate")
        try:
            new_global, server_state = aggregate_checked(self.method, self.global_state, updates, self.server_state,
                                                         self.spec, self.fleet.active_count(accepted), r)
        except Exception as exc:  # noqa: BLE001 - a method's failure fails the round, never the server
            self._round_failed(now, updates, exc)
            return
        s["failed_rounds"] = 0
        self.server_state = server_state
        if self.server_state:  # written before the state points at it: a crash redoes the round from the old one
            server_path = self.store.root / "server" / f"round_{r:05d}.safetensors"
            self.store.write_tensors(server_path, self.server_state)
            s["server_file"] = self.store.relative(server_path)
        path = self.store.global_path(r)
        self.global_blob = self.store.write_tensors(path, new_global)
        crash_point("close:after_global_write")
        self.global_state = new_global
        for dev in accepted:
            self.fleet.worked(dev)
        s["history"].append(round_row(r, s["participants"], accepted, len(self.global_blob), now - s["round_started_at"],
                                      configurator_row(self.method, s["configurator"], updates)
                                      if s.get("configurator") else None))
        s["global_file"] = self.store.relative(path)
        log.info("round %d closed: %d update(s) averaged", r, len(accepted))
        self._start_round(r + 1, "evaluate" if r >= self.cfg.rounds else "train")
        self._prune(r)

    def _round_failed(self, now: float, updates: list[Update], exc: Exception) -> None:
        """The method could not aggregate: the round is skipped (the global stays), the failure is in the
        history and in ``errors``; after ``max_failed_rounds`` in a row the run is failed."""
        s, r = self.state, self.state["round"]
        log.error("round %d: aggregating %d update(s) failed (%s: %s); the global stays as it was", r,
                  len(updates), type(exc).__name__, exc)
        self._record_error(f"aggregating round {r}", exc)
        s["failed_rounds"] = s.get("failed_rounds", 0) + 1
        prev = self.store.global_path(r - 1)
        self.global_blob = self.store.write_tensors(self.store.global_path(r), self.global_state)
        s["history"].append({
            "round": r, "participants": list(s["participants"]), "accepted": sorted(s["accepted"]),
            "weights": {}, "steps": {}, "bytes_up": sum(a["bytes"] for a in s["accepted"].values()), "bytes_down": 0,
            "seconds": now - s["round_started_at"], "train_loss": None, "train_seconds": None, "accuracy": None,
            "loss": None, "final": False, "failed": f"{type(exc).__name__}: {exc}"[:500], "global_from": prev.name})
        s["global_file"] = self.store.relative(self.store.global_path(r))
        if s["failed_rounds"] >= self.cfg.max_failed_rounds:
            s.update(phase="failed", participants=[], accepted={})
            self._save()
            log.error("run %s failed: %d rounds in a row could not be aggregated (last: %s)", self.run_id,
                      s["failed_rounds"], exc)
            return
        self._start_round(r + 1, "evaluate" if r >= self.cfg.rounds else "train")

    def _close_score_round(self, accepted: dict) -> None:
        """Score round: the devices' layer scores give the global its layout; training starts."""
        reports = [(a["metrics"], float(a["n_samples"])) for _, a in sorted(accepted.items())]
        new_global, info = self.method.select(self.global_state, reports, self.spec)
        path = self.store.global_path(0)
        self.global_blob = self.store.write_tensors(path, new_global)
        self.global_state = new_global
        self.state["selection"] = {**info, "devices": sorted(accepted)}
        log.info("score round closed (%d device(s)): shared layers %s", len(accepted), info.get("shared_layers"))
        self._start_round(1, "train")

    def _record_eval(self, global_round: int, accepted: dict) -> None:
        """Devices evaluated the global they received (the one after ``global_round``): fill that row in."""
        row = record_eval(self.state["history"], global_round, accepted)
        if row is not None and self.state["phase"] != "evaluate":
            self._publish_summary(row)

    def _prune(self, closed_round: int) -> None:
        """Keep the update files of the last two rounds (older ones were aggregated and persisted)."""
        import shutil

        old = self.store.root / "updates" / f"round_{closed_round - 2:05d}"
        if closed_round >= 2 and old.exists():
            shutil.rmtree(old, ignore_errors=True)
        if closed_round >= 2:  # the method's server state: the current one and the one before suffice
            (self.store.root / "server" / f"round_{closed_round - 2:05d}.safetensors").unlink(missing_ok=True)

    # -- outbound (broker_server.publisher) ---------------------------------------------------
    def publish_retained(self) -> None:
        """(Re)publish everything a late joiner needs: presence, the global adapter, the manifest."""
        self.publisher.retained(self.state, self.global_blob, self.init_blob)

    def _publish_manifest(self) -> None:
        self.publisher.manifest(self.state, self.global_blob, self.init_blob)

    def _publish_summary(self, row: dict) -> None:
        self.publisher.summary(self.run_id, row)
