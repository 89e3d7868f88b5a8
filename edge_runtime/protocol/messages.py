"""Versioned protocol messages: frozen dataclasses, validated on construction.

Every control message travels as one small JSON object ``{"v": 4, "type": ..., ...fields}``;
tensors never travel inside them (they go as safetensors payloads, see ``chunking``).

Version 2: an update's per-block step counts travel as the typed ``layer_steps`` field,
no longer as ``layer_steps.<l>`` metric keys. Version 3: messages may carry a ``sig`` field
(``signing``), and the training spec has a ``robust`` section (the server's defences). Version 4:
the training spec has a ``dp`` section (DP-FedAvg). A server and
its devices must speak the same version: a message of another version is refused with a reason
that names both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from edge_runtime.errors import EdgeRuntimeError

PROTOCOL_VERSION = 10
MAX_LAYERS = 4096          # bound on ``layer_steps`` entries (one per transformer block)
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class ProtocolError(EdgeRuntimeError, ValueError):
    """A message or payload violates the protocol; the text says what and where."""


def check_id(kind: str, value: object) -> str:
    """Device / fleet / update ids: 1-64 chars of letters, digits, ``_ . -`` (safe in topics and paths)."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise ProtocolError(f"{kind} must be 1-64 characters of letters, digits, '_', '.', '-', got {value!r:.80}")
    return value


def _check_round(value: object, name: str = "round") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError(f"{name} must be an integer >= 0, got {value!r:.40}")
    return value


def protocol1_layer_steps(metrics: dict) -> tuple[int, ...]:
    """The per-block step counts a protocol-1 update carried as ``layer_steps.<l>`` metric keys (an
    update accepted, or a pending one saved, before the upgrade): ``()`` unless they run 0..L-1."""
    found = {}
    for k, v in metrics.items():
        if isinstance(k, str) and k.startswith("layer_steps.") and k[12:].isdigit() and len(k) < 20:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer() or v < 0:
                return ()
            found[int(k[12:])] = int(v)
    if sorted(found) != list(range(len(found))) or len(found) > MAX_LAYERS:
        return ()
    return tuple(found[l] for l in range(len(found)))


@dataclass(frozen=True)
class PayloadRef:
    """Describes a chunked payload: id, total size (bytes), sha256 (hex) of the whole, chunk count."""

    payload_id: str
    size: int
    sha256: str
    n_chunks: int

    def __post_init__(self) -> None:
        check_id("payload_id", self.payload_id)
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise ProtocolError(f"payload size must be an integer >= 0, got {self.size!r:.40}")
        if not isinstance(self.sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ProtocolError(f"sha256 must be 64 lowercase hex digits, got {self.sha256!r:.80}")
        if isinstance(self.n_chunks, bool) or not isinstance(self.n_chunks, int) or self.n_chunks < 1:
            raise ProtocolError(f"n_chunks must be an integer >= 1, got {self.n_chunks!r:.40}")


@dataclass(frozen=True)
class Hello:
    """Device -> server (retained): who I am, what I can do, what I last finished."""

    TYPE: ClassVar[str] = "hello"
    device_id: str
    profile: dict = field(default_factory=dict)     # device profile (memory, compute, ...)
    runtime_version: str = ""
    n_samples: int = 0                              # local training examples
    last_round_done: int = -1

    def __post_init__(self) -> None:
        check_id("device_id", self.device_id)
        if not isinstance(self.profile, dict):
            raise ProtocolError("hello.profile must be an object")


@dataclass(frozen=True)
class RoundManifest:
    """Server -> all (retained): the current round, who takes part, what to do, and the global adapter."""

    TYPE: ClassVar[str] = "round"
    run_id: str
    round: int
    action: str                                   # "score" | "train" | "evaluate" | "done"
    participants: tuple[str, ...]
    global_payload: PayloadRef | None
    deadline_s: float                             # seconds the server waits for updates
    training: dict = field(default_factory=dict)  # model, method, labels, train + method configs
    issued_at: float = 0.0                        # server wall clock (seconds since epoch)
    init_payload: PayloadRef | None = None        # the run's init adapter, for methods that need it (FeDeRA)
    assignments: dict = field(default_factory=dict)   # device -> its spec overrides this round (DropPEFT)
    global_delta: PayloadRef | None = None        # compressed downlink: the global as a delta from ...
    delta_base: str = ""                          # ... the global whose payload has this sha256 (hex)

    def __post_init__(self) -> None:
        check_id("run_id", self.run_id)
        _check_round(self.round)
        if (self.global_delta is None) != (self.delta_base == "") or (
                self.delta_base and not _SHA_RE.match(str(self.delta_base))):
            raise ProtocolError("round.global_delta and round.delta_base (a sha256 in hex) come together")
        if self.action not in ("score", "train", "evaluate", "done"):
            raise ProtocolError(f"round.action must be score / train / evaluate / done, got {self.action!r:.40}")
        for d in self.participants:
            check_id("participant", d)
        if not isinstance(self.assignments, dict):
            raise ProtocolError(f"round.assignments must be an object, got {type(self.assignments).__name__}")
        for d, a in self.assignments.items():
            check_id("assignments device", d)
            if not isinstance(a, dict):
                raise ProtocolError(f"round.assignments[{d}] must be an object, got {type(a).__name__}")


@dataclass(frozen=True)
class GlobalAnnouncement:
    """Server -> all (retained): the latest global adapter's payload (chunks on the global topic)."""

    TYPE: ClassVar[str] = "global"
    run_id: str
    round: int          # the global adapter the devices start round `round` from
    payload: PayloadRef

    def __post_init__(self) -> None:
        check_id("run_id", self.run_id)
        _check_round(self.round)


@dataclass(frozen=True)
class UpdateManifest:
    """Device -> server: my update for ``round`` (payload chunks follow on the update topic).

    ``(device_id, round, update_id)`` is the idempotency key: a re-sent update is counted once.
    """

    TYPE: ClassVar[str] = "update"
    run_id: str
    device_id: str
    round: int
    update_id: str
    payload: PayloadRef | None        # None for an evaluate-only report
    n_samples: int                    # aggregation weight
    metrics: dict = field(default_factory=dict)   # e.g. eval of the received global, train loss, seconds
    # optimizer steps each transformer block ran, in block order (methods with layer dropout); () otherwise
    layer_steps: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        check_id("run_id", self.run_id)
        check_id("device_id", self.device_id)
        check_id("update_id", self.update_id)
        _check_round(self.round)
        if isinstance(self.n_samples, bool) or not isinstance(self.n_samples, int) or self.n_samples < 0:
            raise ProtocolError(f"n_samples must be an integer >= 0, got {self.n_samples!r:.40}")
        if not isinstance(self.metrics, dict):
            raise ProtocolError("update.metrics must be an object")
        if not isinstance(self.layer_steps, tuple) or len(self.layer_steps) > MAX_LAYERS or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in self.layer_steps):
            raise ProtocolError(f"update.layer_steps must be at most {MAX_LAYERS} integers >= 0, "
                                f"got {self.layer_steps!r:.80}")

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.device_id, self.round, self.update_id)


