"""FedPepTAO (seed 000): partial deep-prompt tuning with device- and server-side adaptive optimisation.

Built on :mod:`edge_runtime.methods.prompt` (a ``[P, 2, H_kv]`` prefix per layer, frozen base).

1. **Layer selection** (a ``score`` round before training): every device runs its frozen model
   without prompts on one batch of its own data and reports one score per layer
   (:func:`edge_runtime.algorithms.layer_score.layer_score`); the server weights them by data
   size and shares the prompts of the ``ceil(share_ratio * L)`` best layers. The selection
   travels implicitly: the global after the score round holds only those layers' prompts.
2. **Device side**: an AdamW whose moments persist across rounds and restarts (in the device's
   personal state), linear learning-rate decay over the device's cumulative steps, and
   SCAFFOLD-style control variates: after each optimizer step a shared tensor moves by
   ``-lr_t * (c - c_k)``, and after the round ``c_k' = c_k - c + (w - theta_k) / (K_k * lr)``.
   The correction is applied to the *update direction* (the units ``(w - theta) / (K lr)``
   estimates with Adam), not to the raw gradient, whose scale Adam normalises away.
3. **Server side**: :func:`edge_runtime.algorithms.server_opt.server_update` (adaptive momentum
   with the control-variate correction; ``momentum`` and ``fedavg`` as alternatives).
4. **Unshared layers** stay on the device (``unshared: personal``, trained there, never uploaded;
   the device's own model is the shared + its personal prompts) or have no prefix at all
   (``unshared: mask``). The global model is the shared prompts with the other layers masked.

Upload per round: the shared layers' prompts, the head and the device's new control variate
(``cv.`` + key): with ``share_ratio`` 0.5 about half of full deep-prompt FedAvg's prompts, plus
the variates (``control_variates: false`` drops them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from torch import Tensor, nn

from edge_runtime.algorithms.aggregation import Update, check_compatible
from edge_runtime.algorithms.layer_score import combine_scores, layer_score, select_layers
from edge_runtime.algorithms.server_opt import CV, ServerOptConfig, server_update
from edge_runtime.errors import AggregationError, ConfigError
from edge_runtime.methods import prompt
from edge_runtime.methods.personal import PersonalState
from edge_runtime.training.data import Splits, encode_batch
from edge_runtime.training.evaluate import evaluate
from edge_runtime.training.trainer import TrainResult, train_local
from edge_runtime.methods.base import Method, ModelState

if TYPE_CHECKING:
    from edge_runtime.training.spec import TrainingSpec

SCORE_KEY = "layer_score."


@dataclass(frozen=True)
class FedPepTAOConfig:
    share_ratio: float = 0.5            # r: fraction of layers whose prompts are shared
    unshared: str = "personal"          # "personal" (kept and trained on the device) or "mask"
    control_variates: bool = True
    persistent_optimizer: bool = True   # AdamW moments carried across rounds (and restarts)
    lr_decay_steps: int = 0             # device lr decays linearly to 0 over this many local steps; 0: constant
    score_batch: int = 16               # examples in the one scoring batch
    server: ServerOptConfig = field(default_factory=ServerOptConfig)

    def __post_init__(self) -> None:
        if not 0 < self.share_ratio <= 1:
            raise ConfigError(f"fedpeptao.share_ratio must be in (0, 1], got {self.share_ratio!r}")
        if self.unshared not in ("personal", "mask"):
            raise ConfigError(f"fedpeptao.unshared must be 'personal' or 'mask', got {self.unshared!r}")
        if self.lr_decay_steps < 0 or self.score_batch < 2:
            raise ConfigError("fedpeptao.lr_decay_steps must be >= 0 and score_batch >= 2")


@dataclass
class FptModel:
    """Per model: the spec it was built for, the layers the global shares, the server's control
    variate ``c`` and this device's ``c_k`` (SCAFFOLD-style, when ``control_variates``)."""

    spec: "TrainingSpec"
    shared: list[int]
    c: dict[str, Tensor] = field(default_factory=dict)
    ck: dict[str, Tensor] | None = None


STATE: ModelState[FptModel] = ModelState("fedpeptao")


