"""Everything the aggregation server publishes: its presence, the global and the run's init payload
(retained chunks, each payload cut and hashed once), the round manifest and round summaries.

It holds no round state: the coordinator passes the persisted state and the blobs in force.
"""

from __future__ import annotations

import hashlib
from typing import Callable

from broker_server.run_state import ANNOUNCED
from edge_runtime.protocol import topics
from edge_runtime.protocol.chunking import split_payload
from edge_runtime.protocol.codec import Security
from edge_runtime.protocol.messages import (GlobalAnnouncement, PayloadRef,
                                            RoundManifest, RoundSummary,
                                            Status)
from edge_runtime.transport.base import Transport


class Publisher:
    def __init__(self, transport: Transport, fleet: str, clock: Callable[[], float],
                 security: Security | None = None) -> None:
        self.transport, self.fleet, self.clock = transport, fleet, clock
        self.security = security or Security()
        self._framed: dict[str, tuple[bytes, PayloadRef, list[bytes]]] = {}   # what was last cut into chunks
        self._digest: tuple[bytes | None, str] = (None, "")         # the global in force, its sha256
        self._delta_digest: tuple[bytes | None, str] = (None, "")   # its delta, the delta's sha256

    def frames(self, payload_id: str, blob: bytes) -> tuple[PayloadRef, list[bytes]]:
        """``split_payload``, computed once per payload: manifests re-published every few seconds name it."""
        got = self._framed.get(payload_id)
        if got is not None and got[0] is blob:
            return got[1], got[2]
        ref, frames = split_payload(payload_id, blob)
        # one of each kind: the run's init payload ("init-"), the latest global ("g"), its delta ("d")
        self._framed = {k: v for k, v in self._framed.items() if k[0] != payload_id[0]} | {
            payload_id: (blob, ref, frames)}
        return ref, frames

    def global_payload(self, state: dict, blob: bytes) -> tuple[PayloadRef, list[bytes]]:
        """The global in force, named by its round and content (a score round replaces round 0's
        global, and a device's cached copy must not stand in for the new one)."""
        if self._digest[0] is not blob:
            self._digest = (blob, hashlib.sha256(blob).hexdigest()[:10])
        name = f"g{max(state['round'] - 1, 0):05d}-{self._digest[1]}-{state['run_id'][-20:]}"
        return self.frames(name.replace("_", "-")[:64], blob)

    def delta_payload(self, state: dict, blob: bytes | None) -> PayloadRef | None:
        """The compressed delta that turns the global ``state["delta_base"]`` into the one in force."""
        if blob is None or not state.get("delta_base"):
            return None
        if self._delta_digest[0] is not blob:   # hashed once, not at every manifest
            self._delta_digest = (blob, hashlib.sha256(blob).hexdigest()[:10])
        name = f"d{max(state['round'] - 1, 0):05d}-{self._delta_digest[1]}-{state['run_id'][-20:]}"
        return self.frames(name.replace("_", "-")[:64], blob)[0]

    def init_payload(self, run_id: str, blob: bytes | None, publish: bool = False) -> PayloadRef | None:
        """The run's init payload (methods whose devices need the round-0 global), published when asked."""
        if blob is None:
            return None
        ref, frames = self.frames(f"init-{run_id[-40:]}".replace("_", "-"), blob)
        if publish:
            for i, frame in enumerate(frames):
                self.transport.publish(topics.init_chunk_topic(self.fleet, i), frame, qos=1, retain=True)
        return ref

    def retained(self, state: dict, global_blob: bytes, init_blob: bytes | None, delta_blob: bytes | None = None) -> None:
        """(Re)publish everything a late joiner needs: presence, the init and global payloads, the
        global's delta (a compressed downlink), the manifest."""
        f = self.fleet
        self.publish(topics.server_status_topic(f), Status("server", True), retain=True)
        self.init_payload(state["run_id"], init_blob, publish=True)
        ref, frames = self.global_payload(state, global_blob)
        for i, frame in enumerate(frames):
            self.transport.publish(topics.global_chunk_topic(f, i), frame, qos=1, retain=True)
        delta = self.delta_payload(state, delta_blob)
        if delta is not None:
            for i, frame in enumerate(self.frames(delta.payload_id, delta_blob)[1]):
                self.transport.publish(topics.delta_chunk_topic(f, i), frame, qos=1, retain=True)
        self.publish(topics.global_topic(f), GlobalAnnouncement(state["run_id"], state["round"], ref), retain=True)
        self.manifest(state, global_blob, init_blob, delta_blob)

    def manifest(self, state: dict, global_blob: bytes, init_blob: bytes | None, delta_blob: bytes | None = None) -> None:
        """The round manifest of the phase in force (retained); nothing while the server waits."""
        s = state
        if s["phase"] not in ANNOUNCED:
            return
        ref, _ = self.global_payload(s, global_blob)
        delta = self.delta_payload(s, delta_blob)
        deadline_left = max(0.0, (s["deadline_at"] or 0) - self.clock())
        m = RoundManifest(s["run_id"], s["round"], s["phase"], tuple(s["participants"]), ref, deadline_left,
                          s["training"], self.clock(), self.init_payload(s["run_id"], init_blob),
                          s.get("assignments") or {}, delta, s.get("delta_base", "") if delta else "")
        self.publish(topics.round_topic(self.fleet), m, retain=True)

    def summary(self, run_id: str, row: dict) -> None:
        """A round's history row for watchers (the demo prints them)."""
        msg = RoundSummary(run_id, row["round"], tuple(row["participants"]), len(row["accepted"]),
                           row["accuracy"], row["loss"], row["train_loss"], row["seconds"], row["bytes_up"],
                           row["bytes_down"], bool(row.get("final")))
        self.publish(topics.summary_topic(self.fleet), msg, qos=1)

    def publish(self, topic: str, msg, qos: int = 1, retain: bool = False) -> None:
        """A control message, signed by the server's key (in a secured fleet)."""
        self.transport.publish(topic, self.security.encode(msg, topic), qos=qos, retain=retain)
