"""What comes from the server before a round can run: the global and init payloads (retained
chunks, reassembled under the device's payload limit), and each manifest vetted against the
device's limits (a refused one is shown in ``status.json`` with its reason).

With a compressed downlink (``compression.downlink``) the device listens to the global's delta
only, and rebuilds the new global from the one it holds (``round.wire.apply_delta``); the rebuilt
bytes must have the sha256 the signed manifest names. A device that cannot (it missed a round,
restarted from nothing, or the rebuild does not match) subscribes to the whole global until it has
it: a full resync, then back to deltas.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from edge_runtime.algorithms.compression import CompressionConfig
from edge_runtime.atomic_io import write_bytes_atomic
from edge_runtime.errors import ConfigError
from edge_runtime.protocol import topics
from edge_runtime.protocol.chunking import Reassembler
from edge_runtime.protocol.codec import decode_tensors, encode_tensors
from edge_runtime.protocol.messages import PayloadRef, ProtocolError, RoundManifest, check_id
from edge_runtime.round.wire import apply_delta
from edge_runtime.training.spec import dataclass_from_json

if TYPE_CHECKING:
    from edge_runtime.agent.core import Agent

log = logging.getLogger("edge_runtime.agent")


class Fetcher:
    def __init__(self, agent: "Agent") -> None:
        self.agent = agent
        cap = agent.cfg.limits.max_payload_bytes   # one payload under it; unfinished chunks under twice that
        self.globals = Reassembler(cap, ttl_s=3600, max_buffered_bytes=2 * cap, max_per_source_bytes=2 * cap)
        # (payload id, sha256) -> bytes: chunks of the same id but other bytes (forged) never stand in for it
        self.global_blobs: dict[tuple[str, str], bytes] = {}
        self.inits = Reassembler(cap, ttl_s=3600, max_buffered_bytes=2 * cap, max_per_source_bytes=2 * cap)
        self._init_candidate: tuple[PayloadRef, bytes] | None = None   # a complete init payload no manifest named yet
        self.refused: dict | None = None                   # the last manifest refused, and why (status shows it)
        self.deltas = Reassembler(cap, ttl_s=3600, max_buffered_bytes=2 * cap, max_per_source_bytes=2 * cap)
        self.delta_blobs: dict[tuple[str, str], bytes] = {}   # (payload id, sha256) -> a compressed delta
        self._unbuildable: set[tuple[str, str]] = set()       # deltas whose rebuild failed: fetch the whole global
        held = Path(agent.cfg.state_dir) / "model" / "global.safetensors"   # the last global this device used
        if held.exists():
            data = held.read_bytes()
            self.global_blobs[("held", hashlib.sha256(data).hexdigest())] = data
        self.full = False                                     # subscribed to the whole global's chunks
        self.resyncs = 0                                      # times the whole global was asked for

    def on_chunk(self, kind: str, frame: bytes) -> None:
        """A retained chunk of a global ("global/chunk") or of the run's init payload ("init/chunk")."""
        if kind == "global/chunk":
            ref, whole = self.globals.add("server", frame, self.agent.clock())
            if whole is not None:   # the two latest globals are kept, and always the one the manifest names
                self.global_blobs[(ref.payload_id, ref.sha256)] = whole
                m = self.agent.manifest
                named = (m.global_payload.payload_id, m.global_payload.sha256) if m and m.global_payload else None
                for k in list(self.global_blobs)[:-2]:
                    if k != named:
                        del self.global_blobs[k]
        elif kind == "delta/chunk":
            ref, whole = self.deltas.add("server", frame, self.agent.clock())
            if whole is not None:
                self.delta_blobs = dict(list(self.delta_blobs.items())[-1:]) | {(ref.payload_id, ref.sha256): whole}
        else:
            ref, whole = self.inits.add("server", frame, self.agent.clock())
            if whole is not None:   # on disk only once the run's manifest names it
                self._init_candidate = (ref, whole)
                self.keep_init()

    def vet(self, m: RoundManifest) -> None:
        """Refuse a manifest that asks for more than this device's limits allow (any training setting,
        the payload sizes, the model)."""
        if m.action not in ("train", "score", "evaluate") or self.agent.cfg.device_id not in m.participants:
            return   # nothing to do for this device: nothing to check
        sizes = {"global": m.global_payload.size if m.global_payload else 0,
                 "init": m.init_payload.size if m.init_payload else 0}
        training = m.training if isinstance(m.training, dict) else {}
        self.agent.cfg.limits.check(training, sizes, len(self.agent.raw_data))
        assignment = (m.assignments or {}).get(self.agent.cfg.device_id)
        if assignment:
            self.agent.cfg.limits.check({**training, **assignment, "train": {**(training.get("train") or {}),
                                                                       **(assignment.get("train") or {})}},
                                  {}, len(self.agent.raw_data))

    def check_fresh(self, m: RoundManifest) -> None:
        """A signed fleet: an older manifest of the server's (a replay) never replaces a newer one, so
        a replayed old run cannot make the device drop its progress."""
        cur = self.agent.manifest
        if self.agent.security.insecure or cur is None:
            return
        if m.run_id != cur.run_id and m.issued_at < cur.issued_at:
            raise ProtocolError(f"stale manifest of run {m.run_id} (issued {cur.issued_at - m.issued_at:.0f} s before "
                                f"the one of run {cur.run_id} in force): a replay")
        if m.run_id == cur.run_id and m.round < cur.round:
            raise ProtocolError(f"stale manifest of round {m.round} (round {cur.round} is in force): a replay")

    def refuse(self, m: RoundManifest, reason: str) -> None:
        key = (m.run_id, m.round, m.action, reason)
        if self.refused is None or self.refused.get("key") != list(key):
            log.warning("refused the manifest of run %s round %d (%s): %s; this device does not take part",
                        m.run_id, m.round, m.action, reason)
            self.refused = {"key": list(key), "run_id": m.run_id, "round": m.round, "reason": reason,
                            "at": self.agent.clock()}
            self.agent.write_status()

    def keep_init(self) -> None:
        """Write the init payload the manifest in force names (once), and only that one."""
        m, cand = self.agent.manifest, self._init_candidate
        if m is None or m.init_payload is None or cand is None or cand[0] != m.init_payload:
            return
        path = self.init_path(cand[0].payload_id)
        if not path.exists():
            write_bytes_atomic(path, cand[1])   # kept: a restarted device needs no retained copy
        for other in path.parent.glob("*.safetensors"):
            if other != path:
                other.unlink(missing_ok=True)
        self._init_candidate = None

    def global_blob(self, m: RoundManifest) -> bytes | None:
        """The global the manifest names (its id and its sha256), if it has arrived or can be rebuilt
        from the delta the manifest names and the global it applies to."""
        ref = m.global_payload
        if ref is None:
            return None
        # by sha256, the content the signed manifest names (a global kept on disk has no payload id)
        blob = next((b for (_, sha), b in self.global_blobs.items() if sha == ref.sha256), None) or self._rebuild(m)
        self.want_full(blob is None and self._needs_full(m)
                       or (blob is not None and not _compression(m).compresses_downlink))
        return blob

    def _base_for(self, m: RoundManifest) -> bytes | None:
        return next((b for (_, sha), b in self.global_blobs.items() if sha == m.delta_base), None)

    def _needs_full(self, m: RoundManifest) -> bool:
        d = m.global_delta
        return d is None or (d.payload_id, d.sha256) in self._unbuildable or self._base_for(m) is None

    def _rebuild(self, m: RoundManifest) -> bytes | None:
        """``held + delta`` encoded as the server encodes the global, kept if its sha256 is the manifest's."""
        d, ref = m.global_delta, m.global_payload
        delta = self.delta_blobs.get((d.payload_id, d.sha256)) if d else None
        base = self._base_for(m) if d else None
        if delta is None or base is None or (d.payload_id, d.sha256) in self._unbuildable:
            return None
        try:
            cfg = _compression(m)
            blob = encode_tensors(apply_delta(decode_tensors(base), delta, cfg.downlink, cfg.block, cfg.rank))
        except ProtocolError as exc:
            blob, why = None, str(exc)
        else:
            why = "its sha256 is not the manifest's"
        if blob is None or hashlib.sha256(blob).hexdigest() != ref.sha256:
            log.warning("cannot rebuild global %s from delta %s (%s); fetching it whole", ref.payload_id,
                        d.payload_id, why)
            self._unbuildable.add((d.payload_id, d.sha256))
            return None
        named = (ref.payload_id, ref.sha256)
        self.global_blobs = {k: v for k, v in list(self.global_blobs.items())[-1:]} | {named: blob}
        return blob

    def want_full(self, on: bool) -> None:
        """Listen to the whole global's retained chunks (a resync, or an uncompressed downlink), or not."""
        if on != self.full:
            pattern = topics.global_wildcard(self.agent.cfg.fleet)
            if on:
                self.resyncs += 1
                if self.resyncs > 1:
                    log.info("fetching the whole global (resync): no global held that its delta applies to")
                self.agent.transport.subscribe(pattern, self.agent.enqueue)
            else:
                self.agent.transport.unsubscribe(pattern)
            self.full = on

    def init_path(self, payload_id: str) -> Path:
        return Path(self.agent.cfg.state_dir) / "init" / f"{check_id('payload_id', payload_id)}.safetensors"

    def init_blob(self, m: RoundManifest) -> bytes | None:
        """The run's init adapter named by the manifest, from disk, if it is there and intact."""
        if m.init_payload is None:
            return None
        path = self.init_path(m.init_payload.payload_id)
        if not path.exists():
            return None
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != m.init_payload.sha256:
            log.warning("%s does not match the manifest's init payload; fetching it again", path)
            path.unlink(missing_ok=True)
            return None
        return data


def _compression(m: RoundManifest) -> CompressionConfig:
    """The manifest's ``compression`` section; an unreadable one counts as none (the whole global is
    fetched, and the worker refuses the spec with its reason)."""
    section = m.training.get("compression", {}) if isinstance(m.training, dict) else {}
    try:
        return dataclass_from_json(CompressionConfig, section, "compression")
    except ConfigError:
        return CompressionConfig()
