"""FedPepTAO on a device: layer scores, the narrowed global, personal layers that never leave,
control variates by their formula, and AdamW state that survives a restart."""

import dataclasses

import pytest
import torch

from edge_runtime.algorithms.aggregation import Update
from edge_runtime.errors import AggregationError
from edge_runtime.methods import fedpeptao, prompt
from edge_runtime.methods.fedpeptao import FedPepTAOConfig
from edge_runtime.methods.personal import load_personal, save_personal
from edge_runtime.methods.prompt import PromptConfig
from edge_runtime.training.data import Splits, load_dataset
from edge_runtime.training.spec import TrainingSpec, build_model
from edge_runtime.training.trainer import TrainConfig
from tests.conftest import make_toy_rows, write_jsonl
from tests.fleet_helpers import TOY_CORPUS, TOY_WORDS


def _spec(**fpt) -> TrainingSpec:
    return TrainingSpec(model="tiny-llama", labels=tuple(sorted(TOY_WORDS)), method="fedpeptao",
                        prompt=PromptConfig(length=3), fedpeptao=FedPepTAOConfig(**fpt), tokenizer_corpus=TOY_CORPUS,
                        train=TrainConfig(max_steps=4, batch_size=8, lr=4e-2, weight_decay=0.1, max_seq_len=16))


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("fpt") / "d.jsonl", make_toy_rows(60, seed=3))
    data = load_dataset(path, sorted(TOY_WORDS))
    return Splits(data.subset(range(40)), data.subset(range(40, 50)), data.subset(range(50, 60)))


def _selected_global(spec, splits):
    model, tok = build_model(spec)
    full = fedpeptao.initial_global(model, spec)
    reports = [(fedpeptao.score(model, tok, splits, spec, seed=s), 10.0) for s in (0, 1)]
    glob, info = fedpeptao.select(full, reports, spec)
    return model, tok, full, glob, info


def test_scores_cover_every_layer_and_selection_narrows_the_global(splits):
    spec = _spec()
    model, tok, full, glob, info = _selected_global(spec, splits)
    n = len(prompt.attention_modules(model))
    assert len(info["layer_scores"]) == n and len(info["shared_layers"]) == 1   # ceil(0.5 * 2)
    kept = info["shared_layers"][0]
    assert {k for k in glob if "prompt." in k} == {f"prompt.{kept}", f"cv.prompt.{kept}"}
    assert {k for k in full if k.startswith("head.")} == {k for k in glob if k.startswith("head.")}
    # the scores come from the frozen model without prompts: prefixes do not move them
    before = fedpeptao.score(model, tok, splits, spec, seed=0)
    with torch.no_grad():
        for p in prompt.prompt_parameters(model).values():
            p.add_(1.0)
    assert fedpeptao.score(model, tok, splits, spec, seed=0) == before
    with pytest.raises(AggregationError, match="lacks a score"):
        fedpeptao.select(full, [({"layer_score.0": 1.0}, 5.0)], spec)


def test_upload_holds_only_shared_layers_and_personal_layers_train_on_the_device(splits):
    spec = _spec()
    model, tok, _, glob, info = _selected_global(spec, splits)
    shared = info["shared_layers"]
    own = [i for i in range(2) if i not in shared]
    fedpeptao.load_trainable_state(model, glob)
    init_own = fedpeptao.initial_prompts(model, spec)[f"prompt.{own[0]}"]
    res, personal = fedpeptao.local_train(model, tok, splits, spec, seed=1, personal=None)
    upload = fedpeptao.trainable_state(model)
    assert set(upload) == set(glob)
    assert not torch.equal(personal.tensors[f"prompt.{own[0]}"], init_own)   # the personal layer trained
    assert f"prompt.{own[0]}" not in upload
    # c_k' = c_k - c + (w - theta) / (K lr), with c_k = 0 and c = 0 in round one
    key = f"prompt.{shared[0]}"
    expected = (glob[key] - upload[key]) / (res.steps * spec.train.lr)
    torch.testing.assert_close(upload["cv." + key], expected)
    torch.testing.assert_close(personal.tensors["ck." + key], expected)


def test_mask_mode_keeps_no_personal_prompts(splits):
    spec = _spec(unshared="mask")
    model, tok, _, glob, info = _selected_global(spec, splits)
    fedpeptao.load_trainable_state(model, glob)
    _, personal = fedpeptao.local_train(model, tok, splits, spec, seed=1, personal=None)
    assert not any(k.startswith("prompt.") for k in personal.tensors)
    assert fedpeptao.personalise(model, tok, splits, spec, personal)[0] == {}


def test_optimizer_state_survives_a_restart(splits, tmp_path):
    spec = _spec()
    model, tok, _, glob, _ = _selected_global(spec, splits)
    fedpeptao.load_trainable_state(model, glob)
    _, personal = fedpeptao.local_train(model, tok, splits, spec, seed=1, personal=None)
    assert any(k.endswith(".exp_avg_sq") for k in personal.tensors) and personal.meta["steps_total"] == 4
    restored = load_personal(save_personal(tmp_path / "p.safetensors", personal))

    def second_round(state):
        m, t = build_model(spec)   # a restarted device: a fresh process, the same global
        fedpeptao.load_trainable_state(m, glob)
        fedpeptao.local_train(m, t, splits, spec, seed=2, personal=state)
        return fedpeptao.trainable_state(m)

    kept, reloaded, fresh = second_round(personal), second_round(restored), second_round(None)
    assert all(torch.equal(kept[k], reloaded[k]) for k in kept)
    assert any(not torch.equal(kept[k], fresh[k]) for k in kept)   # the state did matter


def test_server_aggregate_uses_the_adaptive_update(splits):
    spec = _spec()
    _, _, _, glob, _ = _selected_global(spec, splits)
    ups = [Update(d, {k: v + 0.1 * (i + 1) for k, v in glob.items()}, 10.0, 4) for i, d in enumerate("AB")]
    new, state = fedpeptao.aggregate(glob, ups, {}, spec, 2)
    assert set(new) == set(glob) and int(state["round"]) == 1
    plain, _ = fedpeptao.aggregate(glob, ups, {}, dataclasses.replace(
        spec, fedpeptao=FedPepTAOConfig(server=dataclasses.replace(spec.fedpeptao.server, mode="fedavg"))), 2)
    key = next(k for k in glob if k.startswith("prompt."))
    assert not torch.allclose(new[key], plain[key])   # momentum + correction moved it off FedAvg
