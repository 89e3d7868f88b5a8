"""JSON from the network, parsed within limits: size, nesting depth, string length, element count, numbers.

``json.loads`` on hostile bytes can recurse until ``RecursionError`` (``[[[[...``), build huge
integers digit by digit, or accept ``NaN``; every caller on the wire goes through :func:`loads`
instead, which raises only :class:`ProtocolError`. Depth is checked on the parsed document (the
C scanner itself stops runaway nesting with a ``RecursionError``, turned into the same error).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from edge_runtime.protocol.messages import ProtocolError


@dataclass(frozen=True)
class JsonLimits:
    max_bytes: int = 64 * 1024
    max_depth: int = 12          # a manifest's training spec is ~4 deep
    max_string: int = 16 * 1024  # characters of one string (keys included)
    max_items: int = 20_000      # values in the whole document
    max_int_digits: int = 19     # |int| < 10**19: counts, sizes, rounds


DEFAULT = JsonLimits()


def _check(value, limits: JsonLimits) -> None:
    """Walk the parsed document iteratively: nesting depth, string lengths and the element count."""
    stack, items = [(value, 0)], 0
    while stack:
        v, depth = stack.pop()
        items += 1
        if depth > limits.max_depth:
            raise ProtocolError(f"JSON nests deeper than {limits.max_depth} levels")
        if items > limits.max_items:
            raise ProtocolError(f"JSON has more than {limits.max_items} values")
        if isinstance(v, str):
            if len(v) > limits.max_string:
                raise ProtocolError(f"JSON string of {len(v)} characters is over the {limits.max_string} limit")
        elif isinstance(v, dict):
            for k, x in v.items():
                if len(k) > limits.max_string:
                    raise ProtocolError(f"JSON key of {len(k)} characters is over the {limits.max_string} limit")
                stack.append((x, depth + 1))
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)


def loads(data: bytes | str, limits: JsonLimits = DEFAULT, what: str = "message"):
    """Parse ``data`` as JSON within ``limits``; ProtocolError (naming ``what``) for anything else."""
    if len(data) > limits.max_bytes:
        raise ProtocolError(f"{what} of {len(data)} bytes is over the {limits.max_bytes}-byte limit")
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray, memoryview)) else str(data)
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what} is not UTF-8: {exc.reason} at byte {exc.start}") from exc

    def parse_int(s: str) -> int:
        if len(s.lstrip("-")) > limits.max_int_digits:
            raise ValueError(f"integer of {len(s)} digits")
        return int(s)

    def parse_constant(name: str):
        raise ValueError(f"{name} is not allowed")

    try:
        value = json.loads(text, parse_int=parse_int, parse_constant=parse_constant)
    except RecursionError as exc:   # the C scanner's own guard, for brackets nested ~1,000 deep
        raise ProtocolError(f"{what}: JSON nests deeper than {limits.max_depth} levels") from exc
    except ValueError as exc:       # JSONDecodeError is a ValueError
        raise ProtocolError(f"{what} is not valid JSON: {str(exc)[:200]}") from exc
    _check(value, limits)
    return value
