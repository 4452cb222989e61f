"""Seeds spent as a budget: alpha-spending ends exactly at alpha, the design's false-claim rate stays within it
where naive repeated looks exceed it, and a real effect is still found with fewer seeds than the budget."""

import numpy as np
import pytest

from toylab.analysis.sequential import decide, look_alphas, looks, simulate_false_positive_rate, spending, stopping_rule_text
from toylab.analysis.stats import compare
from toylab.errors import ToylabError


@pytest.mark.parametrize("rule", ["obrien_fleming", "pocock"])
def test_spending_runs_from_nothing_to_exactly_alpha(rule):
    assert spending(0.0, 0.05, rule) == 0.0 and spending(1.0, 0.05, rule) == 0.05 and spending(1.0, 0.1, rule) == 0.1
    spent = [spending(t, 0.05, rule) for t in np.linspace(0, 1, 21)]
    assert all(b > a for a, b in zip(spent, spent[1:]))


def test_obrien_fleming_spends_less_early_than_pocock():
    for t in (0.1, 0.3, 0.5, 0.9):
        assert spending(t, rule="obrien_fleming") < spending(t, rule="pocock")
    assert spending(0.2) < 1e-4  # almost nothing at a fifth of the seeds
    with pytest.raises(ToylabError, match="valid: obrien_fleming, pocock"):
        spending(0.5, rule="haybittle")
    with pytest.raises(ToylabError, match="outside"):
        spending(1.5)


def test_looks_run_in_batches_up_to_the_budget():
    assert looks(3, 2, 10) == [3, 5, 7, 9, 10]
    assert looks(3, 2, 9) == [3, 5, 7, 9]
    assert looks(5, 10, 8) == [5, 8]
    assert looks(4, 1, 4) == [4]
    for bad in ((2, 2, 10), (3, 0, 10), (5, 2, 4)):
        with pytest.raises(ToylabError):
            looks(*bad)


@pytest.mark.parametrize("rule", ["obrien_fleming", "pocock"])
def test_look_alphas_are_positive_shares_that_sum_to_alpha(rule):
    shares = look_alphas(looks(3, 2, 20), 0.05, rule)
    assert len(shares) == 10 and all(a > 0 for a in shares) and sum(shares) == pytest.approx(0.05, abs=1e-15)
    assert look_alphas([7], 0.05, rule) == [0.05]
    with pytest.raises(ToylabError):
        look_alphas([3, 3, 5])


def test_stopping_rule_text_names_the_looks_and_the_rule():
    text = stopping_rule_text("obrien_fleming", 0.05, looks(3, 2, 10))
    assert text.startswith("Seeds added in batches of 2 from 3 up to 10 (looks at 3, 5, 7, 9, 10)")
    assert "O'Brien–Fleming" in text and "Benjamini–Hochberg" in text and text.endswith("inconclusive.")


def test_decide_settles_on_clear_effects_and_not_on_noise():
    rng = np.random.default_rng(0)
    clear = [compare(rng.normal(3.0, 1.0, 10), np.zeros(10), alpha=0.01), compare(rng.normal(-3.0, 1.0, 10), np.zeros(10), alpha=0.01)]
    found = decide(clear, 0.01)
    assert found["settled"] and found["verdicts"] == ["more", "less"] and found["alpha"] == 0.01
    noise = [compare(rng.normal(0.0, 1.0, 5), np.zeros(5), alpha=0.01) for _ in range(3)]
    assert not decide(noise, 0.01)["settled"]


def test_simulation_matches_compare_and_decide_study_by_study():
    """The vectorized simulation reaches, per study, the verdict and seed count of the design run look by look."""
    schedule = looks(3, 3, 15)
    for effect, margin in ((0.8, 0.05), (0.0, 1.0)):
        simulated = simulate_false_positive_rate(schedule, 60, effect=effect, margin=margin, seed=1)
        differences = np.random.default_rng(1).normal(effect, 1.0, (60, schedule[-1]))
        for row, verdict, seeds in zip(differences, simulated["verdicts"], simulated["seeds"]):
            for n, a in zip(schedule, look_alphas(schedule)):
                look = decide([compare(row[:n], np.zeros(n), margin=margin, alpha=a)], a)
                if look["settled"]:
                    break
            assert (look["verdicts"][0], n) == (verdict, seeds)
        assert len(set(simulated["verdicts"])) > 1


def test_spending_keeps_false_claims_within_alpha_where_naive_looks_do_not():
    """2000 studies with no effect, 10 looks from 3 to 20 seeds (a fixed seed, so deterministic)."""
    schedule = looks(3, 2, 20)
    spent = simulate_false_positive_rate(schedule, 2000, effect=0.0)
    naive = simulate_false_positive_rate(schedule, 2000, effect=0.0, naive=True)
    assert spent["more_or_less"] <= 0.05
    assert naive["more_or_less"] > 0.1 > spent["more_or_less"]  # repeated looks at full alpha: several times alpha
    assert simulate_false_positive_rate(schedule, 2000, effect=0.0, rule="pocock")["more_or_less"] <= 0.05


def test_spending_finds_a_real_effect_with_fewer_seeds_than_the_budget():
    found = simulate_false_positive_rate(looks(3, 2, 20), 2000, effect=1.0)
    assert found["shares"]["more"] > 0.8 and found["mean_seeds"] < 16
