"""Summary statistics over seeds: means with confidence intervals, four-outcome paired comparisons, p-values."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

MARGIN = 0.05
"""Default equivalence margin δ of `compare` (in NMI, or in accuracy/rate units)."""
UNIT = (0.0, 1.0)
"""Bounds of NMI, rates, accuracies and shares, for `mean_ci`."""
NONNEGATIVE = (0.0, math.inf)
"""Bounds of losses, counts and other quantities that cannot be negative, for `mean_ci`."""
ADJUSTMENT = "Benjamini–Hochberg"
"""How `adjust` corrects a family of tests."""
VERDICTS = ("more", "less", "equivalent", "inconclusive")
"""The four outcomes of `compare`."""
FLOOR = "both at floor"
"""An inconclusive verdict of two scores that both sit within the margin of their nulls (`at_floor`)."""
RESAMPLES = 200
"""Bootstrap resamples of the evaluation sequences (`sequence_resamples`)."""
MIN_SEEDS = 3
"""The fewest seeds `compare` draws a verdict from: with two, one degree of freedom makes the interval's width
as noisy as the difference itself (two seeds that happen to agree give a tiny interval)."""
INTERVAL_NOTE = (
    "Every `mean [low, high]` is a mean over seeds with its 95% Student-t interval; for quantities bounded to a "
    "range (NMI, ARI, rates, accuracies, shares) the interval is intersected with that range, which keeps its coverage "
    "(the true mean lies in the range) and never shows impossible values."
)


def mean_ci(values: Sequence[float], confidence: float = 0.95, bounds: tuple[float, float] | None = None) -> dict[str, float]:
    """Mean and Student-t confidence interval of finite values (NaNs, e.g. diverged runs, are dropped).

    With `bounds` (e.g. `UNIT` for NMI or a rate) the interval is intersected with them: the mean of a bounded
    quantity lies in its bounds, so the clipped interval covers it exactly as often as the t-interval does.
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
    mean = float(x.mean())
    if n == 1:
        return {"mean": mean, "ci_low": math.nan, "ci_high": math.nan, "n": 1}
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, min(bounds[0], mean)), min(high, max(bounds[1], mean))  # rounding may put the mean just outside
    return {"mean": mean, "ci_low": low, "ci_high": high, "n": n}


def permutation_p_value(observed: float, null: np.ndarray) -> float:
    """One-sided p-value (add-one): share of null values at least as large as the observed one."""
    return float((1 + np.sum(null >= observed)) / (1 + len(null)))


def sequence_resamples(sequences: np.ndarray, n_resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """Weights `[n_resamples, n_tokens]` of a bootstrap over evaluation sequences: token i's weight in resample r is how
    often its sequence (`sequences[i]`, ids 0..n-1 of the batch) was drawn, n draws with replacement. The draws depend
    on `seed` and the number of sequences only, so every training seed analysed on the same batch (and every label's
    subset of its tokens) gets the same resamples: their spread is the evaluation batch's own noise, shared by all seeds."""
    n = int(sequences.max()) + 1 if sequences.size else 0
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=n_resamples) if n else np.zeros((n_resamples, 0))
    return counts[:, sequences].astype(np.float64)


