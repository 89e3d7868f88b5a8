"""What the agent shows and takes from the operator: ``status.json`` (``edge-runtime status``), and
device profiles pushed by the server (validated against the run's spec, persisted, in force from
the next round)."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING

from edge_runtime.atomic_io import write_json_atomic
from edge_runtime.device.profiles import ProfileError, validate_device_profile
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.protocol import topics
from edge_runtime.protocol.messages import ProfileAck, ProfilePush
from edge_runtime.training.spec import TrainingSpec

if TYPE_CHECKING:
    from edge_runtime.agent.core import Agent

log = logging.getLogger("edge_runtime.agent")


def status_of(agent: "Agent", connected: bool | None = None) -> dict:
    """The agent's ``status.json`` (it may be written while the agent is still being built)."""
    m = getattr(agent, "manifest", None)
    fetcher, worker = getattr(agent, "fetcher", None), getattr(agent, "worker", None)
    spec = (m.training if m else {}) or {}
    acked = (agent.state.get("results") or [None])[-1]
    status = {"device_id": agent.cfg.device_id, "fleet": agent.cfg.fleet, "pid": os.getpid(),
              "connected": agent.transport.wait_connected(0) if connected is None else connected,
              "activity": agent.activity,
              "run_id": agent.state.get("run_id"), "server_round": m.round if m else None,
              "server_action": m.action if m else None, "last_round_done": agent.state.get("last_round_done"),
              "pending_update": (agent.state.get("pending") or {}).get("update_id"),
              "plan": {k: spec.get(k) for k in ("model", "method", "task")} | {
                  "rank": (spec.get("lora") or {}).get("rank"),
                  "batch_size": (spec.get("train") or {}).get("batch_size"),
                  "max_seq_len": (spec.get("train") or {}).get("max_seq_len")} if spec else None,
              "last_result": acked, "updated_at": agent.clock(),
              "security": agent.security.describe() if getattr(agent, "security", None) else None,
              "refused_manifest": ({k: v for k, v in fetcher.refused.items() if k != "key"}
                                   if fetcher is not None and fetcher.refused else None),
              "last_error": getattr(agent, "last_error", None),
              "bad_messages": ({k: v for k, v in agent.bad_messages.items() if k != "written_at"}
                               if getattr(agent, "bad_messages", None) else None),
              "profile": ({k: agent.profile.get(k) for k in ("name", "profile_id", "applies_from_round")}
                          if getattr(agent, "profile", None) else None),
              "fitted_plan": ({**dataclasses.asdict(worker.plan_choice.plan),
                               "predicted_peak": worker.plan_choice.predicted.total,
                               "budget": worker.plan_choice.budget}
                              if worker is not None and worker.plan_choice else None)}
    return status


def on_profile(agent: "Agent", push: ProfilePush) -> None:
    """A pushed device profile: validated against the run's spec, persisted, in force from the next
    round; a bad one is refused with the reason and the profile in force stays."""
    current = agent.profile or {}
    if current.get("profile_id") == push.profile_id:
        accepted, reason, applies = True, "already in force", current.get("applies_from_round", 0)
    elif current and push.sent_at < current.get("sent_at", 0):
        accepted, reason, applies = False, "older than the profile in force", 0
    else:
        try:
            spec = TrainingSpec.from_json(agent.manifest.training) if agent.manifest else None
            overrides = validate_device_profile(push.profile, spec, where=f"profile {push.profile_id}")
        except (ProfileError, EdgeRuntimeError) as exc:
            log.warning("refused device profile %s: %s (the profile in force stays)", push.profile_id, exc)
            accepted, reason, applies = False, str(exc), 0
        else:
            applies = (agent.manifest.round + 1) if agent.manifest else 0
            agent.profile = {"profile_id": push.profile_id, "name": push.profile["name"], "overrides": overrides,
                            "applies_from_round": applies, "sent_at": push.sent_at, "received_at": agent.clock()}
            write_json_atomic(agent.profile_path, agent.profile)
            agent.write_status()
            log.info("device profile %s (%s) accepted: %s from round %d", push.profile["name"], push.profile_id,
                     overrides, applies)
            accepted, reason = True, ""
    ack = ProfileAck(agent.cfg.device_id, push.profile_id, accepted, reason[:500], applies)
    agent.publish(topics.device_topic(agent.cfg.fleet, agent.cfg.device_id, "profile/ack"), ack)
