"""``edge-runtime demo``: a whole federation on this machine, as separate processes over real MQTT.

It lives with the server because it launches everything (broker, server, agents); ``edge-runtime``
finds the command through the ``edge_runtime.commands`` entry point, so ``edge_runtime`` never
imports ``broker_server``.

Starts the embedded broker (amqtt) unless ``--broker`` names one, the aggregation server, and N
device agents, each with its own slice of the WordNet supersense data (Dirichlet label split) in
its own folder. Prints one line per round from the server's summaries, then the report and the
final global adapter (peft format).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from broker_server.broker import free_port, start_broker_process
from broker_server.enrolment import enrol_local_devices
from broker_server.zygote import Zygote
from edge_runtime.cli_common import positive_int
from edge_runtime.deps import require
from edge_runtime.device.profiler import parse_size
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.methods import METHODS, default_lr
from edge_runtime.protocol import topics
from edge_runtime.protocol.codec import decode_message
from edge_runtime.protocol.messages import RoundSummary
from edge_runtime.training.data import (LocalDataset, federation_shards,
                                        resolve_dataset)
from edge_runtime.training.models import resolve_model_source
from edge_runtime.training.spec import TrainingSpec
from edge_runtime.transport.mqtt import BrokerAddress, MqttTransport


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("runs/demo")
    devices: int = 4
    rounds: int = 3
    alpha: float = 0.5
    max_examples: int = 4000
    model: str = "minilm-l6"
    method: str = "lora"
    quantization: str = "fp32"
    data: str = "wordnet"
    broker: str | None = None        # None: start the embedded broker
    port: int = 0                    # embedded broker port; 0 = a free one
    fleet: str = "demo"
    seed: int = 0
    memory_budget: str | None = None   # each device acts as one with this much memory (e.g. "2GiB")
    epochs: float = 1.0
    lr: float = 1e-3
    batch_size: int = 16
    max_seq_len: int = 64
    timeout_s: float = 1800.0
    server_args: tuple[str, ...] = ()  # more `broker-server run` flags, e.g. ("--deadline", "600")
    agent_args: tuple[str, ...] = ()   # more `edge-runtime agent` flags for every device, e.g. ("--no-warm-up",)
    launch: str = "fork"   # fork: the server and agents forked from a zygote that imported the libraries once
    #                        (Linux, no CUDA; else as spawn); spawn: each a fresh `python -m` that imports them


def write_device_data(cfg: DemoConfig, full: LocalDataset | None = None) -> list[Path]:
    """Split the data (``full``, else ``cfg.data`` loaded) over the devices (Dirichlet over labels) into one
    JSONL file per device."""
    full = full if full is not None else resolve_dataset(cfg.data)
    paths = []
    for k, shard in enumerate(federation_shards(full, cfg.devices, cfg.alpha, cfg.max_examples or None, cfg.seed)):
        path = cfg.out / "devices" / f"dev{k:02d}" / "data.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for text, y in zip(shard.inputs, shard.targets):
                f.write(json.dumps({"text": text, "label": shard.label_names[y]}) + "\n")
        paths.append(path)
    return paths


def export_and_try(out: Path, cfg: DemoConfig, echo) -> dict:
    """Export the final global adapter to ONNX (merged, parity-checked) and classify one held-out gloss."""
    from edge_runtime.export.onnx import (  # onnx + onnxscript: only once trained
        OnnxPredictor, export_merged)

    res = export_merged(out / "global_adapter", out / "onnx")
    echo(f"exported {res.path / 'model.onnx'} ({res.onnx_bytes / 1e6:.0f} MB, onnxruntime vs PyTorch max |diff| "
         f"{res.max_abs_diff:.1e})")
    full = resolve_dataset(cfg.data)
    used = {json.loads(line)["text"] for p in (out / "devices").glob("*/data.jsonl") for line in open(p)}
    unseen = [i for i in range(len(full)) if full.inputs[i] not in used]   # glosses no device trained on
    i = unseen[np.random.default_rng(cfg.seed).integers(len(unseen))]
    label, prob = OnnxPredictor(res.path).classify([full.inputs[i]])[0]
    truth = full.label_names[full.targets[i]]
    echo(f'edge-runtime infer {res.path} "{full.inputs[i]}"\n  -> {label} (p={prob:.2f}; WordNet says {truth})')
    return {"path": str(res.path / "model.onnx"), "max_abs_diff": res.max_abs_diff, "text": full.inputs[i],
            "predicted": label, "probability": prob, "truth": truth}


class DemoError(EdgeRuntimeError):
    """The demo cannot start, or a process of it died; the message says what to do."""


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "    (no log written)"
    return "\n".join(f"    {line}" for line in text[-lines:]) or "    (the log is empty)"


def validate(cfg: DemoConfig) -> LocalDataset:
    """Everything the demo's processes would otherwise fail on one by one, checked before any starts."""
    if cfg.method not in METHODS:
        raise DemoError(f"unknown method {cfg.method!r}; known: {sorted(METHODS)}")
    if cfg.launch not in ("fork", "spawn"):
        raise DemoError(f"launch must be fork or spawn, got {cfg.launch!r}")
    resolve_model_source(cfg.model)                       # names the package / pip command when missing
    full = resolve_dataset(cfg.data)                      # every bad row, with file and line
    if full.kind != "classification":
        raise DemoError(f"{cfg.data}: the demo runs a classification federation (text + label rows); for "
                        f"prompt + response data use edge-runtime simulate, or broker-server run + agents")
    n = min(len(full), cfg.max_examples or len(full))
    if n < 10 * cfg.devices:
        raise DemoError(f"{n} examples for {cfg.devices} devices: each device needs at least 10 "
                        f"(raise --max-examples or lower --devices)")
    TrainingSpec(model=cfg.model, labels=full.label_names, method=cfg.method, quantization=cfg.quantization)
    if cfg.quantization != "fp32" and not METHODS[cfg.method].quantized_base:
        raise DemoError(f"{cfg.method} cannot train on a {cfg.quantization} base (it needs the float weights); "
                        f"use --quantization fp32, or --method lora")
    if cfg.memory_budget:
        parse_size(cfg.memory_budget)
    if cfg.broker is None:
        require("amqtt.broker", "the embedded MQTT broker")
    else:
        addr = BrokerAddress.parse(cfg.broker)
        try:
            socket.create_connection((addr.host, addr.port), timeout=5).close()
        except OSError as exc:
            raise DemoError(f"cannot reach the broker at {addr}: {exc.strerror or exc}; start it, or drop --broker "
                            f"to use the embedded one") from exc
    return full


