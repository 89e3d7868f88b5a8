"""Benchmark: an honest round while a flood of hellos from unknown ids arrives.

A real Mosquitto, the real server (``broker-server run``) and 3 real agents (MiniLM-L6 + LoRA on
WordNet glosses, 300 each). As soon as round 1 opens, a separate client publishes N hellos from N
distinct ids (QoS 1, not retained) as fast as the broker takes them. Arms: N = 0, 5,000, 20,000,
interleaved, ``--repeats`` times each, every arm a fresh server state and the same data and seeds.

In a fleet the server and the devices are different machines: the flood lands on the server's.
So the server, the broker and the flooding client share CPU 0 and the three agents CPU 1
(``--no-pin``: everything on every core, where the flood's CPU also slows the devices' training).

Measured per arm: round 1's duration (the server's own figure: round open -> last update
accepted and aggregated), how many of the fake ids the server registered, whether any was selected,
and the bytes the server wrote: to its state folder (file sizes) and to disk in total
(``/proc/PID/io`` write_bytes, logs included), per hello, over the no-flood arm.

    python scripts/bench_flood.py                 # ~6 min on 2 cores
    python scripts/bench_flood.py --repeats 1 --floods 0 5000

Writes scripts/results/flood.json.
"""

from __future__ import annotations

import argparse
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
FLEET = "flood"


def _mosquitto(workdir: Path):
    from broker_server.broker import free_port, wait_for_port

    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = workdir / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false",
             f"log_dest file {workdir}/mosquitto.log"] + (["user root"] if os.geteuid() == 0 else [])
    conf.write_text("\n".join(lines) + "\n")
    cpus = PIN["server"]
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    wait_for_port("127.0.0.1", port, timeout=10, proc=proc)
    return proc, port


PIN = {"server": None, "devices": None}   # CPU sets, filled in main()


def _spawn(args: list[str], log: Path, cpus: set[int] | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-m", *args], stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env,
                            cwd=REPO, preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)


def _state(state_dir: Path) -> dict:
    from broker_server.store import StateError, Store

    try:
        return Store(state_dir).load() or {}
    except (OSError, StateError):
        return {}


def _io_written(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def _dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _flood(port: int, n: int, tag: str) -> float:
    import paho.mqtt.client as paho

    from edge_runtime.protocol import topics
    from edge_runtime.protocol.codec import encode_message
    from edge_runtime.protocol.messages import Hello

    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"flood-{tag}")
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    t0 = time.perf_counter()
    infos = [c.publish(topics.device_topic(FLEET, f"fake-{tag}-{i}", "hello"),
                       encode_message(Hello(f"fake-{tag}-{i}", {"memory_total": 8 << 30, "cpu_count": 4}, "0.1",
                                            1000)), qos=1) for i in range(n)]
    for info in infos:
        info.wait_for_publish(120)
    seconds = time.perf_counter() - t0
    c.loop_stop()
    c.disconnect()
    return seconds


def run_arm(work: Path, data_files: list[Path], n_flood: int, tag: str) -> dict:
    broker, port = _mosquitto(work)
    url = f"mqtt://127.0.0.1:{port}"
    state_dir = work / "server"
    procs = []
    try:
        server = _spawn(["broker_server.cli", "run", "--broker", url, "--state-dir", str(state_dir), "--fleet", FLEET,
                         "--rounds", "1", "--min-devices", "3", "--quorum", "1.0", "--deadline", "600",
                         "--model", "minilm-l6", "--labels", "wordnet", "--epochs", "1", "--seed", "0",
                         "--keep-serving", "--insecure"],   # the worst case: every flooding id is believed
                        work / "server.log", PIN["server"])
        procs.append(server)
        for k, f in enumerate(data_files):
            procs.append(_spawn(["edge_runtime.cli", "agent", "--broker", url, "--device-id", f"dev{k}", "--fleet",
                                 FLEET, "--data", str(f), "--state-dir", str(work / f"dev{k}"), "--heartbeat", "2",
                                 "--insecure"],
                                work / f"dev{k}.log", PIN["devices"]))
        deadline = time.monotonic() + 900
        while not (_state(state_dir).get("round") == 1 and _state(state_dir).get("phase") == "train"):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"round 1 did not open; see {work / 'server.log'}")
            time.sleep(0.1)
        io0, files0 = _io_written(server.pid), _dir_bytes(state_dir)
        flood_s = _flood(port, n_flood, tag) if n_flood else 0.0
        while _state(state_dir).get("phase") != "done":
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the run did not finish; see {work / 'server.log'}")
            time.sleep(0.2)
        time.sleep(1.5)   # the registry's last batched write
        s = _state(state_dir)
        io1, files1 = _io_written(server.pid), _dir_bytes(state_dir)
        row = s["history"][1]
        fakes = [d for d in s["devices"] if d.startswith("fake-")]
        return {"flood": n_flood, "flood_publish_s": round(flood_s, 2), "round_s": row["seconds"],
                "accepted": row["accepted"], "participants": row["participants"],
                "fakes_registered": len(fakes), "fakes_selected": sum(p.startswith("fake-") for h in s["history"]
                                                                      for p in h["participants"]),
                "server_write_bytes": io1 - io0, "state_dir_bytes_added": files1 - files0,
                "journal_bytes": (state_dir / "devices.jsonl").stat().st_size,
                "state_json_bytes": (state_dir / "state.json").stat().st_size,
                "accuracy": s["history"][-1]["accuracy"]}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
        broker.kill()
        broker.wait(10)


