"""systemd units and config files for the device agent and the aggregation server.

``install`` writes three files under a root (``/`` on a device, ``--prefix`` for packaging and
tests), each atomically:

- ``etc/systemd/system/<name>.service``: ``Type=notify`` + ``WatchdogSec`` (the process pings
  while its main loop makes progress), ``Restart=on-failure``, a dedicated ``User``,
  ``StateDirectory`` (``/var/lib/edge-runtime/<role>``, created and owned by systemd),
  ``EnvironmentFile=-/etc/default/<name>``, lower CPU / IO weight and a higher OOM score than the
  device's own services (training yields to them), and sandboxing that leaves the process only
  its state folder to write;
- ``etc/edge-runtime/<role>.yaml``: the command's options (``--config`` reads it; command-line
  flags win over it);
- ``etc/default/<name>`` (mode 0600): ``EDGE_RUNTIME_BROKER`` with any credentials, kept out of
  the world-readable unit and config; an existing one is kept unless a broker URL is given.

On the real system (no prefix) it also creates the system user and runs ``systemctl
daemon-reload`` (and ``enable --now`` with ``enable=True``). ``dry_run`` returns what it would
write and touches nothing.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from edge_runtime.atomic_io import write_bytes_atomic
from edge_runtime.errors import ConfigError

ROLES = {
    "agent": ("edge-runtime-agent", "edge-runtime device agent (federated fine-tuning on this device)",
              ["-m", "edge_runtime.cli", "agent"]),
    "server": ("edge-runtime-server", "edge-runtime aggregation server (federated rounds over MQTT)",
               ["-m", "broker_server.cli", "run"]),
}


@dataclass(frozen=True)
class ServiceOptions:
    role: str                                  # agent | server
    options: dict = field(default_factory=dict)  # the command's options, written to the YAML config
    broker: str | None = None                  # EDGE_RUNTIME_BROKER (may hold user:password)
    user: str = "edge-runtime"
    python: str = sys.executable
    watchdog_s: int = 300                      # no main-loop progress for this long: restart
    stop_timeout_s: int = 90                   # SIGTERM -> clean stop must finish within this
    memory_max: str | None = None              # e.g. "6G": a hard cap (the planner's budget belongs below it)
    cpu_quota: str | None = None               # e.g. "200%": at most two CPUs' time (the agent's threads follow)
    cpu_weight: int = 50                       # below the default 100: the device's own work comes first
    log_format: str = "text"

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"service role must be one of {sorted(ROLES)}, got {self.role!r}")
        if not self.user or not self.user.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"user must be a plain user name, got {self.user!r}")
        if self.watchdog_s < 10:
            raise ConfigError(f"watchdog must be >= 10 s (a training step must fit in it), got {self.watchdog_s}")
        if self.memory_max is not None and not re.fullmatch(r"[0-9]+(\.[0-9]+)?[KMGT]?|[0-9]{1,3}%|infinity",
                                                            self.memory_max):
            raise ConfigError(f"memory max must be bytes with K/M/G/T, a percentage or infinity, e.g. 6G, "
                              f"got {self.memory_max!r}")
        if self.cpu_quota is not None and not re.fullmatch(r"[1-9][0-9]{0,5}%", self.cpu_quota):
            raise ConfigError(f"cpu quota must be a percentage of one CPU, e.g. 200%, got {self.cpu_quota!r}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log format must be text or json, got {self.log_format!r}")

    @property
    def name(self) -> str:
        return ROLES[self.role][0]

    @property
    def state_dir(self) -> str:
        return f"/var/lib/edge-runtime/{self.role}"

    @property
    def config_path(self) -> str:
        return f"/etc/edge-runtime/{self.role}.yaml"

    @property
    def env_path(self) -> str:
        return f"/etc/default/{self.name}"

    @property
    def unit_path(self) -> str:
        return f"/etc/systemd/system/{self.name}.service"


def render_unit(o: ServiceOptions) -> str:
    _, description, module_args = ROLES[o.role]
    exec_start = shlex.join([o.python, *module_args[:2], "--log-format", o.log_format, *module_args[2:],
                             "--config", o.config_path])
    limits = f"MemoryMax={o.memory_max}\n" if o.memory_max else ""
    limits += f"CPUQuota={o.cpu_quota}\n" if o.cpu_quota else ""
    return f"""# Written by `{'edge-runtime' if o.role == 'agent' else 'broker-server'} install-service`; edit {o.config_path}
