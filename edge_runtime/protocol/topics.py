"""The one module that builds and parses MQTT topic strings.

Layout (``<fleet>`` isolates fleets sharing a broker; ``v1`` is the protocol version)::

    efl/v1/<fleet>/round                         server -> all, retained RoundManifest
    efl/v1/<fleet>/global                        server -> all, retained GlobalAnnouncement
    efl/v1/<fleet>/global/chunk/<i>              server -> all, retained chunks of the global adapter
    efl/v1/<fleet>/delta/chunk/<i>               server -> all, retained chunks of the global's compressed delta
    efl/v1/<fleet>/init/chunk/<i>                server -> all, retained chunks of the run's init adapter
                                                 (methods that need it, e.g. FeDeRA's A0 / B0)
    efl/v1/<fleet>/summary                       server -> observers, RoundSummary per round
    efl/v1/<fleet>/server/status                 server presence (retained; last will "offline")
    efl/v1/<fleet>/dev/<device>/hello            device -> server, retained Hello
    efl/v1/<fleet>/dev/<device>/status           device presence (retained; last will "offline")
    efl/v1/<fleet>/dev/<device>/heartbeat        device -> server
    efl/v1/<fleet>/dev/<device>/update           device -> server, UpdateManifest
    efl/v1/<fleet>/dev/<device>/update/chunk     device -> server, update chunks
    efl/v1/<fleet>/dev/<device>/ack              server -> device, Ack
    efl/v1/<fleet>/profile                       operator -> all devices, retained ProfilePush
    efl/v1/<fleet>/dev/<device>/profile          operator -> one device, retained ProfilePush
    efl/v1/<fleet>/dev/<device>/profile/ack      device -> operator, ProfileAck (accepted or why not)
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_runtime.protocol.messages import ProtocolError, check_id

ROOT = "efl/v1"
DEVICE_KINDS = ("hello", "status", "heartbeat", "update", "update/chunk", "ack", "profile", "profile/ack")


@dataclass(frozen=True)
class Topic:
    fleet: str
    kind: str                  # round | global | global/chunk | init/chunk | delta/chunk | summary | server/status | dev/<kind>
    device_id: str | None = None
    index: int | None = None   # chunk index of the global / init adapter


def _fleet(fleet: str) -> str:
    return f"{ROOT}/{check_id('fleet', fleet)}"


def round_topic(fleet: str) -> str:
    return f"{_fleet(fleet)}/round"


def global_topic(fleet: str) -> str:
    return f"{_fleet(fleet)}/global"


def global_chunk_topic(fleet: str, index: int) -> str:
    return f"{_fleet(fleet)}/global/chunk/{int(index)}"


def init_chunk_topic(fleet: str, index: int) -> str:
    return f"{_fleet(fleet)}/init/chunk/{int(index)}"


def init_wildcard(fleet: str) -> str:
    return f"{_fleet(fleet)}/init/#"


def delta_chunk_topic(fleet: str, index: int) -> str:
    return f"{_fleet(fleet)}/delta/chunk/{int(index)}"


def delta_wildcard(fleet: str) -> str:
    return f"{_fleet(fleet)}/delta/#"


def fleet_profile_topic(fleet: str) -> str:
    return f"{_fleet(fleet)}/profile"


def summary_topic(fleet: str) -> str:
    return f"{_fleet(fleet)}/summary"


def server_status_topic(fleet: str) -> str:
    return f"{_fleet(fleet)}/server/status"


def device_topic(fleet: str, device_id: str, kind: str) -> str:
    if kind not in DEVICE_KINDS:
        raise ValueError(f"unknown device topic kind {kind!r}")
    return f"{_fleet(fleet)}/dev/{check_id('device_id', device_id)}/{kind}"


def device_wildcard(fleet: str, kind: str) -> str:
    """Subscription pattern for one kind of message from every device."""
    if kind not in DEVICE_KINDS:
        raise ValueError(f"unknown device topic kind {kind!r}")
    return f"{_fleet(fleet)}/dev/+/{kind}"


def global_wildcard(fleet: str) -> str:
    return f"{_fleet(fleet)}/global/#"


def parse_topic(topic: str) -> Topic:
    """Parse any topic of the layout above; ProtocolError for anything else."""
    parts = topic.split("/")
    if len(parts) < 4 or "/".join(parts[:2]) != ROOT:
        raise ProtocolError(f"topic {topic!r:.120} is not under {ROOT}/")
    fleet, rest = check_id("fleet", parts[2]), parts[3:]
    if rest in (["round"], ["global"], ["summary"], ["profile"], ["server", "status"]):
        return Topic(fleet, "/".join(rest))
    if len(rest) == 3 and rest[0] in ("global", "init", "delta") and rest[1] == "chunk" and rest[2].isdigit():
        return Topic(fleet, f"{rest[0]}/chunk", index=int(rest[2]))
    if len(rest) >= 3 and rest[0] == "dev":
        kind = "/".join(rest[2:])
        if kind in DEVICE_KINDS:
            return Topic(fleet, f"dev/{kind}", device_id=check_id("device_id", rest[1]))
    raise ProtocolError(f"topic {topic!r:.120} is not a known edge-runtime topic")


def matches(pattern: str, topic: str) -> bool:
    """MQTT topic-filter matching: ``+`` one level, ``#`` the rest (also zero levels); ``$`` topics need explicit filters."""
    p_parts, t_parts = pattern.split("/"), topic.split("/")
    if t_parts[0].startswith("$") and p_parts[0] in ("+", "#"):
        return False
    for i, p in enumerate(p_parts):
        if p == "#":
            return True
        if i >= len(t_parts):
            return False
        if p != "+" and p != t_parts[i]:
            return False
    return len(p_parts) == len(t_parts)
