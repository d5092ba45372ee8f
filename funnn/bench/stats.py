"""The statistics behind every figure: medians, IQRs, bootstrap intervals, verdicts.

The unit of evidence is the *round*: every implementation of a group runs its calls once
per round, in a random order, so each round yields one median per implementation and one
ratio per implementation to the baseline. A row's ratio is the median of its per-round
ratios; its 95% interval is a percentile bootstrap over rounds (rounds resampled with
replacement, the median recomputed, the 2.5th and 97.5th percentiles kept). Drift that
hits a whole round cancels in its ratio; what is left is the noise the interval shows.

A verdict ("faster", "slower", "no change") is given only where the interval allows: a
change is claimed when the whole interval lies beyond ``1 ± MIN_EFFECT`` (2%): a 95% interval
excludes 1 by chance one time in twenty, and two separately compiled copies of one step can
differ by a percent in memory layout, so smaller shifts are not called changes.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import numpy as np

__all__ = ["iqr", "bootstrap_median_ci", "ratio_summary", "change_summary", "verdict",
           "NOISY_HALF_WIDTH", "BOOTSTRAP", "MIN_EFFECT"]

MIN_EFFECT = 0.02
"""Shifts whose interval does not clear ``1 ± 2%`` are reported as "no change"."""

NOISY_HALF_WIDTH = 0.10
"""A ratio whose 95% interval is wider than ±10% of itself is marked noisy."""

BOOTSTRAP = 2000
"""Bootstrap resamples per interval."""


def iqr(xs: Sequence[float]) -> float | None:
    """Interquartile range (75th minus 25th percentile); None for fewer than 2 values."""
    if len(xs) < 2:
        return None
    q1, q3 = np.percentile(np.asarray(xs, float), [25, 75])
    return float(q3 - q1)


def bootstrap_median_ci(values: Sequence[float], seed: int = 0,
                        n: int = BOOTSTRAP) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median of ``values``.

    One value gives a zero-width interval at that value (no evidence of spread either way:
    the caller marks it noisy by its count).
    """
    v = np.asarray(values, float)
    if v.size == 0:
        raise ValueError("bootstrap_median_ci: expected at least one value, got none")
    if v.size == 1:
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    meds = np.median(v[rng.integers(0, v.size, (n, v.size))], axis=1)
    lo, hi = np.percentile(meds, [2.5, 97.5])
    return float(lo), float(hi)


def _noisy(mid: float, lo: float, hi: float, count: int) -> bool:
    return count < 3 or (hi - lo) / 2 > NOISY_HALF_WIDTH * abs(mid)


def ratio_summary(rounds: Sequence[float], base_rounds: Sequence[float],
                  seed: int = 0) -> dict:
    """A row's ratio to its baseline from the two lists of per-round medians (same rounds).

    Returns ``ratio`` (median of per-round ratios), ``ratio_ci95`` ``[lo, hi]``,
    ``round_ratios`` and ``noisy`` (interval wider than ±10%, or fewer than 3 rounds).
    """
    if len(rounds) != len(base_rounds) or not rounds:
        raise ValueError(f"ratio_summary: expected equal, non-empty lists of round medians, "
                         f"got {len(rounds)} and {len(base_rounds)}")
    ratios = [a / b for a, b in zip(rounds, base_rounds)]
    mid = statistics.median(ratios)
    lo, hi = bootstrap_median_ci(ratios, seed)
    return {"ratio": mid, "ratio_ci95": [lo, hi], "round_ratios": ratios,
            "noisy": _noisy(mid, lo, hi, len(ratios))}


def change_summary(old_rounds: Sequence[float], new_rounds: Sequence[float],
                   seed: int = 0, n: int = BOOTSTRAP) -> dict:
    """``new / old`` time of one row across two runs, from each run's per-round medians.

    The runs are independent, so each side is resampled on its own and the ratio of the
    two bootstrap medians gives the 95% interval. Returns ``change``, ``change_ci95``.
    """
    o, w = np.asarray(old_rounds, float), np.asarray(new_rounds, float)
    if o.size == 0 or w.size == 0:
        raise ValueError("change_summary: each run needs at least one round median")
    mid = float(np.median(w) / np.median(o))
    rng = np.random.default_rng(seed)
    mo = np.median(o[rng.integers(0, o.size, (n, o.size))], axis=1)
    mw = np.median(w[rng.integers(0, w.size, (n, w.size))], axis=1)
    lo, hi = np.percentile(mw / mo, [2.5, 97.5])
    return {"change": mid, "change_ci95": [float(lo), float(hi)]}


def verdict(lo: float, hi: float, tol: float = MIN_EFFECT, *, larger: str = "slower",
            smaller: str = "faster") -> str:
    """``larger`` where the interval ``[lo, hi]`` lies wholly above ``1 + tol``, ``smaller``
    where wholly below ``1 - tol``, else ``"no change"`` (the interval allows either)."""
    if lo > 1.0 + tol:
        return larger
    if hi < 1.0 - tol:
        return smaller
    return "no change"