def personal_key(spec: "TrainingSpec") -> list:
    """What the device's saved state depends on beyond the model (prompt layout, method settings)."""
    return [dataclasses.asdict(spec.prompt), dataclasses.asdict(spec.fedpeptao)]


def _cfg(spec: "TrainingSpec") -> FedPepTAOConfig:
    return spec.fedpeptao


def _n_layers(model: nn.Module) -> int:
    return len(prompt.attention_modules(model))


def _shared(model: nn.Module) -> list[int]:
    st = STATE.get(model)
    return list(st.shared if st is not None else range(_n_layers(model)))


def _param_keys(model: nn.Module, layers: Sequence[int]) -> list[str]:
    return [f"prompt.{i}" for i in sorted(layers)] + [f"head.{n}" for n in prompt.head_parameters(model)]


def _params_by_key(model: nn.Module) -> dict[str, nn.Parameter]:
    out: dict[str, nn.Parameter] = {f"prompt.{i}": p for i, p in prompt.prompt_parameters(model).items()}
    out.update({f"head.{n}": p for n, p in prompt.head_parameters(model).items()})
    return out


def initial_prompts(model: nn.Module, spec: "TrainingSpec") -> dict[str, Tensor]:
    """The seeded round-0 prompts of every layer (what a device's personal layers start from)."""
    values = prompt.draw_prompts(model, spec.prompt.length_for(model), spec.prompt.init_std, spec.seed)
    return {f"prompt.{i}": v for i, v in enumerate(values)}


def _with_cv(model: nn.Module, params: dict[str, Tensor], spec: "TrainingSpec",
             cv: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    if not _cfg(spec).control_variates:
        return params
    out = dict(params)
    for k, v in params.items():
        out[CV + k] = (cv[k] if cv is not None and k in cv else torch.zeros_like(v)).detach().clone()
    return out


# -- hooks ---------------------------------------------------------------------------------
def build(model: nn.Module, spec: "TrainingSpec"):
    model = prompt.build(model, spec)
    STATE.set(model, FptModel(spec, list(range(_n_layers(model)))))
    return model


def initial_global(model, spec: "TrainingSpec") -> dict[str, Tensor]:
    """Round-0 global: every layer's prompts (the score round narrows it), the head, zero variates."""
    STATE.of(model).shared = list(range(_n_layers(model)))
    return _with_cv(model, prompt.state_of(model), spec, None)


def trainable_state(model) -> dict[str, Tensor]:
    """The upload: shared prompts + head (+ this device's control variate ``c_k``)."""
    st = STATE.of(model)
    return _with_cv(model, prompt.state_of(model, _shared(model)), st.spec, st.ck)


def load_trainable_state(model, state: Mapping[str, Tensor]) -> None:
    """Load a global: its prompt keys say which layers are shared; other layers are masked
    (the global model) until :func:`personalise` / :func:`local_train` put the device's own in."""
    layers = prompt.prompt_layers_in(state)
    n = _n_layers(model)
    if not layers or layers[-1] >= n:
        raise AggregationError(f"global prompts: layers {layers} do not fit a model with {n} layers")
    spec = STATE.of(model).spec
    reference = _with_cv(model, prompt.state_of(model, layers), spec, None)
    check_compatible(reference, state, where="global prompts")
    prompt.load_state(model, {k: v for k, v in state.items() if not k.startswith(CV)})
    st = STATE.of(model)
    st.shared = layers
    st.c = {k[len(CV):]: v.detach().clone() for k, v in state.items() if k.startswith(CV)}
    st.ck = None
    prompt.set_active(model, layers)


def score(model, tokenizer, splits: Splits, spec: "TrainingSpec", seed: int = 0) -> dict[str, float]:
    """Device, score round: ``{"layer_score.<l>": s_l}`` from one batch of the frozen model, no prompts."""
    data = splits.train
    if len(data) < 2:
        raise ConfigError("fedpeptao: layer scoring needs at least 2 training examples")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=gen)[: _cfg(spec).score_batch].tolist()
    batch = encode_batch(tokenizer, data, idx, spec.train.max_seq_len)
    batch.pop("labels", None)
    was_training, active = model.training, [i for i, m in enumerate(prompt.attention_modules(model))
                                            if getattr(m, "edge_prompt_on", False)]
    prompt.set_active(model, [])
    model.eval()
    try:
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True)
    finally:
        prompt.set_active(model, active)
        model.train(was_training)
    mask = batch["attention_mask"].unsqueeze(-1).to(out.hidden_states[0].dtype)   # padding contributes nothing
    return {f"{SCORE_KEY}{i}": layer_score(h * mask) for i, h in enumerate(out.hidden_states[1:])}


