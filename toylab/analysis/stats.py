"""Summary statistics over seeds: means with 95% confidence intervals, paired comparisons, p-values."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean and Student-t confidence interval of finite values (NaNs, e.g. diverged runs, are dropped)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
    mean = float(x.mean())
    if n == 1:
        return {"mean": mean, "ci_low": math.nan, "ci_high": math.nan, "n": 1}
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def permutation_p_value(observed: float, null: np.ndarray) -> float:
    """One-sided p-value (add-one): share of null values at least as large as the observed one."""
    return float((1 + np.sum(null >= observed)) / (1 + len(null)))


def paired_comparison(a: Sequence[float], b: Sequence[float], alpha: float = 0.05) -> dict[str, float | str]:
    """Is `a` larger than, smaller than or the same as `b`, paired by seed?

    Uses the 95% t-interval of the per-seed differences a - b (equivalently a two-sided paired
    t-test at level alpha): "more" if the interval lies above 0, "less" if below, else "same".
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    diff = mean_ci(x[keep] - y[keep], 1 - alpha)
    if diff["n"] < 2:
        return {**diff, "p_value": math.nan, "verdict": "undetermined (fewer than 2 seeds)"}
    differences = x[keep] - y[keep]
    if np.ptp(differences) <= 1e-12:  # no spread: the t-test is undefined and the sign is certain
        mean = float(differences.mean())
        verdict = "more" if mean > 1e-12 else "less" if mean < -1e-12 else "same"
        return {**diff, "ci_low": mean, "ci_high": mean, "p_value": float(verdict == "same"), "verdict": verdict}
    p = float(stats.ttest_rel(x[keep], y[keep]).pvalue)
    verdict = "more" if diff["ci_low"] > 0 else "less" if diff["ci_high"] < 0 else "same"
    return {**diff, "p_value": p, "verdict": verdict}
