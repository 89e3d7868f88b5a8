"""Generated units verify with systemd; config / env files; --config; log formats."""

import io
import json
import logging
import shutil
import subprocess
import sys

import pytest

from edge_runtime.cli import build_parser, main
from edge_runtime.errors import ConfigError
from edge_runtime.protocol.signing import Identity
from edge_runtime.service.config import expand_config
from edge_runtime.service.install import (ServiceOptions, install, render_unit,
                                          uninstall)
from edge_runtime.service.logs import (JsonFormatter, TextFormatter,
                                       setup_logging)

needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze missing (.ci/run installs the systemd package)")


def _verify(unit_path) -> tuple[bool, str]:
    """systemd-analyze exits 0 on directives it ignores: a clean unit also has no complaint about itself."""
    r = subprocess.run(["systemd-analyze", "verify", str(unit_path)], capture_output=True, text=True,
                       cwd=unit_path.parent)
    return r.returncode == 0 and unit_path.name not in r.stderr, r.stderr


@needs_systemd
def test_agent_unit_written_by_the_cli_passes_systemd_analyze_verify(tmp_path, toy_jsonl):
    server_key = Identity.generate().public_text
    rc = main(["install-service", "--device-id", "jetson-07", "--data", str(toy_jsonl), "--prefix", str(tmp_path),
               "--broker", "mqtts://dev:secret@broker.lan:8883", "--memory-max", "6G", "--watchdog", "120",
               "--cpu-quota", "150%", "--server-key", server_key])
    assert rc == 0
    key = tmp_path / "var/lib/edge-runtime/agent/device.key"   # made on the device, private
    assert key.stat().st_mode & 0o777 == 0o600 and Identity.load(key).public_text != server_key
    assert f"server_key: {server_key}" in (tmp_path / "etc/edge-runtime/agent.yaml").read_text()
    unit = tmp_path / "etc/systemd/system/edge-runtime-agent.service"
    ok, err = _verify(unit)
    assert ok, err
    text = unit.read_text()
    for line in ("Type=notify", "WatchdogSec=120", "Restart=on-failure", "User=edge-runtime",
                 "StateDirectory=edge-runtime/agent", "EnvironmentFile=-/etc/default/edge-runtime-agent",
                 "MemoryMax=6G", "CPUQuota=150%", "TimeoutStopSec=90"):
        assert f"\n{line}\n" in text, line
    assert f"ExecStart={sys.executable} -m edge_runtime.cli --log-format text agent --config " \
           "/etc/edge-runtime/agent.yaml" in text
    assert "secret" not in text  # credentials only in the 0600 environment file
    env = tmp_path / "etc/default/edge-runtime-agent"
    assert env.stat().st_mode & 0o777 == 0o600 and "secret" in env.read_text()


@needs_systemd
def test_server_unit_passes_verify_and_a_broken_unit_does_not(tmp_path):
    from broker_server.cli import main as server_main

    assert server_main(["install-service", "--prefix", str(tmp_path), "--rounds", "5", "--method", "fdlora",
                        "--option", "deadline=900"]) == 0
    key = tmp_path / "var/lib/edge-runtime/server/server.key"
    assert key.stat().st_mode & 0o777 == 0o600 and Identity.load(key).public_text.startswith("ed25519:")
    unit = tmp_path / "etc/systemd/system/edge-runtime-server.service"
    ok, err = _verify(unit)
    assert ok, err
    cfg = (tmp_path / "etc/edge-runtime/server.yaml").read_text()
    assert "deadline: 900" in cfg and "method: fdlora" in cfg
    broken = tmp_path / "broken.service"
    broken.write_text(unit.read_text().replace("Type=notify", "Type=sometimes"))
    ok, err = _verify(broken)
    assert not ok and "sometimes" in err  # the check can fail


def test_server_install_refuses_an_option_run_does_not_have(tmp_path, capsys):
    from broker_server.cli import main as server_main

    assert server_main(["install-service", "--prefix", str(tmp_path), "--option", "rouns=5"]) == 2
    assert "unknown key 'rouns'" in capsys.readouterr().err
    assert not (tmp_path / "etc").exists()


def test_dry_run_writes_nothing_and_prints_every_file(tmp_path, capsys, toy_jsonl):
    root = tmp_path / "root"
    main(["install-service", "--device-id", "d1", "--data", str(toy_jsonl), "--prefix", str(root), "--dry-run",
          "--insecure"])
    out = capsys.readouterr().out
    assert "[Service]" in out and "device_id: d1" in out and "EDGE_RUNTIME_BROKER=" in out
    assert not root.exists()


