"""sd_notify against a real datagram socket, as systemd would provide it."""

import socket
import threading
import time

import pytest

from edge_runtime.service.sdnotify import Notifier


@pytest.fixture
def notify_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    yield path, sock
    sock.close()


def _drain(sock, seconds: float) -> list[str]:
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        sock.settimeout(max(0.01, end - time.monotonic()))
        try:
            out.append(sock.recv(4096).decode())
        except socket.timeout:
            break
    return out


def test_ready_status_stopping_arrive_as_systemd_expects(notify_socket):
    path, sock = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.ready("waiting for the server") and n.status("training; round 3") and n.stopping()
    assert sock.recv(4096).decode() == "READY=1\nSTATUS=waiting for the server"
    assert sock.recv(4096).decode() == "STATUS=training; round 3"
    assert sock.recv(4096).decode() == "STOPPING=1"


def test_abstract_namespace_socket():
    name = f"edge-runtime-test-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).notify(READY=1)
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()


def test_without_systemd_everything_is_a_no_op(tmp_path):
    n = Notifier({})
    assert not n.enabled and n.ready() is False and n.watchdog_s is None
    assert n.start_watchdog(lambda: True, threading.Event()) is None
    # a socket that vanished never raises into the service
    assert Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).notify(READY=1) is False


def test_watchdog_pings_at_half_the_interval_only_while_alive(notify_socket):
    path, sock = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    assert n.watchdog_s == pytest.approx(0.2)
    alive = threading.Event()
    alive.set()
    stop = threading.Event()
    n.start_watchdog(alive.is_set, stop)
    pings = _drain(sock, 1.05)
    assert pings and set(pings) == {"WATCHDOG=1"}
    assert 7 <= len(pings) <= 12, len(pings)      # every 0.1 s
    alive.clear()                                  # a hung main loop: no more pings
    time.sleep(0.15)
    _drain(sock, 0.05)
    assert _drain(sock, 0.5) == []
    stop.set()


def test_watchdog_pid_for_another_process_is_ignored(notify_socket):
    path, _ = notify_socket
    assert Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}).watchdog_s is None


def test_a_reader_that_stopped_draining_never_blocks_the_sender(notify_socket):
    path, _ = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    t0 = time.monotonic()
    results = [n.status("x" * 1000) for _ in range(2000)]  # far more than a socket buffer holds
    assert time.monotonic() - t0 < 5.0
    assert results[0] is True and results[-1] is False


def test_the_server_reports_ready_and_each_round_to_systemd(notify_socket, tmp_path):
    from tests.fleet_helpers import InProcessFleet

    path, sock = notify_socket
    fleet = InProcessFleet(tmp_path, n_devices=2, rounds=1)
    fleet.coordinator.notifier = Notifier({"NOTIFY_SOCKET": path})
    fleet.start()
    try:
        fleet.wait_done()
    finally:
        fleet.close()
    got = _drain(sock, 0.5)
    assert got[0].startswith("READY=1\nSTATUS=run run-test: round 0 (waiting)")
    assert any(m.startswith("STATUS=run run-test: round 1 (train)") for m in got), got
    assert any(m.startswith("STATUS=run run-test: round 2 (evaluate)") for m in got), got
