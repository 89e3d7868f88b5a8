"""FeDeRA: LoRA whose A and B start from the principal components of the pretrained weight.

For every adapted linear layer with weight W (out x in), LoRA scaling s = alpha / r:

    W = U S V^T (full SVD in float64, each singular pair's sign fixed so that the largest-|.|
    entry of u_i is positive: the same W gives the same factors everywhere)
    A0 = diag(sqrt(S_r)) V_r^T / sqrt(s)        B0 = U_r diag(sqrt(S_r)) / sqrt(s)
    so s * B0 @ A0 is W's best rank-r approximation.

Choices ([choice] in ALGORITHMS.md; fields of :class:`FederaConfig`):

- ``residual=True`` (default, the PiSSA form): the frozen weight becomes W_res = W - s * B0 @ A0,
  so the model at round 0 computes what the base model computes. ``residual=False`` keeps W and
  adds the principal part once more (the model at round 0 differs from the base model).
- Federation: the server computes (A0, B0) once (:func:`initial_global`) and ships them as the
  run's *init* payload (retained, sha256-checked); every device derives W_res from the shipped
  tensors (:func:`prepare`), never from its own SVD, whose signs and last bits vary across
  platforms. Devices with the same init and base weights build bit-identical models.
- Quantized bases are refused: W_res is not representable in NF4 / int8 without a re-quantization
  error that breaks the round-0 identity, and the SVD needs the float weight.
- Export: with the residual form a trained layer computes W + s (B A - B0 A0), which is a plain
  rank-2r LoRA delta on the *untouched* base: A' = [A; A0], B' = [B, -B0], alpha' = 2 alpha
  (same s). :func:`save_adapter` writes that, so every peft / ONNX consumer loads it unchanged.

Upload, aggregation and local training are LoRA's (weighted FedAvg of A, B and the head).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping

import torch
from torch import Tensor

from edge_runtime.algorithms.aggregation import check_compatible, fedavg
from edge_runtime.errors import ConfigError
from edge_runtime.methods import lora
from edge_runtime.methods.lora import load_trainable_state, trainable_state
from edge_runtime.methods.base import Method, ModelState

if TYPE_CHECKING:
    from edge_runtime.training.spec import TrainingSpec

ADAPTER = "default"


@dataclass(frozen=True)
class FederaConfig:
    residual: bool = True    # W_res = W - s B0 A0 (round-0 model == base model); False: keep W

    def __post_init__(self) -> None:
        if not isinstance(self.residual, bool):
            raise ConfigError(f"federa.residual must be true or false, got {self.residual!r}")


@dataclass
class FederaModel:
    """What :func:`prepare` applied to a model: the init it came from (once per model)."""

    init_digest: str
    init: dict[str, tuple[Tensor, Tensor]]   # layer -> (A0, B0)
    residual: bool                           # W was replaced by W - s B0 A0


STATE: ModelState[FederaModel] = ModelState("federa")


def lora_layers(model) -> Iterator[tuple[str, torch.nn.Module]]:
    """(module name, peft LoRA layer) for every adapted linear layer."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            yield name, module


def _float_weight(name: str, layer) -> Tensor:
    w = layer.get_base_layer().weight
    if type(w).__name__ in ("Params4bit", "Int8Params") or not w.dtype.is_floating_point:
        raise ConfigError(f"federa: layer {name} has a quantized weight ({type(w).__name__}, {w.dtype}); FeDeRA "
                          "needs the float weight for the SVD and to store W - s*B0@A0 exactly. Use an fp32 / fp16 "
                          "base for FeDeRA, or method 'lora' on a quantized base")
    return w


def build(model: torch.nn.Module, spec: "TrainingSpec"):
    peft_model = lora.build(model, spec)
    for name, layer in lora_layers(peft_model):
        _float_weight(name, layer)
    return peft_model


def svd_factors(weight: Tensor, rank: int, scaling: float) -> tuple[Tensor, Tensor]:
    """(A0, B0) with scaling * B0 @ A0 = the best rank-``rank`` approximation of ``weight``; deterministic."""
    w = weight.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    r = min(rank, s.numel())
    u, s, vh = u[:, :r], s[:r], vh[:r]
    idx = u.abs().argmax(dim=0)
    signs = torch.sign(u[idx, torch.arange(r)])
    signs[signs == 0] = 1.0
    u, vh = u * signs, vh * signs[:, None]
    root = torch.sqrt(s / scaling)
    a0 = root[:, None] * vh
    b0 = u * root
    if r < rank:  # a layer narrower than the rank: pad with zero components
        a0 = torch.cat([a0, a0.new_zeros(rank - r, a0.shape[1])])
        b0 = torch.cat([b0, b0.new_zeros(b0.shape[0], rank - r)], dim=1)
    return a0, b0


