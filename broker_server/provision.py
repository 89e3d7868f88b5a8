"""``broker-server provision``: a ready Mosquitto setup for one fleet, so the broker enforces who
may publish and read what, on top of the signatures.

Written under ``--out DIR`` (every secret 0600; re-running adds new devices and keeps everything
already issued, so a device's login survives a re-provision)::

    ca.key                 the fleet's CA key: keep it offline; only provision reads it
    broker/ca.crt          the CA certificate every client verifies the broker with
    broker/broker.crt/.key the broker's TLS certificate (SAN: every --host) and key
    broker/passwd          one login per device and one for the server (PBKDF2-SHA512, Mosquitto's $7$)
    broker/acl             a device publishes only under dev/<its id>/ and reads only the fleet's round,
                           global, init and profile topics and its own ack and profile; only the server
                           publishes the fleet's topics and reads the devices'
    broker/mosquitto.conf  TLS listener, no anonymous login, the files above
    credentials.json       every login's password (0600): the source of the env files below
    server.env             EDGE_RUNTIME_BROKER=mqtts://<server login>@host:port for broker-server
    devices/<id>.env       EDGE_RUNTIME_BROKER=mqtts://<id>:<password>@host:port for that device

The broker's login name of a device is its device id (the ACL's ``%u`` patterns rely on it).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge_runtime.errors import ConfigError
from edge_runtime.protocol.messages import check_id
from edge_runtime.protocol.topics import ROOT

PBKDF2_ITERATIONS = 1000
SALT_BYTES = 12
DEVICE_WRITES = ("hello", "status", "heartbeat", "update", "update/chunk", "profile/ack")


@dataclass(frozen=True)
class Provisioned:
    out: Path
    broker_url: str            # without credentials
    server_user: str
    devices: tuple[str, ...]   # every device with a login, old and new
    added: tuple[str, ...]     # the devices this run added


def server_user(fleet: str) -> str:
    return f"efl-server-{fleet}"


def mosquitto_hash(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """A Mosquitto 2 password-file hash: ``$7$<iterations>$<base64 salt>$<base64 PBKDF2-SHA512>``."""
    salt = salt if salt is not None else os.urandom(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def acl_text(fleet: str, devices: list[str]) -> str:
    """The ACL: the server reads and writes the fleet's tree; a device (login = its id) only its own."""
    base = f"{ROOT}/{fleet}"
    lines = ["# written by broker-server provision: a device may publish only under its own dev/<id>/ topics",
             "# and read the fleet's round, global, delta, init and profile topics and its own ack and profile",
             f"user {server_user(fleet)}", f"topic readwrite {base}/#", ""]
    # patterns apply to every login: %u is the login name, which for a device is its id
    lines += [f"pattern write {base}/dev/%u/{kind}" for kind in DEVICE_WRITES]
    lines += [f"pattern read {base}/dev/%u/{kind}" for kind in ("ack", "profile")]
    lines += [f"pattern read {t}" for t in (f"{base}/round", f"{base}/global", f"{base}/global/#",
                                           f"{base}/init/#", f"{base}/delta/#", f"{base}/profile",
                                           f"{base}/server/status")]
    return "\n".join(lines) + "\n"


