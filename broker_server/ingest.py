"""Updates coming in: update manifests, their chunks, reassembly, the checks, and acceptance.

Every accepted update is on disk and listed in ``state.json`` before its ack goes out, so a server
killed at any instant neither loses an acked update nor counts one twice. A refused one is answered
with its reason (retryable where re-sending can succeed) and changes nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from broker_server.run_state import OPEN, Phase
from edge_runtime.algorithms.aggregation import check_compatible
from edge_runtime.errors import AggregationError, ConfigError
from edge_runtime.protocol import topics
from edge_runtime.protocol.chunking import Reassembler, parse_chunk
from edge_runtime.protocol.codec import encode_tensors
from edge_runtime.protocol.messages import Ack, ProtocolError, UpdateManifest
from edge_runtime.round.server import as_update, finite_metrics
from edge_runtime.round.wire import decode_update
from edge_runtime.service.faults import crash_point

if TYPE_CHECKING:
    from broker_server.coordinator import Coordinator

log = logging.getLogger("broker_server.coordinator")


class Ingest:
    """The coordinator's inbound update path; ``run`` is the coordinator (its state, store, fleet, method)."""

    def __init__(self, run: "Coordinator") -> None:
        self.run = run
        cfg = run.cfg
        self.reassembler = Reassembler(cfg.max_update_bytes, ttl_s=max(600.0, cfg.deadline_s))
        self.pending: dict[tuple[str, str], UpdateManifest] = {}   # (device, update id) -> manifest
        self.orphans: dict[tuple[str, str], tuple] = {}    # (ref, bytes) of payloads that beat their manifest
        self.dropped_payloads: set[tuple[str, str]] = set()        # refused payloads whose chunks are ignored

    def _reply(self, device_id: str, round_: int, update_id: str, accepted: bool, reason: str = "",
               retry: bool = False) -> None:
        ack = Ack(device_id, round_, update_id, accepted, reason, retry)
        self.run.publisher.publish(topics.device_topic(self.run.cfg.fleet, device_id, "ack"), ack, qos=1)
        if not accepted:
            log.warning("rejected update %s of %s for round %d: %s", update_id, device_id, round_, reason)
            self.run.record_reject(device_id, update_id, round_, reason)

    def on_update_manifest(self, device_id: str, payload: bytes) -> None:
        try:   # signed by the device's enrolled key (a secured fleet): checked before anything else
            m = self.run.security.decode(payload, UpdateManifest,
                                         topics.device_topic(self.run.cfg.fleet, device_id, "update"))
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
            ref, whole = self.orphans.pop(key)
            if ref != m.payload:   # the signed manifest names the payload: chunks of another one are not it
                self.pending.pop(key)
                self._reply(device_id, m.round, m.update_id, False, "chunks do not match the manifest's payload",
                            retry=True)
                return
            self._ingest(m, whole)

    def _check_manifest(self, m: UpdateManifest) -> tuple[bool, str] | None:
        """None if the update may proceed, else (accepted, reason) to answer right away."""
        s = self.run.state
        prev = s["accepted"].get(m.device_id)
        if prev is not None and prev["update_id"] == m.update_id and m.round == s["round"]:
            return True, "duplicate"
        if m.run_id != self.run.run_id:
            return False, f"update is for run {m.run_id}, this server runs {self.run.run_id}"
        if not self.run.fleet.known(m.device_id):
            return False, f"unknown device {m.device_id}: send hello first"
        if s["phase"] not in OPEN:
            return False, f"no round is open (phase {s['phase']})"
        if m.round < s["round"]:
            return False, f"stale update: round {m.round} is over, the current round is {s['round']}"
        if m.round > s["round"]:
            return False, f"update for future round {m.round}; the current round is {s['round']}"
        if m.device_id not in s["participants"]:
            return False, f"{m.device_id} is not a participant of round {m.round}"
        if prev is not None:
            return False, f"round {m.round} already has update {prev['update_id']} from {m.device_id}"
        if s["phase"] == Phase.TRAIN:
            if m.payload is None:
                return False, "a training round needs an adapter payload"
            if m.payload.payload_id != m.update_id:
                return False, f"payload id {m.payload.payload_id} must equal the update id {m.update_id}"
            if m.payload.size > self.run.cfg.max_update_bytes:
                return False, f"update declares {m.payload.size} bytes, over the {self.run.cfg.max_update_bytes}-byte limit"
            if m.n_samples < 1:
                return False, f"n_samples must be >= 1 for a training update, got {m.n_samples}"
            try:   # numbers the method's aggregation needs (DropPEFT's per-block steps)
                self.run.method.check_update(as_update(m.device_id, self._record(m, None), {}), self.run.global_state,
                                             self.run.spec)
            except (AggregationError, ConfigError, TypeError, ValueError) as exc:
                return False, f"bad update metrics: {exc}"
        elif m.payload is not None:
            return False, f"a{'n evaluation' if s['phase'] == 'evaluate' else ' score'} round takes metrics only, no payload"
        elif s["phase"] == Phase.SCORE:
            if m.n_samples < 1:
                return False, f"a score report needs n_samples >= 1 (its weight), got {m.n_samples}"
            try:  # refused here, with a reason, rather than failing the round at close
                self.run.method.select(self.run.global_state, [(m.metrics, float(m.n_samples))], self.run.spec)
            except (AggregationError, ConfigError) as exc:
                return False, f"bad score report: {exc}"
        return None

    def _drop_payload(self, device_id: str, payload_id: str) -> None:
        self.reassembler.discard(device_id, payload_id)
        self.orphans.pop((device_id, payload_id), None)
        self.dropped_payloads.add((device_id, payload_id))

    def on_chunk(self, device_id: str, frame: bytes) -> None:
        try:
            header, data = parse_chunk(frame)
        except ProtocolError as exc:
            log.warning("dropped a bad chunk from %s: %s", device_id, exc)
            self.run.record_reject(device_id, "-", self.run.state["round"], f"bad chunk: {exc}")
            self._retry_pending(device_id, str(exc))
            return
        key = (device_id, header.payload.payload_id)
        if key in self.dropped_payloads:
            return
        if not self.run.may_speak(device_id):   # not enrolled, or revoked: buffered nowhere, answered never
            return
        if not self.run.fleet.known(device_id):
            self._drop_payload(*key)
            self._reply(device_id, self.run.state["round"], header.payload.payload_id, False,
                        f"unknown device {device_id}: send hello first")
            return
        try:
            ref, whole = self.reassembler.add_parsed(device_id, header, data, self.run.clock())
        except ProtocolError as exc:
            m = self.pending.pop(key, None)
            self._drop_payload(*key)
            self.dropped_payloads.discard(key)  # a re-send with the same id may follow
            self._reply(device_id, m.round if m else self.run.state["round"], header.payload.payload_id, False,
                        str(exc), retry=True)
            return
        if whole is None:
            return
        m = self.pending.pop(key, None)
        if m is None:  # chunks that beat their manifest: one payload per device, bounded in bytes in total
            for k in [k for k in self.orphans if k[0] == device_id]:
                del self.orphans[k]
            self.orphans[key] = (ref, whole)
            while sum(len(w) for _, w in self.orphans.values()) > 2 * self.run.cfg.max_update_bytes:
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
        compression = self.run.spec.compression
        try:   # a compressed delta comes back as the state it stands for: the checks see real values
            tensors = decode_update(data, self.run.global_state, compression)
            check_compatible(self.run.global_state, tensors, where=f"update {m.update_id} from {m.device_id}")
        except (ProtocolError, AggregationError) as exc:
            self._reply(m.device_id, m.round, m.update_id, False, str(exc))
            return
        stored = encode_tensors(tensors) if compression.compresses_uplink else data
        path = self.run.store.update_path(m.round, m.device_id, m.update_id)
        crash_point("update:before_write")
        try:
            self.run.store.write_bytes(path, stored)
        except OSError as exc:
            self._cannot_store(m, exc)
            return
        self._accept(m, path, raw=len(stored))

    def _cannot_store(self, m: UpdateManifest, exc: OSError) -> None:
        """A write failed (disk full): nothing changed; the device is told to back off and re-send."""
        log.error("cannot store update %s of %s: %s", m.update_id, m.device_id, exc)
        self.run.record_error(f"storing update {m.update_id} of {m.device_id}", exc)
        self._reply(m.device_id, m.round, m.update_id, False,
                    f"the server cannot store updates right now ({exc.strerror or exc}); back off and re-send",
                    retry=True)

    def _record(self, m: UpdateManifest, path: Path | None, raw: int | None = None) -> dict:
        """The accepted record of ``m`` (see :mod:`edge_runtime.round.server`)."""
        size = m.payload.size if m.payload else 0
        return {"update_id": m.update_id, "n_samples": m.n_samples, "metrics": finite_metrics(m.metrics),
                "layer_steps": list(m.layer_steps), "file": self.run.store.relative(path) if path else None,
                "bytes": size, "raw_bytes": size if raw is None else raw, "at": self.run.clock()}

    def _accept(self, m: UpdateManifest, path: Path | None, raw: int | None = None) -> None:
        if not self.run.may_speak(m.device_id, fresh=True):   # revoked since its manifest was checked
            log.warning("refused %s from %s: the device was revoked", m.update_id, m.device_id)
            self.run.record_reject(m.device_id, m.update_id, m.round, "the device was revoked")
            if path is not None:
                path.unlink(missing_ok=True)
            return
        self.run.state["accepted"][m.device_id] = self._record(m, path, raw)
        self.run.fleet.seen(m.device_id, self.run.clock())
        crash_point("update:before_save")
        try:
            self.run.save()  # persisted before the ack: an acked update survives a crash
        except OSError as exc:   # not persisted, so not accepted: undo, the device re-sends later
            del self.run.state["accepted"][m.device_id]
            if path is not None:
                path.unlink(missing_ok=True)
            self._cannot_store(m, exc)
            return
        crash_point("update:before_ack")
        self._reply(m.device_id, m.round, m.update_id, True)
        log.info("accepted %s from %s for round %d (%d/%d)", "report" if path is None else "update", m.device_id,
                 m.round, len(self.run.state["accepted"]), len(self.run.state["participants"]))
        self.run.rounds.tick(force=True)
