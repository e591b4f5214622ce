"""The study's statistics: small pure functions, each with its own tests, from which the report's words follow.

A study compares arms (CE, label smoothing, SNCE, controls) trained with the same seeds; seed s of every arm
shares the initial weights, the data order and the sampling noise, so arms are compared *paired by seed*:

    d_s = metric(arm, s) - metric(CE, s)             mean d ± t_{0.975, n-1} * sd(d) / sqrt(n)

and a difference is called a win or a loss only when that 95% interval excludes zero (:func:`verdict`).
With one seed there is no interval (``lo = hi = nan``) and nothing is called.

Convergence is read off FID-vs-step curves evaluated every few steps: :func:`first_reach` is the first step
at which a curve reaches a target value (linear interpolation between evaluations, so a curve that is already
there at its first evaluation reaches it *at* that evaluation, and a curve that later rises again has still
reached it earlier), and :func:`area_under_curve` is the curve's mean over the steps it spans (trapezoidal),
which rewards getting low early as well as ending low.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

WIN, LOSS, NO_DIFFERENCE = "win", "loss", "no difference shown"


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided confidence interval over ``n`` values (lo = hi = nan when n < 2)."""

    mean: float
    lo: float
    hi: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)

    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.lo > 0 or self.hi < 0)


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Student-t interval of the mean of ``values``: mean ± t_{(1+c)/2, n-1} * sd / sqrt(n)."""
    from scipy.stats import t

    _check_confidence(confidence)
    x = [float(v) for v in values]
    n = len(x)
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    if not all(math.isfinite(v) for v in x):
        raise ValueError(f"t_interval needs finite values, got {x}")
    mean = sum(x) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1))
    half = float(t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_difference(
    arm: Sequence[float], baseline: Sequence[float], confidence: float = 0.95
) -> Interval:
    """Interval of the mean of ``arm[s] - baseline[s]`` over seeds s (the two lists are paired by position)."""
    if len(arm) != len(baseline):
        raise ValueError(
            f"paired values need one per seed on both sides, got {len(arm)} and {len(baseline)}"
        )
    return t_interval([a - b for a, b in zip(arm, baseline, strict=True)], confidence)


def verdict(diff: Interval, *, lower_is_better: bool = True) -> str:
    """ "win" / "loss" when the interval of (arm - baseline) excludes zero, else "no difference shown"."""
    if not diff.excludes_zero():
        return NO_DIFFERENCE
    better = diff.hi < 0 if lower_is_better else diff.lo > 0
    return WIN if better else LOSS


def first_reach(steps: Sequence[float], values: Sequence[float], target: float) -> float | None:
    """First step at which ``values`` (evaluated at increasing ``steps``) falls to ``target`` or below.

    Between two evaluations the curve is linear, so the crossing is interpolated; at the first evaluation
    there is nothing before it to interpolate from, so a curve already at or below the target reaches it at
    that step (an upper bound: it may have got there earlier). None: never reached within the run.
    """
    _check_curve(steps, values)
    prev = None  # the last evaluation above the target
    for s, v in zip(steps, values, strict=True):
        if v <= target:
            if prev is None:
                return float(s)
            (s0, v0) = prev
            return s0 + (v0 - target) / (v0 - v) * (s - s0)  # v0 > target >= v
        prev = (s, v)
    return None


def area_under_curve(steps: Sequence[float], values: Sequence[float]) -> float:
    """Mean value of the piecewise-linear curve over [steps[0], steps[-1]] (the value itself for one point)."""
    _check_curve(steps, values)
    if len(steps) == 1:
        return float(values[0])
    area = sum(
        (steps[i + 1] - steps[i]) * (values[i] + values[i + 1]) / 2 for i in range(len(steps) - 1)
    )
    return float(area / (steps[-1] - steps[0]))


def _check_curve(steps, values) -> None:
    if len(steps) != len(values) or not steps:
        raise ValueError(
            f"a curve needs one value per step and at least one step, got {len(steps)} steps and "
            f"{len(values)} values"
        )
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise ValueError(f"steps must increase strictly, got {list(steps)}")


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
