import pytest
import torch

from edge_runtime.errors import ModelLoadError
from edge_runtime.training.models import load_model, load_tokenizer, resolve_model_source


def test_unknown_spec_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="not a known name"):
        resolve_model_source("no-such-model")


def test_folder_without_config_or_gguf(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_source(str(tmp_path))


def test_gguf_file_and_folder_resolve(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert resolve_model_source(str(f)).gguf_file == "m.gguf"
    src = resolve_model_source(str(tmp_path))
    assert (src.path, src.gguf_file) == (tmp_path, "m.gguf")


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_tiny_models_for_each_head(name, task):
    src = resolve_model_source(name)
    tok = load_tokenizer(src, ["a b c d"])
    model = load_model(src, task, num_labels=3, tokenizer=tok)
    ids = tok(["a b c", "d"], padding=True, return_tensors="pt")
    out = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
    expected = (2, 3) if task == "classification" else (2, ids["input_ids"].shape[1], len(tok))
    assert tuple(out.logits.shape) == expected
    assert model.config.pad_token_id == tok.pad_token_id


def test_tiny_model_is_seeded():
    src = resolve_model_source("tiny-bert")
    tok = load_tokenizer(src, ["x y"])
    a = load_model(src, "classification", 2, tok, seed=3)
    b = load_model(src, "classification", 2, tok, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
