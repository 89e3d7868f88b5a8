"""Discounted UCB over a fixed set of arms, one bandit per device, with a fleet prior. Pure functions.

DropPEFT's configurator (seed 001) picks each device's layer-dropout configuration by an
exploration-exploitation policy. Here each device keeps discounted statistics per arm
(Garivier & Moulines' discounted UCB: every update multiplies all counts and sums by ``gamma``,
so an arm's estimate follows a reward that drifts as training converges):

    N_a <- gamma * N_a + [a pulled],   S_a <- gamma * S_a + r * [a pulled]

and the device's choice maximises ``mean_a + explore * sqrt(log(sum_a N_a) / N_a)``. Two
additions make it useful within the few rounds a federated run has:

- **Fleet prior.** A device's estimate of arm ``a`` is shrunk towards the fleet's mean reward of
  ``a`` with ``prior_weight`` pseudo-pulls: ``(S_a + w mu_a) / (N_a + w)``. A device need not try
  every arm itself once the fleet has.
- **Spread exploration.** An arm nobody has tried comes first; devices take different untried
  arms (by their position ``spread``), so the first round covers the arm set across the fleet.

Rewards must be comparable across arms of one device; the caller normalises them (DropPEFT
divides each device's rate of progress, the share of its loss removed per second of its round,
by the round's median, which removes the decay of progress as the model converges).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence


@dataclass
class ArmStats:
    """One device's discounted pull counts ``n`` and reward sums ``s``, one entry per arm."""

    n: list[float]
    s: list[float]

    @classmethod
    def empty(cls, n_arms: int) -> "ArmStats":
        return cls([0.0] * n_arms, [0.0] * n_arms)


@dataclass(frozen=True)
class BanditConfig:
    gamma: float = 0.9          # discount per update
    explore: float = 0.5        # UCB bonus scale; rewards are ~1 on average after normalisation, so 0.5
                                # keeps exploring arms 20-40% apart (DropPEFT uses 0.1 to settle in a run)
    prior_weight: float = 1.0   # pseudo-pulls of the fleet mean in a device's estimate


def update(stats: ArmStats, arm: int, reward: float, gamma: float) -> ArmStats:
    """``stats`` after one pull of ``arm`` that earned ``reward`` (discounts every arm first)."""
    if not 0 <= arm < len(stats.n):
        raise ValueError(f"arm {arm} out of range 0..{len(stats.n) - 1}")
    if not math.isfinite(reward):
        raise ValueError(f"reward must be finite, got {reward}")
    n = [gamma * x for x in stats.n]
    s = [gamma * x for x in stats.s]
    n[arm] += 1.0
    s[arm] += reward
    return ArmStats(n, s)


def fleet_means(fleet: Mapping[str, ArmStats], n_arms: int) -> list[float | None]:
    """Each arm's mean reward over the whole fleet (None where nobody has pulled it)."""
    out: list[float | None] = []
    for a in range(n_arms):
        n = sum(st.n[a] for st in fleet.values())
        out.append(sum(st.s[a] for st in fleet.values()) / n if n > 1e-12 else None)
    return out


def scores(stats: ArmStats, prior: Sequence[float | None], cfg: BanditConfig) -> list[float]:
    """UCB index per arm (``inf`` for an arm with no evidence on this device or in the fleet)."""
    eff_n = [stats.n[a] + (cfg.prior_weight if prior[a] is not None else 0.0) for a in range(len(stats.n))]
    total = max(math.e, sum(eff_n))
    out = []
    for a, ne in enumerate(eff_n):
        if ne <= 1e-12:
            out.append(math.inf)
            continue
        mean = (stats.s[a] + (cfg.prior_weight * prior[a] if prior[a] is not None else 0.0)) / ne
        out.append(mean + cfg.explore * math.sqrt(math.log(total) / ne))
    return out


def choose(stats: ArmStats, prior: Sequence[float | None], feasible: Sequence[int], cfg: BanditConfig,
           spread: int = 0) -> int:
    """The arm to offer: the best UCB index among ``feasible`` (an untried arm first, spread by
    ``spread`` so devices try different ones). ``feasible`` must not be empty."""
    if not feasible:
        raise ValueError("no feasible arm to choose from")
    idx = scores(stats, prior, cfg)
    untried = [a for a in feasible if math.isinf(idx[a])]
    if untried:
        return untried[spread % len(untried)]
    return max(feasible, key=lambda a: (idx[a], -a))
