import json

import pytest

from edge_runtime.methods.lora import LoraMethodConfig
from edge_runtime.simulation import SimulationConfig, prepare_devices, run_simulation
from edge_runtime.training.trainer import TrainConfig

FAST = TrainConfig(epochs=3, batch_size=16, lr=1e-2, max_seq_len=16)


def test_two_rounds_improve_accuracy_on_learnable_task(toy_jsonl, tmp_path):
    cfg = SimulationConfig(model="tiny-llama", data=str(toy_jsonl), devices=3, rounds=2, alpha=1.0,
                           max_examples=None, train=FAST, lora=LoraMethodConfig(rank=4))
    hist = run_simulation(cfg, tmp_path / "out", progress=False)
    accs = [r["global_accuracy"] for r in hist["rounds"]]
    assert [r["round"] for r in hist["rounds"]] == [0, 1, 2]
    assert accs[2] > accs[0] + 0.25, accs
    assert accs[2] > 0.7, accs
    assert hist["rounds"][2]["loss"] < hist["rounds"][0]["loss"]
    # outputs a user looks for
    assert json.loads((tmp_path / "out" / "history.json").read_text())["rounds"][-1]["global_accuracy"] == accs[2]
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "out" / "global_adapter" / "adapter_model.safetensors").is_file()


def test_exported_adapter_loads_with_peft_and_reproduces_accuracy(toy_jsonl, tmp_path):
    from peft import PeftModel

    from edge_runtime.training.data import concat_datasets
    from edge_runtime.training.evaluate import evaluate
    from edge_runtime.training.models import load_model, load_tokenizer, resolve_model_source

    cfg = SimulationConfig(model="tiny-bert", data=str(toy_jsonl), devices=2, rounds=1, max_examples=None,
                           train=FAST, seed=5)
    hist = run_simulation(cfg, tmp_path, progress=False)
    devices = prepare_devices(cfg)
    src = resolve_model_source("tiny-bert")
    tok = load_tokenizer(src, [t for d in devices for t in d.train.inputs])
    base = load_model(src, "classification", 3, tok, seed=5)
    model = PeftModel.from_pretrained(base, tmp_path / "global_adapter")
    res = evaluate(model, tok, concat_datasets([d.test for d in devices]), max_seq_len=16)
    assert res.accuracy == pytest.approx(hist["rounds"][-1]["global_accuracy"])


def test_generation_task_learns_response_tokens(toy_generation_jsonl, tmp_path):
    cfg = SimulationConfig(model="tiny-llama", data=str(toy_generation_jsonl), devices=2, rounds=2,
                           max_examples=None, train=TrainConfig(epochs=4, batch_size=8, lr=1e-2, max_seq_len=24))
    hist = run_simulation(cfg, None, progress=False)
    assert hist["task"] == "causal-lm"
    first, last = hist["rounds"][0], hist["rounds"][-1]
    assert last["loss"] < first["loss"]
    assert last["global_accuracy"] > first["global_accuracy"] + 0.4  # response-token accuracy


def test_per_device_files_keep_their_own_data(tmp_path):
    from tests.conftest import make_toy_rows, write_jsonl

    a = write_jsonl(tmp_path / "a.jsonl", [r for r in make_toy_rows(200, 1) if r["label"] != "tool"])
    b = write_jsonl(tmp_path / "b.jsonl", make_toy_rows(100, 2))
    devices = prepare_devices(SimulationConfig(model="tiny-bert", device_data=(str(a), str(b))))
    assert len(devices) == 2
    a_total = sum(len(getattr(devices[0], s)) for s in ("train", "val", "test"))
    assert a_total == len(a.read_text().splitlines())
    # one label space (the union) on every device, so label ids mean the same thing everywhere
    assert devices[0].train.label_names == devices[1].train.label_names == ("animal", "food", "tool")


def test_simulation_is_deterministic(toy_jsonl):
    cfg = SimulationConfig(model="tiny-bert", data=str(toy_jsonl), devices=2, rounds=1, max_examples=200,
                           train=TrainConfig(max_steps=3, batch_size=8))
    a = run_simulation(cfg, None, progress=False)
    b = run_simulation(cfg, None, progress=False)
    assert a["rounds"][-1]["global_accuracy"] == b["rounds"][-1]["global_accuracy"]
    assert a["rounds"][-1]["loss"] == b["rounds"][-1]["loss"]


def test_fdlora_personalised_models_beat_the_global_one_on_skewed_devices(toy_jsonl, tmp_path):
    from edge_runtime.methods.fdlora import FdloraConfig

    cfg = SimulationConfig(model="tiny-llama", data=str(toy_jsonl), devices=3, rounds=2, alpha=0.1, method="fdlora",
                           max_examples=None, train=FAST, lora=LoraMethodConfig(rank=4),
                           fdlora=FdloraConfig(fusion_evals=12))
    hist = run_simulation(cfg, tmp_path, progress=False)
    last = hist["rounds"][-1]
    assert len(last["device_personal_accuracy"]) == 3 and len(last["fusion"]) == 3
    assert last["mean_personal_accuracy"] > last["mean_device_accuracy"], last
    assert (tmp_path / "global_adapter" / "adapter_model.safetensors").is_file()


