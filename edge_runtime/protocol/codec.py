"""Bytes <-> messages and tensors. Control messages are JSON; tensors are safetensors. Never pickle."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from typing import Mapping

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from edge_runtime.protocol import bounded_json, signing
from edge_runtime.protocol.messages import (MESSAGE_TYPES, PROTOCOL_VERSION,
                                            Message, PayloadRef, ProtocolError)

MAX_MESSAGE_BYTES = 64 * 1024        # a control message is small; anything larger is refused unparsed
ALLOWED_DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.float64}


def encode_message(msg: Message, identity: signing.Identity | None = None, topic: str = "") -> bytes:
    """One control message as JSON; signed by ``identity`` for ``topic`` (the topic it is published on)."""
    body = {"v": PROTOCOL_VERSION, "type": msg.TYPE}
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        body[f.name] = dataclasses.asdict(value) if isinstance(value, PayloadRef) else value
    if identity is not None:   # signed as the receiver will parse it: tuples as lists, every key a string
        body = json.loads(json.dumps(body, allow_nan=False))
        body["sig"] = signing.signature(identity, topic, body)
    data = json.dumps(body, allow_nan=False, separators=(",", ":")).encode("utf-8")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"{msg.TYPE} message is {len(data)} bytes, over the {MAX_MESSAGE_BYTES}-byte limit")
    return data


def decode_message(data: bytes, expect: type | None = None, keys: signing.Keyring | None = None,
                   topic: str = "") -> Message:
    """Parse and validate one control message; ProtocolError says what is wrong.

    With ``keys`` the message must carry a valid signature for ``topic`` by the key ``keys`` allows
    there (checked before anything else of it is used); without, a signature is ignored."""
    body = bounded_json.loads(data, bounded_json.JsonLimits(max_bytes=MAX_MESSAGE_BYTES))
    if not isinstance(body, dict):
        raise ProtocolError(f"message must be a JSON object, got {type(body).__name__}")
    sig = body.pop("sig", None)
    version, kind = body.get("v"), body.get("type")
    if isinstance(version, bool) or version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {version!r:.40}; this runtime speaks {PROTOCOL_VERSION} "
                            f"(upgrade the server and its devices together)")
    if not isinstance(kind, str):
        raise ProtocolError(f"message type must be a string, got {type(kind).__name__}")
    cls = MESSAGE_TYPES.get(kind)
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r:.40}")
    if keys is not None:
        signing.verify(keys, topic, body, sig, kind)
    try:
        return _build(cls, body, expect)
    except ProtocolError:
        raise
    except Exception as exc:  # a field combination no check foresaw: still the protocol's own error
        raise ProtocolError(f"{cls.TYPE}: malformed ({type(exc).__name__}: {str(exc)[:200]})") from exc


@functools.lru_cache(maxsize=None)
def _fields_of(cls) -> tuple[dict, frozenset]:
    """A message class's resolved type hints and field names (resolving them costs ~0.3 ms a call)."""
    return typing.get_type_hints(cls), frozenset(f.name for f in dataclasses.fields(cls))


def _build(cls, body: dict, expect: type | None) -> Message:
    if expect is not None and cls is not expect:
        raise ProtocolError(f"expected a {expect.TYPE} message, got {cls.TYPE}")
    hints, names = _fields_of(cls)
    unknown = sorted(set(body) - names - {"v", "type"})
    if unknown:
        raise ProtocolError(f"{cls.TYPE}: unknown fields {unknown[:5]}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in body:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{cls.TYPE}: missing field {f.name!r}")
            continue
        kwargs[f.name] = _coerce(cls.TYPE, f.name, hints[f.name], body[f.name])
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ProtocolError(f"{cls.TYPE}: {exc}") from exc


def _coerce(type_name: str, field: str, hint, value):
    """Check a JSON value against a field's type hint (the few shapes messages use)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    where = f"{type_name}.{field}"
    if hint is PayloadRef:
        if not isinstance(value, dict) or set(value) != {f.name for f in dataclasses.fields(PayloadRef)}:
            raise ProtocolError(f"{where} must be an object with payload_id, size, sha256, n_chunks")
        return PayloadRef(**value)
    if origin is tuple:
        item = args[0] if args else str
        if not isinstance(value, list) or not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            raise ProtocolError(f"{where} must be a list of {'strings' if item is str else 'integers'}")
        return tuple(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ProtocolError(f"{where} must be true or false, got {value!r:.40}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError(f"{where} must be an integer, got {value!r:.40}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ProtocolError(f"{where} must be a finite number, got {value!r:.40}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ProtocolError(f"{where} must be a string, got {type(value).__name__}")
        return value
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where} must be an object")
        return value
    return value


def encode_tensors(state: Mapping[str, torch.Tensor]) -> bytes:
    """``{name: tensor}`` -> safetensors bytes (contiguous CPU copies)."""
    return safetensors_save({k: v.detach().to("cpu").contiguous() for k, v in state.items()})


def decode_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """safetensors bytes -> ``{name: tensor}``, refusing non-float dtypes and NaN / Inf.

    safetensors parses a JSON header and raw buffers: no code runs, unlike pickle.
    """
    try:
        state = safetensors_load(bytes(data))
    except Exception as exc:  # SafetensorError, ValueError, OverflowError, ... from a hostile header
        raise ProtocolError(f"payload is not valid safetensors: {type(exc).__name__}: {str(exc)[:200]}") from exc
    for name, t in state.items():
        if t.dtype not in ALLOWED_DTYPES:
            raise ProtocolError(f"tensor {name!r} has dtype {t.dtype}; allowed: float32/16, bfloat16, float64")
        if not bool(torch.isfinite(t).all()):
            raise ProtocolError(f"tensor {name!r} contains NaN or Inf")
    return state


@dataclasses.dataclass(frozen=True)
class Security:
    """What a process signs its messages with (``identity``) and whose signatures it requires
    (``keys``). Both None: an insecure process (demo, tests), which signs nothing and checks nothing."""

    identity: signing.Identity | None = None
    keys: signing.Keyring | None = None

    @property
    def insecure(self) -> bool:
        return self.keys is None

    def encode(self, msg: Message, topic: str) -> bytes:
        return encode_message(msg, self.identity, topic)

    def decode(self, data: bytes, expect: type, topic: str) -> Message:
        return decode_message(data, expect, self.keys, topic)

    def describe(self) -> dict:
        """For ``status``: whether messages are signed and checked, and with which keys."""
        return {"signed": self.identity is not None, "verified": self.keys is not None,
                "key": self.identity.fingerprint if self.identity else None,
                "mode": "insecure" if self.insecure else "signed"}
