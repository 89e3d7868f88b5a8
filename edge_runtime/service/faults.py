"""Crash points for the kill tests: ``EDGE_RUNTIME_CRASH_AT=NAME`` (or ``NAME:N``, the N-th time)
SIGKILLs the process when it reaches :func:`crash_point` ``NAME``. Unset (always, outside tests), a
crash point is one dictionary lookup."""

from __future__ import annotations

import os
import signal

CRASH_ENV = "EDGE_RUNTIME_CRASH_AT"
_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    want, _, nth = spec.rpartition(":")
    if not nth.isdigit():
        want, nth = spec, "1"
    if want != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(nth):
        os.kill(os.getpid(), signal.SIGKILL)
