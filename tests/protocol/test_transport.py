import random
import threading

from edge_runtime.transport.base import Will, backoff_delay
from edge_runtime.transport.memory import MemoryBroker, MemoryTransport
from edge_runtime.transport.mqtt import BrokerAddress


def _collect(transport, pattern):
    got, ev = [], threading.Event()

    def handler(t, p):
        got.append((t, p))
        ev.set()
    transport.subscribe(pattern, handler)
    return got, ev


def test_memory_transport_wildcards_retained_and_will():
    b = MemoryBroker()
    pub = MemoryTransport(b, "pub", will=Will("s/pub", b"offline"))
    pub.start()
    pub.publish("r/x", b"kept", retain=True)
    sub = MemoryTransport(b, "sub")
    sub.start()
    got, ev = _collect(sub, "r/#")
    assert ev.wait(2) and got == [("r/x", b"kept")]            # retained delivered on subscribe
    will_got, will_ev = _collect(sub, "s/+")
    pub.crash()
    assert will_ev.wait(2) and will_got == [("s/pub", b"offline")]
    sub.stop()


def test_clean_stop_sends_no_will():
    b = MemoryBroker()
    c = MemoryTransport(b, "c", will=Will("s/c", b"offline"))
    c.start()
    c.stop()
    assert "s/c" not in b.retained


def test_backoff_is_capped_exponential_with_jitter():
    rng = random.Random(0)
    delays = [backoff_delay(a, rng, base=0.5, cap=8.0) for a in range(10)]
    for a, d in enumerate(delays):
        full = min(8.0, 0.5 * 2 ** a)
        assert full / 2 <= d <= full
    assert len({round(backoff_delay(3, rng), 6) for _ in range(20)}) > 10   # jittered, not lock-step


def test_broker_urls():
    a = BrokerAddress.parse("mqtts://user:p%40ss@host.example:8884")
    assert (a.host, a.port, a.tls, a.username, a.password) == ("host.example", 8884, True, "user", "p@ss")
    assert BrokerAddress.parse("localhost").port == 1883
    import pytest

    from edge_runtime.errors import ConfigError
    with pytest.raises(ConfigError, match="scheme"):
        BrokerAddress.parse("http://x")


def _unsubscribe_stops_delivery_and_resubscribing_replays_retained(pub, sub):
    import time

    pub.publish("g/chunk/0", b"v1", retain=True)
    got, ev = _collect(sub, "g/#")
    assert ev.wait(10) and got == [("g/chunk/0", b"v1")]
    sub.unsubscribe("g/#")
    time.sleep(0.5)   # the UNSUBSCRIBE reaches the broker before the next publish
    pub.publish("g/chunk/0", b"v2", retain=True)
    time.sleep(0.5)
    assert got == [("g/chunk/0", b"v1")]              # nothing after the unsubscribe
    again, ev2 = _collect(sub, "g/#")
    assert ev2.wait(10) and again == [("g/chunk/0", b"v2")]   # the retained copy, on subscribing again


def test_memory_transport_unsubscribe():
    b = MemoryBroker()
    pub, sub = MemoryTransport(b, "pub"), MemoryTransport(b, "sub")
    pub.start()
    sub.start()
    try:
        _unsubscribe_stops_delivery_and_resubscribing_replays_retained(pub, sub)
    finally:
        pub.stop()
        sub.stop()


def test_mqtt_transport_unsubscribe_over_mosquitto(tmp_path):
    """What a device does to stop and resume receiving the whole global (a compressed downlink)."""
    from edge_runtime.transport.mqtt import MqttTransport
    from tests.integration.mosquitto import Mosquitto

    broker = Mosquitto(tmp_path / "m").start()
    pub = MqttTransport(BrokerAddress.parse(broker.url), client_id="pub")
    sub = MqttTransport(BrokerAddress.parse(broker.url), client_id="sub")
    try:
        for t in (pub, sub):
            t.start()
            assert t.wait_connected(10)
        _unsubscribe_stops_delivery_and_resubscribing_replays_retained(pub, sub)
    finally:
        pub.stop(2)
        sub.stop(2)
        broker.stop()
