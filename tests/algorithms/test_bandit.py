"""Discounted UCB: finds the best arm on a noisy synthetic reward, follows a change, spreads first tries."""

import random

import pytest

from edge_runtime.algorithms import bandit
from edge_runtime.algorithms.bandit import ArmStats, BanditConfig


def _run(means_at, rounds: int, cfg: BanditConfig, feasible=None, seed=0):
    rng = random.Random(seed)
    st, picks = ArmStats.empty(len(means_at(0))), []
    arms = feasible if feasible is not None else list(range(len(means_at(0))))
    for t in range(rounds):
        a = bandit.choose(st, [None] * len(st.n), arms, cfg)
        picks.append(a)
        st = bandit.update(st, a, rng.gauss(means_at(t)[a], 0.3), cfg.gamma)
    return picks


def test_finds_the_best_arm_on_a_noisy_reward():
    means = [0.2, 0.5, 1.0, 0.7, 0.4, 0.1]
    picks = _run(lambda t: means, 300, BanditConfig(gamma=0.99, explore=0.5))   # window ~100 pulls
    late = picks[-100:]
    assert late.count(2) >= 70, late


def test_follows_a_change_of_the_best_arm_thanks_to_the_discount():
    picks = _run(lambda t: [1.0, 0.3, 0.2] if t < 150 else [0.2, 0.3, 1.0], 300, BanditConfig(gamma=0.9, explore=0.5))
    assert picks[100:150].count(0) >= 35 and picks[-60:].count(2) >= 40


def test_never_picks_an_infeasible_arm():
    means = [5.0, 0.1, 0.4, 1.0]       # the best arm does not fit
    picks = _run(lambda t: means, 100, BanditConfig(gamma=0.99), feasible=[1, 2, 3])
    assert 0 not in picks and picks[-30:].count(3) >= 20
    with pytest.raises(ValueError):
        bandit.choose(ArmStats.empty(3), [None] * 3, [], BanditConfig())


def test_hand_numbers_and_the_fleet_prior():
    st = bandit.update(ArmStats.empty(2), 1, 2.0, 0.5)
    st = bandit.update(st, 0, 1.0, 0.5)
    assert st.n == [1.0, 0.5] and st.s == [1.0, 1.0]   # arm 1's pull and reward halved once
    # untried arms first, devices spread over them
    empty = ArmStats.empty(4)
    assert [bandit.choose(empty, [None] * 4, [0, 1, 2, 3], BanditConfig(), spread=k) for k in range(4)] == [0, 1, 2, 3]
    # a device that never tried an arm uses the fleet's mean for it, not infinity
    fleet = {"a": ArmStats([1.0, 0.0], [0.2, 0.0]), "b": ArmStats([0.0, 1.0], [0.0, 1.5])}
    prior = bandit.fleet_means(fleet, 2)
    assert prior == [0.2, 1.5]
    assert bandit.choose(ArmStats.empty(2), prior, [0, 1], BanditConfig(explore=0.0)) == 1
    assert bandit.fleet_means({}, 2) == [None, None]
