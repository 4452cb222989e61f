"""Power: how often a study at n seeds calls "more", analytically (noncentral t) and by resampling observed seeds."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as distributions

from toylab.analysis.stats import MARGIN, MIN_SEEDS
from toylab.errors import ToylabError


def detection_rate(mean: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Probability that a paired one-sided t-test at level `alpha` on `n` seeds calls "more" when the true mean
    difference is `mean` and the per-seed sd is `sd`: the noncentral t tail past t_{1−alpha, n−1}, noncentrality
    mean · √n / sd. With `sd` 0 every study sees the mean itself (1 if it is positive, else 0); with fewer than
    `MIN_SEEDS` seeds, 0 (`compare` draws no verdict from them)."""
    if n < MIN_SEEDS:
        return 0.0
    if sd == 0:
        return 1.0 if mean > 0 else 0.0
    return float(distributions.nct.sf(distributions.t.isf(alpha, n - 1), n - 1, mean * math.sqrt(n) / sd))


def resampled_detection_rate(
    differences: Sequence[float], n: int, draws: int = 1000, seed: int = 0, margin: float = MARGIN, alpha: float = 0.05,
    evaluation_se: float = 0.0,
) -> float:
    """Share of `draws` studies of `n` seeds, drawn with replacement from the observed per-seed `differences` (non-finite
    ones dropped), that `compare` would call "more": the lower end of the (1 − 2 alpha) t interval above 0, unless the
    interval lies inside (−margin, margin) ("equivalent") or the draw has no spread. `evaluation_se`, the shared
    evaluation batch's standard error of the seeds' mean, widens the interval in quadrature as in `compare`."""
    pool = np.asarray(differences, dtype=np.float64)
    pool = pool[np.isfinite(pool)]
    if not pool.size:
        raise ToylabError("no finite per-seed differences to resample")
    if n < MIN_SEEDS:
        return 0.0
    x = pool[np.random.default_rng(seed).integers(0, pool.size, (draws, n))]
    mean = x.mean(1)
    sd = np.sqrt(x.var(1, ddof=1) + n * evaluation_se**2)
    half = distributions.t.isf(alpha, n - 1) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    more = (sd > 1e-12) & (low > 0) & ~((-margin < low) & (high < margin))
    return float(more.mean())


def sensitivity(realized: Sequence[float], rates: Sequence[float], target: float = 0.8) -> float | None:
    """The smallest realized value (e.g. of specialization) from which on every grid point is detected at rate
    `target` or more: above the largest point that falls short, the smallest point; None when the largest falls short
    (or there are no points). Rates need not rise with it: a shortfall anywhere raises the answer past it."""
    x, r = np.asarray(realized, dtype=np.float64), np.asarray(rates, dtype=np.float64)
    short = x[~(r >= target)]  # a NaN rate falls short
    above = x[x > short.max()] if short.size else x
    return float(above.min()) if above.size else None


def false_positive_rate(verdicts: Sequence[str], confidence: float = 0.95) -> dict[str, float]:
    """Share of "more" among `verdicts` (e.g. of studies with no effect) and its exact Clopper–Pearson interval."""
    n, k = len(verdicts), sum(v == "more" for v in verdicts)
    if n == 0:
        return {"more": 0, "n": 0, "share": math.nan, "ci_low": math.nan, "ci_high": math.nan, "confidence": confidence}
    interval = distributions.binomtest(k, n).proportion_ci(confidence, method="exact")
    return {"more": k, "n": n, "share": k / n, "ci_low": float(interval.low), "ci_high": float(interval.high), "confidence": confidence}
