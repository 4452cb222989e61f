"""Claims in three states and trend verdicts: planted answers, and no directional claim from a null."""

import math

import numpy as np

from toylab.analysis.stats import adjust, claim_state, claim_states, compare, trend_verdict
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


def null_family(rng: np.random.Generator, size: int = 30, seeds: int = 5, effect: float = 0.0) -> list[dict]:
    """`size` comparisons of `seeds` paired scores; the first differs by `effect` (in units of the seed spread)."""
    return [compare(rng.normal(effect if i == 0 else 0.0, 1.0, seeds), rng.normal(0.0, 1.0, seeds), margin=0.1)
            for i in range(size)]


def test_adjustment_keeps_the_familywise_false_verdict_rate_at_five_percent():
    """400 reports' worth of 30-comparison families with no effect anywhere: uncorrected, nearly every family has
    a false "more" or "less"; Benjamini–Hochberg-adjusted, at most about 5% do. A planted effect is still found."""
    rng = np.random.default_rng(0)
    raw = adjusted = 0
    for _ in range(400):
        family = null_family(rng)
        raw += any(c["verdict"] in ("more", "less") for c in family)
        adjusted += any(c["verdict"] in ("more", "less") for c in adjust(family))
    assert raw / 400 > 0.9
    assert adjusted / 400 <= 0.065
    found = sum(adjust(null_family(rng, effect=6.0))[0]["verdict"] == "more" for _ in range(100))
    assert found >= 80


def test_adjusted_verdicts_keep_the_raw_one_and_equivalence():
    family = [compare([0.50, 0.31, 0.60, 0.42], [0.49, 0.30, 0.61, 0.41]), compare([0.9, 0.8, 0.85, 0.95], [0.1, 0.2, 0.15, 0.1])]
    first, second = adjust(family)
    assert first["verdict"] == first["raw_verdict"] == "equivalent" and second["verdict"] == "more"
    assert first["family_size"] == 2 and first["p_adjusted"] >= first["p_value"]
    assert adjust([compare([0.3], [0.1])])[0]["verdict"] == "inconclusive"  # one seed: no p-value


def test_two_seeds_give_no_verdict_however_tight_their_interval():
    """Two seeds whose differences agree to four decimals: a tiny interval above 0 from one degree of freedom, which
    is no evidence; with a third seed of the same kind the verdict is drawn."""
    from toylab.report import verdict_text

    two = compare([0.50, 0.60], [0.40, 0.50001])
    assert two["ci_low"] > 0 and two["verdict"] == "inconclusive" and two["too_few_seeds"]
    assert math.isnan(two["p_value"]) and adjust([two])[0]["verdict"] == "inconclusive"
    assert "2 seeds, and a verdict needs at least 3" in verdict_text(two)
    assert compare([0.50, 0.60, 0.70], [0.40, 0.50001, 0.60002])["verdict"] == "more"
    assert compare([0.5, 0.6], [0.5, 0.6])["verdict"] == "equivalent"  # identical in every seed: exact, said so
    # a null with 2 seeds: uncorrected one-sided tests at 5% would call about 10% of noise pairs; now none
    rng = np.random.default_rng(3)
    assert all(compare(rng.normal(size=2), rng.normal(size=2))["verdict"] == "inconclusive" for _ in range(200))


def test_sequence_resamples_are_shared_by_every_seed_and_weight_whole_sequences():
    from toylab.analysis.clustering import contingency, weighted_tables
    from toylab.analysis.stats import sequence_resamples

    sequences = np.repeat(np.arange(10), 3)  # 10 sequences of 3 tokens
    weights = sequence_resamples(sequences, 50)
    assert weights.shape == (50, 30) and np.array_equal(weights, sequence_resamples(sequences, 50))
    assert (weights.sum(1) == 30).all() and (weights.reshape(50, 10, 3).std(-1) == 0).all()  # a sequence is drawn whole
    a, b = np.arange(30) % 4, np.arange(30) % 3
    assert np.array_equal(weighted_tables(a, b, np.ones((1, 30)), 4, 3)[0], contingency(a, b, 4, 3))


def test_the_evaluation_batch_noise_shared_by_all_seeds_widens_the_interval():
    """No true difference, but each study draws one evaluation batch whose luck shifts every seed alike (sd 0.05,
    seeds' own noise 0.01). Seeds alone call a direction in over 30% of studies; with the resampled differences
    (which spread like the batch's luck) in at most the test's nominal 10% (5% each way)."""
    rng = np.random.default_rng(0)
    seeds_only = with_evaluation = 0
    for _ in range(300):
        differences = rng.normal(0, 0.05) + rng.normal(0, 0.01, 5)
        resampled = differences[:, None] + rng.normal(0, 0.05, 200)[None, :]  # every seed shifted alike per resample
        seeds_only += compare(differences, np.zeros(5))["verdict"] in ("more", "less")
        with_evaluation += compare(differences, np.zeros(5), evaluation=resampled)["verdict"] in ("more", "less")
    assert seeds_only > 90 and with_evaluation <= 45  # 127 and 4 of 300
    planted = compare(0.2 + rng.normal(0, 0.01, 5), np.zeros(5), evaluation=np.tile(rng.normal(0.2, 0.02, 200), (5, 1)))
    assert planted["verdict"] == "more" and 0.015 < planted["evaluation_se"] < 0.025


def test_the_families_table_puts_the_primary_first_then_the_study_s_order():
    """`results.json` sorts keys; the section restores the study's order, the primary family first."""
    from toylab.report import Table, families_section

    counts = {"tests": 1, "raw": {"more": 1}, "adjusted": {"inconclusive": 1}}
    families = {"a": {**counts, "role": "secondary: a"}, "b": {**counts, "role": "secondary: b"},
                "z": {**counts, "role": "primary: z"}}
    (table,) = [block for block in families_section("Q?", families, order=("z", "b", "a")).blocks if isinstance(block, Table)]
    assert [row["family"] for row in table.rows] == ["z", "b", "a"]
    assert table.rows[1]["uncorrected verdicts"] == "1 more" and table.rows[1]["adjusted verdicts"] == "1 inconclusive"
