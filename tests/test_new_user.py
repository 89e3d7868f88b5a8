"""What a new user hits first: clear errors before anything starts, their own test files, label files."""

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from edge_runtime.cli import main
from broker_server.demo import DemoConfig, DemoError, log_tail, run_demo, validate
from edge_runtime.errors import ConfigError, DataError
from edge_runtime.training.data import LocalDataset, device_splits, load_dataset, resolve_labels
from edge_runtime.transport.mqtt import BrokerAddress
from tests.conftest import make_toy_rows, write_jsonl


# -- broker URLs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("url", ["mqtt//host:1883", "mqtt:host:1883", "mqtt://host:1883/fleet", "mqtt://host:1883?x=1",
                                 "http://host", "mqtt://:1883", "", "mqtt://host:70000"])
def test_malformed_broker_urls_are_errors_not_silent_misparses(url):
    with pytest.raises(ConfigError, match="broker URL"):
        BrokerAddress.parse(url)


@pytest.mark.parametrize("url,expect", [("host", ("host", 1883, False)), ("host:1884", ("host", 1884, False)),
                                        ("mqtts://u:p%40ss@h", ("h", 8883, True)), ("[::1]:1883", ("::1", 1883, False))])
def test_good_broker_urls(url, expect):
    a = BrokerAddress.parse(url)
    assert (a.host, a.port, a.tls) == expect


def test_agent_rejects_a_malformed_broker_url_before_connecting(tmp_path, toy_jsonl, capsys):
    rc = main(["agent", "--broker", "mqtt//127.0.0.1:1883", "--device-id", "d1", "--data", str(toy_jsonl),
               "--state-dir", str(tmp_path / "s")])
    assert rc == 2
    assert "broker URL 'mqtt//127.0.0.1:1883' is malformed" in capsys.readouterr().err


# -- the demo checks everything before it spawns a process -------------------------------------
@pytest.mark.parametrize("kw,message", [
    ({"model": "no-such-model"}, "model 'no-such-model': not a known name"),
    ({"data": "/nonexistent/rows.jsonl"}, "/nonexistent/rows.jsonl: no such data file"),
    ({"method": "fedsgd"}, "unknown method 'fedsgd'"),
    ({"method": "federa", "quantization": "nf4"}, "federa cannot train on a nf4 base"),
    ({"devices": 50, "max_examples": 300}, "300 examples for 50 devices"),
    ({"broker": "mqtt//127.0.0.1:1883"}, "is malformed"),
    ({"memory_budget": "lots"}, "lots"),
    ({"launch": "thread"}, "launch must be fork or spawn, got 'thread'"),
])
def test_demo_validates_before_spawning(tmp_path, kw, message):
    cfg = DemoConfig(out=tmp_path / "demo", **kw)
    with pytest.raises(Exception, match=message.replace("(", r"\(")):
        run_demo(cfg, echo=lambda s: None)
    assert not (tmp_path / "demo").exists()     # nothing written, nothing started


def test_demo_names_an_unreachable_broker(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]    # bound, not listening: connections are refused
        with pytest.raises(DemoError, match=f"cannot reach the broker at mqtt://127.0.0.1:{port}.*drop --broker"):
            validate(DemoConfig(broker=f"mqtt://127.0.0.1:{port}"))


def test_demo_rejects_generation_data(tmp_path, toy_generation_jsonl):
    with pytest.raises(DemoError, match="classification federation"):
        validate(DemoConfig(data=str(toy_generation_jsonl), max_examples=100, devices=2))


def test_demo_prints_the_log_tail_when_the_embedded_broker_dies(tmp_path):
    with socket.socket() as s:    # the port is taken (bound, not listening): the broker cannot bind it and exits
        s.bind(("127.0.0.1", 0))
        cfg = DemoConfig(out=tmp_path / "demo", port=s.getsockname()[1], devices=2, max_examples=300)
        with pytest.raises(DemoError) as info:
            run_demo(cfg, echo=lambda s: None)
    msg = str(info.value)
    assert "the embedded MQTT broker did not start" in msg and "exited with code" in msg
    assert "broker.log" in msg and "--broker mqtt://127.0.0.1:1883" in msg
    assert "in use" in msg.lower() or "errno 98" in msg.lower(), msg   # the broker's own words, from its log


