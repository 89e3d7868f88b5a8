"""sd_notify(3) in pure Python: READY / STATUS / WATCHDOG / STOPPING datagrams to ``$NOTIFY_SOCKET``.

Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op that returns False, so the same code
runs under systemd, in a terminal and in tests (which bind their own socket).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Callable

log = logging.getLogger("edge_runtime.service")


class Notifier:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        if addr.startswith("@"):  # abstract namespace
            addr = "\0" + addr[1:]
        self.address = addr or None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_s: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines (``notify(READY=1, STATUS="round 2")``); False if not under systemd."""
        if self.address is None:
            return False
        msg = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._sock.setblocking(False)  # a reader that stopped draining must not block the agent
                self._sock.sendto(msg, self.address)
                return True
            except OSError as exc:  # a missing socket must never take the service down
                log.debug("sd_notify to %s failed: %s", self.address, exc)
                return False

    def ready(self, status: str = "") -> bool:
        return self.notify(READY=1, **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def stopping(self, status: str = "") -> bool:
        return self.notify(STOPPING=1, **({"STATUS": status} if status else {}))

    def start_watchdog(self, alive: Callable[[], bool], stop: threading.Event) -> threading.Thread | None:
        """Ping ``WATCHDOG=1`` every half interval while ``alive()`` (the main loop made progress lately).

        A hung main loop stops the pings, and systemd restarts the service after ``WatchdogSec``.
        """
        if self.watchdog_s is None or not self.enabled:
            return None
        period = self.watchdog_s / 2

        def loop() -> None:
            stalled = False
            while not stop.wait(period):
                if alive():
                    self.notify(WATCHDOG=1)
                    stalled = False
                elif not stalled:  # once per stall: systemd restarts the service if it lasts WatchdogSec
                    stalled = True
                    log.error("main loop made no progress for %.0f s: withholding the watchdog ping",
                              self.watchdog_s)

        t = threading.Thread(target=loop, name="sd-watchdog", daemon=True)
        t.start()
        return t
