"""``edge-runtime``: the device-side command line."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points
from pathlib import Path

from edge_runtime import __version__
from edge_runtime.agent import Agent, AgentConfig
from edge_runtime.cli_common import (add_broker_args, add_service_args,
                                     add_set_option, positive_int, service_key,
                                     service_options)
from edge_runtime.device.memory_model import load_arch
from edge_runtime.device.planner import (Capabilities, choose_plan,
                                         request_from_spec)
from edge_runtime.device.profiler import (bound_kernel_caches, format_size, parse_size,
                                          profile_device)
from edge_runtime.device.profiles import (find_device_class,
                                          find_training_profile)
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.export.device import write_device_adapter
from edge_runtime.export.metadata import FILE
from edge_runtime.methods import METHODS, config_sections, default_lr
from edge_runtime.methods.lora import LoraMethodConfig
from edge_runtime.protocol import topics
from edge_runtime.protocol.codec import Security
from edge_runtime.protocol.messages import Status, check_id
from edge_runtime.protocol.signing import Identity, PinnedKey
from edge_runtime.round.server import describe_bytes
from edge_runtime.service import lifecycle
from edge_runtime.service.config import finish_parser, parse_command_line
from edge_runtime.service.install import install, uninstall
from edge_runtime.service.limits import add_limit_args, limits_from_args
from edge_runtime.service.sdnotify import Notifier
from edge_runtime.simulation import SimulationConfig, run_simulation
from edge_runtime.training.data import resolve_labels
from edge_runtime.training.models import bitsandbytes_problem
from edge_runtime.training.spec import apply_overrides, dataclass_from_json
from edge_runtime.training.trainer import TrainConfig
from edge_runtime.transport.base import Will
from edge_runtime.transport.mqtt import BrokerAddress, MqttTransport

DEVICE_KEY_FILE = "device.key"   # in the agent's state folder
log = logging.getLogger("edge_runtime")


def _add_simulate(sub) -> None:
    p = sub.add_parser("simulate", help="federated fine-tuning of N simulated devices in one process (no broker)",
                       description="Run R rounds of federated fine-tuning with N simulated devices in this "
                                   "process: Dirichlet label split, local PEFT training, weighted FedAvg. "
                                   "Writes report.json, report.png, history.json and global_adapter/ to --out.")
    p.add_argument("--model", default="minilm-l6",
                   help="minilm-l6 | smollm2-135m | tiny-bert | tiny-llama | a HF model folder | a .gguf file")
    p.add_argument("--data", default="wordnet",
                   help="'wordnet' (built-in noun supersenses) or a JSONL/CSV file (text+label or prompt+response)")
    p.add_argument("--device-data", nargs="+", default=(), metavar="FILE",
                   help="one data file per device instead of partitioning --data (sets the device count)")
    p.add_argument("--device-test-data", nargs="+", default=(), metavar="FILE",
                   help="each device's own test file, in --device-data order (else 10%% of its --device-data)")
    p.add_argument("--device-val-data", nargs="+", default=(), metavar="FILE",
                   help="each device's own validation file, in --device-data order (else 10%% of its --device-data)")
    p.add_argument("--method", default="lora", choices=sorted(METHODS), help="PEFT method (see README: Methods)")
    p.add_argument("--quantization", default="fp32", choices=["fp32", "nf4", "int8"],
                   help="store the frozen base's linear weights in NF4 / int8 (bitsandbytes; fp32 if it cannot run)")
    p.add_argument("--devices", type=positive_int, default=4)
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha of the label split (small = skewed)")
    p.add_argument("--max-examples", type=int, default=4000,
                   help="use a random subset of this many examples of --data (0 = all)")
    p.add_argument("--participation", type=float, default=1.0, help="fraction of devices picked each round")
    p.add_argument("--device-memory", default="", metavar="SIZE[,SIZE...]",
                   help="memory each simulated device may train in, cycled over the devices (e.g. 1GiB,600MiB); "
                        "DropPEFT's configurator never offers a device a configuration that does not fit")
    p.add_argument("--epochs", type=float, default=1.0, help="local epochs per round")
    p.add_argument("--max-steps", type=int, default=None, help="cap on local steps per round")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--lr", type=float, default=None,
                   help="local learning rate (default: the method's: 1e-3 for LoRA methods, 4e-2 for prompts)")
    p.add_argument("--max-seq-len", type=positive_int, default=64)
    p.add_argument("--rank", type=positive_int, default=8, help="LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/simulate"))
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_set_option(p)
    p.set_defaults(func=_cmd_simulate)


def _cmd_simulate(args: argparse.Namespace) -> int:
    import dataclasses


    cfg = SimulationConfig(
        model=args.model, data=args.data, device_data=tuple(args.device_data), method=args.method,
        device_test_data=tuple(args.device_test_data), device_val_data=tuple(args.device_val_data),
        quantization=args.quantization,
        devices=len(args.device_data) or args.devices, rounds=args.rounds, alpha=args.alpha,
        max_examples=args.max_examples or None, participation=args.participation, seed=args.seed,
        device_memory=tuple(parse_size(s) for s in args.device_memory.split(",") if s.strip()),
        train=TrainConfig(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                          lr=default_lr(args.method, args.lr), max_seq_len=args.max_seq_len),
        lora=LoraMethodConfig(rank=args.rank, alpha=args.lora_alpha),
    )
    if args.set:
        sections = (*config_sections(), "train", "eval", "robust", "dp", "fedopt", "compression")
        d = apply_overrides({k: dataclasses.asdict(getattr(cfg, k)) for k in sections}, args.set)
        cfg = dataclasses.replace(cfg, **{k: dataclass_from_json(type(getattr(cfg, k)), d[k], k) for k in sections})

    def print_round(row: dict) -> None:
        train = f"train loss {row['train_loss']:.3f}  " if row["train_loss"] is not None else ""
        personal = (f"personalised acc {100 * row['mean_personal_accuracy']:5.1f}%  "
                    if "mean_personal_accuracy" in row else "")
        acc = (f"global acc {100 * row['global_accuracy']:5.1f}%  device acc {100 * row['mean_device_accuracy']:5.1f}%  "
               f"{personal}loss {row['loss']:.3f}  " if row["global_accuracy"] is not None else "(not evaluated)  ")
        print(f"round {row['round']:>3}/{cfg.rounds}  {acc}{train}"
              f"{row['seconds']:6.1f} s  {describe_bytes(row)}{_epsilon(row)}", flush=True)

    history = run_simulation(cfg, args.out, progress=not args.no_progress, on_round=print_round)
    print(f"done in {history['total_seconds']:.0f} s: {args.out / 'report.json'}, {args.out / 'report.png'}, "
          f"{args.out / 'history.json'}, adapter in {history['adapter_dir']}")
    return 0


def _epsilon(row: dict) -> str:
    privacy = row.get("privacy")
    if not privacy:
        return ""
    return f"  epsilon {privacy['epsilon']:.3g}" if privacy["epsilon"] is not None else "  epsilon inf (no noise)"


def _add_agent(sub) -> None:
    p = sub.add_parser("agent", help="run this device's agent: join the fleet, train when asked, upload updates",
                       description="Run the device agent. Options may come from --config FILE.yaml (keys are the "
                                   "option names, e.g. device_id: jetson-07); flags typed here override the file. "
                                   "The broker URL defaults to $EDGE_RUNTIME_BROKER.")
    p.add_argument("--config", type=Path, default=None, help="YAML file of these options (install-service writes one)")
    add_broker_args(p)
    p.add_argument("--device-id", required=True)
    p.add_argument("--fleet", default="default")
    p.add_argument("--data", required=True, help="this device's local JSONL / CSV data file")
    p.add_argument("--test-data", default=None, metavar="FILE",
                   help="this device's own held-out test file (default: 10%% of --data is held out)")
    p.add_argument("--val-data", default=None, metavar="FILE",
                   help="this device's own validation file (default: 10%% of --data)")
    p.add_argument("--state-dir", type=Path, required=True, help="the agent's persistent state")
    p.add_argument("--heartbeat", type=float, default=10.0, help="seconds between heartbeats")
    p.add_argument("--ack-timeout", type=float, default=30.0, help="seconds before an unacked update is re-sent")
    p.add_argument("--chunk-bytes", type=int, default=256 * 1024, help="upload chunk size (<= 256 KiB)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice, at most the CPUs this process may use: "
                   "its affinity and cgroup CPU quota)")
    p.add_argument("--keep-running", action="store_true", help="stay up after the run is done (service mode)")
    p.add_argument("--progress", action="store_true", help="progress bar for local training")
    p.add_argument("--plan", default="auto", choices=["auto", "off"],
                   help="auto: fit batch, sequence length, checkpointing and quantization to this device's memory")
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="act as a device with this much memory for training, e.g. 2GiB")
    p.add_argument("--no-warm-up", action="store_true",
                   help="do not profile the device and import the model libraries while waiting for the first "
                        "manifest (they then run in the first round)")
    p.add_argument("--server-key", default=None, metavar="ed25519:...",
                   help="the server's public key (`broker-server keys` prints it): only messages it signed are "
                        "acted on; this device signs its own with <state-dir>/device.key")
    p.add_argument("--insecure", action="store_true",
                   help="sign nothing and trust every message on the broker (demo / test fleets only)")

    add_limit_args(p)
    p.set_defaults(func=_cmd_agent)


def agent_security(args: argparse.Namespace) -> Security:
    """The agent's keys: its own (created on first use) and the server's pinned one; or, only when
    asked with --insecure, none."""
    if args.insecure:
        if args.server_key:
            raise EdgeRuntimeError("--insecure and --server-key contradict each other: choose one")
        log.warning("INSECURE: this agent signs nothing and acts on any message on its broker (--insecure); "
                    "a real fleet pins the server's key with --server-key")
        return Security()
    if not args.server_key:
        raise EdgeRuntimeError("the agent needs the server's public key: --server-key ed25519:... (print it on the "
                               "server with `broker-server keys --state-dir DIR`), or --insecure for a demo or test "
                               "fleet that trusts everyone on its broker")
    server = PinnedKey(args.server_key)
    identity, created = Identity.load_or_create(Path(args.state_dir) / DEVICE_KEY_FILE)
    if created:
        log.warning("created this device's key %s; until the server enrols it, nothing it sends is accepted: "
                    "broker-server devices add %s --public-key %s", identity.path, args.device_id,
                    identity.public_text)
    log.info("signing as %s, trusting server key %s", identity.fingerprint, server.fingerprint)
    return Security(identity, server)


def _add_enroll(sub) -> None:
    p = sub.add_parser("enroll", help="create this device's key pair and print what the operator registers",
                       description="Create the device's Ed25519 key (<state-dir>/device.key, mode 0600; never "
                                   "sent anywhere) if there is none, and print its public key with the command "
                                   "that enrols it on the server.")
    p.add_argument("--state-dir", type=Path, default=Path("/var/lib/edge-runtime/agent"))
    p.add_argument("--device-id", required=True)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_enroll)


def _cmd_enroll(args: argparse.Namespace) -> int:
    import json

    check_id("device_id", args.device_id)
    identity, created = Identity.load_or_create(args.state_dir / DEVICE_KEY_FILE)
    command = f"broker-server devices add {args.device_id} --public-key {identity.public_text}"
    if args.json:
        print(json.dumps({"device_id": args.device_id, "public_key": identity.public_text, "key_file":
                          str(identity.path), "fingerprint": identity.fingerprint, "created": created,
                          "enrol_command": command}))
        return 0
    print(f"{'created' if created else 'existing'} key {identity.path} (fingerprint {identity.fingerprint})")
    print(f"on the server, run:\n  {command}")
    return 0


def _cmd_agent(args: argparse.Namespace) -> int:
    import signal

    import torch


    from edge_runtime.device.profiler import usable_cpus

    # torch's default follows the machine's cores; a service held to fewer (CPUQuota=, a container's
    # --cpus, taskset) would run more threads than it has CPUs
    torch.set_num_threads(args.threads or min(torch.get_num_threads(), usable_cpus()))
    cfg = AgentConfig(device_id=args.device_id, data=args.data, state_dir=args.state_dir, fleet=args.fleet,
                      heartbeat_s=args.heartbeat, ack_timeout_s=args.ack_timeout, chunk_bytes=args.chunk_bytes,
                      exit_when_done=not args.keep_running, progress=args.progress, plan=args.plan,
                      memory_budget=parse_size(args.memory_budget) if args.memory_budget else None,
                      warm_up=not args.no_warm_up, test_data=args.test_data, val_data=args.val_data, limits=limits_from_args(args))
    address = BrokerAddress.parse(args.broker)   # a malformed URL is the first thing said
    security = agent_security(args)
    status_topic = topics.device_topic(args.fleet, args.device_id, "status")
    will = Will(status_topic, security.encode(Status(args.device_id, False), status_topic))
    transport = MqttTransport(address, client_id=f"dev-{args.fleet}-{args.device_id}",
                              will=will, ca_certs=args.ca_certs, certfile=args.certfile, keyfile=args.keyfile)
    agent = Agent(cfg, transport, notifier=Notifier(), security=security)

    def on_signal(signum, _frame) -> None:  # a safe point: the loop, or the next training / evaluation step
        log.info("%s: stopping at the next safe point", signal.Signals(signum).name)
        lifecycle.request_stop()
        agent.stop_event.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        agent.run()
    finally:
        agent.shutdown()
    log.info("agent stopped; state in %s", args.state_dir)
    return 0


def _add_status(sub) -> None:
    p = sub.add_parser("status", help="this device's agent: connected, current round, plan, last result",
                       description="Read the agent's status.json / agent.json in --state-dir (the service's "
                                   "state folder by default) and print them.")
    p.add_argument("--state-dir", type=Path, default=Path("/var/lib/edge-runtime/agent"))
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_status)


def _cmd_status(args: argparse.Namespace) -> int:
    import json
    import os
    import time

    path = args.state_dir / "status.json"
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeRuntimeError(f"{path}: no agent status here (has the agent run with --state-dir {args.state_dir}?)")
    except (OSError, json.JSONDecodeError) as exc:
        raise EdgeRuntimeError(f"{path}: unreadable: {exc}") from exc
    try:
        os.kill(int(status.get("pid", 0)), 0)
        running = status.get("activity") != "stopped"
    except (OSError, ValueError):
        running = False
    status["running"] = running
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    age = time.time() - float(status.get("updated_at") or 0)
    plan = status.get("plan") or {}
    print(f"device {status['device_id']} in fleet {status['fleet']}: {'running' if running else 'not running'}"
          f" (pid {status.get('pid')}), {'connected' if status.get('connected') else 'not connected'}")
    print(f"  activity {status.get('activity')} (updated {age:.0f} s ago); server round {status.get('server_round')} "
          f"({status.get('server_action')}); last round done {status.get('last_round_done')}; run {status.get('run_id')}")
    if plan:
        print("  run's spec " + ", ".join(f"{k} {v}" for k, v in plan.items() if v is not None))
    fitted = status.get("fitted_plan")
    if fitted:
        print(f"  fitted to this device: {fitted['quantization']}, batch {fitted['batch_size']}, sequence "
              f"{fitted['seq_len']}{', checkpointing' if fitted.get('checkpointing') else ''}; predicted peak "
              f"{fitted['predicted_peak'] / 2**20:.0f} MiB of a {fitted['budget'] / 2**20:.0f} MiB budget")
    profile = status.get("profile")
    if profile:
        print(f"  device profile {profile.get('name')} ({profile.get('profile_id')}), from round "
              f"{profile.get('applies_from_round')}")
    if status.get("pending_update"):
        print(f"  update {status['pending_update']} awaiting its ack")
    last = status.get("last_result")
    if last:
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in last.items()
                 if k in ("round", "accepted", "reason", "eval_accuracy", "personal_accuracy", "train_loss",
                          "train_seconds")}
        print("  last result " + ", ".join(f"{k} {v}" for k, v in shown.items() if v not in (None, "")))
    refused = status.get("refused_manifest")
    if refused:
        print(f"  REFUSED the manifest of run {refused.get('run_id')} round {refused.get('round')}: "
              f"{refused.get('reason')}")
    if status.get("last_error"):
        e = status["last_error"]
        print(f"  last error (round {e.get('round')}, {age_of(e.get('at')):.0f} s ago): {e.get('error')}")
    _print_security(status.get("security") or {})
    bad = status.get("bad_messages") or {}
    if bad.get("count"):
        print(f"  {bad['count']} malformed message(s) ignored; the last on {bad['last']['topic']}: "
              f"{bad['last']['reason']}")
    return 0


def _print_security(sec: dict) -> None:
    if sec.get("mode") == "insecure":
        print("  INSECURE: signs nothing and acts on any message on its broker (--insecure)")
    elif sec:
        print(f"  messages signed with key {sec.get('key')}; only the pinned server key is trusted")


def age_of(at) -> float:
    import time

    return time.time() - float(at or 0)


def _add_profile(sub) -> None:
    p = sub.add_parser("profile", help="this device's memory, CPUs, disk, GPU / Jetson and a compute probe",
                       description="Profile the device a training plan has to fit: memory (or --memory-budget), "
                                   "CPUs, free disk, CUDA device, Jetson board, matmul GFLOP/s (about 1-2 s).")
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="act as a device with this much memory for training, e.g. 2GiB")
    p.add_argument("--no-probe", action="store_true", help="skip the compute probe")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_profile)


def _cmd_profile(args: argparse.Namespace) -> int:
    import json


    prof = profile_device(memory_budget=args.memory_budget, probe_compute=not args.no_probe)
    print(json.dumps(prof.to_json(), indent=2) if args.json else prof.summary())
    return 0


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="the training plan that fits a device (or a device class, or a budget)",
                       description="Price every plan (quantization, rank, micro-batch, sequence length, checkpointing) "
                                   "with the memory model and pick the one that keeps most of the training profile "
                                   "under the budget, with the reasons.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--device-class", default=None, help="a class from profiles/devices (name or YAML file)")
    where.add_argument("--memory-budget", default=None, metavar="SIZE", help="plan for this much memory, e.g. 2GiB")
    p.add_argument("--profile", default="lora-minilm", help="training profile (name in profiles/training or YAML file)")
    p.add_argument("--num-labels", type=positive_int, default=26, help="classes of the task (WordNet: 26)")
    p.add_argument("--margin", type=float, default=0.15, help="headroom kept free (fraction of the budget)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_plan)


def _cmd_plan(args: argparse.Namespace) -> int:
    import dataclasses
    import json


    profile = find_training_profile(args.profile)
    spec = profile.spec(labels=tuple(f"label-{i}" for i in range(args.num_labels)))
    if args.device_class:
        dc = find_device_class(args.device_class)
        budget, where = dc.budget, dc.name
        # fp16 training is not a plan the runtime executes yet: plan what an agent would run
        caps = Capabilities(dc.accelerator, False, dc.bitsandbytes, dc.gflops_fp32)
    else:
        prof = profile_device(memory_budget=args.memory_budget)
        cuda = prof.cuda is not None
        caps = Capabilities("cuda" if cuda else "cpu", False, _bitsandbytes_runs(),
                            prof.gflops_fp16 or prof.gflops_fp32 or 50.0)
        budget, where = prof.training_memory, "this device" + (" (--memory-budget)" if args.memory_budget else "")
    choice = choose_plan(load_arch(spec.model), budget, request_from_spec(spec, METHODS[spec.method]), caps,
                         margin=args.margin)
    if args.json:
        print(json.dumps({"device": where, "profile": profile.name, "capabilities": dataclasses.asdict(caps),
                          **({"unsupported": dc.unsupported} if args.device_class and dc.unsupported else {}),
                          **choice.to_json()}, indent=2))
        return 0
    print(f"{profile.name} ({spec.model}, {spec.method}) on {where}")
    if args.device_class and dc.unsupported:
        print(f"  NOTE: edge-runtime cannot run on {dc.name}: {dc.unsupported}; this plan is what would fit it")
    for line in choice.reasons:
        print(f"  {line}")
    print("  predicted peak: " + ", ".join(f"{k} {format_size(v)}" for k, v in choice.predicted.as_dict().items()))
    return 0


def _bitsandbytes_runs() -> bool:
    return bitsandbytes_problem() is None


def _add_install(sub) -> None:
    p = sub.add_parser("install-service", help="install this device's agent as a systemd service",
                       description="Write the systemd unit, /etc/edge-runtime/agent.yaml and the 0600 environment "
                                   "file /etc/default/edge-runtime-agent; create the user; daemon-reload.")
    p.add_argument("--device-id", required=True)
    p.add_argument("--data", required=True, type=Path, help="the device's local data file (absolute path)")
    p.add_argument("--test-data", type=Path, default=None, help="the device's own held-out test file")
    p.add_argument("--val-data", type=Path, default=None, help="the device's own validation file")
    p.add_argument("--fleet", default="default")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--heartbeat", type=float, default=10.0)
    trust = p.add_mutually_exclusive_group(required=True)
    trust.add_argument("--server-key", default=None, metavar="ed25519:...",
                       help="the server's public key (`broker-server keys`); the device's own key is created "
                            "in the service's state folder")
    trust.add_argument("--insecure", action="store_true", help="a fleet that signs nothing (tests, demos)")
    add_service_args(p, "agent")
    p.set_defaults(func=_cmd_install)
    u = sub.add_parser("uninstall-service", help="stop and remove the agent's systemd service")
    u.add_argument("--prefix", type=Path, default=None)
    u.add_argument("--purge", action="store_true", help="also delete the state folder (adapters, personal state)")
    u.set_defaults(func=lambda a: _cmd_uninstall(a, "agent"))


def _cmd_install(args: argparse.Namespace) -> int:
    options = {"device_id": args.device_id, "data": str(args.data.resolve()), "fleet": args.fleet,
               "keep_running": True, "heartbeat": args.heartbeat}
    if args.threads:
        options["threads"] = args.threads
    for key in ("test_data", "val_data"):
        if getattr(args, key):
            options[key] = str(getattr(args, key).resolve())
    if args.insecure:
        options["insecure"] = True
    else:
        PinnedKey(args.server_key)   # a malformed key fails here, not at the service's first start
        options["server_key"] = args.server_key
    o = service_options(args, "agent", options)
    install(o, prefix=args.prefix, dry_run=args.dry_run, enable=args.enable)
    if not args.insecure and not args.dry_run:
        _service_key(Path(args.prefix or "/") / o.state_dir.lstrip("/"), args.user, args.device_id, args.prefix)
    return 0


def _service_key(state_dir: Path, user: str, device_id: str, prefix) -> None:
    """The device's key in the service's state folder, owned by the service's user (a real install)."""
    identity, created = service_key(state_dir / DEVICE_KEY_FILE, user, prefix)
    print(f"{'created' if created else 'kept'} the device key {identity.path}; on the server, run:\n"
          f"  broker-server devices add {device_id} --public-key {identity.public_text}")


