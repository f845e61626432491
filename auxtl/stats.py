"""Means and 95% confidence intervals (Student's t) for small samples of seeds."""

from __future__ import annotations

import math
from collections.abc import Sequence

from auxtl.errors import InputError

# Two-sided 95% quantiles of Student's t, t_{0.975, df}.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131,
         16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042,
         40: 2.021, 60: 2.000, 120: 1.980}


def t_quantile_975(df: int) -> float:
    if df < 1:
        raise InputError(f"need at least 2 values for an interval (df={df})")
    if df in _T975:
        return _T975[df]
    larger = [d for d in _T975 if d > df]
    return _T975[min(larger)] if larger else 1.960  # conservative: next tabulated df up


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high) of a 95% t-interval for the mean; (v, nan, nan) for one value."""
    n = len(values)
    if n == 0:
        raise InputError("no values")
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan, math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95% interval of a - b over paired runs (same seed, same labels)."""
    if len(a) != len(b):
        raise InputError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    return mean_interval([x - y for x, y in zip(a, b)])