def initial_global(model, spec: "TrainingSpec") -> dict[str, Tensor]:
    """Server: SVD-initialise every LoRA layer, then set ``model`` up exactly as a device will."""
    for name, layer in lora_layers(model):
        w = _float_weight(name, layer)
        a0, b0 = svd_factors(w, layer.r[ADAPTER], layer.scaling[ADAPTER])
        layer.lora_A[ADAPTER].weight.data.copy_(a0.to(layer.lora_A[ADAPTER].weight.dtype))
        layer.lora_B[ADAPTER].weight.data.copy_(b0.to(layer.lora_B[ADAPTER].weight.dtype))
    init = trainable_state(model)
    prepare(model, spec, init)
    return init


def init_digest(init: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(init):
        h.update(k.encode())
        h.update(init[k].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def prepare(model, spec: "TrainingSpec", init: Mapping[str, Tensor] | None) -> None:
    """Device: load the shipped (A0, B0) (and head) and, in the residual form, replace W by W - s B0 A0.

    Idempotent for the same init; a second, different init on the same model is an error (the
    residual would be subtracted twice).
    """
    if init is None:
        raise ConfigError("federa: the run's init adapter (A0, B0) is missing; the server ships it with round 1")
    digest = init_digest(init)
    st = STATE.get(model)
    done = st.init_digest if st is not None else None
    if done == digest:
        return
    if done is not None:
        raise ConfigError("federa: this model was already prepared with another init; build a fresh model")
    check_compatible(trainable_state(model), init, where="federa init")
    load_trainable_state(model, init)
    saved: dict[str, tuple[Tensor, Tensor]] = {}
    for name, layer in lora_layers(model):
        w = _float_weight(name, layer)
        a0 = layer.lora_A[ADAPTER].weight.detach().clone()
        b0 = layer.lora_B[ADAPTER].weight.detach().clone()
        saved[name] = (a0, b0)
        if spec.federa.residual:
            delta = layer.scaling[ADAPTER] * (b0.float() @ a0.float())
            w.data.copy_((w.data.float() - delta).to(w.dtype))
    STATE.set(model, FederaModel(digest, saved, spec.federa.residual))


def _residual(model) -> bool:
    st = STATE.get(model)
    return st is not None and st.residual


def plain_lora_state(model) -> tuple[dict[str, Tensor], int, float]:
    """The trained adapter as a plain LoRA on the untouched base: (state, rank, alpha)."""
    state = trainable_state(model)
    cfg = model.peft_config[ADAPTER]
    st = STATE.get(model)
    if not _residual(model):
        return state, cfg.r, cfg.lora_alpha
    for name, (a0, b0) in st.init.items():
        ka, kb = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        state[ka] = torch.cat([state[ka], a0.to(state[ka].dtype)], dim=0)
        state[kb] = torch.cat([state[kb], -b0.to(state[kb].dtype)], dim=1)
    return state, 2 * cfg.r, 2 * cfg.lora_alpha


def save_adapter(model, folder: Path) -> None:
    """A plain peft LoRA folder for the untouched base model (rank 2r in the residual form)."""
    from safetensors.torch import save_file

    state, rank, alpha = plain_lora_state(model)
    cfg = copy.deepcopy(model.peft_config[ADAPTER])
    cfg.r, cfg.lora_alpha = rank, alpha
    cfg.init_lora_weights = True
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt", "edge_runtime.method": "federa",
                        "edge_runtime.federa": json.dumps({"residual": _residual(model)})})
    lora.ship_identity_pooler(model, folder)


def save_personal_adapter(model, personal, folder: Path) -> None:
    """The device's own model is the global one: its plain-LoRA form."""
    save_adapter(model, folder)


METHOD = Method(
    name="federa", summary="LoRA initialised from the SVD of each frozen weight (FeDeRA), FedAvg",
    build=build, initial_global=initial_global, trainable_state=trainable_state,
    load_trainable_state=load_trainable_state, local_train=lora.local_train, save_adapter=save_adapter,
    prepare=prepare, save_personal_adapter=save_personal_adapter, aggregate=fedavg,
    config=("federa", FederaConfig),
    needs_init=True,        # devices build W_res from the server's shipped (A0, B0)
    quantized_base=False)   # the residual W - s*B0*A0 needs the float weight
