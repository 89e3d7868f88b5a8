"""``broker-server keys`` and ``broker-server devices add / list / revoke``: the server's key pair
and the enrolled devices (see :mod:`broker_server.enrolment`), and the security of ``run`` and
``push-profile`` (signed with the server's key, or ``--insecure``)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from broker_server.enrolment import Enrolment, server_identity
from edge_runtime.errors import ConfigError, EdgeRuntimeError
from edge_runtime.protocol.codec import Security

log = logging.getLogger("broker_server")


def add_security_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--insecure", action="store_true",
                   help="sign nothing and accept any device on the broker (demo / test fleets only); otherwise "
                        "the server signs with <state-dir>/server.key and accepts enrolled devices only")


def server_security(args: argparse.Namespace, state_dir: Path | None) -> Security:
    """The server's key (created on first use) and the enrolment; none with --insecure."""
    if args.insecure:
        log.warning("INSECURE: nothing is signed and any client of the broker is believed (--insecure)")
        return Security()
    if state_dir is None:
        raise EdgeRuntimeError("signing needs the server's key: give --state-dir (the server's state folder), "
                               "or --insecure for a fleet that signs nothing")
    identity, created = server_identity(state_dir)
    if created:
        log.warning("created the server's key %s; every device pins its public key: --server-key %s",
                    identity.path, identity.public_text)
    enrolment = Enrolment(state_dir)
    active = sum(1 for e in enrolment.entries().values() if e.get("revoked_at") is None)
    log.info("signing as %s; %d device(s) enrolled (broker-server devices list)", identity.fingerprint, active)
    return Security(identity, enrolment)


def add_commands(sub) -> None:
    p = sub.add_parser("keys", help="the server's public key (created if there is none): what devices pin",
                       description="Print the server's Ed25519 public key, creating <state-dir>/server.key "
                                   "(mode 0600) first if there is none. Each device's agent takes it as "
                                   "--server-key.")
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_keys)

    p = sub.add_parser("devices", help="enrol, list and revoke devices (their public keys)",
                       description="The devices whose signed messages the server accepts. A change takes "
                                   "effect in a running server within a second.")
    dsub = p.add_subparsers(dest="devices_command", required=True)
    a = dsub.add_parser("add", help="enrol a device with the public key `edge-runtime enroll` printed")
    a.add_argument("device_id")
    a.add_argument("--public-key", required=True, metavar="ed25519:...")
    a.add_argument("--max-samples", type=int, default=None,
                   help="the most training examples this device may declare (caps its weight)")
    a.add_argument("--replace", action="store_true", help="replace the key of a device enrolled with another one")
    a.add_argument("--state-dir", type=Path, required=True)
    a.set_defaults(func=_cmd_add)
    ls = dsub.add_parser("list", help="every enrolled device, its key fingerprint and whether it is revoked")
    ls.add_argument("--state-dir", type=Path, required=True)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_cmd_list)
    r = dsub.add_parser("revoke", help="refuse everything the device sends from now on")
    r.add_argument("device_id")
    r.add_argument("--state-dir", type=Path, required=True)
    r.set_defaults(func=_cmd_revoke)


def add_provision(sub) -> None:
    p = sub.add_parser("provision", help="a ready Mosquitto setup for a fleet: TLS, one login per device, an ACL",
                       description="Write a CA, the broker's TLS certificate, a password file with one login per "
                                   "device (its device id) and one for the server, an ACL in which a device "
                                   "publishes only under its own dev/<id>/ topics and only the server publishes "
                                   "the fleet's, and mosquitto.conf. Re-run with more --device to add devices; "
                                   "what was issued is kept.")
    p.add_argument("--out", type=Path, required=True, help="the folder to write (secrets 0600)")
    p.add_argument("--fleet", default="default")
    p.add_argument("--device", action="append", default=[], metavar="ID", help="a device to issue a login (repeatable)")
    p.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="a name or address devices reach the broker at (repeatable; the certificate's SAN)")
    p.add_argument("--port", type=int, default=8883)
    p.add_argument("--bind", default="0.0.0.0", help="the address the broker's TLS listener binds")
    p.add_argument("--tls-ca", type=Path, default=None, metavar="PEM",
                   help="your own CA certificate (with --tls-cert and --tls-key) instead of a generated CA")
    p.add_argument("--tls-cert", type=Path, default=None, metavar="PEM", help="the broker's certificate, issued by --tls-ca")
    p.add_argument("--tls-key", type=Path, default=None, metavar="PEM", help="the broker certificate's key (unencrypted)")
    p.set_defaults(func=_cmd_provision)


def _cmd_provision(args: argparse.Namespace) -> int:
    from broker_server.provision import provision

    own = (args.tls_ca, args.tls_cert, args.tls_key)
    if any(own) and not all(own):
        raise ConfigError("--tls-ca, --tls-cert and --tls-key go together (your own CA and broker certificate)")
    r = provision(args.out, args.fleet, args.device, args.host, args.port, args.bind, own if all(own) else None)
    print(f"fleet {args.fleet}: broker {r.broker_url}, {len(r.devices)} device login(s)"
          f"{' (new: ' + ', '.join(r.added) + ')' if r.added else ''}")
    print(f"  broker:  sudo chown -R mosquitto: {r.out / 'broker'} && mosquitto -c {r.out / 'broker' / 'mosquitto.conf'}")
    print(f"  server:  broker-server run --config ... with EDGE_RUNTIME_BROKER from {r.out / 'server.env'} and "
          f"--ca-certs {r.out / 'broker' / 'ca.crt'}")
    print(f"  devices: copy {r.out / 'devices'}/<id>.env to the device's /etc/default/edge-runtime-agent, and "
          f"{r.out / 'broker' / 'ca.crt'} beside it (--ca-certs); keep {r.out / 'ca.key'} offline")
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    identity, created = server_identity(args.state_dir)
    if args.json:
        print(json.dumps({"public_key": identity.public_text, "fingerprint": identity.fingerprint,
                          "key_file": str(identity.path), "created": created}))
    else:
        print(f"{'created' if created else 'existing'} server key {identity.path} (fingerprint "
              f"{identity.fingerprint}); devices run the agent with:\n  --server-key {identity.public_text}")
    return 0


def _cmd_add(args: argparse.Namespace) -> int:
    e = Enrolment(args.state_dir).add(args.device_id, args.public_key, args.max_samples, replace=args.replace)
    cap = f", at most {e['max_samples']} samples" if e.get("max_samples") else ""
    print(f"enrolled {args.device_id} (key {e['fingerprint']}{cap})")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    entries = Enrolment(args.state_dir).entries()
    if args.json:
        print(json.dumps(entries, indent=2, sort_keys=True))
        return 0
    print(f"{len(entries)} device(s) enrolled in {args.state_dir}")
    for d, e in sorted(entries.items()):
        state = (f"REVOKED {time.strftime('%Y-%m-%d %H:%M', time.gmtime(e['revoked_at']))} UTC"
                 if e.get("revoked_at") is not None else "active")
        cap = e.get("max_samples") or "-"
        print(f"  {d:<20} {e.get('fingerprint')}  max samples {cap!s:<8} {state}")
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    e = Enrolment(args.state_dir).revoke(args.device_id)
    print(f"revoked {args.device_id} (key {e.get('fingerprint')}): nothing it sends is accepted from now on")
    return 0
