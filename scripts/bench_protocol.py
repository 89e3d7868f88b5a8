"""Benchmark the wire protocol: server ingest throughput, bytes per round, overhead share of a round.

``ingest``: the real coordinator (own process) behind a real Mosquitto (or the embedded amqtt),
N lightweight simulated devices (paho clients in 2 processes) each sending one 1 MB update
(safetensors, 256 KiB chunks, sha256 checked, validated, persisted with fsync, acked). The fleet is
signed as a production one is: every device enrolled with its own Ed25519 key, every message
signed and verified (``--insecure`` measures the unsigned path).
Throughput = update bytes / (first send -> last ack).

``demo``: runs ``edge-runtime demo`` (MiniLM + LoRA, WordNet) and reads the server report and the
agents' timings: bytes up / down per round vs the adapter's size, and the protocol's share of a
round (decode of the global + encode of the update + send-to-ack) vs the round's wall time.

    python scripts/bench_protocol.py ingest            # ~1 min
    python scripts/bench_protocol.py demo              # ~6 min
    python scripts/bench_protocol.py all

Writes scripts/results/protocol.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "scripts" / "results"
TENSOR_ELEMS = 262_144  # float32: 1 MiB of adapter


def _spec_json() -> dict:
    """A valid training spec (the server checks it); nothing is trained in the ingest benchmark."""
    from edge_runtime.training.spec import TrainingSpec

    return TrainingSpec(model="tiny-llama", labels=("a", "b")).to_json()


def _server_proc(url: str, state_dir: str, n: int, ready: mp.Event, done: mp.Event, signed: bool) -> None:
    import logging
    import threading

    import torch

    from broker_server.coordinator import Coordinator, ServerConfig
    from broker_server.enrolment import Enrolment, server_identity
    from broker_server.store import Store
    from edge_runtime.protocol.codec import Security
    from edge_runtime.transport.mqtt import BrokerAddress, MqttTransport

    logging.basicConfig(level=logging.WARNING)
    cfg = ServerConfig(fleet="bench", rounds=1, min_devices=n, quorum=1.0, deadline_s=600,
                       max_update_bytes=4 * 1024 * 1024, training=_spec_json())
    transport = MqttTransport(BrokerAddress.parse(url), client_id="bench-server")
    security = (Security(server_identity(Path(state_dir))[0], Enrolment(Path(state_dir))) if signed else Security())
    coord = Coordinator(cfg, Store(Path(state_dir)), transport, lambda: {"w": torch.zeros(TENSOR_ELEMS)},
                        run_id="bench-run", security=security)
    stop = threading.Event()
    threading.Thread(target=lambda: (done.wait(), stop.set()), daemon=True).start()
    ready.set()
    coord.serve(stop, exit_when_done=False)
    transport.stop()


def _devices_proc(url: str, ids: list[str], go: mp.Event, out: mp.Queue, keys_dir: str | None,
                  server_key: str | None) -> None:
    import threading

    import torch

    from edge_runtime.protocol import topics
    from edge_runtime.protocol.chunking import split_payload
    from edge_runtime.protocol.codec import Security, encode_tensors
    from edge_runtime.protocol.messages import Ack, Heartbeat, Hello, RoundManifest, Status, UpdateManifest
    from edge_runtime.protocol.signing import Identity, PinnedKey
    from edge_runtime.transport.mqtt import BrokerAddress, MqttTransport

    sec = {d: (Security(Identity.load(Path(keys_dir) / d / "device.key"), PinnedKey(server_key))
               if keys_dir else Security()) for d in ids}

    def encode_message(msg, d, topic):
        return sec[d].encode(msg, topic)

    def decode_message(payload, kind, d, topic):
        return sec[d].decode(payload, kind, topic)

    blob = encode_tensors({"w": torch.randn(TENSOR_ELEMS)})
    acks: dict[str, float] = {}
    manifests: dict[str, RoundManifest] = {}
    lock = threading.Lock()
    clients = {}
    for d in ids:
        t = MqttTransport(BrokerAddress.parse(url), client_id=f"bench-{d}")

        def on_ack(topic, payload, d=d):
            a = decode_message(payload, Ack, d, topic)
            with lock:
                acks.setdefault(d, time.time()) if a.accepted else None

        def on_round(topic, payload, d=d):
            manifests[d] = decode_message(payload, RoundManifest, d, topic)

        def hello(t=t, d=d):
            for kind, msg, retain in (("hello", Hello(d, {}, "bench", 100), True), ("status", Status(d, True), True),
                                      ("heartbeat", Heartbeat(d), False)):
                topic = topics.device_topic("bench", d, kind)
                t.publish(topic, encode_message(msg, d, topic), retain=retain)
        t.subscribe(topics.device_topic("bench", d, "ack"), on_ack)
        t.subscribe(topics.round_topic("bench"), on_round)
        t.on_connect(hello)
        t.start()
        clients[d] = t
    while not all(d in manifests and manifests[d].action == "train" for d in ids):
        time.sleep(0.05)
    out.put(("ready", len(ids)))
    go.wait()
    t_start = time.time()
    for d, t in clients.items():
        m = manifests[d]
        uid = f"u-{d}"
        ref, frames = split_payload(uid, blob)
        topic = topics.device_topic("bench", d, "update")
        t.publish(topic, encode_message(UpdateManifest(m.run_id, d, m.round, uid, ref, 100, {}), d, topic))
        for f in frames:
            t.publish(topics.device_topic("bench", d, "update/chunk"), f)
    while len(acks) < len(ids) and time.time() - t_start < 300:
        time.sleep(0.01)
    out.put(("result", t_start, max(acks.values()) if acks else None, len(acks), len(blob)))
    for t in clients.values():
        t.stop(2)


def bench_ingest(n_devices: int, broker: str, signed: bool = True) -> dict:
    from broker_server.broker import free_port, start_broker_process, wait_for_port
    from broker_server.enrolment import enrol_local_devices

    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    ids = [f"d{k:03d}" for k in range(n_devices)]
    keys_dir = tmp / "devices" if signed else None
    server_key = enrol_local_devices(tmp / "state", {d: keys_dir / d for d in ids}) if signed else None
    port = free_port()
    if broker == "mosquitto":
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        conf = tmp / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        f"max_queued_messages 10000\n" + ("user root\n" if os.geteuid() == 0 else ""))
        bproc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port("127.0.0.1", port)
    else:
        bproc = start_broker_process("127.0.0.1", port)
    url = f"mqtt://127.0.0.1:{port}"
    ctx = mp.get_context("spawn")
    ready, done, go = ctx.Event(), ctx.Event(), ctx.Event()
    out = ctx.Queue()
    server = ctx.Process(target=_server_proc, args=(url, str(tmp / "state"), n_devices, ready, done, signed))
    server.start()
    ready.wait(60)
    halves = [ids[: n_devices // 2], ids[n_devices // 2:]]
    senders = [ctx.Process(target=_devices_proc, args=(url, h, go, out, str(keys_dir) if keys_dir else None,
                                                       server_key)) for h in halves]
    for p in senders:
        p.start()
    for _ in senders:
        assert out.get(timeout=300)[0] == "ready"
    go.set()
    results = [out.get(timeout=600) for _ in senders]
    done.set()
    for p in senders + [server]:
        p.join(30)
    bproc.terminate()
    bproc.wait(10)
    start = min(r[1] for r in results)
    end = max(r[2] for r in results if r[2] is not None)
    acked = sum(r[3] for r in results)
    size = results[0][4]
    secs = end - start
    shutil.rmtree(tmp, ignore_errors=True)
    return {"broker": broker, "signed": signed, "devices": n_devices, "update_bytes": size, "acked": acked,
            "seconds": secs,
            "throughput_MB_s": acked * size / secs / 1e6, "updates_per_s": acked / secs}


def bench_demo(out_dir: Path, reuse: bool) -> dict:
    if not (reuse and (out_dir / "report.json").exists()):
        subprocess.run([sys.executable, "-m", "edge_runtime.cli", "demo", "--out", str(out_dir)], check=True)
    report = json.loads((out_dir / "report.json").read_text())
    adapter = out_dir / "global_adapter" / "adapter_model.safetensors"
    adapter_bytes = adapter.stat().st_size
    rows = [h for h in report["rounds"] if h["round"] >= 1]
    per_device = {}
    for agent in sorted((out_dir / "devices").glob("*/agent.json")):
        per_device[agent.parent.name] = json.loads(agent.read_text()).get("timings", [])
    shares = []
    for h in rows:
        proto = [sum(t.get(k, 0.0) for k in ("decode_s", "encode_s", "upload_to_ack_s"))
                 for ts in per_device.values() for t in ts if t["round"] == h["round"]]
        if proto and h["seconds"]:
            shares.append(statistics.mean(proto) / h["seconds"])
    # exact wire framing of one update: chunk headers + the manifest (MQTT's own ~5 bytes a message aside)
    from edge_runtime.protocol.chunking import split_payload
    from edge_runtime.protocol.codec import encode_message
    from edge_runtime.protocol.messages import UpdateManifest

    payload = adapter.read_bytes()
    ref, frames = split_payload("u" + "0" * 20, payload)
    manifest = encode_message(UpdateManifest(report["run_id"], "dev00", 1, ref.payload_id, ref, 1000,
                                             {"eval_accuracy": 0.5, "eval_loss": 1.0, "eval_n": 100,
                                              "train_loss": 1.0, "train_seconds": 60.0, "train_steps": 60}))
    wire = sum(len(f) for f in frames) + len(manifest)
    return {
        "adapter_file_bytes": adapter_bytes,
        "update_wire_bytes": wire,
        "update_framing_overhead": wire / len(payload) - 1,
        "chunks_per_update": len(frames),
        "rounds": [{"round": h["round"], "devices": len(h["accepted"]), "bytes_up": h["bytes_up"],
                    "bytes_down": h["bytes_down"], "bytes_up_per_device": h["bytes_up"] / max(1, len(h["accepted"])),
                    "seconds": h["seconds"]} for h in rows],
        "protocol_share_of_round": shares,
        "protocol_share_mean": statistics.mean(shares) if shares else None,
        "device_timings": per_device,
        "final_accuracy": report["rounds"][-1]["accuracy"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["ingest", "demo", "all"])
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--broker", choices=["mosquitto", "embedded"], default="mosquitto")
    ap.add_argument("--insecure", action="store_true", help="ingest: unsigned messages (default: signed, enrolled)")
    ap.add_argument("--demo-out", type=Path, default=REPO / "runs" / "bench-demo")
    ap.add_argument("--reuse-demo", action="store_true", help="read an existing demo run instead of running one")
    ap.add_argument("--out", type=Path, default=RESULTS / "protocol.json")
    args = ap.parse_args()
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.what in ("ingest", "all"):
        r = bench_ingest(args.devices, args.broker, signed=not args.insecure)
        result[f"ingest_{args.broker}{'_insecure' if args.insecure else ''}"] = r
        print(f"ingest via {r['broker']} ({'signed' if r['signed'] else 'unsigned'}): {r['acked']}/{r['devices']} updates of {r['update_bytes'] / 1e6:.2f} MB "
              f"acked in {r['seconds']:.2f} s = {r['throughput_MB_s']:.1f} MB/s ({r['updates_per_s']:.1f} updates/s)")
    if args.what in ("demo", "all"):
        d = bench_demo(args.demo_out, args.reuse_demo)
        result["demo"] = d
        for r in d["rounds"]:
            print(f"round {r['round']}: up {r['bytes_up'] / 1e6:.2f} MB ({r['bytes_up_per_device'] / 1e6:.3f} MB "
                  f"per device), down {r['bytes_down'] / 1e6:.2f} MB, adapter file {d['adapter_file_bytes'] / 1e6:.3f} MB,"
                  f" {r['seconds']:.1f} s")
        print(f"one update on the wire: {d['update_wire_bytes']} bytes in {d['chunks_per_update']} chunks "
              f"(+{100 * d['update_framing_overhead']:.3f} % framing)")
        print(f"protocol share of round time: {[round(100 * s, 2) for s in d['protocol_share_of_round']]} % "
              f"(mean {100 * (d['protocol_share_mean'] or 0):.2f} %)")
    from edge_runtime.atomic_io import write_json_atomic

    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
