import json

import torch
from safetensors.torch import load_file, save_file

from broker_server.cli import main as server_main
from edge_runtime.cli import main
from tests.conftest import write_jsonl


def test_simulate_prints_one_line_per_round_and_writes_outputs(toy_jsonl, tmp_path, capsys):
    rc = main(["simulate", "--model", "tiny-bert", "--data", str(toy_jsonl), "--devices", "2", "--rounds", "2",
               "--max-steps", "4", "--out", str(tmp_path / "o"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [l for l in out.splitlines() if l.startswith("round")]
    assert len(lines) == 3 and "global acc" in lines[-1] and "device acc" in lines[-1] and " s " in lines[-1]
    hist = json.loads((tmp_path / "o" / "history.json").read_text())
    assert hist["config"]["train"]["max_steps"] == 4 and len(hist["rounds"]) == 3


def test_simulate_takes_the_defences_and_dp_from_set_and_reports_epsilon(toy_jsonl, tmp_path, capsys):
    from edge_runtime.algorithms.dp import epsilon

    rc = main(["simulate", "--model", "tiny-bert", "--data", str(toy_jsonl), "--devices", "3", "--rounds", "2",
               "--max-steps", "2", "--out", str(tmp_path / "o"), "--no-progress", "--set", "dp.clip=0.5",
               "--set", "dp.noise_multiplier=2", "--set", "robust.max_share=0.9"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [l for l in out.splitlines() if l.startswith("round")]
    assert f"epsilon {epsilon(2.0, 1, 1e-5):.3g}" in lines[1] and f"epsilon {epsilon(2.0, 2, 1e-5):.3g}" in lines[2]
    hist = json.loads((tmp_path / "o" / "history.json").read_text())
    assert hist["config"]["dp"]["clip"] == 0.5 and hist["config"]["robust"]["max_share"] == 0.9
    assert all(h["defence"]["dp"]["noise_std"] == 2 * 0.5 / 3 for h in hist["rounds"][1:])
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["privacy"]["rounds"] == 2 and report["training"]["dp"]["noise_multiplier"] == 2


def test_bad_data_file_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok", "label": "a"}, {"text": 3, "label": "b"}])
    rc = main(["simulate", "--model", "tiny-bert", "--data", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{bad}:2: 'text' must be a non-empty string" in err
    assert not (tmp_path / "o").exists()


def test_broker_server_aggregate_files(tmp_path, capsys):
    save_file({"w": torch.tensor([0.0, 4.0])}, tmp_path / "a.safetensors")
    save_file({"w": torch.tensor([4.0, 0.0])}, tmp_path / "b.safetensors")
    rc = server_main(["aggregate", "--out", str(tmp_path / "g.safetensors"),
                      f"{tmp_path / 'a.safetensors'}:3", f"{tmp_path / 'b.safetensors'}:1"])
    assert rc == 0
    assert torch.equal(load_file(tmp_path / "g.safetensors")["w"], torch.tensor([1.0, 3.0]))


def test_broker_server_aggregate_rejects_mismatch_and_garbage(tmp_path, capsys):
    save_file({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.zeros(3)}, tmp_path / "b.safetensors")
    (tmp_path / "c.safetensors").write_bytes(b"\x80\x04not safetensors")
    assert server_main(["aggregate", "--out", str(tmp_path / "g"), str(tmp_path / "a.safetensors"),
                        str(tmp_path / "b.safetensors")]) == 2
    assert "shape" in capsys.readouterr().err
    assert server_main(["aggregate", "--out", str(tmp_path / "g"), str(tmp_path / "c.safetensors")]) == 2
    assert "cannot read as safetensors" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_enroll_keys_and_devices_commands_round_trip(tmp_path, capsys):
    assert main(["enroll", "--state-dir", str(tmp_path / "dev"), "--device-id", "jetson-07", "--json"]) == 0
    enrolled = json.loads(capsys.readouterr().out)
    assert enrolled["created"] and enrolled["enrol_command"] == \
        f"broker-server devices add jetson-07 --public-key {enrolled['public_key']}"
    assert main(["enroll", "--state-dir", str(tmp_path / "dev"), "--device-id", "jetson-07", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["public_key"] == enrolled["public_key"]   # kept, not replaced
    server = str(tmp_path / "server")
    assert server_main(["keys", "--state-dir", server, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["public_key"].startswith("ed25519:")
    assert server_main(["devices", "add", "jetson-07", "--public-key", enrolled["public_key"], "--max-samples", "900",
                        "--state-dir", server]) == 0
    assert "enrolled jetson-07" in capsys.readouterr().out
    assert server_main(["devices", "add", "pi-3", "--public-key", "ed25519:nope", "--state-dir", server]) == 2
    assert "an Ed25519 public key is 32 bytes" in capsys.readouterr().err
    assert server_main(["devices", "revoke", "jetson-07", "--state-dir", server]) == 0
    assert server_main(["devices", "list", "--state-dir", server, "--json"]) == 0
    out = capsys.readouterr().out
    listed = json.loads(out[out.index("{"):])
    assert listed["jetson-07"]["revoked_at"] is not None and listed["jetson-07"]["max_samples"] == 900
    assert server_main(["devices", "revoke", "nobody", "--state-dir", server]) == 2


def test_agent_without_keys_insists_on_insecure(tmp_path, toy_jsonl, capsys):
    rc = main(["agent", "--device-id", "d1", "--data", str(toy_jsonl), "--state-dir", str(tmp_path / "s")])
    assert rc == 2 and "needs the server's public key" in capsys.readouterr().err


def test_provision_with_own_tls_files_needs_all_three(tmp_path, capsys):
    rc = server_main(["provision", "--out", str(tmp_path / "p"), "--fleet", "f", "--host", "127.0.0.1",
                      "--device", "dev0", "--tls-ca", str(tmp_path / "ca.crt")])
    assert rc == 2 and "--tls-ca, --tls-cert and --tls-key go together" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_library_notices_that_need_no_action_stay_off_the_console(caplog):
    """bitsandbytes' missing optional CPU kernels and its kernel hub skipping a check offline (nothing
    is fetched) are not a new user's problem; our own warnings still show."""
    import logging

    from edge_runtime.cli import _quiet_third_party

    _quiet_third_party()
    with caplog.at_level(logging.WARNING):
        logging.getLogger("kernels._internals.hf_hub").warning("Skipping publisher trust check")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward")
        logging.getLogger("edge_runtime.agent").warning("our own")
    assert [r.getMessage() for r in caplog.records] == ["our own"]
