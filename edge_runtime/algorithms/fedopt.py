"""Adaptive server optimizers over a round's mean update (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021): FedAvgM, FedAdam, FedYogi, with a linear warm-up of the server rate.

The round's aggregate (the weighted mean of the devices' states, after the defences) is turned into
a pseudo-gradient ``delta = mean - x`` of the global ``x``; the optimizer moves ``x`` along it:

- ``fedavgm``: ``m = beta1 m + delta``;  ``x += eta m``
- ``fedadam``: ``m = beta1 m + (1 - beta1) delta``;  ``v = beta2 v + (1 - beta2) delta^2``;
  ``x += eta m / (sqrt(v) + tau)``
- ``fedyogi``: as fedadam but ``v = v - (1 - beta2) delta^2 sign(v - delta^2)`` (v grows slower)

``v`` starts at ``tau^2`` (the paper's choice), there is no bias correction, and
``eta_t = lr * min(1, t / warmup_rounds)`` for the t-th step. The state (``fedopt.m.<key>``,
``fedopt.v.<key>``, ``fedopt.t``) lives in the server state the coordinator persists each round,
so a restarted server continues the same trajectory. Pure functions; float64 inside; non-float
tensors (step counters, masks) take the mean's value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from edge_runtime.errors import ConfigError

OPTIMIZERS = ("none", "fedavgm", "fedadam", "fedyogi")
PREFIX = "fedopt."


@dataclass(frozen=True)
class FedOptConfig:
    optimizer: str = "none"     # none: the global is the round's mean (FedAvg)
    lr: float = 1e-2            # eta: the server's learning rate (fedavgm: 1.0 is FedAvg plus momentum)
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3           # adaptivity: the floor under sqrt(v)
    warmup_rounds: int = 0      # eta ramps linearly over this many rounds; 0 = none

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"fedopt.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not (self.lr > 0 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.tau > 0):
            raise ConfigError(f"fedopt needs lr > 0, 0 <= beta1 < 1, 0 <= beta2 < 1 and tau > 0; got {self}")
        if isinstance(self.warmup_rounds, bool) or not isinstance(self.warmup_rounds, int) or self.warmup_rounds < 0:
            raise ConfigError(f"fedopt.warmup_rounds must be an integer >= 0, got {self.warmup_rounds!r}")

    @property
    def enabled(self) -> bool:
        return self.optimizer != "none"

    def rate(self, step: int) -> float:
        """eta for the ``step``-th server step (1-based)."""
        return self.lr * (min(1.0, step / self.warmup_rounds) if self.warmup_rounds else 1.0)


def own_state(server_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The optimizer's part of a server state."""
    return {k: v for k, v in server_state.items() if k.startswith(PREFIX)}


def fedopt_step(global_state: Mapping[str, Tensor], mean_state: Mapping[str, Tensor],
                state: Mapping[str, Tensor], cfg: FedOptConfig) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One server step from the global ``x`` toward the round's ``mean``: ``(new_global, new_state)``.

    ``state`` is the optimizer's previous state (empty on the first step); inputs are not modified."""
    if not cfg.enabled:
        return dict(mean_state), {}
    step = int(state[PREFIX + "t"].item()) + 1 if PREFIX + "t" in state else 1
    eta = cfg.rate(step)
    new_global: dict[str, Tensor] = {}
    new_state: dict[str, Tensor] = {PREFIX + "t": torch.tensor(step, dtype=torch.int64)}
    for key, mean in mean_state.items():
        x = global_state[key]
        if not mean.is_floating_point():
            new_global[key] = mean.clone()
            continue
        delta = mean.double() - x.double()
        m_prev = state.get(f"{PREFIX}m.{key}")
        m_prev = m_prev.double() if m_prev is not None else torch.zeros_like(delta)
        if cfg.optimizer == "fedavgm":
            m = cfg.beta1 * m_prev + delta
            x_new = x.double() + eta * m
        else:
            v_prev = state.get(f"{PREFIX}v.{key}")
            v_prev = v_prev.double() if v_prev is not None else torch.full_like(delta, cfg.tau ** 2)
            m = cfg.beta1 * m_prev + (1 - cfg.beta1) * delta
            d2 = delta * delta
            if cfg.optimizer == "fedadam":
                v = cfg.beta2 * v_prev + (1 - cfg.beta2) * d2
            else:   # fedyogi
                v = v_prev - (1 - cfg.beta2) * d2 * torch.sign(v_prev - d2)
            x_new = x.double() + eta * m / (v.sqrt() + cfg.tau)
            new_state[f"{PREFIX}v.{key}"] = v.float()
        new_state[f"{PREFIX}m.{key}"] = m.float()
        new_global[key] = x_new.to(x.dtype)
    return new_global, new_state
