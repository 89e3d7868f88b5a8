"""Training throughput: real and padded tokens, and the linear layers' FLOPs counted where they run."""

import pytest
import torch

from edge_runtime.methods import lora
from edge_runtime.training.data import encode_batch, load_dataset
from edge_runtime.training.models import load_model, load_tokenizer, resolve_model_source
from edge_runtime.training.spec import TrainingSpec
from edge_runtime.training.throughput import count_linear_flops, throughput_metrics
from edge_runtime.training.trainer import TrainConfig, train_local


def test_linear_flops_by_hand():
    frozen, trained, unused = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2), torch.nn.Linear(2, 9)
    frozen.requires_grad_(False)
    net = torch.nn.ModuleDict({"a": frozen, "b": trained, "c": unused})
    x = torch.randn(5, 2, 4)                       # 10 tokens
    with count_linear_flops(net) as c:
        net["b"](net["a"](x)).sum().backward()
    # frozen: forward + input gradient = 2 passes of 2*4*3 per token; trained: 3 passes of 2*3*2; "c" never ran
    assert c.flops == 10 * (2 * 4 * 3 * 2 + 2 * 3 * 2 * 3) == 840
    with count_linear_flops(net) as again:
        pass
    net["a"](x)                                    # the hooks are gone once the block ends
    assert again.flops == 0 and not net["a"]._forward_hooks


def test_throughput_metrics():
    m = throughput_metrics(tokens=300, padded_tokens=400, flops=6e9, seconds=2.0)
    assert m == {"train_tokens": 300.0, "train_padded_tokens": 400.0, "train_tokens_per_s": 150.0, "train_padding": 0.25,
                 "train_gflops_per_s": 3.0}


def test_train_local_counts_the_tokens_it_trained_on(toy_jsonl):
    ds = load_dataset(toy_jsonl)
    src = resolve_model_source("tiny-bert")
    tok = load_tokenizer(src, ds.inputs)
    spec = TrainingSpec(model="tiny-bert", labels=("a", "b", "c"), lora=lora.LoraMethodConfig(rank=4))
    model = lora.build(load_model(src, "classification", 3, tok), spec)
    cfg = TrainConfig(max_steps=3, batch_size=8, lr=1e-2, max_seq_len=16)
    res = train_local(model, tok, ds, cfg, seed=0)
    # the same seeded order, tokenised independently: 3 batches of 8
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()[:24]
    masks = [encode_batch(tok, ds, order[i:i + 8], 16)["attention_mask"] for i in (0, 8, 16)]
    assert res.tokens == sum(int(m.sum()) for m in masks)
    assert res.padded_tokens == sum(m.numel() for m in masks) >= res.tokens
    # every padded token runs through every linear layer of the blocks (and the pooler / head on CLS only)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    per_token_max = sum(6 * m.in_features * m.out_features for m in linear)
    assert 0 < res.flops <= res.padded_tokens * per_token_max
    assert res.flops >= res.padded_tokens * sum(4 * m.in_features * m.out_features for m in linear
                                               if "encoder" in _name(model, m) and m.in_features > 8) * 0.99


def _name(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)