def _cmd_uninstall(args: argparse.Namespace, role: str) -> int:
    uninstall(role, prefix=args.prefix, purge=args.purge)
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export an adapter to ONNX (merged into its base model), parity-checked",
                       description="Merge a peft adapter written by this runtime (simulate / demo / server) into "
                                   "its full-precision base model and export it with the torch dynamo ONNX exporter; "
                                   "onnxruntime and PyTorch then run the same inputs and the max |diff| is reported.")
    p.add_argument("adapter", type=Path, help="adapter folder (e.g. runs/demo/global_adapter)")
    p.add_argument("--out", type=Path, required=True, help="export folder (model.onnx + tokenizer + metadata)")
    p.add_argument("--format", choices=["merged", "adapter"], default="merged",
                   help="merged: one model.onnx; adapter: base.onnx once + <name>.onnx_adapter per adapter")
    p.add_argument("--name", default="global", help="adapter name with --format adapter (e.g. global, personal)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |logit diff| ONNX vs PyTorch (fp32)")
    p.add_argument("--model", default=None,
                   help="the adapter's base model (a peft folder without edge_runtime.json, e.g. from elsewhere): "
                        "minilm-l6 | smollm2-135m | a HF model folder | a .gguf file")
    p.add_argument("--task", default="classification", choices=["classification", "causal-lm"],
                   help="with --model: the adapter's task")
    p.add_argument("--labels", default=None,
                   help="with --model and classification: the label space in the head's order (wordnet, labels.json, "
                        "a data file or a,b,c)")
    p.set_defaults(func=_cmd_export)


