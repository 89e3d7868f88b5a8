"""The device agent: :class:`Agent` (the state machine and its loop, ``core.py``) and its parts:
``fetcher.py`` (payloads and manifests in), ``worker.py`` (the model, the plan, the round's work),
``uploader.py`` (the pending update out, re-sends, the ack), ``status.py`` (status.json, pushed
profiles), ``state.py`` (agent.json, typed), ``config.py`` (settings)."""

from edge_runtime.agent.config import FAULT_ENV, RESEND_BACKOFF_BASE_S, RESEND_BACKOFF_CAP_S, AgentConfig
from edge_runtime.agent.core import Agent

__all__ = ["Agent", "AgentConfig", "FAULT_ENV", "RESEND_BACKOFF_BASE_S", "RESEND_BACKOFF_CAP_S"]