def select(global_state: Mapping[str, Tensor], reports: Sequence[tuple[Mapping[str, float], float]],
           spec: "TrainingSpec") -> tuple[dict[str, Tensor], dict]:
    """Server, after the score round: the global narrowed to the best layers, and what was chosen."""
    layers = prompt.prompt_layers_in(global_state)
    rows = []
    for k, (metrics, n) in enumerate(reports):
        try:
            rows.append(([float(metrics[f"{SCORE_KEY}{i}"]) for i in layers], float(n)))
        except (KeyError, TypeError, ValueError) as exc:
            raise AggregationError(f"score report {k} lacks a score for every layer ({exc})") from exc
    scores = combine_scores(rows)
    chosen = [layers[i] for i in select_layers(scores, _cfg(spec).share_ratio)]
    keep = {f"prompt.{i}" for i in chosen}
    out = {k: v for k, v in global_state.items()
           if not (k.startswith("prompt.") or k.startswith(CV + "prompt.")) or k.removeprefix(CV) in keep}
    return out, {"layer_scores": scores, "shared_layers": chosen}


def _personal_layers(model, spec: "TrainingSpec") -> list[int]:
    if _cfg(spec).unshared != "personal":
        return []
    shared = set(_shared(model))
    return [i for i in range(_n_layers(model)) if i not in shared]


def _load_personal_layers(model, spec: "TrainingSpec", personal: PersonalState | None) -> list[int]:
    layers = _personal_layers(model, spec)
    if layers:
        init = initial_prompts(model, spec)
        own = personal.tensors if personal is not None else {}
        prompt.load_state(model, {f"prompt.{i}": own.get(f"prompt.{i}", init[f"prompt.{i}"]) for i in layers})
    prompt.set_active(model, sorted(set(_shared(model)) | set(layers)))
    return layers


def personalise(model, tokenizer, splits: Splits, spec: "TrainingSpec", personal: PersonalState | None,
                eval_batch_size: int = 64) -> tuple[dict[str, float], PersonalState | None]:
    """The device's own model (shared + personal prompts), evaluated on its test split."""
    if not _personal_layers(model, spec) or len(splits.test) == 0:
        return {}, personal
    _load_personal_layers(model, spec, personal)
    ev = evaluate(model, tokenizer, splits.test, eval_batch_size, spec.train.max_seq_len,
                  precision=spec.train.precision)
    return {"personal_accuracy": ev.accuracy, "personal_loss": ev.loss, "personal_n": ev.n}, personal


def _restore_optimizer(optimizer, params: Mapping[str, nn.Parameter], keys: Sequence[str],
                       saved: Mapping[str, Tensor]) -> None:
    """AdamW's moments from the device's personal state (``persistent_optimizer``), where the shapes still fit."""
    for k in keys:
        if f"opt.{k}.exp_avg" in saved and saved[f"opt.{k}.exp_avg"].shape == params[k].shape:
            optimizer.state[params[k]] = {"step": saved[f"opt.{k}.step"].clone().float(),
                                          "exp_avg": saved[f"opt.{k}.exp_avg"].clone(),
                                          "exp_avg_sq": saved[f"opt.{k}.exp_avg_sq"].clone()}


