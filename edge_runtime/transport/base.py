"""The publish / subscribe interface every transport implements, and reconnect backoff."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Protocol

Handler = Callable[[str, bytes], None]   # (topic, payload); called on the transport's thread


@dataclass(frozen=True)
class Will:
    """Last will: published by the broker if the client vanishes without a clean disconnect."""

    topic: str
    payload: bytes
    retain: bool = True


class Transport(Protocol):
    client_id: str

    def start(self) -> None:
        """Begin connecting in the background; reconnects by itself until ``stop``."""

    def stop(self, timeout: float = 5.0) -> None:
        """Flush, disconnect cleanly (no last will) and stop the background thread."""

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Queue a message; with QoS 1 it is (re)sent until the broker acknowledges it."""

    def subscribe(self, pattern: str, handler: Handler, qos: int = 1) -> None:
        """Deliver messages matching ``pattern`` (MQTT wildcards) to ``handler``; kept across reconnects."""

    def unsubscribe(self, pattern: str) -> None:
        """Stop delivering ``pattern`` (every handler subscribed with exactly that pattern)."""

    def on_connect(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` after every (re)connection, once subscriptions are restored."""

    def wait_connected(self, timeout: float) -> bool:
        """True once connected (within ``timeout`` seconds)."""

    def flush(self, timeout: float) -> bool:
        """Wait until every QoS>0 message published so far is acknowledged by the broker."""


def backoff_delay(attempt: int, rng: random.Random, base: float = 0.5, cap: float = 30.0) -> float:
    """Seconds to wait before reconnect ``attempt`` (0-based): capped exponential, jittered to [d/2, d].

    The jitter keeps a fleet that lost its broker at once from reconnecting in lock-step.
    """
    delay = min(cap, base * (2 ** min(attempt, 30)))
    return delay * rng.uniform(0.5, 1.0)