def _fleet_env(threads: int = 1) -> dict[str, str]:
    """The environment of the fleet's processes: one compute thread each (they share this machine's cores)."""
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
                TOKENIZERS_PARALLELISM="false")


def _spawn(args: list[str], log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT, env=_fleet_env())


def _starter(cfg: DemoConfig, procs: list, echo):
    """How the server and agents start: forked from a zygote (``cfg.launch == "fork"`` where it can), else
    each as its own ``python -m``. The zygote's process goes into ``procs`` (stopped after its children)."""
    if cfg.launch == "fork":
        zygote = Zygote(_fleet_env(), cfg.out / "zygote.log")
        if zygote.ready:
            procs.append(zygote.proc)
            return lambda args, log_path: zygote.spawn(args[0], args[1:], log_path)
        echo(f"starting each process on its own: {zygote.why}")
    return _spawn


def _start_broker(cfg: DemoConfig, procs: list, echo) -> str:
    """The embedded broker on a free loopback port (or ``cfg.broker``); returns the URL."""
    if cfg.broker is not None:
        return cfg.broker
    out, port = cfg.out, cfg.port or free_port()
    try:
        procs.append(start_broker_process("127.0.0.1", port, open(out / "broker.log", "ab")))
    except (TimeoutError, ChildProcessError) as exc:
        raise DemoError(f"the embedded MQTT broker did not start: {exc}. The end of {out / 'broker.log'}:\n"
                        f"{log_tail(out / 'broker.log')}\nFix: reinstall its package (pip install amqtt), "
                        f"or run your own broker (apt-get install mosquitto) and pass --broker "
                        f"mqtt://127.0.0.1:1883") from exc
    echo(f"embedded MQTT broker (amqtt) on mqtt://127.0.0.1:{port}")
    return f"mqtt://127.0.0.1:{port}"