def mosquitto_conf(out: Path, port: int, bind: str) -> str:
    b = out / "broker"
    return "\n".join([
        "# written by broker-server provision", "per_listener_settings false", "allow_anonymous false",
        f"password_file {b / 'passwd'}", f"acl_file {b / 'acl'}", f"listener {port} {bind}",
        f"cafile {b / 'ca.crt'}", f"certfile {b / 'broker.crt'}", f"keyfile {b / 'broker.key'}",
        "tls_version tlsv1.2", ""])


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _ca(out: Path, fleet: str):
    key_path, crt_path = out / "ca.key", out / "broker" / "ca.crt"
    if key_path.exists() and crt_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        return key, x509.load_pem_x509_certificate(crt_path.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"edge-runtime fleet {fleet} CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write_private(key_path, _pem_key(key))
    crt_path.parent.mkdir(parents=True, exist_ok=True)
    crt_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def _broker_cert(out: Path, ca_key, ca_cert, hosts: list[str]) -> None:
    """The broker's certificate for ``hosts``, re-issued when the hosts change."""
    crt_path = out / "broker" / "broker.crt"
    if crt_path.exists():
        old = x509.load_pem_x509_certificate(crt_path.read_bytes())
        san = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if sorted(map(str, san.get_values_for_type(x509.DNSName) + san.get_values_for_type(x509.IPAddress))) \
                == sorted(str(_san(h).value) for h in hosts):
            return
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_private(out / "broker" / "broker.key", _pem_key(key))
    crt_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _san(host: str):
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def use_own_tls(out: Path, ca: Path, cert: Path, key: Path) -> None:
    """The operator's own CA certificate, broker certificate and key in place of generated ones:
    checked (PEM, the key is the certificate's, the certificate is issued by the CA) and copied
    into ``broker/`` (the key 0600). No ``ca.key`` is written: the CA stays the operator's."""
    try:
        ca_cert = x509.load_pem_x509_certificate(Path(ca).read_bytes())
        cert_obj = x509.load_pem_x509_certificate(Path(cert).read_bytes())
        key_obj = serialization.load_pem_private_key(Path(key).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"--tls-ca / --tls-cert / --tls-key: {exc} (PEM files, the key unencrypted)") from exc
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key_obj.public_key().public_bytes(serialization.Encoding.PEM, pub) != \
            cert_obj.public_key().public_bytes(serialization.Encoding.PEM, pub):
        raise ConfigError(f"{key} is not the key of the certificate {cert}")
    try:
        cert_obj.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ConfigError(f"{cert} is not issued by the CA {ca}: {exc or 'bad signature'}") from exc
    (out / "broker").mkdir(parents=True, exist_ok=True)
    (out / "broker" / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (out / "broker" / "broker.crt").write_bytes(cert_obj.public_bytes(serialization.Encoding.PEM))
    _write_private(out / "broker" / "broker.key", _pem_key(key_obj))


def provision(out: Path, fleet: str, devices: list[str], hosts: list[str], port: int = 8883,
              bind: str = "0.0.0.0", own_tls: tuple[Path, Path, Path] | None = None) -> Provisioned:
    """Write (or extend) the fleet's broker setup under ``out``; see the module's docstring.
    ``own_tls``: the operator's (CA certificate, broker certificate, broker key) instead of a generated CA."""
    check_id("fleet", fleet)
    if not hosts:
        raise ConfigError("give at least one --host: the name or address devices reach the broker at")
    out = Path(out)
    creds_path = out / "credentials.json"
    creds = json.loads(creds_path.read_text()) if creds_path.exists() else {"fleet": fleet, "logins": {}}
    if creds.get("fleet") != fleet:
        raise ConfigError(f"{out} was provisioned for fleet {creds.get('fleet')!r}, not {fleet!r}")
    logins: dict = creds["logins"]
    server = server_user(fleet)
    added = []
    if server in devices:
        raise ConfigError(f"device id {server!r} is the server's broker login name; choose another")
    for d in [server, *devices]:
        check_id("device_id", d)
        if d not in logins:
            logins[d] = secrets.token_urlsafe(24)
            added.append(d)
    _write_private(creds_path, json.dumps(creds, indent=2, sort_keys=True).encode())
    if own_tls:
        use_own_tls(out, *own_tls)
    elif (out / "broker" / "ca.crt").exists() and not (out / "ca.key").exists():
        pass   # the operator's own CA and certificate, from an earlier run: kept as they are
    else:
        ca_key, ca_cert = _ca(out, fleet)
        _broker_cert(out, ca_key, ca_cert, hosts)
    _write_private(out / "broker" / "passwd",
                   "".join(f"{u}:{mosquitto_hash(p)}\n" for u, p in sorted(logins.items())).encode())
    device_ids = sorted(u for u in logins if u != server)
    (out / "broker" / "acl").write_text(acl_text(fleet, device_ids))
    (out / "broker" / "mosquitto.conf").write_text(mosquitto_conf(out, port, bind))
    url = f"mqtts://{hosts[0]}:{port}"
    for user, password in logins.items():
        env = (f"EDGE_RUNTIME_BROKER=mqtts://{quote(user, safe='')}:{quote(password, safe='')}@{hosts[0]}:{port}\n"
               f"# verify the broker with: --ca-certs {out / 'broker' / 'ca.crt'} (copy it to the device)\n")
        _write_private(out / "server.env" if user == server else out / "devices" / f"{user}.env", env.encode())
    return Provisioned(out, url, server, tuple(device_ids), tuple(a for a in added if a != server))
