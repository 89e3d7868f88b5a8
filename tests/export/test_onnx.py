"""ONNX export of merged adapters: parity with PyTorch on tiny models, both heads."""


import numpy as np
import pytest

from edge_runtime.errors import ConfigError
from edge_runtime.export.onnx import ExportError, OnnxPredictor, export_merged, load_merged
from edge_runtime.export.metadata import read_metadata
from edge_runtime.simulation import SimulationConfig, run_simulation
from edge_runtime.training.trainer import TrainConfig


@pytest.fixture(scope="module")
def cls_adapter(tmp_path_factory):
    from tests.conftest import make_toy_rows, write_jsonl

    tmp = tmp_path_factory.mktemp("cls")
    data = write_jsonl(tmp / "toy.jsonl", make_toy_rows(300))
    run_simulation(SimulationConfig(model="tiny-llama", data=str(data), devices=2, rounds=1, max_examples=None,
                                    train=TrainConfig(epochs=3, lr=1e-2, max_seq_len=16)), tmp, progress=False)
    return tmp / "global_adapter"


def test_classifier_export_matches_pytorch_and_predicts(cls_adapter, tmp_path):
    res = export_merged(cls_adapter, tmp_path / "onnx")
    assert res.max_abs_diff < 1e-4
    meta = read_metadata(res.path)
    assert meta["labels"] == ["animal", "food", "tool"] and meta["format"] == "merged"
    pred = OnnxPredictor(res.path)
    texts = ["the old dog", "some red cheese and a", "a big hammer"]
    model, tok = load_merged(cls_adapter, read_metadata(cls_adapter))
    import torch

    with torch.inference_mode():
        enc = tok(texts, return_tensors="pt", padding=True)
        ref = model(**enc).logits.numpy()
    np.testing.assert_allclose(pred.logits(texts), ref, atol=1e-4)     # also on inputs the export never saw
    labels = ["animal", "food", "tool"]
    assert [label for label, _ in pred.classify(texts)] == [labels[i] for i in ref.argmax(-1)]


def test_causal_lm_export_generates_like_pytorch(tmp_path):
    from tests.conftest import write_jsonl

    rows = [{"prompt": f"what is a {w} ?", "response": f"a {w} is a {k}"}
            for k, ws in {"animal": ["dog", "cat"], "food": ["bread", "rice"]}.items() for w in ws] * 15
    data = write_jsonl(tmp_path / "gen.jsonl", rows)
    run_simulation(SimulationConfig(model="tiny-llama", data=str(data), devices=2, rounds=1, max_examples=None,
                                    train=TrainConfig(epochs=4, lr=1e-2, batch_size=8, max_seq_len=24)),
                   tmp_path, progress=False)
    res = export_merged(tmp_path / "global_adapter", tmp_path / "onnx")
    assert res.max_abs_diff < 1e-4
    pred = OnnxPredictor(res.path)
    assert pred.meta["task"] == "causal-lm"
    model, tok = load_merged(tmp_path / "global_adapter", read_metadata(tmp_path / "global_adapter"))
    import torch

    ids = tok("what is a dog ?", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    expected = tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True)
    assert pred.generate("what is a dog ?", max_new_tokens=5) == expected


def test_parity_failure_is_reported(cls_adapter, tmp_path):
    with pytest.raises(ExportError, match="disagree"):
        export_merged(cls_adapter, tmp_path / "onnx", tolerance=0.0)


def test_folder_without_metadata_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="edge_runtime.json is missing"):
        export_merged(tmp_path, tmp_path / "out")


def test_cli_export_and_infer(cls_adapter, tmp_path, capsys):
    from edge_runtime.cli import main

    assert main(["export", str(cls_adapter), "--out", str(tmp_path / "e")]) == 0
    assert "max |diff|" in capsys.readouterr().out
    assert main(["infer", str(tmp_path / "e"), "a cat"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    label, prob, text = line.split("\t")
    assert label in ("animal", "food", "tool") and 0 < float(prob) <= 1 and text == "a cat"


def test_adapter_files_switch_at_run_time_without_re_export(cls_adapter, tmp_path):
    """One base.onnx, two .onnx_adapter files: each run matches PyTorch with that adapter."""
    import torch
    from peft import set_peft_model_state_dict

    from edge_runtime.export.onnx import export_adapter, load_with_adapter

    out = tmp_path / "ax"
    res = export_adapter(cls_adapter, out, name="global")
    assert res.max_abs_diff < 1e-4
    # a second adapter (here: the global one scaled, standing in for a device's personal adapter)
    model, tok = load_with_adapter(cls_adapter, read_metadata(cls_adapter))
    from peft import get_peft_model_state_dict

    other = {k: v * 0.5 for k, v in get_peft_model_state_dict(model).items()}
    other_dir = tmp_path / "personal"
    set_peft_model_state_dict(model, other)
    model.save_pretrained(other_dir)
    tok.save_pretrained(other_dir)
    (other_dir / "edge_runtime.json").write_text((cls_adapter / "edge_runtime.json").read_text())
    base_mtime = (out / "base.onnx").stat().st_mtime_ns
    res2 = export_adapter(other_dir, out, name="personal")
    assert res2.max_abs_diff < 1e-4
    assert (out / "base.onnx").stat().st_mtime_ns == base_mtime          # not re-exported
    assert read_metadata(out)["adapters"] == ["global", "personal"]
    texts = ["the old dog", "a big hammer"]
    pred = OnnxPredictor(out, "global")
    a = pred.logits(texts)
    pred.use_adapter("personal")
    b = pred.logits(texts)
    with torch.inference_mode():
        ref_b = model(**tok(texts, return_tensors="pt", padding=True)).logits.numpy()
    np.testing.assert_allclose(b, ref_b, atol=1e-4)
    assert np.abs(a - b).max() > 1e-3                                  # switching really changes the model
    with pytest.raises(ExportError, match="no adapter 'nope'"):
        pred.use_adapter("nope")
