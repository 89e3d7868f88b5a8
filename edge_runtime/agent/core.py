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

import json
import logging
import queue
import threading
import time
from pathlib import Path

from edge_runtime.agent.config import AgentConfig
from edge_runtime.agent.fetcher import Fetcher
from edge_runtime.agent.presence import Presence
from edge_runtime.agent.state import AgentState, fresh_agent_state
from edge_runtime.agent.status import on_profile, status_of
from edge_runtime.agent.uploader import Uploader
from edge_runtime.agent.worker import RoundWorker
from edge_runtime.atomic_io import write_json_atomic
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.protocol import topics
from edge_runtime.protocol.codec import Security
from edge_runtime.protocol.messages import (Ack, GlobalAnnouncement, ProfilePush,
                                            ProtocolError, RoundManifest, Status)
from edge_runtime.service import lifecycle
from edge_runtime.service.limits import ManifestRefused
from edge_runtime.service.sdnotify import Notifier
from edge_runtime.training.data import resolve_dataset
from edge_runtime.transport.base import Transport

log = logging.getLogger("edge_runtime.agent")


class Agent:
    def __init__(self, cfg: AgentConfig, transport: Transport, clock=time.time,
                 notifier: Notifier | None = None, security: Security | None = None) -> None:
        self.cfg = cfg
        self.transport = transport
        self.security = security or Security()   # insecure unless given keys (the CLI insists on --insecure)
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
        self.last_error: dict | None = None                # the last failed round step (status shows it)
        self.bad_messages: dict = {"count": 0, "last": None}   # malformed messages ignored (status shows them)
        self.fetcher = Fetcher(self)    # the global and init payloads, manifests vetted against the limits
        self.worker = RoundWorker(self)   # the model, the plan, the round's work
        self.presence = Presence(self)    # hello, online status, heartbeats
        self._named: tuple[tuple | None, float] = (None, 0.0)   # (run, round, action) this device was named for, when
        self.uploader = Uploader(self)  # the pending update: send, re-send with backoff, the ack
        self.profile_path = Path(cfg.state_dir) / "profile.json"
        self.profile = self._load_profile()                # the device profile in force (pushed, validated)

    # -- persistence -------------------------------------------------------------------------
    def _load_state(self) -> AgentState:
        if self.state_path.exists():
            try:
                return json.loads(self.state_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise EdgeRuntimeError(f"{self.state_path}: unreadable agent state: {exc}") from exc
        return fresh_agent_state()

    def forget_attempt(self) -> None:
        if self.state.pop("attempt", None) is not None:
            self.save_state()

    def _load_profile(self) -> dict | None:
        if not self.profile_path.exists():
            return None
        try:
            return json.loads(self.profile_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise EdgeRuntimeError(f"{self.profile_path}: unreadable device profile: {exc}; move it away "
                                   f"to drop it") from exc

    def save_state(self) -> None:
        write_json_atomic(self.state_path, self.state)
        self.write_status()

    @property
    def activity(self) -> str:
        return self._activity

    @activity.setter
    def activity(self, value: str) -> None:
        if value != self._activity:
            self._activity = value
            self.write_status()

    def write_status(self, connected: bool | None = None) -> None:
        """``status.json`` for ``edge-runtime status`` and systemd's STATUS line; never fails the agent."""
        with self._status_lock:   # computed and written under one lock: the last write is the freshest
            m = getattr(self, "manifest", None)
            status = status_of(self, connected)
            try:
                write_json_atomic(self.status_path, status)
            except OSError as exc:
                log.warning("cannot write %s: %s", self.status_path, exc)
            round_text = f"round {m.round} ({m.action})" if m else "waiting for the server"
            self.notifier.status(f"{self._activity}; {round_text}; last round done {self.state.get('last_round_done')}")

    # -- transport wiring --------------------------------------------------------------------
    def attach(self) -> None:
        f, d = self.cfg.fleet, self.cfg.device_id
        put = self.enqueue
        self.transport.subscribe(topics.round_topic(f), put)
        self.transport.subscribe(topics.delta_wildcard(f), put)
        # the whole global: from the start unless a global is held (a compressed downlink may need
        # only its delta); the fetcher subscribes and unsubscribes as the run needs
        self.fetcher.want_full(not self.fetcher.global_blobs)
        self.transport.subscribe(topics.init_wildcard(f), put)
        self.transport.subscribe(topics.device_topic(f, d, "ack"), put)
        self.transport.subscribe(topics.device_topic(f, d, "profile"), put)
        self.transport.subscribe(topics.fleet_profile_topic(f), put)
        self.transport.subscribe(topics.server_status_topic(f), put)
        self.transport.on_connect(self.presence.announce)

    def enqueue(self, topic: str, payload: bytes) -> None:
        """Transport callback: inbound messages are handled on the agent's thread, in order."""
        self.inbox.put((topic, payload))

    def publish(self, topic: str, msg, qos: int = 1, retain: bool = False) -> None:
        """A control message, signed when this device has a key."""
        self.transport.publish(topic, self.security.encode(msg, topic), qos=qos, retain=retain)

    # -- main loop ---------------------------------------------------------------------------
    def run(self) -> None:
        self.attach()
        # READY first: the transport's on-connect callback sends a STATUS, which must not beat it
        self.notifier.ready(f"device {self.cfg.device_id} in fleet {self.cfg.fleet}: waiting for the server")
        self.transport.start()
        threading.Thread(target=self.presence.run, name="heartbeat", daemon=True).start()
        self.worker.probe.start_warm_up()   # the profile and the model libraries, while the first manifest is awaited
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
                    self.forget_attempt()   # a clean stop is not a failed try
                    log.info("stop requested: abandoned round %s's local work (nothing of it was persisted or "
                             "sent; the round is redone after a restart if it is still open)",
                             self.manifest.round if self.manifest else "-")
                    break
                except Exception as exc:  # loop boundary: log, back off, keep serving the fleet
                    try:
                        self.forget_attempt()
                    except OSError:   # (a full disk) the attempt counter is only advice
                        pass
                    log.exception("round step failed; retrying in 5 s")
                    self.last_error = {"error": f"{type(exc).__name__}: {exc}"[:500], "at": self.clock(),
                                       "round": self.manifest.round if self.manifest else None}
                    self.write_status()
                    self.stop_event.wait(5.0)
        finally:
            self.stop_event.set()

    def handle(self, topic: str, payload: bytes) -> None:
        """One inbound message; a malformed one is logged and ignored."""
        try:
            t = topics.parse_topic(topic)
            if t.kind in ("global/chunk", "init/chunk", "delta/chunk"):
                if payload:
                    self.fetcher.on_chunk(t.kind, payload)
            elif t.kind == "round" and payload:
                m = self.security.decode(payload, RoundManifest, topic)
                self.fetcher.check_fresh(m)
                try:
                    self.fetcher.vet(m)
                except ManifestRefused as exc:
                    self.fetcher.refuse(m, str(exc))
                    return
                before = (self.manifest.round, self.manifest.action) if self.manifest else None
                self.manifest = m
                self.fetcher.keep_init()
                if before != (self.manifest.round, self.manifest.action):
                    self.write_status()
            elif t.kind == "global" and payload:
                self.security.decode(payload, GlobalAnnouncement, topic)  # checked; the manifest names the payload
            elif t.kind == "dev/ack" and payload:
                self.uploader.on_ack(self.security.decode(payload, Ack, topic))
            elif t.kind in ("profile", "dev/profile") and payload:
                on_profile(self, self.security.decode(payload, ProfilePush, topic))
            elif t.kind == "server/status" and payload:
                status = self.security.decode(payload, Status, topic)
                if status.client_id == "server" and status.online:
                    self.presence.server_online()
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
            self.write_status()

    def step(self) -> bool:
        """Advance the state machine once; True when the run is over and the agent should exit."""
        m, s = self.manifest, self.state
        if m is None:
            return False
        if s["run_id"] != m.run_id:  # a new run: forget the old one's progress
            log.info("joining run %s", m.run_id)
            s.update(run_id=m.run_id, last_round_done=-1, pending=None)
            self.save_state()
        if s["pending"] is not None:
            self.uploader.step(m)
            return False
        if m.action == "done":
            return self.cfg.exit_when_done
        if self.cfg.device_id not in m.participants or m.round <= s["last_round_done"]:
            return False
        if self._named[0] != (m.run_id, m.round, m.action):   # when this device first saw itself named
            self._named = ((m.run_id, m.round, m.action), self.clock())
        blob = self.fetcher.global_blob(m)
        init = self.fetcher.init_blob(m)
        if blob is None or (m.init_payload is not None and init is None):
            self.activity = "fetching"
            return False
        self.worker.work(m, blob, init, fetch_s=max(0.0, self.clock() - self._named[1]))
        return False

    def shutdown(self, timeout: float = 5.0) -> None:
        """Tell the server this device is leaving (retained offline status), persist, disconnect."""
        self.stop_event.set()
        self.notifier.stopping("leaving the fleet")
        self.activity = "stopped"
        self.save_state()
        f, d = self.cfg.fleet, self.cfg.device_id
        self.publish(topics.device_topic(f, d, "status"), Status(d, False), retain=True)
        self.transport.stop(timeout)
