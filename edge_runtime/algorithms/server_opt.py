"""FedPepTAO's server update: adaptive momentum over the averaged prompts, with control variates.

Notation (per shared tensor; ``p_k = n_k / sum n``): devices return ``theta_k`` and their new
control variate ``c_k'``; the server holds the global ``w``, its control variate ``c``, momentum
``v``, the previous round's ``Delta_prev`` and each device's last ``c_k`` (zero for a newcomer).

- ``w_bar = sum_k p_k theta_k``;  ``Delta = w - w_bar``;  ``g = Delta_prev - Delta``
- ``v_k = beta v + (1 - beta) g + c - c_k``;  ``w_k = w_bar - eta v_k``
- ``w = sum_k p_k w_k``;  ``v = sum_k p_k v_k``;  ``eta`` = ``lr * decay^t`` floored at ``lr_min``
- ``c += (|S| / N) * sum_k (K_k / sum K) (c_k' - c_k)``  (SCAFFOLD's server control variate)

``c_k`` in ``v_k`` is the variate device k used during this round (the one the server last
recorded), a choice where the public code leaves it open. ``mode="momentum"`` is the plain
alternative (server momentum on ``Delta``, FedAvgM) with the same correction; ``"fedavg"`` is
``w = w_bar`` (control variates still maintained when present). Pure functions, float64 inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from edge_runtime.algorithms.aggregation import Update, check_compatible
from edge_runtime.errors import AggregationError, ConfigError

CV = "cv."          # control-variate keys in the global / an update: "cv." + the parameter's key
MODES = ("adaptive", "momentum", "fedavg")


@dataclass(frozen=True)
class ServerOptConfig:
    mode: str = "adaptive"
    lr: float = 0.05            # eta_s
    lr_decay: float = 0.99      # per round
    lr_min: float = 1e-4
    beta: float = 0.9           # momentum
    momentum_lr: float = 1.0    # mode "momentum": w <- w - momentum_lr * v

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"fedpeptao.server.mode must be one of {MODES}, got {self.mode!r}")
        if not (self.lr > 0 and 0 < self.lr_decay <= 1 and 0 <= self.lr_min <= self.lr and 0 <= self.beta < 1
                and self.momentum_lr > 0):
            raise ConfigError(f"fedpeptao.server needs lr > 0, 0 < lr_decay <= 1, 0 <= lr_min <= lr, 0 <= beta < 1 "
                              f"and momentum_lr > 0; got {self}")


def server_update(global_state: Mapping[str, Tensor], updates: Sequence[Update], state: Mapping[str, Tensor],
                  cfg: ServerOptConfig, fleet_size: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One round: returns ``(new_global, new_server_state)``; inputs are not modified.

    ``server_state`` keys: ``round`` (scalar), ``v.<key>``, ``dprev.<key>``, ``ck.<device>.<key>``.
    """
    if not updates:
        raise AggregationError("no updates to aggregate")
    for u in updates:
        check_compatible(global_state, u.tensors, where=f"update from {u.device_id}")
    total_n = float(sum(u.n_samples for u in updates))
    total_k = float(sum(u.steps for u in updates))
    if not total_n > 0:
        raise AggregationError("update weights sum to 0")
    p = [u.n_samples / total_n for u in updates]
    f64 = torch.float64
    keys = [k for k in global_state if not k.startswith(CV)]
    with_cv = all(CV + k in global_state for k in keys)
    t = int(state["round"].item()) if "round" in state else 0
    eta = max(cfg.lr * cfg.lr_decay ** t, cfg.lr_min)
    new_global: dict[str, Tensor] = {}
    new_state: dict[str, Tensor] = {"round": torch.tensor(t + 1)}
    for k in keys:
        w = global_state[k].to(f64)
        w_bar = sum(pk * u.tensors[k].to(f64) for pk, u in zip(p, updates))
        c = global_state[CV + k].to(f64) if with_cv else torch.zeros_like(w)
        old_ck = [state.get(f"ck.{u.device_id}.{k}", torch.zeros_like(w)).to(f64) for u in updates]
        correction = c - sum(pk * ck for pk, ck in zip(p, old_ck)) if with_cv else torch.zeros_like(w)
        v = state.get("v." + k, torch.zeros_like(w)).to(f64)
        delta = w - w_bar
        if cfg.mode == "adaptive":
            g = state.get("dprev." + k, torch.zeros_like(w)).to(f64) - delta
            v = cfg.beta * v + (1 - cfg.beta) * g + correction   # = sum_k p_k v_k
            w_new = w_bar - eta * v                              # = sum_k p_k w_k
        elif cfg.mode == "momentum":
            v = cfg.beta * v + delta + correction
            w_new = w - cfg.momentum_lr * v
        else:
            w_new = w_bar
        new_global[k] = w_new.to(global_state[k].dtype)
        new_state["v." + k] = v.to(torch.float32)
        new_state["dprev." + k] = delta.to(torch.float32)
        if with_cv:
            if total_k > 0:
                c = c + (len(updates) / max(fleet_size, len(updates))) * sum(
                    (u.steps / total_k) * (u.tensors[CV + k].to(f64) - ck) for u, ck in zip(updates, old_ck))
            new_global[CV + k] = c.to(global_state[CV + k].dtype)
    if with_cv:  # the table of device variates: the newest for who reported, the old one for the rest
        for name, value in state.items():
            if name.startswith("ck."):
                new_state[name] = value
        for u in updates:
            for k in keys:
                new_state[f"ck.{u.device_id}.{k}"] = u.tensors[CV + k].detach().to(torch.float32).clone()
    return new_global, new_state
