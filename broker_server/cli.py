"""``broker-server``: the aggregation server's command line (run, status, broker, aggregate)."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from broker_server import cli_security
from broker_server.broker import run_broker
from broker_server.coordinator import Coordinator, ServerConfig
from broker_server.enrolment import SERVER_KEY_FILE, Enrolment
from broker_server.store import Store
from edge_runtime import __version__
from edge_runtime.algorithms.aggregation import weighted_mean
from edge_runtime.atomic_io import write_bytes_atomic
from edge_runtime.cli_common import (add_broker_args, add_service_args,
                                     service_key, service_options)
from edge_runtime.device.profiles import read_yaml
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.methods import METHODS, default_lr
from edge_runtime.methods.lora import LoraMethodConfig
from edge_runtime.protocol import topics
from edge_runtime.protocol.messages import (ProfileAck, ProfilePush,
                                            ProtocolError, Status)
from edge_runtime.report import (describe_privacy, export_adapter,
                                 last_privacy, write_report)
from edge_runtime.service.config import (finish_parser, options_argv,
                                         parse_command_line, subcommand)
from edge_runtime.service.install import install, uninstall
from edge_runtime.service.sdnotify import Notifier
from edge_runtime.training.data import resolve_labels
from edge_runtime.training.spec import (TrainingSpec, apply_overrides,
                                        build_model)
from edge_runtime.training.trainer import TrainConfig
from edge_runtime.transport.base import Will
from edge_runtime.transport.mqtt import BrokerAddress, MqttTransport

ADAPTER_FILE = "adapter_model.safetensors"
EXIT_RUN_FAILED = 3    # the run was failed (rounds in a row could not be aggregated): see `status`
EXIT_DISK_FULL = 75    # EX_TEMPFAIL: no space to persist; nothing on disk was damaged, retry later
log = logging.getLogger("broker_server")


def _parse_input(spec: str) -> tuple[Path, float]:
    """``PATH`` or ``PATH:WEIGHT`` (weight = e.g. the device's number of training examples)."""
    path, sep, weight = spec.rpartition(":")
    if sep and path and weight.replace(".", "", 1).isdigit():
        return Path(path), float(weight)
    return Path(spec), 1.0


def _cmd_aggregate(args: argparse.Namespace) -> int:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save


    updates, config_dir = [], None
    for spec in args.inputs:
        path, weight = _parse_input(spec)
        file = path / ADAPTER_FILE if path.is_dir() else path
        if path.is_dir() and config_dir is None:
            config_dir = path
        try:
            updates.append((load_file(file), weight))
        except (OSError, SafetensorError) as exc:
            raise EdgeRuntimeError(f"{file}: cannot read as safetensors: {exc}") from exc
    merged = weighted_mean(updates)
    out = args.out
    blob = save({k: v.contiguous() for k, v in merged.items()})
    if config_dir is not None:  # inputs were peft adapter folders: write one too
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(config_dir / "adapter_config.json", out / "adapter_config.json")
        write_bytes_atomic(out / ADAPTER_FILE, blob)
    else:
        write_bytes_atomic(out, blob)
    total = sum(w for _, w in updates)
    print(f"averaged {len(updates)} adapters ({len(merged)} tensors, weights "
          f"{[round(w / total, 4) for _, w in updates]}) into {out}")
    return 0


def _cmd_broker(args: argparse.Namespace) -> int:
    run_broker(args.host, args.port)
    return 0


def add_training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--task", default="classification", choices=["classification", "causal-lm"])
    p.add_argument("--labels", default="wordnet",
                   help="the label space: 'wordnet', a label file (labels.json: a JSON list; .txt: one a line), a "
                        "data file whose labels to use, or a comma-separated list; it must cover every device's labels")
    p.add_argument("--method", default="lora", choices=sorted(METHODS), help="PEFT method (README: Methods)")
    p.add_argument("--quantization", default="fp32", choices=["fp32", "nf4", "int8"],
                   help="store the frozen base's linear weights in NF4 / int8 (bitsandbytes; fp32 if it cannot run)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None,
                   help="local learning rate (default: the method's: 1e-3 for LoRA methods, 4e-2 for prompts)")
    p.add_argument("--max-seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training-spec setting, e.g. fdlora.personal_epochs=2, federa.residual=false "
                        "(repeatable; values are YAML)")


def training_spec_from_args(args: argparse.Namespace, tokenizer_corpus: tuple[str, ...] = ()):
    labels: tuple[str, ...] = ()
    if args.task == "classification":
        labels = resolve_labels(args.labels)
    spec = TrainingSpec(model=args.model, task=args.task, labels=labels, method=args.method,
                        quantization=args.quantization,
                        lora=LoraMethodConfig(rank=args.rank, alpha=args.lora_alpha),
                        train=TrainConfig(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                                          lr=default_lr(args.method, args.lr), max_seq_len=args.max_seq_len),
                        seed=args.seed, tokenizer_corpus=tokenizer_corpus)
    if getattr(args, "set", None):
        spec = TrainingSpec.from_json(apply_overrides(spec.to_json(), args.set))
    return spec


def _cmd_run(args: argparse.Namespace) -> int:
    corpus = tuple(Path(args.tokenizer_corpus).read_text().split()) if args.tokenizer_corpus else ()
    spec = training_spec_from_args(args, corpus)
    cfg = ServerConfig(fleet=args.fleet, rounds=args.rounds, min_devices=args.min_devices,
                       devices_per_round=args.devices_per_round, quorum=args.quorum, deadline_s=args.deadline,
                       eval_deadline_s=args.eval_deadline, heartbeat_timeout_s=args.heartbeat_timeout,
                       seed=args.seed, max_participants=args.max_participants, max_devices=args.max_devices,
                       max_update_bytes=int(args.max_update_mb * 2**20),
                       restart_grace_s=args.restart_grace, max_failed_rounds=args.max_failed_rounds,
                       training=spec.to_json())
    out_dir = Path(args.out or args.state_dir)

    store = Store(Path(args.state_dir))

    def initial_global():
        model, _ = build_model(spec)
        return METHODS[spec.method].initial_global(model, spec)

    def on_done(state, global_state):
        write_report(out_dir, state)
        path = export_adapter(out_dir, state["training"], global_state, store.read_tensors(store.global_path(0)),
                              state)
        log.info("final global adapter written to %s; report in %s", path, out_dir / "report.json")

    security = cli_security.server_security(args, Path(args.state_dir))
    status_topic = topics.server_status_topic(args.fleet)
    transport = MqttTransport(BrokerAddress.parse(args.broker), client_id=f"server-{args.fleet}",
                              will=Will(status_topic, security.encode(Status("server", False), status_topic)),
                              ca_certs=args.ca_certs, certfile=args.certfile, keyfile=args.keyfile)
    notifier = Notifier()
    coord = Coordinator(cfg, store, transport, initial_global, on_done=on_done, notifier=notifier, security=security)
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:  # the loop stops between two messages: state is always saved
        log.info("%s: stopping", signal.Signals(signum).name)
        notifier.stopping("stopping")
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    coord.serve(stop, exit_when_done=not args.keep_serving)
    transport.stop()
    if coord.phase == "failed":
        last = (coord.state.get("errors") or [{}])[-1]
        print(f"broker-server: error: run {coord.run_id} failed: {last.get('what')}: {last.get('error')}",
              file=sys.stderr)
        return EXIT_RUN_FAILED
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    state = Store(Path(args.state_dir)).load()
    if state is None:
        raise EdgeRuntimeError(f"{args.state_dir}: no server state here")
    if args.json:
        keys = ("run_id", "round", "phase", "participants", "accepted", "devices", "history", "rejects", "errors",
                "configurator", "security")
        print(json.dumps({**{k: state.get(k) for k in keys}, "privacy": last_privacy(state["history"])}, indent=2))
        return 0
    now = time.time()
    print(f"run {state['run_id']}  fleet {state['fleet_name']}  round {state['round']}  phase {state['phase']}  "
          f"accepted {len(state['accepted'])}/{len(state['participants'])}")
    sec = state.get("security") or {}
    if sec.get("mode") == "signed":
        enrolled = Enrolment(Path(args.state_dir)).entries()
        print(f"signed by server key {sec.get('key')}; {sum(e.get('revoked_at') is None for e in enrolled.values())} "
              f"device(s) enrolled, {sum(e.get('revoked_at') is not None for e in enrolled.values())} revoked")
    else:
        print("INSECURE: this run signs nothing and accepts any device on its broker (--insecure)")
    print(describe_privacy(last_privacy(state["history"])))
    devices = sorted(state["devices"].values(), key=lambda d: (-d["rounds_done"], d["device_id"]))
    shown = devices if args.all else devices[:50]
    print(f"\n{len(devices)} device(s) registered (presence as of the last registry write)")
    print(f"{'device':<16}{'rounds':>8}{'samples':>9}{'seen':>14}  runtime")
    for d in shown:
        seen = f"{now - d['last_seen']:.0f} s ago" if d["last_seen"] else "never"
        print(f"{d['device_id']:<16}{d['rounds_done']:>8}{d['n_samples']:>9}{seen:>14}  {d['runtime_version']}")
    if len(shown) < len(devices):
        print(f"... and {len(devices) - len(shown)} more that did fewer rounds (--all lists them)")
    print(f"\n{'round':>5}{'devices':>9}{'MB up':>8}{'x up':>7}{'MB down':>9}{'x down':>8}{'seconds':>9}"
          f"{'accuracy':>10}{'train loss':>12}")
    for h in state["history"]:
        acc = f"{100 * h['accuracy']:.1f}%" if h["accuracy"] is not None else "-"
        tl = f"{h['train_loss']:.3f}" if h["train_loss"] is not None else "-"
        up, down = (f"{h[f'{k}_raw'] / h[k]:.1f}" if h.get(k) and h.get(f"{k}_raw") else "-"
                    for k in ("bytes_up", "bytes_down"))
        print(f"{h['round']:>5}{len(h['accepted']):>9}{h['bytes_up'] / 1e6:>8.2f}{up:>7}{h['bytes_down'] / 1e6:>9.2f}"
              f"{down:>8}{h['seconds']:>9.1f}{acc:>10}{tl:>12}")
    _print_configurator(state)
    for e in (state.get("errors") or [])[-5:]:
        print(f"\nERROR round {e['round']} ({e['phase']}) {e['what']}: {e['error']}")
    if state["phase"] == "failed":
        print(f"\nthe run FAILED: {state.get('failed_rounds')} rounds in a row could not be aggregated")
    if state["rejects"]:
        print(f"\nlast rejects ({len(state['rejects'])}):")
        for r in state["rejects"][-5:]:
            print(f"  round {r['round']} {r['from']} {r['update_id']}: {r['reason']}")
    return 0


def _print_configurator(state: dict) -> None:
    """The configurator's choices (DropPEFT's bandit): this round's offer and each round's pick and reward."""
    rows = [h for h in state["history"] if h.get("configurator")]
    current = state.get("configurator") or {}
    if not rows and not current:
        return
    print("\nconfigurator (layer-drop ratio / shape per device; reward = val-loss gain per second, round-normalised)")
    devices = sorted({d for h in rows for d in h["configurator"]["assignments"]} | set(current))
    print(f"{'device':<16}" + "".join(f"{'round ' + str(h['round']):>22}" for h in rows)
          + (f"{'now (round ' + str(state['round']) + ')':>22}" if current else ""))
    for d in devices:
        cells = []
        for h in rows:
            a, r = h["configurator"]["assignments"].get(d), h["configurator"].get("rewards", {}).get(d)
            cells.append(f"{a['ratio']:.1f} {a['shape'][:4]} r={r:+.2f}" if a and r is not None
                         else f"{a['ratio']:.1f} {a['shape'][:4]}" if a else "-")
        if current:
            a = current.get(d)
            cells.append(f"{a['ratio']:.1f} {a['shape'][:4]} ({len(a['feasible'])} fit)" if a else "-")
        print(f"{d:<16}" + "".join(f"{c:>22}" for c in cells))


def _cmd_push_profile(args: argparse.Namespace) -> int:
    """Publish a device profile (retained) to one device or the whole fleet and report the acks."""
    import hashlib
    import queue


    profile = read_yaml(args.file)   # syntax is checked here; what it says is for the device to judge
    security = cli_security.server_security(args, args.state_dir)   # devices act on pushes the server signed
    digest = hashlib.sha256(json.dumps(profile, sort_keys=True, default=str).encode()).hexdigest()[:12]
    push = ProfilePush(f"p{digest}-{int(time.time())}", json.loads(json.dumps(profile, default=str)), time.time())
    acks: queue.Queue = queue.Queue()
    transport = MqttTransport(BrokerAddress.parse(args.broker), client_id=f"push-{args.fleet}-{os.getpid()}",
                              ca_certs=args.ca_certs, certfile=args.certfile, keyfile=args.keyfile)

    def on_ack(_topic: str, payload: bytes) -> None:
        try:
            ack = security.decode(payload, ProfileAck, _topic)
        except ProtocolError as exc:
            log.warning("ignored a profile ack on %s: %s", _topic, exc)
            return
        if ack.profile_id == push.profile_id:
            acks.put(ack)

    transport.subscribe(topics.device_wildcard(args.fleet, "profile/ack"), on_ack)
    transport.start()
    try:
        if not transport.wait_connected(15):
            raise EdgeRuntimeError(f"cannot connect to the broker at {args.broker}")
        topic = (topics.device_topic(args.fleet, args.device, "profile") if args.device
                 else topics.fleet_profile_topic(args.fleet))
        transport.publish(topic, security.encode(push, topic), qos=1, retain=True)
        print(f"pushed {args.file} as {push.profile_id} to {args.device or 'every device of ' + args.fleet}", flush=True)
        deadline, seen, ok = time.monotonic() + args.wait, set(), True
        while time.monotonic() < deadline:
            try:
                ack = acks.get(timeout=0.2)
            except queue.Empty:
                continue
            if ack.device_id in seen:
                continue
            seen.add(ack.device_id)
            ok = ok and ack.accepted
            verdict = (f"accepted, in force from round {ack.applies_from_round}" if ack.accepted
                       else f"REJECTED: {ack.reason} (its previous profile stays in force)")
            print(f"  {ack.device_id}: {verdict}", flush=True)
            if args.device:
                break
        if args.device and not seen:
            print(f"  no answer from {args.device} in {args.wait:.0f} s: the profile is retained, and it will be "
                  f"judged when the device connects", flush=True)
            return 2
        return 0 if ok else 1
    finally:
        transport.stop(2.0)


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run the rounds of a federation over MQTT",
                       description="Run the rounds. Options may come from --config FILE.yaml (keys are the option "
                                   "names); flags typed here override the file. The broker URL defaults to "
                                   "$EDGE_RUNTIME_BROKER.")
    p.add_argument("--config", type=Path, default=None, help="YAML file of these options (install-service writes one)")
    add_broker_args(p)
    p.add_argument("--state-dir", type=Path, required=True, help="persistent state (resumed on restart)")
    p.add_argument("--out", type=Path, default=None, help="report + final adapter folder (default: --state-dir)")
    p.add_argument("--fleet", default="default", help="fleet name (topic namespace)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-devices", type=int, default=2, help="online devices needed to start")
    p.add_argument("--devices-per-round", type=int, default=0, help="0 = all online devices")
    p.add_argument("--quorum", type=float, default=0.5, help="share of participants that closes a round at its deadline")
    p.add_argument("--deadline", type=float, default=600.0, help="seconds a round waits for updates")
    p.add_argument("--eval-deadline", type=float, default=120.0)
    p.add_argument("--heartbeat-timeout", type=float, default=90.0, help="seconds of silence before a device is offline")
    p.add_argument("--max-participants", type=int, default=1000, help="cap on one round's participants")
    p.add_argument("--max-update-mb", type=float, default=64.0,
                   help="largest update payload; each device may buffer twice that in unfinished chunks")
    p.add_argument("--max-devices", type=int, default=10_000,
                   help="fleet registry slots; past it a new device evicts one that never worked, or is refused")
    p.add_argument("--restart-grace", type=float, default=30.0,
                   help="after a restart, seconds devices get to reappear before the open round is decided")
    p.add_argument("--max-failed-rounds", type=int, default=3,
                   help="rounds in a row whose aggregation fails before the run is marked failed")
    p.add_argument("--keep-serving", action="store_true", help="stay up after the last round")
    p.add_argument("--tokenizer-corpus", default=None, help=argparse.SUPPRESS)  # tiny test models only
    cli_security.add_security_args(p)
    add_training_args(p)
    p.set_defaults(func=_cmd_run)


