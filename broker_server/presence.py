"""Devices coming and going: hellos register a device (bounded registry), retained status and
heartbeats say whether it is there. A heartbeat or status of a device whose hello has not been
served yet waits behind the hellos once (its hello may still be in the hello queue).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from broker_server.fleet import RegistryFull
from edge_runtime.protocol.messages import (Heartbeat, Hello, ProtocolError,
                                            Status)

if TYPE_CHECKING:
    from broker_server.coordinator import Coordinator

log = logging.getLogger("broker_server.coordinator")


class Presence:
    def __init__(self, run: "Coordinator") -> None:
        self.run = run
        self._new_devices = [0, 0.0]   # hellos of new devices since the last log line, its time

    def on_message(self, topic: str, kind: str, device_id: str, payload: bytes, deferred: bool) -> None:
        """A hello, status or heartbeat from ``device_id`` (ProtocolError: a bad one, nothing changed)."""
        fleet, decode = self.run.fleet, self.run.security.decode   # signatures checked first (a secured fleet)
        if kind == "dev/hello":
            self._on_hello(device_id, decode(payload, Hello, topic))
        elif kind == "dev/status":
            if fleet.known(device_id):
                self._on_status(device_id, decode(payload, Status, topic))
            elif not deferred:
                self.run.hellos.put((topic, payload, True))
        else:
            hb = decode(payload, Heartbeat, topic)
            if hb.device_id != device_id:
                raise ProtocolError(f"heartbeat on {device_id}'s topic names {hb.device_id}")
            if not fleet.known(device_id):
                if not deferred:
                    self.run.hellos.put((topic, payload, True))
            elif fleet.seen(device_id, self.run.clock(), (hb.state or "alive")[:32]):
                log.info("device %s is back online", device_id)

    def _on_hello(self, device_id: str, hello: Hello) -> None:
        if hello.device_id != device_id:
            raise ProtocolError(f"hello from topic device {device_id} names device {hello.device_id}")
        protected = set(self.run.state["participants"]) | set(self.run.state["accepted"])
        try:
            new = self.run.fleet.hello(device_id, hello.profile, hello.n_samples, hello.runtime_version,
                                       self.run.clock(),
                                   protected)
        except (ValueError, RegistryFull) as exc:
            raise ProtocolError(f"hello from {device_id} refused: {exc}") from exc
        if not new:
            log.debug("known device %s said hello (%d samples)", device_id, hello.n_samples)
            return
        self._new_devices[0] += 1
        if self._new_devices[0] <= 20:
            log.info("new device %s (%d samples, last round done %d)", device_id, hello.n_samples,
                     hello.last_round_done)
        elif self.run.clock() - self._new_devices[1] >= 10:   # a flood logs a count every 10 s, not a line each
            log.info("%d new devices since the start (%d registered)", self._new_devices[0],
                     len(self.run.fleet.devices))
            self._new_devices[1] = self.run.clock()

    def _on_status(self, device_id: str, status: Status) -> None:
        if status.client_id != device_id:
            raise ProtocolError(f"status on {device_id}'s topic names {status.client_id}")
        if self.run.fleet.set_online(device_id, status.online, self.run.clock()):
            log.info("device %s is %s", device_id, "online" if status.online else "offline")
