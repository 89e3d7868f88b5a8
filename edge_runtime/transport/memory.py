"""In-memory broker and transport with MQTT semantics (wildcards, retained, QoS-1-like, last will).

For unit tests and in-process simulation only; real fleets use ``transport.mqtt``.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

from edge_runtime.protocol.topics import matches
from edge_runtime.transport.base import Handler, Will


class MemoryBroker:
    """A broker in one process: routes publishes to subscribers, keeps retained messages."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._clients: dict[str, MemoryTransport] = {}
        self.retained: dict[str, bytes] = {}
        self.log: list[tuple[str, str, bytes]] = []   # (client_id, topic, payload): every publish, for tests

    def _attach(self, client: "MemoryTransport") -> None:
        with self._lock:
            self._clients[client.client_id] = client

    def _detach(self, client: "MemoryTransport", unclean: bool) -> None:
        with self._lock:
            self._clients.pop(client.client_id, None)
        if unclean and client.will is not None:
            self.publish(client.client_id, client.will.topic, client.will.payload, client.will.retain)

    def publish(self, sender: str, topic: str, payload: bytes, retain: bool) -> None:
        with self._lock:
            self.log.append((sender, topic, payload))
            if retain:
                if payload:
                    self.retained[topic] = payload
                else:
                    self.retained.pop(topic, None)  # MQTT: an empty retained message clears it
            targets = list(self._clients.values())
        for c in targets:
            c._deliver(topic, payload)

    def retained_matching(self, pattern: str) -> list[tuple[str, bytes]]:
        with self._lock:
            return [(t, p) for t, p in self.retained.items() if matches(pattern, t)]


class MemoryTransport:
    """A client of a :class:`MemoryBroker`; handlers run on this client's own delivery thread."""

    def __init__(self, broker: MemoryBroker, client_id: str, will: Will | None = None) -> None:
        self.broker = broker
        self.client_id = client_id
        self.will = will
        self._subs: list[tuple[str, Handler]] = []
        self._on_connect: list[Callable[[], None]] = []
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._connected = threading.Event()

    def start(self) -> None:
        self.broker._attach(self)
        self._thread = threading.Thread(target=self._run, name=f"mem-{self.client_id}", daemon=True)
        self._thread.start()
        self._connected.set()
        for cb in list(self._on_connect):
            cb()

    def stop(self, timeout: float = 5.0) -> None:
        self._close(unclean=False, timeout=timeout)

    def crash(self) -> None:
        """Vanish without a clean disconnect: the broker publishes the last will."""
        self._close(unclean=True, timeout=1.0)

    def _close(self, unclean: bool, timeout: float) -> None:
        self._connected.clear()
        self.broker._detach(self, unclean)
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.broker.publish(self.client_id, topic, bytes(payload), retain)

    def subscribe(self, pattern: str, handler: Handler, qos: int = 1) -> None:
        self._subs.append((pattern, handler))
        for topic, payload in self.broker.retained_matching(pattern):
            self._queue.put((topic, payload, handler))

    def unsubscribe(self, pattern: str) -> None:
        self._subs = [(p, h) for p, h in self._subs if p != pattern]

    def on_connect(self, callback: Callable[[], None]) -> None:
        self._on_connect.append(callback)

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def flush(self, timeout: float) -> bool:
        return True  # delivery into the broker is synchronous

    def _deliver(self, topic: str, payload: bytes) -> None:
        for pattern, handler in list(self._subs):
            if matches(pattern, topic):
                self._queue.put((topic, payload, handler))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            topic, payload, handler = item
            handler(topic, payload)
