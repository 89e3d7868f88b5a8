"""FeDeRA and FDLoRA through the whole protocol path (server + agents, in-memory transport)."""

import dataclasses
import json

import torch
from safetensors.torch import load as safetensors_load

from edge_runtime.report import export_adapter
from edge_runtime.agent import Agent
from edge_runtime.methods.fdlora import FdloraConfig
from edge_runtime.methods.federa import FederaConfig
from edge_runtime.methods.personal import load_personal
from edge_runtime.protocol import topics
from edge_runtime.protocol.chunking import Reassembler
from edge_runtime.training.spec import TrainingSpec
from edge_runtime.transport.memory import MemoryTransport
from edge_runtime.export.device import write_device_adapter
from edge_runtime.methods import fdlora
from tests.fleet_helpers import InProcessFleet, toy_spec


def _assert_folder_matches_device(agent, folder, set_up):
    """The adapter folder, loaded onto the untouched base, computes what the agent's model computes
    once ``set_up(model)`` has switched it to the model under test."""
    from peft import PeftModel

    from edge_runtime.training.models import load_model, resolve_model_source

    spec = TrainingSpec.from_json(json.loads((agent.cfg.state_dir / "model" / "device.json").read_text())["training"])
    model, tok = agent.worker.model, agent.worker.tokenizer
    batch = tok(["an apple", "a hammer and a dog"], padding=True, return_tensors="pt")
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model.eval()
    with torch.no_grad():
        set_up(model)
        expected = model(**batch).logits
        fdlora._activate(model, "global")
        base = load_model(resolve_model_source(spec.model), spec.task, len(spec.labels), tok, seed=spec.seed)
        got = PeftModel.from_pretrained(base, folder).eval()(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def _assert_same_logits(agent, personal, folder):
    """The fused personal folder computes the device's fused model at its own (a, b)."""
    def fused(model):
        fdlora._load_adapter(model, "personal", personal.tensors, "personal")
        fdlora._activate(model, ["personal", "global"])
        fdlora._set_scales(model, personal.meta["a"], personal.meta["b"])

    _assert_folder_matches_device(agent, folder, fused)


def _assert_global_logits(agent, folder):
    """The rank-2r global folder computes what the device's model computes with the global adapter alone."""
    def global_only(model):
        fdlora._activate(model, "global")
        fdlora._set_scales(model, 0.0, 1.0)

    _assert_folder_matches_device(agent, folder, global_only)


def _run(fleet: InProcessFleet, spy: MemoryTransport | None = None) -> dict:
    if spy is not None:
        spy.start()
    fleet.start()
    try:
        fleet.wait_done(timeout=180)
    finally:
        fleet.close()
        if spy is not None:
            spy.stop(1.0)
    return fleet.coordinator.state


def _run_with_spy(fleet: InProcessFleet) -> tuple[dict, list[bytes]]:
    """Run the fleet with a subscriber that reassembles every uploaded payload, as the bytes sent."""
    sent: list[tuple[str, bytes]] = []
    spy = MemoryTransport(fleet.broker, "spy")
    spy.subscribe(topics.device_wildcard("t", "update/chunk"), lambda t, p: sent.append((t, p)))
    state = _run(fleet, spy)
    payloads, reasm = [], Reassembler(1 << 30)
    for topic, frame in sent:
        _, whole = reasm.add(topics.parse_topic(topic).device_id, frame, 0.0)
        if whole is not None:
            payloads.append(whole)
    return state, payloads


def test_federa_devices_build_identical_models_from_the_shipped_init(tmp_path):
    spec = dataclasses.replace(toy_spec(), method="federa", federa=FederaConfig(residual=True))
    fleet = InProcessFleet(tmp_path, n_devices=2, rounds=2, spec=spec)
    state = _run(fleet)
    hist = state["history"]
    assert [h["round"] for h in hist] == [0, 1, 2] and hist[-1]["final"]
    assert hist[2]["loss"] < hist[0]["loss"]
    init_files = [sorted((tmp_path / f"dev{k}" / "init").glob("*.safetensors")) for k in range(2)]
    assert all(len(f) == 1 for f in init_files)
    assert init_files[0][0].read_bytes() == (tmp_path / "server" / "global" / "round_00000.safetensors").read_bytes()
    # both devices' frozen (residual) base weights are bit-identical
    m0, m1 = (dict(a.worker.model.named_parameters()) for a in fleet.agents)
    frozen = [k for k, p in m0.items() if not p.requires_grad]
    assert frozen and all(torch.equal(m0[k], m1[k]) for k in frozen)
    # the server's export is a plain LoRA for the untouched base (rank 2r)
    init = fleet.store.read_tensors(fleet.store.global_path(0))
    folder = export_adapter(tmp_path / "out", state["training"], fleet.coordinator.global_state, init)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["r"] == 2 * spec.lora.rank
    # a device's own model from its state folder: the same plain-LoRA form
    device = write_device_adapter(tmp_path / "dev0", tmp_path / "dev0-adapter")
    assert json.loads((device / "adapter_config.json").read_text())["r"] == 2 * spec.lora.rank


def test_fdlora_personal_adapter_never_leaves_the_device_and_survives_a_restart(tmp_path):
    spec = dataclasses.replace(toy_spec(), method="fdlora", fdlora=FdloraConfig(fusion_evals=8))
    fleet = InProcessFleet(tmp_path, n_devices=2, rounds=2, spec=spec)
    state, payloads = _run_with_spy(fleet)

    hist = state["history"]
    assert all(h.get("personal_accuracy") is not None for h in hist), hist
    assert len(payloads) == 2 * 2  # 2 devices x 2 training rounds
    global_keys = set(safetensors_load(payloads[0]))
    for k in range(2):
        files = list((tmp_path / f"dev{k}" / "personal").glob("*.safetensors"))
        assert len(files) == 1
        personal = load_personal(files[0])
        assert personal.meta["trained"] is True and {"a", "b"} <= set(personal.meta)
        assert set(personal.tensors) == global_keys  # same names as the upload: compare the bytes
        secrets = [v.contiguous().numpy().tobytes() for n, v in personal.tensors.items() if "lora_B" in n]
        assert secrets and all(v.abs().sum() > 0 for n, v in personal.tensors.items() if "lora_B" in n)
        for blob in payloads:
            assert set(safetensors_load(blob)) == global_keys
            assert not any(secret in blob for secret in secrets)
        # the device's own (fused) model, exported from its state folder, computes what the device computes
        folder = write_device_adapter(tmp_path / f"dev{k}", tmp_path / f"dev{k}-personal")
        meta = json.loads((folder / "edge_runtime.json").read_text())
        assert meta["personal"] is True and meta["fusion"] == {"a": personal.meta["a"], "b": personal.meta["b"]}
        _assert_same_logits(fleet.agents[k], personal, folder)
        if k == 0:  # personal and global served from one ONNX base graph: same layout, no re-export
            from edge_runtime.export.onnx import OnnxPredictor, export_adapter

            glob = write_device_adapter(tmp_path / "dev0", tmp_path / "dev0-global", which="global")
            onnx_dir = tmp_path / "dev0-onnx"
            export_adapter(folder, onnx_dir, name="personal")
            base_mtime = (onnx_dir / "base.onnx").stat().st_mtime_ns
            res = export_adapter(glob, onnx_dir, name="global")   # parity-checked against PyTorch inside
            assert res.max_abs_diff < 1e-4 and (onnx_dir / "base.onnx").stat().st_mtime_ns == base_mtime
            texts = ["an apple", "a hammer and a dog"]
            personal_logits = OnnxPredictor(onnx_dir, adapter="personal").logits(texts)
            global_logits = OnnxPredictor(onnx_dir, adapter="global").logits(texts)
            if (personal.meta["a"], personal.meta["b"]) != (0.0, 1.0):   # two different models, one base file
                assert abs(personal_logits - global_logits).max() > 1e-4
            else:   # the fusion search may pick the global alone (a = 0, b = 1): then they must agree
                assert abs(personal_logits - global_logits).max() < 1e-4
            _assert_global_logits(fleet.agents[k], glob)
        # a restarted agent picks its personal adapter up again
        again = Agent(fleet.agents[k].cfg, MemoryTransport(fleet.broker, f"again{k}"))
        again.worker.prepare(TrainingSpec.from_json(state["training"]), None)
        assert again.worker.personal is not None and again.worker.personal.meta == personal.meta
        assert all(torch.equal(again.worker.personal.tensors[n], v) for n, v in personal.tensors.items())


def test_fedpeptao_scores_then_uploads_only_the_shared_layers(tmp_path):
    from edge_runtime.methods.fedpeptao import FedPepTAOConfig
    from edge_runtime.methods.prompt import PromptConfig

    spec = dataclasses.replace(toy_spec(lr=4e-2), method="fedpeptao", prompt=PromptConfig(length=3),
                               fedpeptao=FedPepTAOConfig())
    fleet = InProcessFleet(tmp_path, n_devices=2, rounds=2, spec=spec)
    state, payloads = _run_with_spy(fleet)

    sel = state["selection"]
    assert sel["devices"] == ["dev0", "dev1"] and len(sel["shared_layers"]) == 1 and len(sel["layer_scores"]) == 2
    shared = sel["shared_layers"][0]
    hist = state["history"]
    assert [h["round"] for h in hist] == [0, 1, 2] and hist[-1]["final"]
    assert all(h.get("personal_accuracy") is not None for h in hist)
    payloads = [safetensors_load(b) for b in payloads]
    assert len(payloads) == 2 * 2   # the score round sends metrics only
    for p in payloads:
        assert {k for k in p if "prompt." in k} == {f"prompt.{shared}", f"cv.prompt.{shared}"}
    # the server's optimiser state is persisted per round and names both devices' control variates
    server = fleet.store.read_tensors(fleet.store.resolve(state["server_file"]))
    assert int(server["round"]) == 2 and {f"ck.dev0.prompt.{shared}", f"ck.dev1.prompt.{shared}"} <= set(server)
    # each device's personal layer and AdamW moments are on its disk, and a restart reads them back
    for k in range(2):
        files = list((tmp_path / f"dev{k}" / "personal").glob("fedpeptao-*.safetensors"))
        assert len(files) == 1
        personal = load_personal(files[0])
        own = f"prompt.{1 - shared}"
        assert own in personal.tensors and personal.meta["steps_total"] > 0
        assert not any(torch.equal(personal.tensors[own], p[f"prompt.{shared}"]) for p in payloads)
        again = Agent(fleet.agents[k].cfg, MemoryTransport(fleet.broker, f"again{k}"))
        again.worker.prepare(TrainingSpec.from_json(state["training"]), None)
        assert again.worker.personal is not None and again.worker.personal.meta == personal.meta
    # the server's global export and a device's own model are prompt folders that export to ONNX
    folder = export_adapter(tmp_path / "out", state["training"], fleet.coordinator.global_state, None)
    assert json.loads((folder / "prompt_config.json").read_text())["layers"] == [shared]
    device = write_device_adapter(tmp_path / "dev0", tmp_path / "dev0-adapter")
    assert json.loads((device / "prompt_config.json").read_text())["layers"] == [0, 1]