def _add_push_profile(sub) -> None:
    p = sub.add_parser("push-profile", help="push a device profile (retained) to a device or the whole fleet",
                       description="Publish a device profile YAML (name, description, training: {train: {...}, "
                                   "quantization}) retained to one device or every device; each device validates it "
                                   "against the run, applies it from its next round and acks, or refuses it with the "
                                   "reason and keeps its previous profile.")
    p.add_argument("file", type=Path)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", default=None, help="the device id")
    target.add_argument("--all", action="store_true", help="every device of the fleet")
    p.add_argument("--fleet", default="default")
    p.add_argument("--wait", type=float, default=20.0, help="seconds to wait for acks")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="the server's state folder: its key signs the push, its enrolment checks the acks")
    cli_security.add_security_args(p)
    add_broker_args(p)
    p.set_defaults(func=_cmd_push_profile)


def _add_status(sub) -> None:
    p = sub.add_parser("status", help="devices and rounds of a server's state directory")
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("--all", action="store_true", help="list every registered device (default: the first 50)")
    p.set_defaults(func=_cmd_status)


def _add_broker(sub) -> None:
    p = sub.add_parser("broker", help="run the embedded MQTT broker (amqtt) standalone")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.set_defaults(func=_cmd_broker)


def _add_aggregate(sub) -> None:
    p = sub.add_parser("aggregate", help="weighted FedAvg of adapter files or peft adapter folders, offline",
                       description="Average adapters (safetensors files or peft adapter folders) with weights, "
                                   "e.g. broker-server aggregate --out global dev0_adapter:1200 dev1_adapter:300")
    p.add_argument("inputs", nargs="+", metavar="PATH[:WEIGHT]")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_cmd_aggregate)


