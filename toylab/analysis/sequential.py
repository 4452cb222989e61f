"""Seeds spent as a budget: a group-sequential design that adds seeds in batches while the primary family is
inconclusive, each look testing at its share of alpha given by a Lan–DeMets alpha-spending function."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as distributions

from toylab.analysis.stats import ADJUSTMENT, MARGIN, MIN_SEEDS, VERDICTS, adjust
from toylab.errors import ToylabError

RULES = {
    "obrien_fleming": ("O'Brien–Fleming-type", "2 − 2Φ(z_{1−α/2} / √t)"),
    "pocock": ("Pocock-type", "α · ln(1 + (e − 1) t)"),
}
"""Spending rules of `spending`: name -> (name in reports, cumulative alpha spent at information fraction t)."""


def spending(t: float, alpha: float = 0.05, rule: str = "obrien_fleming") -> float:
    """Lan–DeMets cumulative alpha spent at information fraction `t` in [0, 1] (seeds so far / max seeds).

    "obrien_fleming": 2 − 2Φ(z_{1−α/2} / √t), which spends almost nothing early and most of alpha near the end;
    "pocock": α · ln(1 + (e − 1) t), which spends more evenly. Both are 0 at t = 0 and exactly alpha at t = 1.
    """
    if rule not in RULES:
        raise ToylabError(f"unknown spending rule {rule!r}; valid: {', '.join(RULES)}")
    if not 0 <= t <= 1:
        raise ToylabError(f"information fraction {t} is outside [0, 1]")
    if rule == "pocock":
        return alpha * math.log1p((math.e - 1) * t)
    if t in (0, 1):  # the ends exactly (the formula gives alpha at t = 1 only up to rounding)
        return alpha * t
    return float(2 * distributions.norm.sf(distributions.norm.isf(alpha / 2) / math.sqrt(t)))


def looks(start: int, batch: int, max_seeds: int) -> list[int]:
    """Seed counts at each look: `start`, `start + batch`, ..., with a last look at `max_seeds`."""
    if start < MIN_SEEDS:
        raise ToylabError(f"the first look needs at least {MIN_SEEDS} seeds, got {start}")
    if batch < 1:
        raise ToylabError(f"seeds are added in batches of at least 1, got {batch}")
    if max_seeds < start:
        raise ToylabError(f"max seeds ({max_seeds}) is below the first look's {start}")
    return [*range(start, max_seeds, batch), max_seeds]


def look_alphas(schedule: Sequence[int], alpha: float = 0.05, rule: str = "obrien_fleming") -> list[float]:
    """Each look's alpha: the increment spending(n_k / N) − spending(n_{k−1} / N), N = `schedule[-1]`; they sum to alpha.

    A look that tests at its increment errs at a rate of at most that increment (with Benjamini–Hochberg within the
    family: its false discovery rate; in a family with no effect anywhere, the chance of any false claim), so by the
    union bound (Bonferroni over looks) the error over all looks is at most alpha, whatever the correlation between
    looks. This is conservative: looks share their seeds, so the true rate is lower (exact group-sequential
    boundaries would spend it fully, at the cost of assuming the looks' joint distribution).
    """
    if not schedule or schedule[0] < MIN_SEEDS or any(b <= a for a, b in zip(schedule, schedule[1:])):
        raise ToylabError(f"a schedule of looks is increasing seed counts from at least {MIN_SEEDS}, got {list(schedule)}")
    spent = [spending(n / schedule[-1], alpha, rule) for n in schedule]
    return np.diff(spent, prepend=0.0).tolist()


def decide(tests: Sequence[dict[str, Any]], alpha_look: float) -> dict[str, Any]:
    """One look at the primary family: its `compare` results re-adjusted (`adjust`) at the look's alpha.

    Returns the adjusted `tests`, their `verdicts`, the look's `alpha` and whether the family is `settled`
    (no verdict inconclusive: adding seeds stops).
    """
    adjusted = adjust(tests, alpha=alpha_look)
    verdicts = [c["verdict"] for c in adjusted]
    return {"verdicts": verdicts, "settled": "inconclusive" not in verdicts, "alpha": alpha_look, "tests": adjusted}


def stopping_rule_text(rule: str, alpha: float, schedule: Sequence[int]) -> str:
    """The design in one sentence, for reports."""
    shares = ", ".join(f"{a:.2g}" for a in look_alphas(schedule, alpha, rule))
    name, formula = RULES[rule]
    if len(schedule) == 1:
        return f"All {schedule[0]} seeds at one look, which tests the primary family at alpha = {alpha:g}, {ADJUSTMENT} within the family."
    return (f"Seeds added in batches of {schedule[1] - schedule[0]} from {schedule[0]} up to {schedule[-1]} "
            f"(looks at {', '.join(map(str, schedule))}); each look tests the primary family at its share of alpha = {alpha:g} "
            f"spent by the {name} Lan–DeMets function {formula} of t = seeds / {schedule[-1]} (per look: {shares}; "
            f"at most alpha in all by the union bound over looks), {ADJUSTMENT} within the family; stop at the first "
            f"look where no primary test is inconclusive.")


def simulate_false_positive_rate(
    schedule: Sequence[int], n_studies: int, effect: float = 0.0, sd: float = 1.0, alpha: float = 0.05,
    rule: str = "obrien_fleming", seed: int = 0, margin: float = MARGIN, naive: bool = False,
) -> dict[str, Any]:
    """Monte Carlo of the whole design on studies whose primary family is one paired comparison.

    Each study's per-seed differences are `np.random.default_rng(seed).normal(effect, sd, (n_studies, max_seeds))`
    (row per study); at each look the first n_k are compared with zero and decided as `decide([compare(...)], a_k)`
    would (vectorized over studies: Benjamini–Hochberg leaves a family of one p-value unchanged), and a study stops
    at its first verdict other than "inconclusive". `naive` tests every look at the full alpha (no spending), the
    repeated significance testing whose error rate grows with the number of looks.

    Returns the share of studies ending "more" or "less" (`more_or_less`: the false-positive rate when `effect` is
    0), the share of each verdict, the mean seeds used, and per study its final `verdicts` and `seeds`.
    """
    if sd <= 0:
        raise ToylabError(f"the simulated per-seed sd must be positive, got {sd}")
    alphas = look_alphas(schedule, alpha, rule)
    if naive:
        alphas = [alpha] * len(alphas)
    differences = np.random.default_rng(seed).normal(effect, sd, (n_studies, schedule[-1]))
    verdicts = np.full(n_studies, "inconclusive", dtype=object)
    seeds = np.zeros(n_studies, dtype=int)
    running = np.arange(n_studies)
    for n, a in zip(schedule, alphas):
        x = differences[running, :n]
        mean, se = x.mean(1), x.std(1, ddof=1) / math.sqrt(n)
        p = 2 * distributions.t.sf(np.abs(mean) / se, n - 1)  # as `compare`, then `adjust` of a family of one
        p_equivalent = np.maximum(distributions.t.sf((mean + margin) / se, n - 1), distributions.t.cdf((mean - margin) / se, n - 1))
        found = np.select([p_equivalent < a, (p < a) & (mean > 0), p < a], ["equivalent", "more", "less"], "inconclusive")
        verdicts[running], seeds[running] = found, n
        running = running[found == "inconclusive"]
    return {"design": "naive" if naive else rule, "alpha": alpha, "schedule": list(schedule), "n_studies": n_studies,
            "effect": effect, "sd": sd, "margin": margin,
            "more_or_less": float(np.isin(verdicts, ("more", "less")).mean()),
            "shares": {v: float((verdicts == v).mean()) for v in VERDICTS}, "mean_seeds": float(seeds.mean()),
            "verdicts": verdicts.tolist(), "seeds": seeds.tolist()}