def compare(
    a: Sequence[float], b: Sequence[float], margin: float = MARGIN, alpha: float = 0.05, power: float = 0.8, min_seeds: int = MIN_SEEDS,
    evaluation: np.ndarray | None = None,
) -> dict[str, float | str]:
    """Is `a` more than, less than, equivalent to `b`, or can the seeds not tell? Paired by seed.

    From the per-seed differences a - b and their (1 - 2 alpha) = 90% Student-t interval:
    - "equivalent": the interval lies inside (-margin, margin): two one-sided tests (TOST) at level alpha;
    - "more" / "less": otherwise, the interval lies above / below 0 (a one-sided test at level alpha);
    - "inconclusive": neither; also with fewer than `min_seeds` seeds (`too_few_seeds`: the interval is reported,
      but no verdict and no p-value drawn from it), or when every seed gives the same nonzero difference (no
      interval can be estimated, `no_spread`: the same difference in a few seeds is not certainty).
    Where a and b are identical in every seed (`identical`, e.g. exact by construction), the verdict is "equivalent".
    Also returns `detectable`, the smallest true difference these seeds would call more or less with the
    given power: (t_{1-alpha} + t_{power}) * sd / sqrt(n), the two-sided paired t-test p-value and the TOST
    p-value `p_equivalent` (the larger of the two one-sided p-values), which `adjust` corrects for multiplicity.

    Every seed is usually scored on one shared evaluation batch, whose own noise the seeds do not average out. With
    `evaluation`, `[n_seeds, n_resamples]` values of a - b on the same resamples of that batch (`sequence_resamples`),
    its standard error `evaluation_se` (the spread over resamples of the seeds' mean) is added in quadrature to the
    seeds' standard error, for the interval, the p-values and `detectable` alike.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    differences = x[keep] - y[keep]
    n = len(differences)
    out: dict[str, float | str] = {"margin": margin, "confidence": 1 - 2 * alpha, "n": n}
    if n < 2:
        mean = float(differences[0]) if n else math.nan
        return {**out, "mean": mean, "ci_low": math.nan, "ci_high": math.nan, "detectable": math.nan,
                "p_value": math.nan, "p_equivalent": math.nan, "verdict": "inconclusive"}
    diff = mean_ci(differences, 1 - 2 * alpha)
    sd = float(differences.std(ddof=1))
    if evaluation is not None:  # the shared evaluation batch's own noise, in quadrature: se = sqrt(se_seeds^2 + se_eval^2)
        out["evaluation_se"] = float(np.asarray(evaluation, dtype=np.float64)[keep].mean(0).std(ddof=1))
        sd = math.sqrt(sd**2 + n * out["evaluation_se"] ** 2)
        half = float(stats.t.ppf(1 - alpha, n - 1)) * sd / math.sqrt(n)
        diff["ci_low"], diff["ci_high"] = diff["mean"] - half, diff["mean"] + half
    if sd <= 1e-12:  # no spread over seeds: the t-interval cannot be estimated
        diff["ci_low"] = diff["ci_high"] = diff["mean"]
        if abs(diff["mean"]) <= 1e-12:  # the two are identical in every seed (e.g. exact by construction): say so
            return {**out, **diff, "detectable": 0.0, "p_value": 1.0, "p_equivalent": 0.0, "verdict": "equivalent", "identical": True}
        return {**out, **diff, "detectable": math.nan, "p_value": math.nan, "p_equivalent": math.nan,
                "verdict": "inconclusive", "no_spread": True}  # the same nonzero difference in every seed is not certainty
    detectable = float((stats.t.ppf(1 - alpha, n - 1) + stats.t.ppf(power, n - 1)) * sd / math.sqrt(n))
    if n < min_seeds:
        return {**out, **diff, "detectable": detectable, "p_value": math.nan, "p_equivalent": math.nan,
                "verdict": "inconclusive", "too_few_seeds": True}
    se = sd / math.sqrt(n)
    p = float(2 * stats.t.sf(abs(diff["mean"]) / se, n - 1))  # the paired t-test (`scipy.stats.ttest_rel` without `evaluation`)
    p_equivalent = float(max(stats.t.sf((diff["mean"] + margin) / se, n - 1), stats.t.cdf((diff["mean"] - margin) / se, n - 1)))
    if -margin < diff["ci_low"] and diff["ci_high"] < margin:
        verdict = "equivalent"
    elif diff["ci_low"] > 0:
        verdict = "more"
    elif diff["ci_high"] < 0:
        verdict = "less"
    else:
        verdict = "inconclusive"
    return {**out, **diff, "detectable": detectable, "p_value": p, "p_equivalent": p_equivalent, "verdict": verdict}


def at_floor(comparison: dict[str, Any], floor: bool) -> dict[str, Any]:
    """`comparison` flagged `both_at_floor` when `floor` (its two scores both sit within the margin of their nulls):
    two scores at the null agree without saying anything, so an "equivalent" there reads "inconclusive"."""
    flagged = {**comparison, "both_at_floor": floor}
    return {**flagged, "verdict": "inconclusive"} if floor and comparison["verdict"] == "equivalent" else flagged


def verdict_label(comparison: dict[str, Any]) -> str:
    """A verdict's outcome in a word: its `verdict`, or `FLOOR` for an inconclusive one whose scores are both at floor."""
    return FLOOR if comparison["verdict"] == "inconclusive" and comparison.get("both_at_floor") else comparison["verdict"]


