"""The update awaiting its ack: persisted before it is sent, sent as a manifest plus chunks,
re-sent on an ack timeout or a retryable reject with jittered exponential backoff, forgotten
once acked (accepted or refused for good).
"""

from __future__ import annotations

import logging
import os
import random
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from edge_runtime.agent.config import (FAULT_ENV, RESEND_BACKOFF_BASE_S,
                                       RESEND_BACKOFF_CAP_S)
from edge_runtime.agent.residual import commit_residual
from edge_runtime.agent.state import Pending
from edge_runtime.protocol import topics
from edge_runtime.protocol.chunking import split_payload
from edge_runtime.protocol.messages import (Ack, RoundManifest, UpdateManifest,
                                            protocol1_layer_steps)
from edge_runtime.transport.base import backoff_delay

if TYPE_CHECKING:
    from edge_runtime.agent.core import Agent

log = logging.getLogger("edge_runtime.agent")


class Uploader:
    def __init__(self, agent: "Agent") -> None:
        self.agent = agent
        self.sent_at: float | None = None
        self._retries, self._ack_wait, self.hold_until = 0, None, 0.0   # re-send backoff of the pending update
        self._rng = random.Random()

    def step(self, m: RoundManifest) -> None:
        """The pending update, while the server is at round ``m.round``: dropped if the server moved
        on, sent when its hold ends, re-sent when its ack is overdue."""
        agent, pending = self.agent, self.agent.state["pending"]
        now = agent.clock()
        if pending["round"] != m.round:
            log.info("dropping the unacked update for round %d: the server is at round %d", pending["round"], m.round)
            commit_residual(agent.cfg.state_dir, pending.get("residual_file"), accepted=False)
            agent.state["pending"] = None
            agent.save_state()
        elif now >= self.hold_until and (self.sent_at is None or now - self.sent_at > self.resend_after):
            if self.sent_at is not None:
                log.warning("no ack for update %s after %.0f s; re-sending", pending["update_id"], self.resend_after)
                self.backoff(timeout=True)
            self.upload(pending)

    @property
    def resend_after(self) -> float:
        """Seconds to wait for the ack of a sent update before sending it again."""
        return self._ack_wait if self._ack_wait is not None else self.agent.cfg.ack_timeout_s

    def backoff(self, timeout: bool = False) -> float:
        """Jittered exponential backoff for re-sends, capped, so a busy or refusing server is not hammered.
        After a retryable reject the next send waits that long; after an ack timeout the update goes again
        now and the wait for its ack grows (never below the ack timeout). Returns the wait."""
        self._retries += 1
        wait = backoff_delay(self._retries - 1, self._rng, base=RESEND_BACKOFF_BASE_S, cap=RESEND_BACKOFF_CAP_S)
        if timeout:
            self._ack_wait = wait = max(wait, self.agent.cfg.ack_timeout_s)
        else:
            self.hold_until, self.sent_at = self.agent.clock() + wait, None
        return wait

    def set_pending(self, m: RoundManifest, file: Path | None, n_samples: int, metrics: dict, timings: dict,
                    update_id: str | None = None, layer_steps: tuple[int, ...] = (),
                    residual_file: str | None = None) -> None:
        self.agent.state["pending"] = {"run_id": m.run_id, "round": m.round,
                                 "update_id": update_id or f"u{uuid.uuid4().hex[:20]}",
                                 "file": str(file) if file else None, "n_samples": n_samples, "metrics": metrics,
                                 "layer_steps": list(layer_steps), "timings": timings, "action": m.action,
                                 "residual_file": residual_file}
        self.agent.save_state()
        self.sent_at = None
        self._retries, self._ack_wait, self.hold_until = 0, None, 0.0

    def upload(self, pending: Pending) -> None:
        self.agent.activity = "uploading"
        pending.setdefault("timings", {}).setdefault("first_send_at", self.agent.clock())
        f, d = self.agent.cfg.fleet, self.agent.cfg.device_id
        frames, ref = [], None
        if pending["file"]:
            data = Path(pending["file"]).read_bytes()
            ref, frames = split_payload(pending["update_id"], data, self.agent.cfg.chunk_bytes)
        m = UpdateManifest(pending["run_id"], d, pending["round"], pending["update_id"], ref,
                           pending["n_samples"], pending["metrics"],
                           tuple(pending["layer_steps"]) if "layer_steps" in pending   # else saved before protocol 2
                           else protocol1_layer_steps(pending["metrics"]))
        self.agent.publish(topics.device_topic(f, d, "update"), m, qos=1)   # signed: covers the chunks' sha256
        fault = os.environ.get(FAULT_ENV, "")
        for i, frame in enumerate(frames):
            self.agent.transport.publish(topics.device_topic(f, d, "update/chunk"), frame, qos=1)
            if fault == f"after_chunk:{i}":
                self.agent.transport.flush(5.0)
                log.error("fault injection: exiting after chunk %d", i)
                os._exit(17)
        self.sent_at = self.agent.clock()

    def on_ack(self, ack: Ack) -> None:
        pending = self.agent.state["pending"]
        if pending is None or ack.update_id != pending["update_id"] or ack.device_id != self.agent.cfg.device_id:
            return
        what = {"evaluate": "final evaluation", "score": "layer scores"}.get(pending.get("action"), "update")
        if ack.accepted:
            log.info("round %d: %s %s accepted%s", ack.round, what, ack.update_id,
                     " (duplicate)" if ack.reason == "duplicate" else "")
        elif ack.retry:
            wait = self.backoff()
            log.warning("round %d: update %s rejected (%s); re-sending in %.1f s", ack.round, ack.update_id,
                        ack.reason, wait)
            return
        else:
            log.error("round %d: update %s rejected: %s", ack.round, ack.update_id, ack.reason)
        if pending["file"]:
            Path(pending["file"]).unlink(missing_ok=True)
        commit_residual(self.agent.cfg.state_dir, pending.get("residual_file"), ack.accepted)
        t = pending.get("timings", {})
        if "first_send_at" in t:  # seconds from the first send of the update to its ack (re-sends included)
            t["upload_to_ack_s"] = self.agent.clock() - t.pop("first_send_at")
        self.agent.state.setdefault("timings", []).append({"round": pending["round"], **t})
        del self.agent.state["timings"][:-100]
        self.agent.state.setdefault("results", []).append({"round": pending["round"], "accepted": ack.accepted,
                                                     "reason": ack.reason, **pending.get("metrics", {})})
        del self.agent.state["results"][:-20]
        self.agent.state.update(last_round_done=pending["round"], pending=None)
        self.agent.save_state()
        self.agent.activity = "idle"