def _optimizer_tensors(optimizer, params: Mapping[str, nn.Parameter], keys: Sequence[str]) -> dict[str, Tensor]:
    """AdamW's moments as personal-state tensors (``opt.<key>.step|exp_avg|exp_avg_sq``)."""
    out = {}
    for k in keys:
        st = optimizer.state.get(params[k])
        if st:
            out[f"opt.{k}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(())
            out[f"opt.{k}.exp_avg"] = st["exp_avg"].detach().clone()
            out[f"opt.{k}.exp_avg_sq"] = st["exp_avg_sq"].detach().clone()
    return out


def local_train(model, tokenizer, splits: Splits, spec: "TrainingSpec", seed: int,
                personal: PersonalState | None, progress: bool = False,
                desc: str = "train") -> tuple[TrainResult, PersonalState]:
    cfg, tcfg = _cfg(spec), spec.train
    shared = _shared(model)
    own = _load_personal_layers(model, spec, personal)
    trained = sorted(set(shared) | set(own))
    params = _params_by_key(model)
    keys = _param_keys(model, trained)
    for k, p in params.items():
        p.requires_grad_(k in keys)
    optimizer = torch.optim.AdamW([params[k] for k in keys], lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    saved = personal.tensors if personal is not None else {}
    total_steps = int(personal.meta.get("steps_total", 0)) if personal is not None else 0
    if cfg.persistent_optimizer:
        _restore_optimizer(optimizer, params, keys, saved)
    shared_keys = _param_keys(model, shared)
    c = STATE.of(model).c
    ck = {k: saved.get(f"ck.{k}", torch.zeros_like(params[k])).detach().clone() for k in shared_keys}
    corr = {k: (c[k] - ck[k]).to(params[k].dtype) for k in shared_keys if k in c} if cfg.control_variates else {}
    w = {k: params[k].detach().clone() for k in shared_keys}

    def lr_at(step: int) -> float:
        if not cfg.lr_decay_steps:
            return tcfg.lr
        return tcfg.lr * max(0.0, 1.0 - step / cfg.lr_decay_steps)

    for group in optimizer.param_groups:
        group["lr"] = lr_at(total_steps)

    def after_step(i: int) -> None:
        lr_now = optimizer.param_groups[0]["lr"]
        with torch.no_grad():
            for k, d in corr.items():
                params[k].sub_(lr_now * d)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(total_steps + i + 1)

    res = train_local(model, tokenizer, splits.train, tcfg, seed=seed, progress=progress, desc=desc,
                      optimizer=optimizer, after_step=after_step)
    tensors: dict[str, Tensor] = {}
    if cfg.control_variates:
        new_ck = {}
        for k in shared_keys:
            theta = params[k].detach()
            new_ck[k] = ck[k] - c.get(k, torch.zeros_like(theta)) + (w[k] - theta) / (res.steps * tcfg.lr)
            tensors[f"ck.{k}"] = new_ck[k].clone()
        STATE.of(model).ck = new_ck
    for i in own:
        tensors[f"prompt.{i}"] = params[f"prompt.{i}"].detach().clone()
    if cfg.persistent_optimizer:
        tensors.update(_optimizer_tensors(optimizer, params, keys))
    prompt.set_active(model, shared)   # back to the global layout: the upload is the shared part
    return res, PersonalState(tensors, {"steps_total": total_steps + res.steps, "shared_layers": shared})


def aggregate(global_state: Mapping[str, Tensor], updates: Sequence[Update], server_state: Mapping[str, Tensor] | None,
              spec: "TrainingSpec", fleet_size: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    return server_update(global_state, updates, server_state or {}, _cfg(spec).server, fleet_size)


def save_adapter(model, folder: Path) -> None:
    """The global model: shared prompts + head; the unshared layers attend without a prefix."""
    prompt.save_prompts(model, folder, active=_shared(model), extra={"method": "fedpeptao"})


def save_personal_adapter(model, personal: PersonalState | None, folder: Path) -> None:
    """The device's own model: shared + its personal prompts (the global one in ``mask`` mode)."""
    spec = STATE.of(model).spec
    layers = _load_personal_layers(model, spec, personal)
    prompt.save_prompts(model, folder, active=sorted(set(_shared(model)) | set(layers)),
                        extra={"method": "fedpeptao", "personal_layers": layers})
    prompt.set_active(model, _shared(model))


METHOD = Method(
    name="fedpeptao", summary="prompts on the layers scored best, adaptive server update, personal layers (FedPepTAO)",
    build=build, initial_global=initial_global, trainable_state=trainable_state,
    load_trainable_state=load_trainable_state, local_train=local_train, save_adapter=save_adapter,
    prepare=prompt.prepare, personalise=personalise, save_personal_adapter=save_personal_adapter,
    aggregate=aggregate, score=score, select=select, personal_key=personal_key,
    config=("fedpeptao", FedPepTAOConfig), scoring=True, prompt_like=True, default_lr=prompt.DEFAULT_LR)