def _start_fleet(cfg: DemoConfig, broker_url: str, data_files: list[Path], procs: list, echo):
    """The aggregation server and one agent per data file, each a process with its own log."""
    out = cfg.out
    spawn = _starter(cfg, procs, echo)
    common = ["--model", cfg.model, "--method", cfg.method, "--quantization", cfg.quantization,
              "--epochs", str(cfg.epochs), "--lr", str(cfg.lr), "--batch-size", str(cfg.batch_size),
              "--max-seq-len", str(cfg.max_seq_len), "--seed", str(cfg.seed)]
    server_dir = out / "server"
    if server_dir.exists():
        shutil.rmtree(server_dir)  # a demo is a fresh run
    # signed end to end, like a real fleet: each device's key made in its folder and enrolled, the
    # server's key pinned by every agent (only the loopback broker stays anonymous)
    server_key = enrol_local_devices(server_dir, {f"dev{k:02d}": p.parent for k, p in enumerate(data_files)})
    server = spawn(["broker_server.cli", "run", "--broker", broker_url, "--state-dir", str(server_dir),
                     "--out", str(out), "--fleet", cfg.fleet, "--rounds", str(cfg.rounds), "--min-devices",
                     str(cfg.devices), "--labels", cfg.data, *common, *cfg.server_args], out / "server.log")
    procs.append(server)
    for k, path in enumerate(data_files):
        dev_dir = path.parent
        (dev_dir / "agent.json").unlink(missing_ok=True)  # a demo is a fresh run for every device too
        procs.append(spawn(["edge_runtime.cli", "agent", "--broker", broker_url, "--device-id", f"dev{k:02d}",
                             "--fleet", cfg.fleet, "--data", str(path), "--state-dir", str(dev_dir),
                             "--server-key", server_key,
                             *(["--memory-budget", cfg.memory_budget] if cfg.memory_budget else []), *cfg.agent_args],
                            dev_dir / "agent.log"))
    return server


def _check_alive(cfg: DemoConfig, procs: list, server: subprocess.Popen, agents: list, summaries: queue.Queue,
                 deadline: float) -> None:
    """A DemoError naming the log to read when a process of the demo died or time ran out."""
    out = cfg.out
    if time.monotonic() > deadline:
        raise DemoError(f"the demo did not finish in {cfg.timeout_s:.0f} s; the end of {out}/server.log:\n"
                        f"{log_tail(out / 'server.log')}")
    if server.poll() is not None and summaries.empty():
        raise DemoError(f"the aggregation server exited with code {server.returncode}; the end of "
                        f"{out}/server.log:\n{log_tail(out / 'server.log')}\nFix what it names and rerun "
                        f"(the demo starts a fresh run each time)")
    for proc, path in agents:
        if proc.poll() not in (None, 0):
            log_path = path.parent / "agent.log"
            raise DemoError(f"device agent {path.parent.name} exited with code {proc.returncode}; the end "
                            f"of {log_path}:\n{log_tail(log_path)}")
    if cfg.broker is None and procs[0].poll() is not None:
        raise DemoError(f"the embedded MQTT broker exited with code {procs[0].returncode}; the end of "
                        f"{out / 'broker.log'}:\n{log_tail(out / 'broker.log')}")


def launch_fleet(cfg: DemoConfig, full: LocalDataset, procs: list, echo) -> tuple[str, list[Path], subprocess.Popen]:
    """The broker (unless ``cfg.broker``), the devices' data files and the server and agent processes
    (appended to ``procs``, broker first): ``(broker URL, data files, server process)``. What the demo
    runs, and what a benchmark times (``scripts/bench_time_to_accuracy.py``)."""
    broker_url = _start_broker(cfg, procs, echo)
    data_files = write_device_data(cfg, full)
    return broker_url, data_files, _start_fleet(cfg, broker_url, data_files, procs, echo)


def _round_line(s: RoundSummary, rounds: int) -> str:
    acc = f"{100 * s.accuracy:5.1f}%" if s.accuracy is not None else "  -  "
    tl = f"{s.train_loss:.3f}" if s.train_loss is not None else "  -  "
    label = "initial" if s.round == 0 else f"{s.round:>3}/{rounds}"
    return (f"round {label}  accuracy {acc}  train loss {tl}  devices {s.accepted}  "
            f"{s.seconds:6.1f} s  up {s.bytes_up / 1e6:.2f} MB  down {s.bytes_down / 1e6:.2f} MB")


