"""The RAMP terminal reward (paper §3.4): quality first, then a three-zone bit budget with a cliff.

    R = r_q + r_b                                                             (Eq. 21)

r_q compares the quantized model's quality with the unquantized baseline (Eq. 19); r_b charges the
parameter-weighted bits per weight `b` of the searched tensors against the budget (Eq. 20).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ramp_cpp.errors import RampError


@dataclass(frozen=True)
class RewardConfig:
    """Reward coefficients, defaults exactly the paper's (Eq. 19-20, Table 3 / Table 10)."""

    quality_gain: float = 10.0  # Eq. 19: slope for beating the baseline
    quality_loss: float = 5.0  # Eq. 19: slope for falling behind it (the paper's 2:1 asymmetry)
    budget_slope: float = 2.0  # Eq. 20: linear zone between target and ceiling
    cliff: float = 20.0  # Eq. 20: quadratic zone above the ceiling
    ceiling: float = 4.25  # Eq. 20 / Table 10: the hard budget in bits per weight (`--budget`)
    margin: float = 0.25  # Eq. 20 / Table 10: target = ceiling - margin = 4.0

    def __post_init__(self) -> None:
        if not self.ceiling > 0:
            raise RampError(f"bit budget must be positive, got {self.ceiling}")
        if not 0 <= self.margin < self.ceiling:
            raise RampError(f"budget margin must lie in [0, {self.ceiling}), got {self.margin}")
        if min(self.quality_gain, self.quality_loss, self.budget_slope, self.cliff) < 0:
            raise RampError("reward coefficients must be non-negative")

    @property
    def target(self) -> float:
        """Bits per weight up to which the budget costs nothing (paper: 4.0)."""
        return self.ceiling - self.margin


@dataclass(frozen=True)
class RewardTerms:
    r_q: float
    r_b: float
    total: float


def quality_reward(q: float, q_base: float, cfg: RewardConfig | None = None) -> float:
    """Eq. 19 for a lower-is-better quality q (perplexity) against the baseline q_base:

        r_q = +quality_gain * (1 - q / q_base)   if q <= q_base
        r_q = -quality_loss * (q / q_base - 1)   if q >  q_base

    Continuous (0 at q = q_base) and non-increasing in q."""
    c = cfg or RewardConfig()
    if not (math.isfinite(q_base) and q_base > 0):
        raise RampError(f"baseline quality must be a positive number, got {q_base}")
    if not (math.isfinite(q) and q >= 0):
        raise RampError(f"quality must be a non-negative number, got {q}")
    ratio = q / q_base
    return c.quality_gain * (1.0 - ratio) if ratio <= 1.0 else -c.quality_loss * (ratio - 1.0)


def kld_quality_reward(kld: float, cfg: RewardConfig | None = None) -> float:
    """Eq. 19 for the KLD metric, with q / q_base := exp(kld), i.e. quality_reward(exp(kld), 1).

    Why exp: PPL / PPL_base = exp(NLL - NLL_base), and the mean KL divergence from the baseline's
    next-token distribution is the expected NLL increase when the text follows the baseline model. So
    exp(kld) is the perplexity ratio the KLD implies, and the paper's slopes keep their meaning: a KLD of
    0.01 costs about what a 1% perplexity increase costs. A sampled estimate of a (near-)zero KLD can dip
    slightly below 0; that gives a small positive reward, like a quantization that happens to beat the
    baseline's perplexity."""
    if not math.isfinite(kld):
        raise RampError(f"KLD must be a finite number, got {kld}")
    return quality_reward(math.exp(kld), 1.0, cfg)


def budget_reward(b: float, cfg: RewardConfig | None = None) -> float:
    """Eq. 20 with target = ceiling - margin:

        r_b = 0                                  if b <= target
        r_b = -budget_slope * (b - target)       if target < b <= ceiling
        r_b = -cliff * (b - ceiling)^2           if b > ceiling

    Exactly the paper's, including its discontinuity at the ceiling: r_b falls to
    -budget_slope * margin (-0.5) at b = ceiling, then jumps back to ~0 just above it and only returns to
    -0.5 at b = ceiling + sqrt(budget_slope * margin / cliff) (4.408 with the defaults). So slightly
    over-budget allocations score better on r_b than ones exactly at the ceiling; a search must still
    keep its best result in budget."""
    c = cfg or RewardConfig()
    if not math.isfinite(b):
        raise RampError(f"bits per weight must be a finite number, got {b}")
    if b <= c.target:
        return 0.0
    if b <= c.ceiling:
        return -c.budget_slope * (b - c.target)
    return -c.cliff * (b - c.ceiling) ** 2


def reward(q: float, q_base: float, b: float, cfg: RewardConfig | None = None) -> RewardTerms:
    """Eq. 21 for perplexity: R = r_q(q, q_base) + r_b(b)."""
    r_q, r_b = quality_reward(q, q_base, cfg), budget_reward(b, cfg)
    return RewardTerms(r_q, r_b, r_q + r_b)


def kld_reward(kld: float, b: float, cfg: RewardConfig | None = None) -> RewardTerms:
    """Eq. 21 for KLD: R = r_q(exp(kld), 1) + r_b(b)."""
    r_q, r_b = kld_quality_reward(kld, cfg), budget_reward(b, cfg)
    return RewardTerms(r_q, r_b, r_q + r_b)
