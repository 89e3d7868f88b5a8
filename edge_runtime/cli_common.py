"""Command-line pieces both ``edge-runtime`` and ``broker-server`` use (neither CLI imports the other)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from edge_runtime.service.install import ServiceOptions


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_set_option(p) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method / training setting, e.g. fdlora.personal_epochs=2, federa.residual=false, "
                        "train.weight_decay=0.01 (repeatable; values are YAML)")


def add_broker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", default=os.environ.get("EDGE_RUNTIME_BROKER", "mqtt://127.0.0.1:1883"),
                   help="mqtt://[user:pass@]host:port or mqtts://... (default: $EDGE_RUNTIME_BROKER or localhost)")
    p.add_argument("--ca-certs", default=None, help="CA bundle for TLS (mqtts://)")
    p.add_argument("--certfile", default=None, help="client certificate for TLS")
    p.add_argument("--keyfile", default=None, help="client key for TLS")


def add_service_args(p, role: str) -> None:
    p.add_argument("--prefix", type=Path, default=None, help="write under this folder instead of / (packaging, tests)")
    p.add_argument("--dry-run", action="store_true", help="print the files instead of writing them")
    p.add_argument("--enable", action="store_true", help="also `systemctl enable --now` the service")
    p.add_argument("--broker", default=None,
                   help="broker URL (with credentials) for the 0600 environment file; an existing one is kept "
                        "when this is not given")
    p.add_argument("--user", default="edge-runtime", help="the dedicated system user the service runs as")
    p.add_argument("--watchdog", type=int, default=300, help="WatchdogSec: restart after this long without progress")
    p.add_argument("--stop-timeout", type=int, default=90, help="TimeoutStopSec")
    p.add_argument("--memory-max", default=None, help="MemoryMax for the service, e.g. 6G")
    p.add_argument("--cpu-quota", default=None,
                   help="CPUQuota for the service, e.g. 200%% (two CPUs' time); the agent runs that many threads")
    p.add_argument("--log-format", dest="service_log_format", choices=["text", "json"], default="text")
    p.add_argument("--python", default=sys.executable, help="the interpreter the unit runs (this one by default)")


def service_options(args: argparse.Namespace, role: str, options: dict):
    return ServiceOptions(role, options, broker=args.broker, user=args.user, python=args.python,
                          watchdog_s=args.watchdog, stop_timeout_s=args.stop_timeout, memory_max=args.memory_max,
                          cpu_quota=args.cpu_quota, log_format=args.service_log_format)


def service_key(path: Path, user: str, prefix: Path | None):
    """(identity, created): the key pair a service signs with, in its state folder; a real install
    (root, no --prefix) hands the folder and the key to the service's user, who alone may read it."""
    from edge_runtime.protocol.signing import Identity

    identity, created = Identity.load_or_create(path)
    if created and prefix is None and os.geteuid() == 0:
        import pwd

        pw = pwd.getpwnam(user)
        for p in (path.parent, path):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    return identity, created