# and {o.env_path} rather than this file (reinstalling rewrites it).
[Unit]
Description={description}
After=network-online.target
Wants=network-online.target
StartLimitIntervalSec=900
StartLimitBurst=5

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_start}
EnvironmentFile=-{o.env_path}
Environment=PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false HOME={o.state_dir}
User={o.user}
Group={o.user}
StateDirectory=edge-runtime/{o.role}
StateDirectoryMode=0750
WorkingDirectory={o.state_dir}
Restart=on-failure
RestartSec=15
# 2: a configuration error, 3: a failed run (see `status`); restarting repeats them
RestartPreventExitStatus=2 3
TimeoutStartSec=900
TimeoutStopSec={o.stop_timeout_s}
WatchdogSec={o.watchdog_s}
KillMode=mixed
Nice=10
CPUWeight={o.cpu_weight}
IOWeight={o.cpu_weight}
OOMScoreAdjust=500
{limits}NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=strict
ProtectHome=read-only
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
LockPersonality=yes

[Install]
WantedBy=multi-user.target
"""


def render_config(o: ServiceOptions) -> str:
    options = {"state_dir": o.state_dir, **o.options}
    command = "edge-runtime agent" if o.role == "agent" else "broker-server run"
    return (f"# {o.name}: options of `{command}` (command-line flags override them)\n"
            + yaml.safe_dump(options, sort_keys=True, default_flow_style=False))


def render_env(o: ServiceOptions) -> str:
    return (f"# {o.name}: broker URL and credentials (mode 0600), e.g. mqtts://user:password@broker:8883\n"
            f"EDGE_RUNTIME_BROKER={shlex.quote(o.broker or 'mqtt://127.0.0.1:1883')}\n")


@dataclass(frozen=True)
class PlannedFile:
    path: str          # absolute path on the target system
    content: str
    mode: int
    keep_existing: bool = False


def plan(o: ServiceOptions) -> list[PlannedFile]:
    return [PlannedFile(o.unit_path, render_unit(o), 0o644),
            PlannedFile(o.config_path, render_config(o), 0o644),
            PlannedFile(o.env_path, render_env(o), 0o600, keep_existing=o.broker is None)]


def _target(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def install(o: ServiceOptions, prefix: Path | None = None, dry_run: bool = False, enable: bool = False,
            echo=print) -> list[Path]:
    """Write the unit, config and environment file; on the real system also user + daemon-reload."""
    root = Path(prefix) if prefix is not None else Path("/")
    files = plan(o)
    if dry_run:
        for f in files:
            echo(f"--- {_target(root, f.path)} (mode {f.mode:04o}){' [kept if present]' if f.keep_existing else ''}")
            echo(f.content.rstrip("\n"))
        if prefix is None:
            echo(f"--- then: create system user {o.user!r} if missing; systemctl daemon-reload"
                 + (f"; systemctl enable --now {o.name}" if enable else ""))
        return []
    if prefix is None and os.geteuid() != 0:
        raise ConfigError("installing into the system needs root (sudo), or use --prefix DIR / --dry-run")
    written = []
    for f in files:
        path = _target(root, f.path)
        if f.keep_existing and path.exists():
            echo(f"kept {path} (pass --broker to replace it)")
            continue
        write_bytes_atomic(path, f.content.encode())
        os.chmod(path, f.mode)
        written.append(path)
        echo(f"wrote {path}")
    if prefix is None:
        _ensure_user(o.user, echo)
        _systemctl(["daemon-reload"], echo)
        if enable:
            _systemctl(["enable", "--now", o.name], echo)
        else:
            echo(f"start it with: sudo systemctl enable --now {o.name}; logs: journalctl -u {o.name} -f")
    return written


def uninstall(role: str, prefix: Path | None = None, purge: bool = False, echo=print) -> list[Path]:
    """Stop and remove the unit and its files; the state folder only with ``purge``."""
    o = ServiceOptions(role)
    root = Path(prefix) if prefix is not None else Path("/")
    if prefix is None:
        if os.geteuid() != 0:
            raise ConfigError("uninstalling from the system needs root (sudo), or use --prefix DIR")
        _systemctl(["disable", "--now", o.name], echo, check=False)
    removed = []
    for path in [o.unit_path, o.config_path, o.env_path] + ([o.state_dir] if purge else []):
        target = _target(root, path)
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        else:
            continue
        removed.append(target)
        echo(f"removed {target}")
    if prefix is None:
        _systemctl(["daemon-reload"], echo)
    if not purge:
        echo(f"kept the state folder {_target(root, o.state_dir)} (use --purge to remove it)")
    return removed


def _ensure_user(user: str, echo) -> None:
    import pwd

    try:
        pwd.getpwnam(user)
        return
    except KeyError:
        pass
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/var/lib/edge-runtime",
                    "--shell", "/usr/sbin/nologin", user], check=True)
    echo(f"created system user {user}")


def _systemctl(args: list[str], echo, check: bool = True) -> None:
    if shutil.which("systemctl") is None:
        echo(f"systemctl not found: run `systemctl {' '.join(args)}` on the target system")
        return
    result = subprocess.run(["systemctl", *args], capture_output=True, text=True)
    if result.returncode != 0 and check:
        raise ConfigError(f"systemctl {' '.join(args)} failed: {result.stderr.strip()}")
    echo(f"systemctl {' '.join(args)}")