def adjust(comparisons: Sequence[dict[str, Any]], alpha: float = 0.05) -> list[dict[str, Any]]:
    """The verdicts of one family of `compare` results, corrected for multiplicity by Benjamini–Hochberg
    (`scipy.stats.false_discovery_control`).

    Within the family, the two-sided p-values (a difference in either direction) and the TOST p-values are each
    adjusted, and a verdict reads: "equivalent" where the adjusted TOST p < alpha, else "more" / "less" (by the
    sign of the mean difference) where the adjusted two-sided p < alpha, else "inconclusive". Benjamini–Hochberg
    bounds the expected share of false claims among a family's claims by alpha; in a family with no effect
    anywhere every claim is false, so the chance of any "more" or "less" there is at most alpha. Each result keeps
    its `raw_verdict` (uncorrected, one-sided at alpha per direction) and gains `p_adjusted`,
    `p_equivalent_adjusted`, `family_size` and `adjustment`. Results without p-values (too few seeds) stay
    inconclusive, and so does an equivalence of two scores `both_at_floor` (`at_floor`).
    """
    def corrected(key: str) -> np.ndarray:
        p = np.array([c.get(key, math.nan) for c in comparisons], dtype=np.float64)
        out = np.full(len(p), math.nan)
        finite = np.isfinite(p)
        if finite.any():
            out[finite] = stats.false_discovery_control(p[finite], method="bh")
        return out

    direction, equivalence = corrected("p_value"), corrected("p_equivalent")
    adjusted = []
    for c, p, p_eq in zip(comparisons, direction, equivalence):
        if p_eq < alpha and not c.get("both_at_floor"):
            verdict = "equivalent"
        elif p < alpha:
            verdict = "more" if c["mean"] > 0 else "less"
        else:
            verdict = "inconclusive"
        adjusted.append({**c, "raw_verdict": c.get("raw_verdict", c["verdict"]), "verdict": verdict, "p_adjusted": float(p),
                         "p_equivalent_adjusted": float(p_eq), "family_size": len(comparisons), "adjustment": ADJUSTMENT})
    return adjusted


def adjust_family(tests: Sequence[tuple[dict[str, Any], str]]) -> dict[str, Any]:
    """Correct one family of verdicts in place: each test is `(holder, key)` with a `compare` result at `holder[key]`,
    replaced by its `adjust`ed version. Returns the family's size, adjustment and verdict counts before and after
    (and, where some test is `both_at_floor`, how many inconclusive verdicts are `FLOOR`)."""
    raw = [holder[key]["verdict"] for holder, key in tests]
    for (holder, key), corrected in zip(tests, adjust([holder[key] for holder, key in tests])):
        holder[key] = corrected
    found = [holder[key] for holder, key in tests]
    family = {"tests": len(tests), "adjustment": ADJUSTMENT, "raw": {v: raw.count(v) for v in VERDICTS},
              "adjusted": {v: sum(c["verdict"] == v for c in found) for v in VERDICTS}}
    if any(c.get("both_at_floor") for c in found):
        family["at_floor"] = {stage: sum(verdict_label({**c, "verdict": c[key]}) == FLOOR for c in found)
                              for stage, key in (("raw", "raw_verdict"), ("adjusted", "verdict"))}
    return family