def test_reinstall_keeps_credentials_unless_a_broker_is_given_and_uninstall_cleans_up(tmp_path):
    o = ServiceOptions("agent", {"device_id": "d1", "data": "/data/d1.jsonl"}, broker="mqtt://a:b@h:1883")
    install(o, prefix=tmp_path, echo=lambda s: None)
    env = tmp_path / "etc/default/edge-runtime-agent"
    install(ServiceOptions("agent", {"device_id": "d1", "data": "/x"}), prefix=tmp_path, echo=lambda s: None)
    assert "a:b@h" in env.read_text()
    state = tmp_path / "var/lib/edge-runtime/agent"
    state.mkdir(parents=True)
    (state / "agent.json").write_text("{}")
    removed = uninstall("agent", prefix=tmp_path, echo=lambda s: None)
    assert len(removed) == 3 and not env.exists() and (state / "agent.json").exists()
    uninstall("agent", prefix=tmp_path, purge=True, echo=lambda s: None)
    assert not state.exists()


@pytest.mark.parametrize("kw, message", [({"role": "printer"}, "role"), ({"user": "a b"}, "user"),
                                         ({"watchdog_s": 3}, "watchdog"), ({"log_format": "xml"}, "log format"),
                                         ({"cpu_quota": "2"}, "cpu quota"), ({"cpu_quota": "0%"}, "cpu quota"),
                                         ({"cpu_quota": "50%\nUser=root"}, "cpu quota"),
                                         ({"memory_max": "6 GB"}, "memory max"),
                                         ({"memory_max": "6G\nUser=root"}, "memory max")])
def test_bad_service_options(kw, message):
    with pytest.raises(ConfigError, match=message):
        ServiceOptions(**({"role": "agent"} | kw))


def test_config_file_gives_the_options_and_typed_flags_win(tmp_path, toy_jsonl):
    o = ServiceOptions("agent", {"device_id": "d1", "data": str(toy_jsonl), "keep_running": True, "heartbeat": 5})
    install(o, prefix=tmp_path, echo=lambda s: None)
    cfg = tmp_path / "etc/edge-runtime/agent.yaml"
    parser = build_parser()
    args = parser.parse_args(expand_config(parser, ["agent", "--config", str(cfg), "--heartbeat", "2"]))
    assert (args.device_id, args.data, args.keep_running, args.heartbeat) == ("d1", str(toy_jsonl), True, 2.0)
    assert str(args.state_dir) == "/var/lib/edge-runtime/agent"
    assert render_unit(o).count("--config /etc/edge-runtime/agent.yaml") == 1


@pytest.mark.parametrize("text, message", [("device_idd: x\n", "unknown key 'device_idd'"),
                                           ("keep_running: maybe\n", "must be true or false"),
                                           ("heartbeat: [1, 2\n", "not valid YAML"),
                                           ("- a\n- b\n", "must be a mapping"),
                                           ("heartbeat: {a: 1}\n", "single value")])
def test_bad_config_files_name_the_file_and_key(tmp_path, capsys, text, message):
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(text)
    assert main(["agent", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and message in err


def test_log_lines_text_journald_and_json():
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        import sys as _sys
        record = logging.LogRecord("edge_runtime.agent", logging.WARNING, __file__, 1, "round %d: %s", (3, "x\ny"),
                                   _sys.exc_info())
    text = TextFormatter().format(record)
    assert "\n" not in text and "WARNING" in text and "round 3: x | y" in text and "boom" in text
    assert TextFormatter(journald=True).format(record).startswith("<4>edge_runtime.agent: round 3")
    obj = json.loads(JsonFormatter().format(record))
    assert obj["level"] == "warning" and obj["msg"] == "round 3: x\ny" and "ValueError" in obj["exc"]
    buf = io.StringIO()
    setup_logging("INFO", "json", stream=buf)
    try:
        logging.getLogger("edge_runtime.test").info("hello %s", "there")
        logging.getLogger("edge_runtime.test").debug("hidden")
    finally:
        setup_logging("WARNING", "text")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["msg"] == "hello there"


def test_install_service_passes_the_devices_own_test_and_validation_files(tmp_path, toy_jsonl):
    test_file, val_file = tmp_path / "test.jsonl", tmp_path / "val.jsonl"
    test_file.write_text(toy_jsonl.read_text())
    val_file.write_text(toy_jsonl.read_text())
    assert main(["install-service", "--device-id", "d1", "--data", str(toy_jsonl), "--test-data", str(test_file),
                 "--val-data", str(val_file), "--prefix", str(tmp_path),
                 "--server-key", Identity.generate().public_text]) == 0
    cfg = tmp_path / "etc/edge-runtime/agent.yaml"
    parser = build_parser()
    args = parser.parse_args(expand_config(parser, ["agent", "--config", str(cfg)]))
    assert (args.test_data, args.val_data) == (str(test_file.resolve()), str(val_file.resolve()))
    assert args.server_key.startswith("ed25519:") and not args.insecure