def run_demo(cfg: DemoConfig, echo=print) -> dict:
    """The whole demo; returns the server's report (plus the ONNX export and the demo's seconds)."""
    t0 = time.perf_counter()
    full = validate(cfg)
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    watcher = None
    try:
        broker_url = _start_broker(cfg, procs, echo)
        data_files = write_device_data(cfg, full)
        echo(f"{cfg.devices} devices, {sum(1 for p in data_files for _ in open(p))} WordNet glosses split with "
             f"Dirichlet alpha={cfg.alpha}; logs in {out}/")
        summaries: queue.Queue = queue.Queue()
        watcher = MqttTransport(BrokerAddress.parse(broker_url), client_id=f"demo-watch-{os.getpid()}")
        watcher.subscribe(topics.summary_topic(cfg.fleet), lambda t, p: summaries.put(p))
        watcher.start()
        if not watcher.wait_connected(30):
            raise DemoError(f"cannot connect to the broker at {broker_url}"
                            + (f"; the end of {out / 'broker.log'}:\n{log_tail(out / 'broker.log')}"
                               if cfg.broker is None else ""))
        server = _start_fleet(cfg, broker_url, data_files, procs, echo)
        echo(f"server and {cfg.devices} device agents started; training {cfg.model} + {cfg.method} for "
             f"{cfg.rounds} rounds")
        deadline, agents, final = time.monotonic() + cfg.timeout_s, list(zip(procs[-cfg.devices:], data_files)), None
        while final is None:
            _check_alive(cfg, procs, server, agents, summaries, deadline)
            try:
                s = decode_message(summaries.get(timeout=1.0), RoundSummary)
            except queue.Empty:
                continue
            echo(_round_line(s, cfg.rounds))
            final = s if s.final else None
        server.wait(timeout=120)
        report = json.loads((out / "report.json").read_text())
        report["onnx"] = export_and_try(out, cfg, echo)
        report["demo_seconds"] = time.perf_counter() - t0
        echo(f"done in {report['demo_seconds']:.0f} s: report {out / 'report.json'}, plot {out / 'report.png'}, "
             f"global adapter {out / 'global_adapter'}, ONNX model {out / 'onnx' / 'model.onnx'}")
        return report
    finally:
        if watcher is not None:
            watcher.stop()
        stop_processes(procs)


def stop_processes(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """SIGTERM every process still running (the agents and server before the broker), SIGKILL
    those that have not exited ``grace_s`` later."""
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            p.kill()


def add_command(sub) -> None:
    """``edge-runtime demo``: registered under the ``edge_runtime.commands`` entry points (pyproject.toml)."""
    p = sub.add_parser("demo", help="THE main job: broker + server + N device agents over real MQTT on this machine",
                       description="Start the embedded MQTT broker, the aggregation server and N device agents as "
                                   "separate processes; federated fine-tuning of MiniLM + LoRA on WordNet "
                                   "supersenses; writes report.json, report.png and global_adapter/ to --out.")
    p.add_argument("--devices", type=positive_int, default=4)
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--max-examples", type=int, default=4000)
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--method", default="lora", choices=sorted(METHODS), help="PEFT method (README: Methods)")
    p.add_argument("--quantization", default="fp32", choices=["fp32", "nf4", "int8"],
                   help="store the frozen base's linear weights in NF4 / int8 (bitsandbytes; fp32 if it cannot run)")
    p.add_argument("--data", default="wordnet")
    p.add_argument("--broker", default=None, help="use this broker instead of starting the embedded one")
    p.add_argument("--fleet", default="demo")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=None,
                   help="local learning rate (default: the method's: 1e-3 for LoRA methods, 4e-2 for prompts)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--max-seq-len", type=positive_int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--launch", default="fork", choices=["fork", "spawn"],
                   help="fork: start the server and agents from one process that imported the model libraries once "
                        "(Linux, no CUDA device; else spawn); spawn: each process imports them itself")
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="every device acts as one with this much memory (its agent fits the plan to it), e.g. 2GiB")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.memory_budget:
        parse_size(args.memory_budget)   # a bad size fails here, not in every agent's log

    logging.getLogger("edge_runtime.transport").setLevel(logging.WARNING)  # the demo's own watcher

    run_demo(DemoConfig(out=args.out, devices=args.devices, rounds=args.rounds, alpha=args.alpha,
                        max_examples=args.max_examples, model=args.model, method=args.method, data=args.data,
                        quantization=args.quantization, memory_budget=args.memory_budget,
                        broker=args.broker,
                        fleet=args.fleet, seed=args.seed, epochs=args.epochs, lr=default_lr(args.method, args.lr),
                        batch_size=args.batch_size, max_seq_len=args.max_seq_len, launch=args.launch), echo=lambda s: print(s, flush=True))
    return 0