def main() -> None:
    from broker_server.demo import DemoConfig, write_device_data

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--floods", type=int, nargs="+", default=[0, 5000, 20000])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--examples", type=int, default=900, help="WordNet glosses over the 3 devices")
    ap.add_argument("--no-pin", action="store_true", help="do not split server and devices over CPUs 0 and 1")
    ap.add_argument("--out", type=Path, default=RESULTS / "flood.json")
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if not args.no_pin and len(cpus) >= 2:
        PIN.update(server={cpus[0]}, devices=set(cpus[1:]))
        os.sched_setaffinity(0, PIN["server"])   # this process publishes the flood
    root = Path(tempfile.mkdtemp(prefix="bench-flood-"))
    data_files = write_device_data(DemoConfig(out=root / "data", devices=3, max_examples=args.examples))
    runs = []
    for rep in range(args.repeats):
        for n in args.floods:
            work = root / f"r{rep}-n{n}"
            work.mkdir()
            r = run_arm(work, data_files, n, f"{rep}-{n}")
            runs.append(r)
            print(f"flood {n:>6}: round 1 {r['round_s']:6.1f} s, {r['fakes_registered']:>6} fake ids registered, "
                  f"{r['fakes_selected']} selected, server wrote {r['server_write_bytes'] / 1e6:7.2f} MB "
                  f"(state folder +{r['state_dir_bytes_added'] / 1e3:.0f} kB), accepted {r['accepted']}", flush=True)
    base = [r for r in runs if r["flood"] == 0]
    base_s = statistics.median(r["round_s"] for r in base) if base else None
    base_io = statistics.median(r["server_write_bytes"] for r in base) if base else 0
    base_files = statistics.median(r["state_dir_bytes_added"] for r in base) if base else 0
    summary = {}
    for n in args.floods:
        rs = [r for r in runs if r["flood"] == n]
        med = statistics.median(r["round_s"] for r in rs)
        summary[str(n)] = {
            "round_s_median": med, "slowdown_vs_no_flood": (med / base_s - 1) if base_s else None,
            "server_bytes_written_per_hello": ((statistics.median(r["server_write_bytes"] for r in rs) - base_io) / n
                                               if n else None),
            "state_bytes_per_hello": ((statistics.median(r["state_dir_bytes_added"] for r in rs) - base_files) / n
                                      if n else None),
            "fakes_registered_median": statistics.median(r["fakes_registered"] for r in rs),
            "fakes_selected": sum(r["fakes_selected"] for r in rs),
            "all_honest_updates_accepted": all(r["accepted"] == ["dev0", "dev1", "dev2"] for r in rs)}
        s = summary[str(n)]
        if n:
            print(f"flood {n}: round {med:.1f} s vs {base_s:.1f} s ({100 * s['slowdown_vs_no_flood']:+.1f} %), "
                  f"{s['server_bytes_written_per_hello']:.0f} B written per hello "
                  f"({s['state_bytes_per_hello']:.0f} B into the state folder)")
    from edge_runtime.atomic_io import write_json_atomic

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, {"runs": runs, "summary": summary, "examples": args.examples,
                                 "cpus": {k: sorted(v) if v else "all" for k, v in PIN.items()},
                                 "command": "python scripts/bench_flood.py " + " ".join(sys.argv[1:])})
    shutil.rmtree(root, ignore_errors=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
