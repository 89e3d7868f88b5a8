"""Process-wide liveness and stop signalling between the main loop, long steps and signal handlers.

Training and evaluation loops call :func:`progress` once per step: it records that the process
is alive (for the systemd watchdog) and raises :class:`Interrupted` once a stop was requested
(SIGTERM / SIGINT), so a long local round is abandoned at a step boundary instead of running past
the service's stop timeout. Nothing is half-written at that point: updates and personal state
are only persisted after a round's training completes.
"""

from __future__ import annotations

import threading
import time


STOP = threading.Event()
_last_progress = time.monotonic()


class Interrupted(Exception):
    """A stop was requested while a long step was running; the step was abandoned. Not an
    :class:`EdgeRuntimeError`: code that handles a failed step (``except EdgeRuntimeError``) must not
    swallow a stop request."""


def touch() -> None:
    global _last_progress
    _last_progress = time.monotonic()


def progress() -> None:
    touch()
    if STOP.is_set():
        raise Interrupted("stop requested: abandoning the current step")


def seconds_since_progress() -> float:
    return time.monotonic() - _last_progress


def request_stop() -> None:
    STOP.set()


def reset() -> None:
    """For tests and for a process that runs several agents one after another."""
    STOP.clear()
    touch()