@dataclass(frozen=True)
class Ack:
    """Server -> device: the update was accepted (or was a duplicate of an accepted one), or rejected."""

    TYPE: ClassVar[str] = "ack"
    device_id: str
    round: int
    update_id: str
    accepted: bool
    reason: str = ""      # why it was rejected, or "duplicate"
    retry: bool = False   # rejected, but re-sending the same update may succeed (e.g. a corrupted chunk)

    def __post_init__(self) -> None:
        check_id("device_id", self.device_id)
        check_id("update_id", self.update_id)
        _check_round(self.round)


@dataclass(frozen=True)
class Heartbeat:
    """Device -> server: still alive; what it is doing."""

    TYPE: ClassVar[str] = "heartbeat"
    device_id: str
    state: str = "idle"     # idle | fetching | training | uploading
    round: int = -1
    sent_at: float = 0.0

    def __post_init__(self) -> None:
        check_id("device_id", self.device_id)


@dataclass(frozen=True)
class Status:
    """Presence (retained): ``online`` / ``offline``; the broker publishes ``offline`` as the last will."""

    TYPE: ClassVar[str] = "status"
    client_id: str
    online: bool

    def __post_init__(self) -> None:
        check_id("client_id", self.client_id)


@dataclass(frozen=True)
class RoundSummary:
    """Server -> observers: one line per finished round (what ``demo`` prints)."""

    TYPE: ClassVar[str] = "summary"
    run_id: str
    round: int
    participants: tuple[str, ...]
    accepted: int
    accuracy: float | None          # sample-weighted device accuracy of the global the round started from
    loss: float | None
    train_loss: float | None
    seconds: float
    bytes_up: int
    bytes_down: int
    final: bool = False


@dataclass(frozen=True)
class ProfilePush:
    """Operator -> device(s), retained: a device training profile (``{"name", "training": {...}}``),
    validated by the device, applied from its next round, answered with a :class:`ProfileAck`."""

    TYPE: ClassVar[str] = "profile"
    profile_id: str
    profile: dict
    sent_at: float = 0.0

    def __post_init__(self) -> None:
        check_id("profile_id", self.profile_id)
        if not isinstance(self.profile, dict):
            raise ProtocolError("profile.profile must be an object")


@dataclass(frozen=True)
class ProfileAck:
    """Device -> operator: the pushed profile is in force from ``applies_from_round``, or why it was refused
    (the previous profile then stays in force)."""

    TYPE: ClassVar[str] = "profile_ack"
    device_id: str
    profile_id: str
    accepted: bool
    reason: str = ""
    applies_from_round: int = 0

    def __post_init__(self) -> None:
        check_id("device_id", self.device_id)
        check_id("profile_id", self.profile_id)


MESSAGE_TYPES: dict[str, type] = {cls.TYPE: cls for cls in
                                  (Hello, RoundManifest, GlobalAnnouncement, UpdateManifest, Ack, Heartbeat,
                                   Status, RoundSummary, ProfilePush, ProfileAck)}
Message = Any  # one of MESSAGE_TYPES' classes