def _add_install(sub) -> None:
    p = sub.add_parser("install-service", help="install the aggregation server as a systemd service",
                       description="Write the systemd unit, /etc/edge-runtime/server.yaml (the options of "
                                   "`broker-server run`) and the 0600 file /etc/default/edge-runtime-server; "
                                   "create the user; daemon-reload.")
    p.add_argument("--fleet", default="default")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-devices", type=int, default=2)
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--method", default="lora")
    p.add_argument("--labels", default="wordnet")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other `broker-server run` option for the config file, e.g. deadline=900 (repeatable)")
    add_service_args(p, "server")
    p.set_defaults(func=_cmd_install)
    p = sub.add_parser("uninstall-service", help="stop and remove the server's systemd service")
    p.add_argument("--prefix", type=Path, default=None)
    p.add_argument("--purge", action="store_true", help="also delete the server's state folder")
    p.set_defaults(func=_cmd_uninstall)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="broker-server", description="Aggregation server for edge-runtime fleets.")
    parser.add_argument("--version", action="version", version=f"broker-server {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_push_profile(sub)
    _add_status(sub)
    cli_security.add_commands(sub)
    cli_security.add_provision(sub)
    _add_broker(sub)
    _add_aggregate(sub)
    _add_install(sub)
    return finish_parser(parser)


def _cmd_install(args: argparse.Namespace) -> int:
    import yaml


    options = {"fleet": args.fleet, "rounds": args.rounds, "min_devices": args.min_devices, "model": args.model,
               "method": args.method, "labels": args.labels}
    for item in args.option:
        key, sep, raw = item.partition("=")
        if not sep:
            raise EdgeRuntimeError(f"--option {item!r}: expected KEY=VALUE, e.g. deadline=900")
        options[key.strip().replace("-", "_")] = yaml.safe_load(raw)
    # the written config is checked against `run`'s options now, not at the service's first start
    options_argv(subcommand(build_parser(), "run"), options, "install-service")
    o = service_options(args, "server", options)
    install(o, prefix=args.prefix, dry_run=args.dry_run, enable=args.enable)
    if not options.get("insecure") and not args.dry_run:
        identity, created = service_key(Path(args.prefix or "/") / o.state_dir.lstrip("/") / SERVER_KEY_FILE,
                                        args.user, args.prefix)
        print(f"{'created' if created else 'kept'} the server key {identity.path}; every device's agent takes:\n"
              f"  --server-key {identity.public_text}\nenrol each device with: broker-server devices add ID "
              f"--public-key ... --state-dir {o.state_dir}")
    return 0


def _cmd_uninstall(args: argparse.Namespace) -> int:
    uninstall("server", prefix=args.prefix, purge=args.purge)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_command_line(build_parser(), argv)
    except EdgeRuntimeError as exc:  # a bad --config file
        print(f"broker-server: error: {exc}", file=sys.stderr)
        return 2
    for name in ("bitsandbytes", "kernels", "amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return args.func(args)
    except EdgeRuntimeError as exc:
        print(f"broker-server: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"broker-server: error: disk full: {exc}; nothing persisted was changed, start again when there is "
              f"space", file=sys.stderr)
        return EXIT_DISK_FULL


if __name__ == "__main__":
    sys.exit(main())
