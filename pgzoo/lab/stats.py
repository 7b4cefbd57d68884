"""Deciding a comparison over seeds: the 95% t-interval, the rule a grid states for each comparison, its verdict,
and how many seeds the rule needs (power), computed before the runs from a measured spread.

    mean, half = mean_ci([-0.122, -0.402, -0.323])              # -0.282, 0.358 (t with 2 degrees of freedom)
    rule = Rule("less")                                          # A − B < 0: the interval lies below 0
    rule.verdict(mean, half)                                     # "undecided" (the interval holds 0)
    power(-0.282, 0.144, 8, rule)                                # P(verdict "reproduced") with 8 seeds
    seeds_needed(-0.282, 0.144, rule, target=0.8)               # the fewest seeds reaching that power

The rules (``expect`` in a grid's comparison; lo, hi the 95% t-interval of the paired differences A − B):

- ``less``: reproduced when hi < 0, not reproduced when lo > 0 (the opposite effect), else undecided;
- ``greater``: reproduced when lo > 0, not reproduced when hi < 0, else undecided;
- ``equivalent`` with ``margin`` m fixed in advance: reproduced when the interval lies inside (−m, m), not
  reproduced when it lies outside it (lo >= m or hi <= −m: a difference of at least m), else undecided.

Fewer than two seeds: undecided. The equivalence rule uses the same 95% interval as the directional ones (stricter
than the 90% interval of the two one-sided tests, TOST): one interval per comparison, one reading.

Power: the probability that the rule says "reproduced" when the per-seed differences are normal with mean
``effect`` and standard deviation ``sd``, estimated from ``sims`` simulated experiments of ``seeds`` seeds each
(seeded, so the same call gives the same number): each simulated experiment goes through :meth:`Rule.verdict`'s
arithmetic exactly, so the power is that of the rule the comparison is judged by.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pgzoo.errors import ConfigError

# two-sided 95% quantiles of Student's t, t(0.975, df), df = 1..30
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
        2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
        2.0518, 2.0484, 2.0452, 2.0423)
EXPECTS = ("less", "greater", "equivalent")
VERDICTS = ("reproduced", "not reproduced", "undecided")


def t975(df: int) -> float:
    """t(0.975, df); beyond the table (df > 30) the normal 1.96 (within 2% of t there)."""
    if df < 1:
        raise ConfigError(f"a confidence interval needs at least two seeds (df={df})")
    return T975[df - 1] if df <= len(T975) else 1.96


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """(mean, half-width of the 95% t interval); the half-width is None for a single value."""
    n = len(values)
    if n == 0:
        return math.nan, None
    mean = sum(values) / n
    if n == 1:
        return mean, None
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t975(n - 1) * s / math.sqrt(n)


@dataclass(frozen=True)
class Rule:
    """What a comparison A − B predicts (``expect``) and, for ``equivalent``, the margin fixed in advance."""

    expect: str
    margin: float | None = None

    def __post_init__(self) -> None:
        if self.expect not in EXPECTS:
            raise ConfigError(f"expect={self.expect!r}; use one of {', '.join(EXPECTS)}")
        if self.expect == "equivalent":
            m = self.margin
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m < 1:
                raise ConfigError(f"margin={m!r}: expect: equivalent needs a margin in (0, 1) on the accuracy "
                                  "difference, fixed before the runs (e.g. 0.03)")
        elif self.margin is not None:
            raise ConfigError(f"margin={self.margin!r}: only expect: equivalent takes a margin (expect: {self.expect} "
                              "is decided by the interval excluding 0)")

    def __str__(self) -> str:
        if self.expect == "equivalent":
            return f"A ≈ B ± {self.margin:g}"  # no "|": it is a markdown table cell
        return "A < B" if self.expect == "less" else "A > B"

    def reproduced(self, lo, hi):
        """Whether the interval [lo, hi] reproduces the prediction (floats, or tensors elementwise)."""
        if self.expect == "less":
            return hi < 0
        if self.expect == "greater":
            return lo > 0
        return (lo > -self.margin) & (hi < self.margin)

    def contradicted(self, lo, hi):
        """Whether the interval [lo, hi] rules the prediction out (see the module docstring)."""
        if self.expect == "less":
            return lo > 0
        if self.expect == "greater":
            return hi < 0
        return (lo >= self.margin) | (hi <= -self.margin)

    def verdict(self, mean: float, half: float | None) -> str:
        """"reproduced", "not reproduced" or "undecided" for a paired mean ± the half-width of its 95% interval."""
        if half is None or math.isnan(mean):
            return "undecided"
        lo, hi = mean - half, mean + half
        if self.reproduced(lo, hi):
            return "reproduced"
        return "not reproduced" if self.contradicted(lo, hi) else "undecided"


def power(effect: float, sd: float, seeds: int, rule: Rule, *, sims: int = 20_000, rng_seed: int = 0) -> float:
    """P(``rule`` says "reproduced") with ``seeds`` seeds whose paired differences are N(effect, sd²) (see the
    module docstring); a Monte Carlo estimate with standard error ≤ 0.5/√sims."""
    import torch

    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 2:
        raise ConfigError(f"seeds={seeds!r}: a paired interval needs at least 2 seeds")
    if not sd > 0 or not math.isfinite(effect):
        raise ConfigError(f"sd={sd!r}, effect={effect!r}: use a finite effect and a positive standard deviation "
                          "(from the per-seed differences of a pilot)")
    g = torch.Generator().manual_seed(rng_seed)
    diffs = effect + sd * torch.randn(sims, seeds, generator=g, dtype=torch.float64)
    mean = diffs.mean(1)
    half = t975(seeds - 1) * diffs.std(1) / math.sqrt(seeds)
    return float(rule.reproduced(mean - half, mean + half).double().mean())


def seeds_needed(effect: float, sd: float, rule: Rule, *, target: float = 0.8, max_seeds: int = 60,
                 sims: int = 20_000) -> int | None:
    """The fewest seeds (2..``max_seeds``) whose :func:`power` reaches ``target``; None when none does."""
    if not 0 < target < 1:
        raise ConfigError(f"target={target!r}; use a power in (0, 1), e.g. 0.8")
    for n in range(2, max_seeds + 1):
        if power(effect, sd, n, rule, sims=sims) >= target:
            return n
    return None


def pilot(diffs: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of a pilot's per-seed differences: the effect and spread to plan with."""
    if len(diffs) < 2:
        raise ConfigError(f"a pilot needs per-seed differences of at least 2 seeds, got {len(diffs)}")
    mean = sum(diffs) / len(diffs)
    return mean, math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