def _export_meta(args: argparse.Namespace) -> dict | None:
    """Metadata for a peft folder that has no edge_runtime.json (``--model`` / ``--task`` / ``--labels``)."""

    if args.model is None:
        if args.labels is not None:
            raise EdgeRuntimeError("--labels goes with --model (the adapter's base model)")
        return None
    if (args.adapter / FILE).exists():
        raise EdgeRuntimeError(f"{args.adapter / FILE} already says which model, task and labels this adapter has; "
                               f"drop --model / --task / --labels")
    labels: tuple[str, ...] = ()
    if args.task == "classification":
        if args.labels is None:
            raise EdgeRuntimeError("--model with --task classification needs --labels (the head's label order)")
        labels = resolve_labels(args.labels)
    return {"model": args.model, "task": args.task, "labels": list(labels)}


def _cmd_export(args: argparse.Namespace) -> int:
    from edge_runtime.export.onnx import export_adapter, export_merged

    if not args.adapter.is_dir():
        raise EdgeRuntimeError(f"{args.adapter}: no such adapter folder")
    meta = _export_meta(args)
    if args.format == "merged":
        res = export_merged(args.adapter, args.out, args.tolerance, meta=meta)
        what = res.path / "model.onnx"
    else:
        res = export_adapter(args.adapter, args.out, args.name, args.tolerance, meta=meta)
        what = res.path / f"{args.name}.onnx_adapter"
    print(f"exported {what} ({res.onnx_bytes / 1e6:.2f} MB) in {res.seconds:.1f} s; "
          f"onnxruntime vs PyTorch max |diff| {res.max_abs_diff:.2e}")
    return 0


