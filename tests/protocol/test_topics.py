import pytest

from edge_runtime.protocol import topics
from edge_runtime.protocol.messages import ProtocolError


def test_build_and_parse_every_topic():
    f = "fleet1"
    assert topics.parse_topic(topics.round_topic(f)) == topics.Topic(f, "round")
    assert topics.parse_topic(topics.global_chunk_topic(f, 7)) == topics.Topic(f, "global/chunk", index=7)
    assert topics.parse_topic(topics.init_chunk_topic(f, 2)) == topics.Topic(f, "init/chunk", index=2)
    assert topics.matches(topics.init_wildcard(f), topics.init_chunk_topic(f, 2))
    assert not topics.matches(topics.global_wildcard(f), topics.init_chunk_topic(f, 2))
    for kind in topics.DEVICE_KINDS:
        t = topics.parse_topic(topics.device_topic(f, "dev-1", kind))
        assert (t.kind, t.device_id) == (f"dev/{kind}", "dev-1")


@pytest.mark.parametrize("bad", ["other/v1/f/round", "efl/v1/f/nope", "efl/v1/f/dev/d1/unknown",
                                 "efl/v1/f/dev/../hello", "efl/v1/f/global/chunk/x",
                                 "efl/v1/f/init/chunk/-1", "efl/v1/f/init"])
def test_unknown_topics_rejected(bad):
    with pytest.raises(ProtocolError):
        topics.parse_topic(bad)


def test_ids_with_topic_wildcards_are_refused():
    for bad in ("a/b", "+", "#", ""):
        with pytest.raises(ProtocolError):
            topics.device_topic("f", bad, "hello")


@pytest.mark.parametrize("pattern, topic, hit", [
    ("a/+/c", "a/b/c", True), ("a/+/c", "a/b/d", False), ("a/#", "a", True), ("a/#", "a/b/c", True),
    ("a/b", "a/b/c", False), ("+/+", "a/b", True), ("#", "$SYS/x", False), ("a/+", "a/b/c", False),
])
def test_wildcard_matching(pattern, topic, hit):
    assert topics.matches(pattern, topic) is hit