def test_demo_prints_the_server_log_tail_when_the_server_dies(tmp_path):
    cfg = DemoConfig(out=tmp_path / "demo", devices=2, max_examples=300, server_args=("--set", "nosuch.key=1"))
    with pytest.raises(DemoError) as info:
        run_demo(cfg, echo=lambda s: None)
    msg = str(info.value)
    assert "the aggregation server exited with code 2" in msg
    assert "nosuch" in msg            # the server's own error line, quoted from server.log


def test_log_tail(tmp_path):
    p = tmp_path / "x.log"
    p.write_text("".join(f"line {i}\n" for i in range(30)))
    tail = log_tail(p, 3).splitlines()
    assert tail == ["    line 27", "    line 28", "    line 29"]
    assert "no log" in log_tail(tmp_path / "missing.log")


# -- label spaces -------------------------------------------------------------------------------
def test_labels_from_a_json_list_file_a_text_file_and_a_list(tmp_path):
    (tmp_path / "labels.json").write_text(json.dumps(["tool", "animal", "food"]))
    (tmp_path / "labels.txt").write_text("tool\nanimal\n\nfood\n")
    assert resolve_labels(str(tmp_path / "labels.json")) == ("tool", "animal", "food")   # order kept: the head's
    assert resolve_labels(str(tmp_path / "labels.txt")) == ("tool", "animal", "food")
    assert resolve_labels("b,a") == ("b", "a")
    assert len(resolve_labels("wordnet")) == 26
    (tmp_path / "bad.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(DataError, match="JSON list of non-empty strings"):
        resolve_labels(str(tmp_path / "bad.json"))
    (tmp_path / "dup.json").write_text(json.dumps(["a", "b", "a"]))
    with pytest.raises(DataError, match="listed twice"):
        resolve_labels(str(tmp_path / "dup.json"))
    with pytest.raises(DataError, match="not 'wordnet', a label file"):
        resolve_labels("just-one")


def test_server_takes_a_label_list_file(tmp_path):
    from broker_server.cli import build_parser, training_spec_from_args

    (tmp_path / "labels.json").write_text(json.dumps(["tool", "animal", "food"]))
    args = build_parser().parse_args(["run", "--labels", str(tmp_path / "labels.json"), "--model", "tiny-bert",
                                      "--state-dir", str(tmp_path / "s")])
    assert training_spec_from_args(args).labels == ("tool", "animal", "food")


def test_labels_outside_the_runs_are_all_named(tmp_path):
    rows = make_toy_rows(60) + [{"text": "x y", "label": "vehicle"}, {"text": "y z", "label": "plant"},
                                {"text": "z", "label": "plant"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_dataset(path, ["animal", "food", "tool"])
    msg = str(info.value)
    assert "3 row(s) have labels outside the run's 3 labels: 'plant', 'vehicle'" in msg
    assert "--labels" in msg


# -- a device's own test / validation files ---------------------------------------------------
def _ds(n: int, tag: str) -> LocalDataset:
    return LocalDataset("classification", tuple(f"{tag}{i}" for i in range(n)), tuple(i % 2 for i in range(n)), ("a", "b"))


def test_device_splits_use_the_devices_own_files_whole():
    data, test, val = _ds(100, "d"), _ds(17, "t"), _ds(9, "v")
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    sp = device_splits(data, (0.8, 0.1, 0.1), rng())
    assert (len(sp.train), len(sp.val), len(sp.test)) == (80, 10, 10)
    sp = device_splits(data, (0.8, 0.1, 0.1), rng(), test=test)
    assert sp.test is test and (len(sp.train), len(sp.val)) == (89, 11)      # 0.8 : 0.1 of all 100
    sp = device_splits(data, (0.8, 0.1, 0.1), rng(), test=test, val=val)
    assert sp.test is test and sp.val is val and len(sp.train) == 100
    assert not set(sp.train.inputs) & set(test.inputs)


def test_an_agent_evaluates_on_its_own_test_file(tmp_path, caplog):
    from edge_runtime.agent import Agent, AgentConfig
    from edge_runtime.protocol import topics
    from edge_runtime.protocol.codec import decode_message
    from edge_runtime.protocol.messages import UpdateManifest
    from edge_runtime.transport.memory import MemoryTransport
    from tests.fleet_helpers import InProcessFleet

    fleet = InProcessFleet(tmp_path, n_devices=2, rounds=1)
    test_file = write_jsonl(tmp_path / "own_test.jsonl", make_toy_rows(37, seed=99))
    a0 = fleet.agents[0]
    fleet.agents[0] = Agent(AgentConfig("dev0", a0.cfg.data, tmp_path / "dev0b", fleet="t", ack_timeout_s=5.0,
                                        heartbeat_s=1.0, test_data=str(test_file)), MemoryTransport(fleet.broker, "dev0b"))
    seen: dict[str, list] = {}
    spy = MemoryTransport(fleet.broker, "spy")
    spy.subscribe(f"{topics.ROOT}/t/dev/+/update", lambda t, p: seen.setdefault(t.split("/")[-2], []).append(
        decode_message(p, UpdateManifest)))
    spy.start()
    caplog.set_level("INFO", logger="edge_runtime")
    fleet.start()
    try:
        fleet.wait_done()
    finally:
        fleet.close()
    assert seen, "no update manifests seen"
    assert {m.metrics["eval_n"] for m in seen["dev0"]} == {37}           # its own file, every round
    assert {m.metrics["eval_n"] for m in seen["dev1"]} == {30}           # 10% of its 300 rows
    assert max(m.n_samples for m in seen["dev0"]) == 267 and max(m.n_samples for m in seen["dev1"]) == 240
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("round 1: update ") and line.endswith(" accepted") for line in lines), lines
    assert any(line.startswith("round 2: final evaluation ") and line.endswith(" accepted") for line in lines), lines
    assert not any(line.startswith("round 2: update ") for line in lines)


# -- command line ---------------------------------------------------------------------------------
def test_log_options_work_after_the_subcommand(tmp_path, capsys):
    (tmp_path / "status.json").write_text(json.dumps({"device_id": "d", "fleet": "f", "pid": 0}))
    assert main(["status", "--state-dir", str(tmp_path), "--json", "--log-format", "json", "--log-level", "DEBUG"]) == 0
    assert main(["--log-level", "WARNING", "status", "--state-dir", str(tmp_path), "--json"]) == 0
    from edge_runtime.cli import build_parser

    args = build_parser().parse_args(["--log-level", "ERROR", "status"])
    assert args.log_level == "ERROR"                     # before the subcommand: kept
    args = build_parser().parse_args(["status", "--log-level", "DEBUG"])
    assert args.log_level == "DEBUG" and args.log_format == "text"


def test_help_shows_defaults():
    out = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "demo", "--help"], capture_output=True,
                         text=True, timeout=120).stdout
    assert "(default: 4)" in out and "(default: runs/demo)" in out
    out = subprocess.run([sys.executable, "-m", "broker_server.cli", "run", "--help"], capture_output=True,
                         text=True, timeout=120).stdout
    assert "(default: minilm-l6)" in out or "default: minilm-l6" in out


def test_export_without_metadata_names_options_that_exist(tmp_path, capsys):
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    assert main(["export", str(folder), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "edge_runtime.json is missing" in err and "--model, --task and --labels" in err
    from edge_runtime.cli import build_parser

    opts = {s for a in build_parser()._subparsers._group_actions[0].choices["export"]._actions for s in a.option_strings}
    assert {"--model", "--task", "--labels"} <= opts
    assert main(["export", str(folder), "--out", str(tmp_path / "x"), "--model", "minilm-l6"]) == 2
    assert "needs --labels" in capsys.readouterr().err


def test_infer_on_a_folder_that_is_not_an_export(tmp_path, capsys):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "edge_runtime.json").write_text(json.dumps({"model": "tiny-bert", "task": "classification"}))
    assert main(["infer", str(tmp_path / "adapter"), "hello"]) == 2
    err = capsys.readouterr().err
    assert "is not an ONNX export" in err and "edge-runtime export" in err
    assert main(["infer", str(tmp_path / "nothing"), "hello"]) == 2
    assert "no such export folder" in capsys.readouterr().err
