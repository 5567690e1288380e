from __future__ import annotations

import math

import numpy as np
import pytest

from ramp_cpp.allocate.sac.reward import (
    RewardConfig,
    RewardTerms,
    budget_reward,
    kld_quality_reward,
    kld_reward,
    quality_reward,
    reward,
)
from ramp_cpp.errors import RampError

PAPER = RewardConfig()


def test_paper_defaults() -> None:
    c = PAPER
    assert (c.quality_gain, c.quality_loss, c.budget_slope, c.cliff) == (10.0, 5.0, 2.0, 20.0)
    assert (c.ceiling, c.target) == (4.25, 4.0)


# Eq. 19 by hand: q/q_base = 0.9 -> +10 * 0.1; 1.2 -> -5 * 0.2; ...
@pytest.mark.parametrize(
    ("q", "q_base", "expected"),
    [
        (10.0, 10.0, 0.0),
        (9.0, 10.0, 1.0),
        (12.0, 10.0, -1.0),
        (5.0, 10.0, 5.0),
        (20.0, 10.0, -5.0),
        (0.0, 10.0, 10.0),
        (15.5, 15.5 / 1.01, -0.05),
        (15.5, 15.5 / 0.99, 0.1),
    ],
)
def test_quality_reward_eq19(q: float, q_base: float, expected: float) -> None:
    assert quality_reward(q, q_base) == pytest.approx(expected)


# Eq. 20 by hand with the paper's 4.0 / 4.25 and with custom budgets
@pytest.mark.parametrize(
    ("b", "cfg", "expected"),
    [
        (3.0, PAPER, 0.0),
        (4.0, PAPER, 0.0),  # boundary: target itself is free
        (4.1, PAPER, -0.2),
        (4.25, PAPER, -0.5),  # boundary: ceiling is still linear
        (4.35, PAPER, -0.2),  # -20 * 0.1^2, the discontinuity the paper's formula has
        (4.75, PAPER, -5.0),
        (5.25, PAPER, -20.0),
        (3.5, RewardConfig(ceiling=3.5, margin=0.25), -0.5),
        (3.25, RewardConfig(ceiling=3.5, margin=0.25), 0.0),
        (3.3, RewardConfig(ceiling=3.5, margin=0.25), -0.1),
        (4.0, RewardConfig(ceiling=3.5, margin=0.25), -5.0),
        (5.0, RewardConfig(ceiling=5.0, margin=0.0), 0.0),  # no negotiable zone
        (5.1, RewardConfig(ceiling=5.0, margin=0.0), -0.2),
        (4.5, RewardConfig(ceiling=4.25, budget_slope=4.0, cliff=10.0), -0.625),
    ],
)
def test_budget_reward_eq20(b: float, cfg: RewardConfig, expected: float) -> None:
    assert budget_reward(b, cfg) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("q", "q_base", "b", "r_q", "r_b"),
    [
        (9.0, 10.0, 3.9, 1.0, 0.0),
        (9.0, 10.0, 4.2, 1.0, -0.4),
        (11.0, 10.0, 4.25, -0.5, -0.5),
        (11.0, 10.0, 4.45, -0.5, -0.8),
    ],
)
def test_total_is_eq21(q: float, q_base: float, b: float, r_q: float, r_b: float) -> None:
    t = reward(q, q_base, b)
    assert isinstance(t, RewardTerms)
    assert (t.r_q, t.r_b) == (pytest.approx(r_q), pytest.approx(r_b))
    assert t.total == pytest.approx(r_q + r_b)


@pytest.mark.parametrize(
    ("kld", "expected"),
    [(0.0, 0.0), (math.log(1.2), -1.0), (math.log(2.0), -5.0), (-math.log(1 / 0.9), 1.0), (0.01, -0.0502508)],
)
def test_kld_quality_reward_is_eq19_on_exp_kld(kld: float, expected: float) -> None:
    assert kld_quality_reward(kld) == pytest.approx(expected, abs=1e-6)
    t = kld_reward(kld, 4.1)
    assert (t.r_q, t.r_b, t.total) == (
        pytest.approx(expected, abs=1e-6),
        pytest.approx(-0.2),
        pytest.approx(expected - 0.2, abs=1e-6),
    )


def test_better_quality_never_lowers_the_reward() -> None:
    q = np.linspace(0.0, 40.0, 4001)
    for b in (3.5, 4.1, 4.25, 4.6):
        totals = [reward(float(x), 10.0, b).total for x in q]
        assert np.all(np.diff(totals) <= 0)
    klds = np.linspace(-0.05, 3.0, 1001)
    assert np.all(np.diff([kld_reward(float(k), 4.1).total for k in klds]) <= 0)


def test_quality_reward_continuous_at_baseline_and_asymmetric() -> None:
    eps = 1e-9
    assert quality_reward(10 - eps, 10) == pytest.approx(0, abs=1e-8)
    assert quality_reward(10 + eps, 10) == pytest.approx(0, abs=1e-8)
    # 2:1: a 10% improvement earns twice what a 10% degradation costs
    assert quality_reward(9, 10) == pytest.approx(-2 * quality_reward(11, 10))


def test_budget_reward_monotone_within_each_zone() -> None:
    for lo, hi in ((2.0, 4.25), (4.2500001, 6.0)):
        b = np.linspace(lo, hi, 500)
        assert np.all(np.diff([budget_reward(float(x)) for x in b]) <= 0)


@pytest.mark.parametrize(
    "call",
    [
        lambda: quality_reward(10.0, 0.0),
        lambda: quality_reward(float("nan"), 10.0),
        lambda: quality_reward(float("inf"), 10.0),
        lambda: kld_quality_reward(float("nan")),
        lambda: budget_reward(float("inf")),
        lambda: RewardConfig(ceiling=0.0),
        lambda: RewardConfig(ceiling=4.0, margin=4.0),
        lambda: RewardConfig(margin=-0.1),
        lambda: RewardConfig(cliff=-1.0),
    ],
)
def test_bad_input_is_one_ramp_error(call) -> None:
    with pytest.raises(RampError):
        call()
