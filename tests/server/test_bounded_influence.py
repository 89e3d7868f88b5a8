"""One of four devices lies, through the whole protocol path (server + agents, tiny model): it
declares n_samples = 1e9, or sends an update 10^6 times its honest delta. With the default
defences the final global stays within 2 accuracy points of the all-honest run; without them the
huge update wrecks it (so the check can fail)."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from broker_server.store import Store
from edge_runtime.algorithms.dp import DPConfig, epsilon
from edge_runtime.algorithms.robust import RobustConfig
from edge_runtime.protocol.codec import decode_tensors
from edge_runtime.report import write_report
from tests.fleet_helpers import InProcessFleet, toy_spec

UNDEFENDED = RobustConfig(norm_bound="off", max_share=1.0, weight_multiple=1e12)


def _attacker(agent, mode: str) -> None:
    """``agent`` trains honestly, then lies about what it sends."""
    honest = agent.uploader.set_pending

    def set_pending(m, file, n_samples, metrics, timings, update_id=None, layer_steps=(), **kw):
        if m.action == "train" and file is not None:
            if mode == "samples":
                n_samples = 10**9
            else:
                g = decode_tensors(agent.fetcher.global_blob(m))
                u = load_file(file)
                save_file({k: g[k] + (u[k] - g[k]) * 1e6 for k in u}, file)
        honest(m, file, n_samples, metrics, timings, update_id, layer_steps, **kw)

    agent.uploader.set_pending = set_pending


def _run(tmp_path, name: str, mode: str | None, robust: RobustConfig | None = None, dp: DPConfig | None = None) -> dict:
    spec = dataclasses.replace(toy_spec(), **({"robust": robust} if robust else {}), **({"dp": dp} if dp else {}))
    # a round waits for all four devices however loaded the machine is: a round that closed at its
    # deadline without one of them would weigh the others differently, and the accuracy bound is about the lie
    fleet = InProcessFleet(tmp_path / name, n_devices=4, rounds=3, spec=spec, rows=600, deadline_s=900.0)   # 240 test examples
    if mode:
        _attacker(fleet.agents[3], mode)
    fleet.start()
    try:
        fleet.wait_done(240)
    finally:
        fleet.close()
    state = Store(tmp_path / name / "server").load()
    for h in state["history"][1:4]:
        assert sorted(h["weights"]) == ["dev0", "dev1", "dev2", "dev3"], (h["round"], h["weights"])
    return state


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("honest"), "honest", None)


def test_an_inflated_sample_count_is_capped_and_costs_under_2_points(tmp_path, honest):
    state = _run(tmp_path, "samples", "samples")
    acc, ref = state["history"][-1]["accuracy"], honest["history"][-1]["accuracy"]
    assert ref > 0.6, ref    # the honest run learnt something worth defending
    assert abs(acc - ref) <= 0.02, (acc, ref)
    for h in state["history"][1:4]:
        declared, counted = h["defence"]["capped"]["dev3"]
        assert declared == 10**9 and counted <= 4 * sorted(h["weights"].values())[1]   # 4 x the lower median


def test_a_huge_update_is_clipped_and_costs_under_2_points_and_wrecks_an_undefended_run(tmp_path, honest):
    state = _run(tmp_path, "norm", "norm")
    acc, ref = state["history"][-1]["accuracy"], honest["history"][-1]["accuracy"]
    assert abs(acc - ref) <= 0.02, (acc, ref)
    assert all(h["defence"]["clipped"] == ["dev3"] for h in state["history"][1:4])
    wrecked = _run(tmp_path, "undefended", "norm", UNDEFENDED)
    assert wrecked["history"][-1]["accuracy"] < ref - 0.2, (wrecked["history"][-1]["accuracy"], ref)


def test_dp_fedavg_through_the_protocol_spends_epsilon_shown_by_status(tmp_path, honest):
    dp = DPConfig(clip=0.5, noise_multiplier=0.8, delta=1e-4)
    state = _run(tmp_path, "dp", None, dp=dp)
    rows = [h for h in state["history"] if h["round"] >= 1]
    assert len(rows) == 3
    for k, h in enumerate(rows, start=1):
        assert h["defence"]["dp"]["noise_std"] == pytest.approx(0.8 * 0.5 / 4)
        assert h["privacy"] == {"epsilon": pytest.approx(epsilon(0.8, k, 1e-4)), "delta": 1e-4,
                                "noise_multiplier": 0.8, "clip": 0.5, "rounds": k}
    assert not any("privacy" in h for h in honest["history"])    # no DP: nothing spent, nothing shown
    report = json.loads(write_report(tmp_path / "report", state).read_text())
    assert report["privacy"] == rows[-1]["privacy"]
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-m", "broker_server.cli", "status", "--state-dir", str(tmp_path / "dp" / "server")],
                         capture_output=True, text=True, cwd=root)
    eps = f"{epsilon(0.8, 3, 1e-4):.3g}"
    assert f"differential privacy: epsilon {eps} at delta 0.0001 after 3 round(s)" in out.stdout, out.stdout + out.stderr
    js = subprocess.run([sys.executable, "-m", "broker_server.cli", "status", "--json", "--state-dir",
                         str(tmp_path / "dp" / "server")], capture_output=True, text=True, cwd=root)
    assert json.loads(js.stdout)["privacy"]["rounds"] == 3
