"""MQTT transport over paho-mqtt (the only module that imports paho).

QoS 1, MQTT 3.1.1 (what every broker speaks, the embedded amqtt included), last will, TLS and
username / password, and a background thread that reconnects with jittered exponential backoff
and restores subscriptions after every reconnect.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import unquote, urlparse

import paho.mqtt.client as mqtt

from edge_runtime.errors import ConfigError
from edge_runtime.protocol.topics import matches
from edge_runtime.transport.base import Handler, Will, backoff_delay

log = logging.getLogger("edge_runtime.transport.mqtt")


@dataclass(frozen=True)
class BrokerAddress:
    """``mqtt://[user:pass@]host:port`` or ``mqtts://...`` (TLS)."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> "BrokerAddress":
        form = "expected mqtt://[user:pass@]host[:port] or mqtts://..."
        if not isinstance(url, str) or not url.strip():
            raise ConfigError(f"broker URL is empty ({form})")
        if "://" not in url and ("/" in url or (url.count(":") > 1 and not url.startswith("["))):   # 'mqtt//host:1883', 'mqtt:host:1883'
            raise ConfigError(f"broker URL {url!r} is malformed ({form})")
        u = urlparse(url if "://" in url else f"mqtt://{url}")
        if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ConfigError(f"broker URL scheme must be mqtt:// or mqtts://, got {url!r}")
        if not u.hostname:
            raise ConfigError(f"broker URL has no host: {url!r} ({form})")
        if u.path not in ("", "/") or u.query or u.fragment or u.params:
            raise ConfigError(f"broker URL {url!r} has a path or query after host:port ({form})")
        tls = u.scheme in ("mqtts", "ssl")
        try:
            port = u.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise ConfigError(f"broker URL has a bad port: {url!r}") from exc
        return cls(u.hostname, port, tls, unquote(u.username) if u.username else None,
                   unquote(u.password) if u.password else None)

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


class MqttTransport:
    """A reconnecting MQTT client; handlers run on its network thread, so keep them short."""

    def __init__(self, address: BrokerAddress, client_id: str, will: Will | None = None, keepalive: int = 30,
                 clean_session: bool = True, ca_certs: str | None = None, certfile: str | None = None,
                 keyfile: str | None = None, backoff_base: float = 0.5, backoff_cap: float = 30.0,
                 rng: random.Random | None = None) -> None:
        self.address = address
        self.client_id = client_id
        self.keepalive = keepalive
        self._backoff = (backoff_base, backoff_cap)
        self._rng = rng or random.Random()
        self._subs: list[tuple[str, int, Handler]] = []
        self._subs_lock = threading.Lock()
        self._on_connect_cbs: list[Callable[[], None]] = []
        self._connected = threading.Event()
        self._had_connack = False
        self._stopping = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: list[mqtt.MQTTMessageInfo] = []
        self._pending_lock = threading.Lock()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
                        protocol=mqtt.MQTTv311)
        c.max_inflight_messages_set(64)
        c.max_queued_messages_set(0)  # unbounded: QoS 1 messages wait for the reconnect
        if address.username:
            c.username_pw_set(address.username, address.password)
        if address.tls or ca_certs:
            c.tls_set(ca_certs=ca_certs, certfile=certfile, keyfile=keyfile, cert_reqs=ssl.CERT_REQUIRED)
        if will is not None:
            c.will_set(will.topic, will.payload, qos=1, retain=will.retain)
        c.on_connect = self._handle_connect
        c.on_disconnect = self._handle_disconnect
        c.on_message = self._handle_message
        # Only the network thread may touch the socket. paho writes a publish (subscribe,
        # disconnect) at once from the calling thread when it runs no loop thread of its own, as
        # here (``_run`` drives ``loop()``); over TLS, that SSL_write racing the network thread's
        # SSL_read corrupts OpenSSL's heap (seen as "malloc(): unsorted double linked list
        # corrupted" in a server under load). With this callback set, paho only queues the packet
        # and wakes ``loop()``, which writes it.
        c.on_socket_register_write = lambda *_: None
        self._client = c

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.client_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        if self._connected.is_set():
            self.flush(timeout)
            self._client.disconnect()  # clean: the broker does not publish the will
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._connected.clear()

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                self._client.connect(self.address.host, self.address.port, self.keepalive)
            except (OSError, ssl.SSLError) as exc:
                delay = backoff_delay(attempt, self._rng, *self._backoff)
                attempt += 1
                log.warning("%s: cannot reach broker %s (%s); retry in %.1f s", self.client_id, self.address,
                            exc, delay)
                self._stop.wait(delay)
                continue
            while not self._stop.is_set():
                rc = self._client.loop(timeout=0.1)
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    break
            self._connected.clear()
            if self._stop.is_set() or self._stopping:
                # let a clean DISCONNECT go out
                for _ in range(10):
                    if self._client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                        break
                return
            if self._had_connack:  # a session that got going resets the backoff
                attempt, self._had_connack = 0, False
            delay = backoff_delay(attempt, self._rng, *self._backoff)
            attempt += 1
            log.warning("%s: connection to %s lost; reconnecting in %.1f s", self.client_id, self.address, delay)
            self._stop.wait(delay)

    # -- paho callbacks (network thread) -----------------------------------------------------
    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("%s: broker %s refused the connection: %s", self.client_id, self.address, reason_code)
            return
        self._had_connack = True
        with self._subs_lock:
            subs = list(self._subs)
        seen = set()
        for pattern, qos, _ in subs:
            if pattern not in seen:
                client.subscribe(pattern, qos)
                seen.add(pattern)
        self._connected.set()
        log.info("%s: connected to %s", self.client_id, self.address)
        for cb in list(self._on_connect_cbs):
            try:
                cb()
            except Exception:  # a callback's failure must not kill the network thread
                log.exception("%s: on_connect callback failed", self.client_id)

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()

    def _handle_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        with self._subs_lock:
            handlers = [h for p, _, h in self._subs if matches(p, msg.topic)]
        for handler in handlers:
            try:
                handler(msg.topic, msg.payload)
            except Exception:  # one bad message must not kill the network thread
                log.exception("%s: handler for %s failed", self.client_id, msg.topic)

    # -- API ---------------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if qos > 0:
            if info.rc == mqtt.MQTT_ERR_NO_CONN:
                # paho keeps a QoS>0 message queued and sends it after the reconnect; its info would
                # report the failed first attempt forever, so track it as pending instead.
                info.rc = mqtt.MQTT_ERR_SUCCESS
            with self._pending_lock:
                self._pending = [p for p in self._pending if not _published(p)]
                self._pending.append(info)

    def subscribe(self, pattern: str, handler: Handler, qos: int = 1) -> None:
        with self._subs_lock:
            self._subs.append((pattern, qos, handler))
        if self._connected.is_set():
            self._client.subscribe(pattern, qos)

    def unsubscribe(self, pattern: str) -> None:
        with self._subs_lock:
            self._subs = [s for s in self._subs if s[0] != pattern]
        if self._connected.is_set():
            self._client.unsubscribe(pattern)

    def on_connect(self, callback: Callable[[], None]) -> None:
        self._on_connect_cbs.append(callback)

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._pending_lock:
            pending = list(self._pending)
        for info in pending:
            while not _published(info):
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.005)
        with self._pending_lock:
            self._pending = [p for p in self._pending if not _published(p)]
        return True


def _published(info: mqtt.MQTTMessageInfo) -> bool:
    try:
        return info.is_published()
    except (RuntimeError, ValueError):  # failed for good (e.g. queue full): nothing left to wait for
        return True
