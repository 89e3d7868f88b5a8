"""A device fits the run to its memory: the planner's local settings, an out-of-memory step-down
that keeps the round, and a step-down after a try that died (the OOM killer raises nothing)."""

import dataclasses
import math

import torch

from edge_runtime.agent import Agent, AgentConfig
from edge_runtime.methods import METHODS
from edge_runtime.protocol.messages import RoundManifest
from edge_runtime.training.spec import TrainingSpec
from edge_runtime.transport.memory import MemoryBroker, MemoryTransport
from tests.conftest import make_toy_rows, write_jsonl
from tests.fleet_helpers import InProcessFleet


def _manifest(spec: TrainingSpec, round_: int = 1) -> RoundManifest:
    return RoundManifest("run-x", round_, "train", ("d0",), None, 60.0, spec.to_json())


def test_a_small_budget_shrinks_local_settings_but_not_the_adapter(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_toy_rows(30))
    agent = Agent(AgentConfig("d0", str(data), tmp_path / "d0", memory_budget=800 * 2**20),
                  MemoryTransport(MemoryBroker(), "d0"))
    spec = TrainingSpec(model="minilm-l6", labels=tuple(f"l{i}" for i in range(26)))
    fitted = agent.worker.plan(spec, _manifest(spec))
    assert fitted.train.batch_size == spec.train.batch_size                # the fleet's step, in micro-batches
    assert 0 < fitted.train.micro_batch_size < spec.train.batch_size or fitted.train.gradient_checkpointing
    assert fitted.lora == spec.lora and fitted.method == spec.method   # what every device uploads is unchanged
    assert agent.worker.plan_choice.predicted.total <= 800 * 2**20 * 0.85
    roomy = Agent(AgentConfig("d1", str(data), tmp_path / "d1", memory_budget=16 * 2**30),
                  MemoryTransport(MemoryBroker(), "d1"))
    assert roomy.worker.plan(spec, _manifest(spec)).train == spec.train   # the request as asked
    off = Agent(AgentConfig("d2", str(data), tmp_path / "d2", plan="off", memory_budget=800 * 2**20),
                MemoryTransport(MemoryBroker(), "d2"))
    assert off.worker.plan(spec, _manifest(spec)) == spec


def test_the_time_model_predicts_each_round_at_the_efficiency_the_last_one_measured(tmp_path):
    from edge_runtime.device.planner import TRAIN_EFFICIENCY

    data = write_jsonl(tmp_path / "d.jsonl", make_toy_rows(30))
    agent = Agent(AgentConfig("d0", str(data), tmp_path / "d0", memory_budget=16 * 2**30),
                  MemoryTransport(MemoryBroker(), "d0"))
    spec = TrainingSpec(model="minilm-l6", labels=tuple(f"l{i}" for i in range(26)))
    agent.worker.plan(spec, _manifest(spec))             # profiles the device (its matmul speed)
    first = {"train_padded_tokens": 20_000.0, "train_seconds": 4.0}
    agent.worker.add_timings(first, {"train_s": 4.0}, spec)
    eff = agent.state["train_efficiency"]["minilm-l6"]
    assert first["predicted_train_s"] == 4.0 * eff / TRAIN_EFFICIENCY      # the default efficiency, then measured
    second = {"train_padded_tokens": 10_000.0, "train_seconds": 2.5}     # half the tokens: predicted half the time
    agent.worker.add_timings(second, {"train_s": 2.5}, spec)
    assert math.isclose(second["predicted_train_s"], 2.0, rel_tol=1e-9) and second["t_train_s"] == 2.5
    built = {"train_padded_tokens": 10_000.0, "train_seconds": 3.5, "cache_build_s": 1.0}   # a round that built the cache
    agent.worker.add_timings(built, {}, spec)
    again = {"train_padded_tokens": 10_000.0, "train_seconds": 2.5}
    agent.worker.add_timings(again, {}, spec)
    assert math.isclose(again["predicted_train_s"], 2.5, rel_tol=1e-9)     # calibrated on its 2.5 s of steps
    agent.state["train_efficiency"] = "garbage"                           # a hand-edited state file: the default
    third = {"train_padded_tokens": 10_000.0, "train_seconds": 2.5}
    agent.worker.add_timings(third, {}, spec)
    assert math.isclose(third["predicted_train_s"], 2.5 * agent.state["train_efficiency"]["minilm-l6"]
                        / TRAIN_EFFICIENCY, rel_tol=1e-9)


def test_out_of_memory_steps_down_and_keeps_the_round(tmp_path, monkeypatch):
    real = METHODS["lora"].local_train
    seen = []

    def tight(model, tok, splits, spec, *a, **kw):   # this "device" cannot hold more than 4 examples at once
        at_once = spec.train.micro_batch_size or spec.train.batch_size
        seen.append(at_once)
        if at_once > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (test: over 4 examples at once do not fit)")
        return real(model, tok, splits, spec, *a, **kw)

    monkeypatch.setitem(METHODS, "lora", dataclasses.replace(METHODS["lora"], local_train=tight))
    fleet = InProcessFleet(tmp_path, n_devices=2, rounds=1)
    fleet.start()
    try:
        fleet.wait_done(timeout=180)
    finally:
        fleet.close()
    row = fleet.coordinator.state["history"][1]
    assert sorted(row["accepted"]) == ["dev0", "dev1"]            # nobody lost the round
    assert sorted(seen, reverse=True) == [16, 16, 8, 8, 4, 4]      # each device: 16 -> 8 -> 4 at once, then it trained
    epochs, batch = fleet.spec.train.epochs, fleet.spec.train.batch_size
    assert batch == 16
    for dev, agent in zip(("dev0", "dev1"), fleet.agents):
        n_train = len(next(iter(agent.worker.splits.values())).train)
        assert row["steps"][dev] == math.ceil(epochs * n_train / batch)   # the fleet's batch: the same steps
        assert "attempt" not in agent.state                      # the marker is gone after success


