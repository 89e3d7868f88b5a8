"""What tells the server that a device is there: its retained hello and online status, sent on
every connect, and its heartbeats (the server selects only devices whose heartbeats it hears)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from edge_runtime import __version__
from edge_runtime.device.profiler import basic_profile
from edge_runtime.protocol import topics
from edge_runtime.protocol.messages import Heartbeat, Hello, Status

if TYPE_CHECKING:
    from edge_runtime.agent.core import Agent

NUDGE_EVERY_S = 1.0   # the most often the server's online status brings a heartbeat forward


class Presence:
    def __init__(self, agent: "Agent") -> None:
        self.agent = agent
        self.nudged_at = float("-inf")   # when the server's online status last brought a heartbeat forward

    def hello(self) -> None:
        a = self.agent
        profile = {**basic_profile(), **({"memory_budget": a.cfg.memory_budget} if a.cfg.memory_budget else {})}
        hello = Hello(a.cfg.device_id, profile, __version__, len(a.raw_data), a.state["last_round_done"])
        a.publish(topics.device_topic(a.cfg.fleet, a.cfg.device_id, "hello"), hello, retain=True)

    def announce(self) -> None:
        """On every connect: the hello, the online status, a heartbeat at once."""
        a = self.agent
        self.hello()
        a.publish(topics.device_topic(a.cfg.fleet, a.cfg.device_id, "status"), Status(a.cfg.device_id, True),
                  retain=True)
        self.heartbeat()
        a.write_status(connected=True)   # called on connect: the flag may not be set yet

    def server_online(self) -> None:
        """The server (re)connected: a heartbeat now, not at the next tick. The one sent when this
        device connected is lost if the server subscribed later (a fleet started together, a
        restarted server): without this, round 1 waits up to ``heartbeat_s`` for it. At most one a
        second, however often the status comes."""
        now = time.monotonic()
        if now - self.nudged_at >= NUDGE_EVERY_S:
            self.nudged_at = now
            self.heartbeat()

    def heartbeat(self) -> None:
        a = self.agent
        round_ = a.manifest.round if a.manifest else -1
        a.publish(topics.device_topic(a.cfg.fleet, a.cfg.device_id, "heartbeat"),
                  Heartbeat(a.cfg.device_id, a.activity, round_, a.clock()), qos=0)

    def run(self) -> None:
        """Heartbeats until the agent stops; and while no manifest names this device, the hello again
        now and then: a broker drops messages past a client's queue limit (a flood of retained hellos
        replayed to a restarted server), and a repeated hello of a known device costs the server nothing."""
        a = self.agent
        every = max(5.0, 5 * a.cfg.heartbeat_s)
        last_hello = time.monotonic()
        while not a.stop_event.wait(a.cfg.heartbeat_s):
            self.heartbeat()
            m = a.manifest
            if time.monotonic() - last_hello >= every and (m is None or a.cfg.device_id not in m.participants):
                last_hello = time.monotonic()
                self.hello()
