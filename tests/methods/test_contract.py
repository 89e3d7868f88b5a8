"""The method contract, checked on every registered method: a new method that passes these tests
works end to end (build, a local round, the upload, the aggregate, the export, a restart)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from peft import PeftModel

from broker_server.coordinator import Coordinator
from edge_runtime.report import export_adapter
from broker_server.store import Store
from edge_runtime.agent import Agent
from edge_runtime.methods import METHODS, config_sections, register
from edge_runtime.methods.base import Method
from edge_runtime.methods.prompt import load_prompts
from edge_runtime.training.models import load_model, resolve_model_source
from edge_runtime.training.spec import TrainingSpec, build_model, with_assignment
from edge_runtime.transport.memory import MemoryTransport
from tests.fleet_helpers import InProcessFleet, initial_global, toy_spec

# the smallest settings each method trains with on the toy data (everything else: the method's defaults)
SETTINGS = {
    "lora": {},
    "federa": {},
    "fdlora": {"fdlora": {"fusion_evals": 6}},
    "prompt": {"prompt": {"length": 3}, "train": {"lr": 4e-2}},
    "fedpeptao": {"prompt": {"length": 3}, "train": {"lr": 4e-2}},
    "droppeft": {"droppeft": {"ratios": [0.0, 0.5], "shapes": ["uniform"]}},
}


def _spec(name: str) -> TrainingSpec:
    d = toy_spec(epochs=1).to_json()
    d["method"] = name
    for section, values in SETTINGS[name].items():
        d[section] = {**d[section], **values}
    return TrainingSpec.from_json(d)


def test_every_method_is_in_the_settings_of_this_test():
    assert set(SETTINGS) == set(METHODS), "a new method: add its smallest settings to SETTINGS"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_method_declares_itself_completely(name):
    m = METHODS[name]
    assert isinstance(m, Method) and m.name == name and m.summary
    if m.config is not None:   # its section of the spec: a field, default-constructible, through the wire JSON
        section, cls = m.config
        assert config_sections()[section] is cls
        spec = _spec(name)
        assert isinstance(getattr(spec, section), cls)
        assert TrainingSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert m.default_lr > 0 and m.adapter_copies >= 1 and m.personal_format >= 1
    for section, keys in m.assignable.items():   # assignable keys exist in their section
        assert set(keys) <= {f.name for f in dataclasses.fields(getattr(_spec(name), section))}
    assert 0.0 <= m.layer_dropout(_spec(name)) < 1.0


def test_the_registry_refuses_a_second_method_of_the_same_name_or_section():
    lora = METHODS["lora"]
    with pytest.raises(ValueError, match="registered twice"):
        register(lora)
    with pytest.raises(ValueError, match="section 'lora' is taken"):
        register(dataclasses.replace(lora, name="lora2"))
    assert "lora2" not in METHODS


def test_the_contract_catches_a_method_that_is_not_complete():
    lora = METHODS["lora"]
    with pytest.raises(TypeError, match="needs score"):
        dataclasses.replace(lora, name="x", scoring=True)
    with pytest.raises(TypeError, match="no assign"):
        dataclasses.replace(lora, name="x", assignable={"lora": ("rank",)})
    with pytest.raises(TypeError, match="local_train must be callable"):
        dataclasses.replace(lora, name="x", local_train=None)


def test_an_assignment_may_only_set_what_the_method_declares():
    spec = _spec("droppeft")
    assert with_assignment(spec, {"droppeft": {"ratio": 0.5}}).droppeft.ratio == 0.5
    with pytest.raises(Exception, match="not something the server may set"):
        with_assignment(_spec("lora"), {"lora": {"rank": 2}})


def _trained_keys(before: dict, after: dict) -> list[str]:
    return [k for k in before if not torch.equal(before[k], after[k])]


def _logits(model, tok) -> torch.Tensor:
    batch = tok(["an apple", "a hammer and a dog"], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_method_runs_a_round_exports_and_restarts(tmp_path, name):
    spec = _spec(name)
    method = METHODS[spec.method]
    fleet = InProcessFleet(tmp_path, n_devices=2, rounds=1, spec=spec)
    g0 = initial_global(spec)()
    fleet.start()
    try:
        fleet.wait_done(timeout=240)
    finally:
        fleet.close()
    state = fleet.coordinator.state
    trained = [h for h in state["history"] if h["round"] == 1]
    assert trained and sorted(trained[0]["accepted"]) == ["dev0", "dev1"], state["history"]   # both uploads counted
    assert trained[0]["accuracy"] is not None and state["history"][-1]["final"]   # devices evaluated the global
    glob = fleet.coordinator.global_state
    if method.scoring:   # the score round laid the global out (FedPepTAO: the shared layers only)
        assert state["selection"]["devices"] == ["dev0", "dev1"]
        g0 = Store(tmp_path / "server").read_tensors(Store(tmp_path / "server").global_path(0))
    assert set(glob) == set(g0) and all(glob[k].shape == g0[k].shape for k in g0)
    assert _trained_keys(g0, glob), "the aggregate left the global unchanged"
    assert all(torch.isfinite(v).all() for v in glob.values())

    # the export loads onto the untouched base and computes what the server's model computes
    init = fleet.store.read_tensors(fleet.store.global_path(0)) if method.needs_init else None
    folder = export_adapter(tmp_path / "out", spec.to_json(), glob, init)
    model, tok = build_model(spec)
    method.prepare(model, spec, init)
    method.load_trainable_state(model, glob)
    base = load_model(resolve_model_source(spec.model), spec.task, len(spec.labels), tok, seed=spec.seed)
    loaded = load_prompts(base, folder) if method.prompt_like else PeftModel.from_pretrained(base, folder)
    torch.testing.assert_close(_logits(loaded, tok), _logits(model, tok), atol=1e-5, rtol=0)

    # a restart: the server resumes the finished run as it was, a device remembers its round
    again = Coordinator(fleet.cfg, Store(tmp_path / "server"), MemoryTransport(fleet.broker, "server2"),
                        lambda: pytest.fail("a resumed run does not rebuild its initial global"))
    assert again.phase == "done" and again.run_id == state["run_id"]
    assert all(torch.equal(again.global_state[k], glob[k]) for k in glob)
    dev = Agent(fleet.agents[0].cfg, MemoryTransport(fleet.broker, "dev0-again"))
    assert dev.state["run_id"] == state["run_id"] and dev.state["last_round_done"] == state["round"]


def test_method_state_lives_beside_the_model_and_goes_with_it():
    import gc

    from edge_runtime.methods.base import ModelState

    state: ModelState[dict] = ModelState("x")
    model = torch.nn.Linear(2, 2)
    assert state.get(model) is None
    with pytest.raises(Exception, match="not built by the x method"):
        state.of(model)
    state.set(model, {"layers": [1]})
    assert state.of(model) == {"layers": [1]} and not any(k.startswith("_x") for k in vars(model))
    del model
    gc.collect()
    assert len(state._of) == 0   # no model kept alive by its state


@pytest.mark.parametrize("name", ["droppeft", "fdlora", "fedpeptao"])
def test_methods_keep_no_private_attributes_on_the_model(name):
    spec = _spec(name)
    model, _ = build_model(spec)
    METHODS[name].initial_global(model, spec)
    own = [k for k in vars(model) if k.startswith(("_dp_", "_fpt_", "_federa_", "_fdlora_"))]
    assert own == []


def _model_global_upload(spec):
    """(the method's model, its initial global, an upload: the global's float tensors moved a little)."""
    method = METHODS[spec.method]
    model, _ = build_model(spec)
    g = method.initial_global(model, spec)
    gen = torch.Generator().manual_seed(0)
    upload = {k: (v + 0.01 * torch.randn(v.shape, generator=gen)) if v.is_floating_point() else v
              for k, v in method.trainable_state(model).items()}
    return model, g, upload


@pytest.mark.parametrize("codec", ["fp16", "int8", "int4", "nf4"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_methods_upload_travels_through_every_codec(name, codec):
    """What each method uploads (LoRA states, FedPepTAO's prompts and control variate, FDLoRA's global
    adapter, DropPEFT's shared blocks) goes through each codec, top-k and dense, and comes back as
    a state the method loads, within the codec's error."""
    from edge_runtime.algorithms.aggregation import check_compatible
    from edge_runtime.algorithms.compression import CompressionConfig
    from edge_runtime.round.wire import decode_update, encode_update

    method = METHODS[name]
    model, g, upload = _model_global_upload(_spec(name))
    assert set(upload) == set(g), "an upload names the global's tensors (the server refuses others)"
    for topk in (1.0, 0.25):
        cfg = CompressionConfig(uplink=codec, topk=topk)
        data, residual = encode_update(upload, g, cfg)
        out = decode_update(data, g, cfg)
        check_compatible(g, out)
        method.load_trainable_state(model, out)
        for k, v in upload.items():
            if v.is_floating_point():   # what was sent plus what was kept back is the upload, exactly
                torch.testing.assert_close(out[k] - g[k] + residual[k], v - g[k], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_methods_upload_travels_as_low_rank_factors(name):
    """On BERT (whose 32 x 32 pooler admits rank-2 factors), each method's upload goes through
    ``compression.rank``: the matrices that qualify travel as factors, the rest whole, and what was
    sent plus the residual is the upload."""
    from edge_runtime.algorithms.aggregation import check_compatible
    from edge_runtime.algorithms.compression import CompressionConfig, compress_state, lowrank_shape
    from edge_runtime.round.wire import decode_update, encode_update

    method = METHODS[name]
    model, g, upload = _model_global_upload(dataclasses.replace(_spec(name), model="tiny-bert"))
    cfg = CompressionConfig(uplink="int4", rank=2)
    factored = sorted(k for k, v in g.items() if v.is_floating_point() and lowrank_shape(tuple(v.shape), 2))
    sent, _ = compress_state({k: upload[k] - g[k] for k in factored}, "int4", rank=2)
    assert all(sent[k].factors is not None for k in factored)
    data, residual = encode_update(upload, g, cfg)
    out = decode_update(data, g, cfg)
    check_compatible(g, out)
    method.load_trainable_state(model, out)
    for k, v in upload.items():
        if v.is_floating_point():
            torch.testing.assert_close(out[k] - g[k] + residual[k], v - g[k], rtol=0, atol=1e-5)
    if name in ("lora", "federa", "droppeft", "fdlora"):   # the methods that train BERT's pooler
        assert any("pooler" in k for k in factored), factored


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_method_runs_a_round_with_compressed_updates(tmp_path, name):
    from edge_runtime.algorithms.compression import CompressionConfig

    spec = dataclasses.replace(_spec(name), compression=CompressionConfig(uplink="int4", topk=0.5))
    fleet = InProcessFleet(tmp_path, n_devices=2, rounds=1, spec=spec)
    fleet.start()
    try:
        fleet.wait_done(timeout=240)
    finally:
        fleet.close()
    trained = [h for h in fleet.coordinator.state["history"] if h["round"] == 1]
    assert trained and sorted(trained[0]["accepted"]) == ["dev0", "dev1"], fleet.coordinator.state["rejects"]
    assert trained[0]["bytes_up_raw"] > 2 * trained[0]["bytes_up"], trained[0]
