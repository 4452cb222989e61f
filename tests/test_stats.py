"""Claims in three states and trend verdicts: planted answers, and no directional claim from a null."""

import math

import numpy as np

from toylab.analysis.stats import claim_state, claim_states, trend_verdict
from toylab.analysis.superposition import rank_trend


def test_a_failure_to_reject_is_not_shown_never_no():
    assert claim_state("more", ("more",)) == "supported"
    assert claim_state("inconclusive", ("more",)) == "not shown"
    assert claim_state("equivalent", ("more",)) == "contradicted"  # a direction claimed, none within the margin
    assert claim_state("less", ("more",)) == "contradicted"
    assert claim_state("equivalent", ("equivalent", "less")) == "supported"
    assert claim_states(["supported", "supported"], ["E=2", "E=4"]) == "supported"
    assert claim_states(["supported", "not shown"], ["E=2", "E=4"]) == "mixed (E=2: supported, E=4: not shown)"


def test_trend_verdicts_find_planted_trends_and_stay_quiet_on_noise():
    rng = np.random.default_rng(0)
    x = np.repeat(np.arange(6.0), 5)
    rising = trend_verdict(rank_trend(x, x + rng.normal(0, 0.5, x.size))["rho"], x.size)
    assert rising["verdict"] == "more" and rising["ci_low"] > 0
    flat = trend_verdict(rank_trend(x, -x)["rho"], x.size)
    assert flat["verdict"] == "less"
    assert trend_verdict(math.nan, 10)["verdict"] == "inconclusive"  # undefined: not shown, never "no"
    assert trend_verdict(0.0, 2000, margin=0.2)["verdict"] == "equivalent"
    # a null: 1000 noise data sets of 30 points give a directional verdict about 10% of the time (5% each way)
    directional = sum(trend_verdict(rank_trend(x, rng.normal(size=x.size))["rho"], x.size)["verdict"] in ("more", "less")
                      for _ in range(1000))
    assert 50 <= directional <= 160