def correct_families(members: dict[str, Sequence[tuple[dict[str, Any], str]]], questions: dict[str, str],
                    primary: str = "primary") -> dict[str, dict[str, Any]]:
    """Correct each family of `members` (name -> `(holder, key)` tests) on its own (`adjust_family`) and return per
    non-empty family its `role` ("primary: <question>" for `primary`, else "secondary: <question>"), its number of
    tests and its verdict counts before and after the correction; the primary family also keeps its uncorrected
    `comparisons` (what `adjust` reads), so a sequential design can correct them again at its own alpha."""
    families = {}
    for name, tests in members.items():
        if tests:
            role = f"{'primary' if name == primary else 'secondary'}: {questions[name]}"
            families[name] = {"role": role, **adjust_family(tests)}
            if name == primary:
                families[name]["comparisons"] = [
                    {**{k: holder[key].get(k, math.nan) for k in ("n", "mean", "p_value", "p_equivalent")},
                     "verdict": holder[key]["raw_verdict"], "both_at_floor": bool(holder[key].get("both_at_floor"))}
                    for holder, key in tests]
    return families


def claim_state(verdict: str, expected: Sequence[str]) -> str:
    """A claim's state from a four-outcome verdict: "supported" when the verdict is one the claim `expected`,
    "not shown" when inconclusive (a test that failed to reject says nothing), "contradicted" otherwise (the
    opposite direction, or equivalence within the margin when a direction was claimed)."""
    if verdict in expected:
        return "supported"
    return "not shown" if verdict == "inconclusive" else "contradicted"


def claim_states(states: Sequence[str], names: Sequence[str]) -> str:
    """One state for a claim checked in several settings: the common state, or "mixed" naming each setting's."""
    if len(set(states)) == 1:
        return states[0]
    return "mixed (" + ", ".join(f"{name}: {state}" for name, state in zip(names, states)) + ")"


def claim_somewhere(verdicts: Sequence[str], expected: Sequence[str]) -> str:
    """The state of a claim that holds if it holds in some setting (e.g. at some layer), from that setting's verdicts
    (corrected together): "supported" where any supports it, "contradicted" where every one contradicts it (e.g.
    equivalent within the margin at every layer), else "not shown"."""
    states = [claim_state(v, expected) for v in verdicts]
    if "supported" in states:
        return "supported"
    return "contradicted" if states and all(s == "contradicted" for s in states) else "not shown"


def claim_everywhere(verdicts: Sequence[str], expected: Sequence[str]) -> str:
    """The state of a claim that must hold in every setting (every layer, direction or reference), from their verdicts
    (corrected): "supported" where every one supports it, "contradicted" where any contradicts it, else "not shown"."""
    states = [claim_state(v, expected) for v in verdicts]
    if states and all(s == "supported" for s in states):
        return "supported"
    return "contradicted" if "contradicted" in states else "not shown"


def trend_verdict(rho: float, n: int, margin: float = 0.2, alpha: float = 0.05) -> dict[str, float | str]:
    """Four-outcome verdict on a Spearman rank correlation from its (1 - 2 alpha) = 90% interval (Fisher z with the
    Bonett-Wright standard error sqrt((1 + rho^2 / 2) / (n - 3))): "more" / "less" (a rising / falling trend),
    "equivalent" (no trend: |rho| < margin), or "inconclusive" (also when rho is undefined or n < 4). Also returns
    the p-values `adjust` corrects, on the same z and standard error: `p_value`, the two-sided test of no trend, and
    `p_equivalent`, the larger of the two one-sided tests of |rho| < margin; `mean` is rho (the sign of a trend)."""
    out: dict[str, float | str] = {"rho": rho, "mean": rho, "n": n, "margin": margin, "confidence": 1 - 2 * alpha}
    if not math.isfinite(rho) or n < 4:
        return {**out, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan, "p_equivalent": math.nan, "verdict": "inconclusive"}
    z, se = math.atanh(min(max(rho, -0.999999), 0.999999)), math.sqrt((1 + rho**2 / 2) / (n - 3))
    half, bound = float(stats.norm.ppf(1 - alpha)) * se, math.atanh(margin)
    low, high = math.tanh(z - half), math.tanh(z + half)
    if -margin < low and high < margin:
        verdict = "equivalent"
    elif low > 0:
        verdict = "more"
    elif high < 0:
        verdict = "less"
    else:
        verdict = "inconclusive"
    return {**out, "ci_low": low, "ci_high": high, "p_value": float(2 * stats.norm.sf(abs(z) / se)),
            "p_equivalent": float(max(stats.norm.sf((z + bound) / se), stats.norm.cdf((z - bound) / se))), "verdict": verdict}