def test_a_try_that_died_is_stepped_down_after_the_restart(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_toy_rows(30))
    agent = Agent(AgentConfig("d0", str(data), tmp_path / "d0", plan="off"), MemoryTransport(MemoryBroker(), "d0"))
    spec = TrainingSpec(model="tiny-llama", labels=("animal", "food", "tool"))
    agent.state["attempt"] = {"run_id": "run-x", "round": 1,
                              "overrides": {"train": {"batch_size": 16, "max_seq_len": 64,
                                                      "gradient_checkpointing": False}, "quantization": "fp32"}}
    killed = agent.worker.plan(spec, _manifest(spec, 1)).train                  # the killed try's plan, one step down
    assert (killed.batch_size, killed.micro_batch_size) == (16, 8)
    again = agent.worker.plan(spec, _manifest(spec, 2)).train                   # another round: as asked
    assert (again.batch_size, again.micro_batch_size) == (16, 0)
    assert dataclasses.replace(spec) == spec


def test_the_warm_up_profiles_once_even_when_a_round_asks_at_the_same_time(tmp_path, monkeypatch):
    import threading
    import time

    import edge_runtime.agent.probe as probe_mod

    calls, real = [], probe_mod.profile_device

    def slow_profile(**kw):
        calls.append(threading.current_thread().name)
        time.sleep(0.3)   # long enough for the round's request to arrive while the warm-up measures
        return real(**kw)

    monkeypatch.setattr(probe_mod, "profile_device", slow_profile)
    data = write_jsonl(tmp_path / "d.jsonl", make_toy_rows(30))
    agent = Agent(AgentConfig("d0", str(data), tmp_path / "d0"), MemoryTransport(MemoryBroker(), "d0"))
    warm = threading.Thread(target=agent.worker.probe.warm_up, name="warm-up")
    warm.start()
    time.sleep(0.05)
    caps, budget = agent.worker.capabilities()   # the round: waits for the warm-up's measurement
    warm.join()
    assert calls == ["warm-up"] and agent.worker.probe.warm_up_s is not None and agent.worker.probe.warm_up_s >= 0.3
    assert agent.worker.probe._idle.is_set()   # a round would not wait for it any longer
    assert caps.gflops_fp32 > 0 and budget > 0 and agent.worker.capabilities()[0] is caps


def test_the_agent_warms_up_while_it_waits_for_a_manifest_unless_told_not_to(tmp_path, monkeypatch):
    import threading
    import time

    import edge_runtime.agent.probe as probe_mod

    data = write_jsonl(tmp_path / "d.jsonl", make_toy_rows(30))
    for warm in (True, False):
        agent = Agent(AgentConfig(f"d{int(warm)}", str(data), tmp_path / f"d{int(warm)}", warm_up=warm),
                      MemoryTransport(MemoryBroker(), f"d{int(warm)}"))
        runner = threading.Thread(target=agent.run, daemon=True)
        runner.start()
        deadline = time.monotonic() + 60
        while agent.worker.probe.warm_up_s is None and time.monotonic() < deadline and warm:
            time.sleep(0.05)
        if not warm:
            time.sleep(1.0)
        agent.stop_event.set()
        runner.join(10)
        assert not runner.is_alive()
        assert (agent.worker.probe.warm_up_s is not None) == warm and (agent.worker.probe.device is not None) == warm

    # a warm-up that fails costs the head start only: logged, nothing raised, the round profiles itself
    def broken(**kw):
        raise OSError("no /proc here")

    monkeypatch.setattr(probe_mod, "profile_device", broken)
    agent = Agent(AgentConfig("d2", str(data), tmp_path / "d2"), MemoryTransport(MemoryBroker(), "d2"))
    agent.worker.probe.warm_up()
    assert agent.worker.probe.warm_up_s is None and agent.worker.probe.device is None


def test_a_round_waits_for_a_running_warm_up_and_a_stop_ends_the_wait(tmp_path, monkeypatch):
    import threading
    import time

    import pytest

    from edge_runtime.service import lifecycle

    data = write_jsonl(tmp_path / "d.jsonl", make_toy_rows(30))
    agent = Agent(AgentConfig("d0", str(data), tmp_path / "d0"), MemoryTransport(MemoryBroker(), "d0"))
    probe = agent.worker.probe
    probe._idle.clear()                                   # as if a warm-up were running
    threading.Timer(0.6, probe._idle.set).start()
    t0 = time.monotonic()
    probe.wait()
    assert time.monotonic() - t0 >= 0.5 and lifecycle.seconds_since_progress() < 1.0   # waited, watchdog told
    probe._idle.clear()
    monkeypatch.setattr(lifecycle, "STOP", threading.Event())
    lifecycle.STOP.set()
    with pytest.raises(lifecycle.Interrupted):   # a stop request is not held up by a slow warm-up
        probe.wait()
    probe._idle.set()