def _add_device_adapter(sub) -> None:
    p = sub.add_parser("device-adapter", help="this device's own model (e.g. FDLoRA's fused personal adapter) as an "
                                              "adapter folder, from the agent's state",
                       description="Rebuild the model the agent last used (global adapter, init, personal state "
                                   "from --state-dir) and write it as a plain peft LoRA folder for the untouched "
                                   "base model; `edge-runtime export` turns it into ONNX.")
    p.add_argument("--state-dir", type=Path, default=Path("/var/lib/edge-runtime/agent"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--which", default="personal", choices=["personal", "global"],
                   help="the device's own model, or the global adapter in the same tensor layout (so both "
                        "export into one --format adapter base graph)")
    p.set_defaults(func=_cmd_device_adapter)


def _cmd_device_adapter(args: argparse.Namespace) -> int:
    path = write_device_adapter(args.state_dir, args.out, args.which)
    print(f"wrote {path} (export it with: edge-runtime export {path} --out {path}-onnx)")
    return 0


def _add_infer(sub) -> None:
    p = sub.add_parser("infer", help="run an ONNX export with onnxruntime on text")
    p.add_argument("export_dir", type=Path)
    p.add_argument("texts", nargs="+", help="texts to classify, or prompts to continue")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--adapter", default=None, help="which <name>.onnx_adapter to activate (adapter exports)")
    p.set_defaults(func=_cmd_infer)


def _cmd_infer(args: argparse.Namespace) -> int:
    from edge_runtime.export.onnx import OnnxPredictor

    pred = OnnxPredictor(args.export_dir, args.adapter)
    if pred.meta["task"] == "classification":
        for text, (label, prob) in zip(args.texts, pred.classify(args.texts)):
            print(f"{label}\t{prob:.3f}\t{text}")
    else:
        for text in args.texts:
            print(f"{text}{pred.generate(text, args.max_new_tokens)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-runtime", description="Federated fine-tuning runtime for edge devices.")
    parser.add_argument("--version", action="version", version=f"edge-runtime {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in entry_points(group="edge_runtime.commands"):   # the demo: broker_server's, registered in
        command.load()(sub)                                     # pyproject.toml (this package never imports it)
    _add_simulate(sub)
    _add_agent(sub)
    _add_enroll(sub)
    _add_status(sub)
    _add_profile(sub)
    _add_plan(sub)
    _add_install(sub)
    _add_export(sub)
    _add_device_adapter(sub)
    _add_infer(sub)

    return finish_parser(parser)


def _quiet_third_party() -> None:
    """Keep the console to our own lines: libraries' notices that need no action go to DEBUG."""
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional CPU kernels package missing
    logging.getLogger("kernels").setLevel(logging.ERROR)   # bitsandbytes' kernel hub, offline: nothing fetched
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
    warnings.filterwarnings("ignore", message="Could not find a config file")  # peft, on GGUF base folders
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
    logging.getLogger("torch.onnx").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_command_line(build_parser(), argv)
    except EdgeRuntimeError as exc:  # a bad --config file
        print(f"edge-runtime: error: {exc}", file=sys.stderr)
        return 2
    _quiet_third_party()
    bound_kernel_caches()   # before any bf16 kernel is built (agents, simulations, the demo's fleet)
    try:
        return args.func(args)
    except EdgeRuntimeError as exc:
        print(f"edge-runtime: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edge-runtime: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
