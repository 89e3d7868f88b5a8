"""Deep prompts injected through transformers' attention interface: they change the logits, masking
is not zeroing, padding and causality are respected, and the exports carry the prefixes."""

import numpy as np
import pytest
import torch

from edge_runtime.export.metadata import write_metadata
from edge_runtime.export.onnx import OnnxPredictor, export_adapter, export_merged, load_merged, read_metadata
from edge_runtime.methods import prompt
from edge_runtime.methods.prompt import PromptConfig
from edge_runtime.training.models import load_model, resolve_model_source
from edge_runtime.training.spec import TrainingSpec, build_model

WORDS = tuple("the a dog cat oak pine car bus red blue runs sits on under".split())
TEXTS = ["the dog sits on a car", "red pine", "a blue bus runs under the oak"]


def _spec(model, task="classification", **kw):
    labels = ("a", "b", "c") if task == "classification" else ()
    return TrainingSpec(model=model, task=task, labels=labels, method="prompt", tokenizer_corpus=WORDS, **kw)


def _logits(model, tok, texts=TEXTS):
    enc = tok(list(texts), padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_changing_a_prefix_changes_the_logits(name):
    model, tok = build_model(_spec(name))
    before = _logits(model, tok)
    for layer, p in prompt.prompt_parameters(model).items():
        with torch.no_grad():
            p.add_(torch.randn_like(p))
        after = _logits(model, tok)
        assert (after - before).abs().max() > 1e-4, f"layer {layer}'s prefix had no effect"
        before = after


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_masked_prefixes_give_the_base_model_and_zeroed_ones_do_not(name):
    spec = _spec(name)
    model, tok = build_model(spec)
    base = load_model(resolve_model_source(name), "classification", 3, tok, seed=spec.seed)
    prompt.set_active(model, [])
    torch.testing.assert_close(_logits(model, tok), _logits(base, tok), atol=1e-5, rtol=0)
    prompt.set_active(model, range(99))
    with torch.no_grad():
        for p in prompt.prompt_parameters(model).values():
            p.zero_()
    assert (_logits(model, tok) - _logits(base, tok)).abs().max() > 1e-5  # zero keys still take softmax mass


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_padding_does_not_change_a_sequence_result(name):
    model, tok = build_model(_spec(name, prompt=PromptConfig(length=3, init_std=1.0)))
    batch = _logits(model, tok, TEXTS)
    for i, text in enumerate(TEXTS):
        torch.testing.assert_close(batch[i], _logits(model, tok, [text])[0], atol=1e-5, rtol=0)


def test_causal_models_stay_causal_with_prefixes():
    model, tok = build_model(_spec("tiny-llama", task="causal-lm"))
    ids = tok(["the dog sits on a car"], return_tensors="pt")["input_ids"]
    other = ids.clone()
    other[0, -1] = (other[0, -1] + 1) % len(WORDS)
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=other).logits
    torch.testing.assert_close(a[0, :-1], b[0, :-1], atol=0, rtol=0)   # earlier positions cannot see the change
    assert (a[0, -1] - b[0, -1]).abs().max() > 1e-4


def test_only_prefixes_and_head_train():
    model, _ = build_model(_spec("tiny-llama"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    n_layers = len(prompt.attention_modules(model))
    assert sum(n.endswith(prompt.PARAM) for n in trainable) == n_layers
    assert trainable - {n for n in trainable if n.endswith(prompt.PARAM)} == {"score.weight"}


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_exports_put_the_prefixes_in_the_graph(name, tmp_path):
    spec = _spec(name, prompt=PromptConfig(length=4, init_std=1.0))
    model, tok = build_model(spec)
    prompt.set_active(model, [0])   # layer 1 attends without a prefix: the folder must say so
    folder = tmp_path / "adapter"
    prompt.save_prompts(model, folder, active=[0])
    tok.save_pretrained(folder)
    write_metadata(folder, name, "classification", ["a", "b", "c"], seed=spec.seed)
    reloaded, _ = load_merged(folder, read_metadata(folder), WORDS)
    torch.testing.assert_close(_logits(reloaded, tok), _logits(model, tok), atol=1e-6, rtol=0)
    res = export_merged(folder, tmp_path / "onnx")
    assert res.max_abs_diff < 1e-4
    np.testing.assert_allclose(OnnxPredictor(res.path).logits(TEXTS), _logits(model, tok).numpy(), atol=1e-4)
    ad = export_adapter(folder, tmp_path / "onnx-adapter", name="global")
    assert ad.max_abs_diff < 1e-4
