"""Run by ``test_broker_acl``: one MqttTransport over TLS publishes from 4 threads while its network
thread reads the same messages back. Exits 0 when every message came back (a native crash of
OpenSSL ends the process with a signal instead).

    python tests/integration/tls_stress.py mqtts://user:pw@127.0.0.1:PORT ca.crt N TOPIC
"""

import sys
import threading
import time

from edge_runtime.transport.mqtt import BrokerAddress, MqttTransport


def main() -> int:
    url, ca, n, topic = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    t = MqttTransport(BrokerAddress.parse(url), client_id=f"stress-{time.monotonic_ns()}", ca_certs=ca)
    got: list[bytes] = []
    lock = threading.Lock()

    def on(_topic: str, payload: bytes) -> None:
        with lock:
            got.append(payload)

    t.subscribe(topic, on)
    t.start()
    if not t.wait_connected(15):
        return 2

    def publish(k: int) -> None:
        for i in range(n):
            t.publish(topic, b"x" * 2000 + f"{k}-{i}".encode())

    threads = [threading.Thread(target=publish, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    deadline = time.monotonic() + 60
    while len(got) < 4 * n and time.monotonic() < deadline:
        time.sleep(0.05)
    t.stop()
    print(len(got), "of", 4 * n)
    return 0 if len(got) == 4 * n and len(set(got)) == 4 * n else 1


if __name__ == "__main__":
    sys.exit(main())
