"""Log output for terminals, journald and machines: one line per event.

``text``: ``2026-11-23T16:05:01 INFO  edge_runtime.agent: round 3: ...``; under journald
(``$JOURNAL_STREAM`` set, as systemd does for a service's stdout) the timestamp is left to the
journal and each line starts with a ``<N>`` syslog priority, which journald turns into the
entry's priority (``journalctl -p warning`` works). ``json``: one JSON object per line with
``ts``, ``level``, ``logger``, ``msg`` (and ``exc`` for tracebacks, folded into the same line).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

_SYSLOG = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class TextFormatter(logging.Formatter):
    def __init__(self, journald: bool = False) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        msg = msg.replace("\n", " | ")
        if self.journald:
            return f"<{_SYSLOG.get(record.levelno, 6)}>{record.name}: {msg}"
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        return f"{ts} {record.levelname:<7} {record.name}: {msg}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup_logging(level: str = "INFO", fmt: str = "text", stream=None) -> logging.Handler:
    """Route every logger to one stream handler in the chosen format (replaces earlier handlers)."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be text or json, got {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    journald = bool(os.environ.get("JOURNAL_STREAM")) and stream is None
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(journald))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
