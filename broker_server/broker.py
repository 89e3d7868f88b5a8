"""The embedded MQTT broker (amqtt, MQTT 3.1.1): started by ``demo`` or ``broker-server broker``.

Production fleets and the integration tests use Mosquitto / EMQX; this one exists so that a
fresh machine needs nothing else to run a federation on loopback.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import subprocess
import sys
import time

log = logging.getLogger("broker_server.broker")


def broker_config(host: str, port: int) -> dict:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


async def _serve(host: str, port: int, stop: asyncio.Event) -> None:
    from edge_runtime.deps import require

    Broker = require("amqtt.broker", "the embedded MQTT broker").Broker

    broker = Broker(broker_config(host, port))
    await broker.start()
    log.info("embedded MQTT broker (amqtt) listening on %s:%d", host, port)
    try:
        await stop.wait()
    finally:
        await broker.shutdown()


def run_broker(host: str = "127.0.0.1", port: int = 1883) -> None:
    """Run the embedded broker in this process until SIGINT / SIGTERM."""
    # amqtt logs every connection at INFO; a fleet's broker log should be quiet unless asked.
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.WARNING)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        loop.run_until_complete(_serve(host, port, stop))
    finally:
        loop.close()


def wait_for_port(host: str, port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    """Block until something accepts TCP connections on ``host:port`` (or raise TimeoutError); with ``proc``,
    raise ChildProcessError at once if that process (the one meant to listen) exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ChildProcessError(f"the broker process exited with code {proc.returncode} before listening on "
                                    f"{host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.0f} s")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_broker_process(host: str, port: int, log_file=None) -> subprocess.Popen:
    """Start the embedded broker as a child process and wait until it accepts connections."""
    proc = subprocess.Popen([sys.executable, "-m", "broker_server.cli", "broker", "--host", host, "--port", str(port)],
                            stdout=log_file or subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for_port(host, port, proc=proc)
    except (TimeoutError, ChildProcessError):
        proc.kill()
        raise
    return proc
