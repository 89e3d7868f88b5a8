"""Ed25519 identities and signed control messages.

Every control message a secured fleet sends carries ``"sig": {"alg": "ed25519", "kid": ..., "sig":
...}``. The signature covers a fixed domain string, the MQTT topic the message is published on and
the message's canonical JSON (sorted keys, no whitespace, the ``sig`` field left out). The topic
binds a message to its fleet and, for a device's messages, to that device; the body binds it to its
run, round, ids, sample count, metrics and the sha256 of any payload it names, so the chunks of a
payload are covered through the manifest and nothing can be replayed into another round or run.

A receiver holds a :class:`Keyring`: which public key may speak on a topic (a device: its enrolled
key, revoked ones refused; the server: the one key the device pinned). Without a keyring the
runtime is *insecure*: signatures are neither required nor checked, and the logs and ``status`` say
so. The private key never leaves its file (mode 0600, created with ``O_EXCL``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey, Ed25519PublicKey)

from edge_runtime.errors import ConfigError
from edge_runtime.protocol.messages import ProtocolError

ALG = "ed25519"
KEY_PREFIX = "ed25519:"
_DOMAIN = b"edge-runtime signed message v1\n"


def public_key_text(key: Ed25519PublicKey) -> str:
    """``ed25519:<base64 of the 32 raw bytes>``: what operators copy between machines."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KEY_PREFIX + base64.b64encode(raw).decode("ascii")


def parse_public_key(text: object) -> Ed25519PublicKey:
    """The inverse of :func:`public_key_text`; ConfigError naming what is wrong."""
    if not isinstance(text, str) or not text.startswith(KEY_PREFIX):
        raise ConfigError(f"a public key looks like {KEY_PREFIX}<44 base64 characters>, got {str(text)[:80]!r}")
    try:
        raw = base64.b64decode(text[len(KEY_PREFIX):], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"public key {text[:80]!r} is not valid base64: {exc}") from exc
    if len(raw) != 32:
        raise ConfigError(f"an Ed25519 public key is 32 bytes, {text[:80]!r} has {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def fingerprint(key: Ed25519PublicKey) -> str:
    """16 hex digits of the key's sha256: short enough for logs, long enough to tell keys apart."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class Identity:
    """This process's own key pair: signs what it publishes."""

    def __init__(self, private: Ed25519PrivateKey, path: Path | None = None) -> None:
        self._private = private
        self.public = private.public_key()
        self.public_text = public_key_text(self.public)
        self.fingerprint = fingerprint(self.public)
        self.path = path

    @classmethod
    def generate(cls) -> "Identity":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> "Identity":
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the private key: {exc}") from exc
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: not an unencrypted PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path}: holds a {type(key).__name__}, not an Ed25519 key")
        if os.name == "posix" and path.stat().st_mode & 0o077:
            raise ConfigError(f"{path}: the private key is readable by others (mode "
                              f"{path.stat().st_mode & 0o777:o}); chmod 600 it")
        return cls(key, path)

    @classmethod
    def create(cls, path: Path) -> "Identity":
        """A new key pair written to ``path`` (0600); refuses to overwrite an existing key."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        ident = cls(Ed25519PrivateKey.generate(), path)
        pem = ident._private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError as exc:
            raise ConfigError(f"{path}: a key is already there (a new one would orphan its enrolment)") from exc
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        return ident

    @classmethod
    def load_or_create(cls, path: Path) -> tuple["Identity", bool]:
        """(identity, created): the key at ``path``, made there first if there is none."""
        path = Path(path)
        if path.exists():
            return cls.load(path), False
        return cls.create(path), True

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)


def canonical(body: dict) -> bytes:
    """The bytes a signature covers for a message body (without its ``sig`` field)."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def signed_bytes(topic: str, body: dict) -> bytes:
    return _DOMAIN + topic.encode("utf-8") + b"\n" + canonical(body)


def signature(identity: Identity, topic: str, body: dict) -> dict:
    """The ``sig`` field of ``body`` published on ``topic``."""
    sig = identity.sign(signed_bytes(topic, body))
    return {"alg": ALG, "kid": identity.fingerprint, "sig": base64.b64encode(sig).decode("ascii")}


class Keyring(Protocol):
    def key_for(self, topic: str) -> Ed25519PublicKey:
        """The key that may sign messages on ``topic``; ProtocolError (with the reason) if none may."""


class PinnedKey:
    """A device's keyring: everything it acts on comes from the server, whose key it pinned."""

    def __init__(self, key: Ed25519PublicKey | str) -> None:
        self.key = parse_public_key(key) if isinstance(key, str) else key
        self.fingerprint = fingerprint(self.key)

    def key_for(self, topic: str) -> Ed25519PublicKey:
        return self.key


def verify(keys: Keyring, topic: str, body: dict, sig: object, kind: str) -> None:
    """Check ``sig`` (the popped ``sig`` field) over ``body`` on ``topic``; ProtocolError if it fails."""
    if sig is None:
        raise ProtocolError(f"unsigned {kind} message; this fleet accepts signed messages only")
    if not isinstance(sig, dict) or set(sig) != {"alg", "kid", "sig"} or sig["alg"] != ALG:
        raise ProtocolError(f"{kind}: sig must be {{alg: {ALG}, kid, sig}}")
    key = keys.key_for(topic)
    try:
        raw = base64.b64decode(sig["sig"], validate=True) if isinstance(sig["sig"], str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    try:
        if len(raw) != 64:
            raise InvalidSignature
        key.verify(raw, signed_bytes(topic, body))
    except InvalidSignature:
        raise ProtocolError(f"bad signature on the {kind} message (signed by key {str(sig['kid'])[:20]!r}; the "
                            f"key allowed on this topic is {fingerprint(key)})") from None
