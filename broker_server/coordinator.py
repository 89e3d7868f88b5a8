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
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from broker_server import downlink
from broker_server.enrolment import Enrolment
from broker_server.fleet import Fleet
from broker_server.ingest import Ingest
from broker_server.presence import Presence
from broker_server.publisher import Publisher
from broker_server.rounds import Rounds
from broker_server.run_state import Phase, RunState, fresh_state
from broker_server.store import Store
from edge_runtime.errors import ConfigError
from edge_runtime.methods import METHODS
from edge_runtime.protocol import topics
from edge_runtime.protocol.codec import Security, encode_tensors
from edge_runtime.protocol.messages import ProtocolError, check_id
from edge_runtime.service import lifecycle
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
                 notifier: Notifier | None = None, security: Security | None = None) -> None:
        self.cfg = cfg
        # signs what the server publishes, checks devices' signatures against the enrolment; None: insecure
        self.security = security or Security()
        self.enrolment = self.security.keys if isinstance(self.security.keys, Enrolment) else None
        if self.security.insecure:
            log.warning("INSECURE: this server signs nothing and accepts any device on its broker (--insecure)")
        self.notifier = notifier or Notifier({})
        self.store = store
        self.transport = transport
        self.clock = clock
        self.on_done = on_done
        self.inbox: queue.Queue = queue.Queue()
        self.hellos: queue.Queue = queue.Queue()   # served when the inbox is empty: updates never wait on them
        self.flushed_at = 0.0
        self._retry_at = 0.0                 # after a failed step: when to try again
        self.publisher = Publisher(transport, cfg.fleet, clock, self.security)
        self.ingest = Ingest(self)     # update manifests and chunks -> accepted updates
        self.presence = Presence(self)   # hellos, status and heartbeats -> the fleet registry
        self.rounds = Rounds(self)     # deadlines, starting and closing rounds
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

    def _load(self, state: RunState) -> None:
        """Build the in-memory view of a persisted state (at start, and after a failed step)."""
        cfg, store = self.cfg, self.store
        old = getattr(self, "fleet", None)
        self.state = state
        state["security"] = self.security.describe()   # for `broker-server status`
        self.fleet = Fleet(cfg.heartbeat_timeout_s, state.pop("devices", {}), cfg.max_devices)
        for rec in self.fleet.devices.values():  # presence is re-learnt from retained status / heartbeats
            was = old.devices.get(rec.device_id) if old else None
            rec.online, rec.last_seen, rec.last_heartbeat, rec.state = (
                (was.online, was.last_seen, was.last_heartbeat, was.state) if was else (False, 0.0, 0.0, "unknown"))
        self.global_state = store.read_tensors(store.resolve(state["global_file"]))
        self.global_blob = encode_tensors(self.global_state)
        self.delta_blob = downlink.load_delta(self)   # the global's compressed delta (compression.downlink)
        self.method = METHODS[state["training"].get("method", "lora")]
        self.spec = TrainingSpec.from_json(state["training"])
        # the round-0 global doubles as the run's init payload for methods whose devices need it
        self.init_blob = store.global_path(0).read_bytes() if self.method.needs_init else None
        # server-side optimiser state of the method (FedPepTAO's momentum, control variates): per round, like globals
        self.server_state = store.read_tensors(store.resolve(state["server_file"])) if state.get("server_file") else {}
        # the configurator's state (DropPEFT's bandit): JSON; a protocol-1 state kept it among the tensors
        self.configurator_state = (store.read_json(store.resolve(state["configurator_file"]))
                                   if state.get("configurator_file") else {})
        if not state.get("configurator_file") and self.server_state:
            self.server_state, migrated = self.method.migrate_state(self.server_state)
            if migrated:
                self.configurator_state = migrated
                log.info("migrated the %s configurator's state from the server tensors to JSON", self.method.name)

    # -- state -------------------------------------------------------------------------------
    def _fresh_state(self, run_id: str, init: dict[str, torch.Tensor]) -> RunState:
        path = self.store.global_path(0)
        self.store.write_tensors(path, init)
        config = {k: v for k, v in vars(self.cfg).items() if k != "training"}
        state = fresh_state(check_id("run_id", run_id), self.cfg.fleet, self.cfg.training, config,
                            self.store.relative(path))
        self.store.save({**state, "devices": {}})
        log.info("new run %s: %d rounds, waiting for %d device(s)", run_id, self.cfg.rounds, self.cfg.min_devices)
        return state

    def save(self) -> None:
        self.flush_registry()
        self.store.save(self.state)

    def flush_registry(self) -> None:
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
        self.flushed_at = self.clock()

    def record_error(self, what: str, exc: BaseException) -> None:
        """A failed step, where ``broker-server status`` shows it (persisted with the next save)."""
        errors = self.state.setdefault("errors", [])
        errors.append({"what": what, "error": f"{type(exc).__name__}: {exc}"[:500], "round": self.state["round"],
                       "phase": self.state["phase"], "at": self.clock()})
        del errors[:-20]
        self.notifier.status(f"{self.status_line()}; last error: {what}: {type(exc).__name__}")

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
        self.record_error(what, exc)
        self._retry_at = self.clock() + 5.0

    def status_line(self) -> str:
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
        self.notifier.ready(self.status_line())
        self.notifier.start_watchdog(lambda: lifecycle.seconds_since_progress() < (self.notifier.watchdog_s or 1), stop)
        try:
            while not stop.is_set():
                lifecycle.touch()
                self.serve_once()
                if exit_when_done and self.phase in (Phase.DONE, Phase.FAILED) and self.inbox.empty():
                    self.transport.flush(10.0)
                    return
        finally:
            try:
                self.flush_registry()   # the last second's registrations
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
            self.rounds.tick()
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
                self.ingest.on_chunk(t.device_id, payload)
                return
            if not payload:
                return  # a cleared retained message
            if t.kind in ("dev/hello", "dev/status", "dev/heartbeat"):
                self.presence.on_message(topic, t.kind, t.device_id, payload, deferred)
            elif t.kind == "dev/update":
                self.ingest.on_update_manifest(t.device_id, payload)
        except ProtocolError as exc:
            log.warning("bad message on %s: %s", topic, exc)
            self.record_reject(topic, "-", -1, str(exc))
        except Exception as exc:  # loop guard: one message never stops the server; the operator sees it
            self._step_failed(f"handling a message on {topic} ({len(payload)} bytes)", exc)
            self.record_reject(topic, "-", -1, f"internal error handling it: {type(exc).__name__}: {exc}"[:500])

    def may_speak(self, device_id: str, fresh: bool = False) -> bool:
        """The device holds an enrolled, unrevoked key (any device, in an insecure fleet); ``fresh``:
        the enrolment file checked now, not within the second."""
        return self.enrolment is None or self.enrolment.active(device_id, fresh)

    def sample_caps(self, devices) -> dict[str, int | None]:
        """The most examples each device may count with: what its hello declared (all its rows; an
        update counts its training split) and its enrolled ``max_samples`` (``devices add
        --max-samples``), the lower of the two; None where neither says."""
        caps = {}
        for d in devices:
            rec = self.fleet.devices.get(d)
            found = [c for c in (self.enrolment.max_samples(d) if self.enrolment else None,
                                 rec.n_samples if rec and rec.n_samples > 0 else None) if c]
            caps[d] = min(found) if found else None
        return caps

    def record_reject(self, who: str, update_id: str, round_: int, reason: str) -> None:
        rejects = self.state["rejects"]
        rejects.append({"from": who, "update_id": update_id, "round": round_, "reason": reason, "at": self.clock()})
        del rejects[:-100]

    # -- outbound (broker_server.publisher) ---------------------------------------------------
    def publish_retained(self) -> None:
        """(Re)publish everything a late joiner needs: presence, the global adapter, the manifest."""
        self.publisher.retained(self.state, self.global_blob, self.init_blob, self.delta_blob)

    def publish_manifest(self) -> None:
        self.publisher.manifest(self.state, self.global_blob, self.init_blob, self.delta_blob)

    def publish_summary(self, row: dict) -> None:
        self.publisher.summary(self.run_id, row)