def test_federa_simulation_starts_from_the_base_model_and_learns(toy_jsonl, tmp_path):
    lora_cfg = SimulationConfig(model="tiny-llama", data=str(toy_jsonl), devices=2, rounds=1, max_examples=None,
                                train=FAST, lora=LoraMethodConfig(rank=4))
    federa_cfg = SimulationConfig(**{**lora_cfg.__dict__, "method": "federa"})
    lora_hist = run_simulation(lora_cfg, None, progress=False)
    hist = run_simulation(federa_cfg, None, progress=False)
    # residual form: the round-0 model is the base model, exactly what LoRA (B = 0) starts from
    assert hist["rounds"][0]["loss"] == pytest.approx(lora_hist["rounds"][0]["loss"], abs=1e-4)
    assert hist["rounds"][1]["loss"] < hist["rounds"][0]["loss"]


def test_fedpeptao_uploads_fewer_prompt_bytes_than_full_deep_prompts_and_learns(toy_jsonl, tmp_path):
    from edge_runtime.methods.fedpeptao import FedPepTAOConfig
    from edge_runtime.methods.prompt import PromptConfig

    # prompts move a tiny random model far less than LoRA does: a mild, near-IID setting shows the signal
    train = TrainConfig(epochs=3, batch_size=16, lr=1e-2, max_seq_len=16)
    full = SimulationConfig(model="tiny-llama", data=str(toy_jsonl), devices=3, rounds=2, alpha=1.0,
                            method="prompt", max_examples=None, train=train, prompt=PromptConfig(length=4))
    fpt = SimulationConfig(**{**full.__dict__, "method": "fedpeptao",
                              "fedpeptao": FedPepTAOConfig(control_variates=False)})
    h_full = run_simulation(full, None, progress=False)
    h = run_simulation(fpt, tmp_path, progress=False)
    assert h_full["selection"] is None and h["selection"]["shared_layers"] in ([0], [1])
    # prompts on a random 2-layer model stay near chance on the 60 held-out examples (their test loss moves
    # with the split, either way); what the devices optimise, their training loss, falls round over round
    for hist in (h_full, h):
        assert hist["rounds"][2]["train_loss"] < hist["rounds"][1]["train_loss"] - 0.02, hist["rounds"]
    assert h["rounds"][1]["bytes_up"] < h_full["rounds"][1]["bytes_up"]   # one of two layers' prompts
    assert "mean_personal_accuracy" in h["rounds"][-1]
    cfg = json.loads((tmp_path / "global_adapter" / "prompt_config.json").read_text())
    assert cfg["layers"] == h["selection"]["shared_layers"]


def test_droppeft_simulation_learns_and_its_configurator_respects_device_memory(toy_jsonl, tmp_path):
    from edge_runtime.methods.droppeft import DropPEFTConfig

    cfg = SimulationConfig(model="tiny-llama", data=str(toy_jsonl), devices=3, rounds=2, alpha=1.0,
                           max_examples=None, method="droppeft", train=FAST, lora=LoraMethodConfig(rank=4),
                           droppeft=DropPEFTConfig(ratios=(0.0, 0.5), shapes=("uniform",)))
    hist = run_simulation(cfg, None, progress=False)   # memory unknown: every arm may be offered
    spec_peaks = []   # over every round: round 1 offers both arms; later rounds may settle on one (timing-dependent)
    for r in hist["rounds"][1:]:
        conf = r["configurator"]
        assert set(conf["assignments"]) == {"dev00", "dev01", "dev02"} and set(conf["rewards"]) == set(conf["assignments"])
        spec_peaks += [a["predicted_peak"] for a in conf["assignments"].values()]
    arms_r1 = sorted(a["arm"] for a in hist["rounds"][1]["configurator"]["assignments"].values())
    assert arms_r1 == [0, 0, 1] or arms_r1 == [0, 1, 1]   # round 1 spreads the devices over both arms
    assert hist["rounds"][-1]["global_accuracy"] > hist["rounds"][0]["global_accuracy"] + 0.25
    # a budget only the 0.5 arm fits (tiny-llama: 2 blocks; 0.5 keeps 1): device 0 is never offered ratio 0
    low, high = min(spec_peaks), max(spec_peaks)
    assert low < high
    budget = int((low + high) / 2 / (1 - cfg.droppeft.memory_margin))
    small = SimulationConfig(**{**cfg.__dict__, "device_memory": (budget, 64 << 30, 64 << 30), "rounds": 1})
    hist = run_simulation(small, tmp_path, progress=False)
    for r in hist["rounds"][1:]:
        a = r["configurator"]["assignments"]
        assert a["dev00"]["feasible"] == [1] and a["dev00"]["ratio"] == 0.5 and a["dev00"]["budget"] == budget
        assert a["dev01"]["feasible"] == [0, 1]
    assert (tmp_path / "global_adapter" / "adapter_model.safetensors").is_file()   # a plain LoRA folder
    cfgj = json.loads((tmp_path / "global_adapter" / "adapter_config.json").read_text())
    assert cfgj["peft_type"] == "LORA"
