"""Agreement metrics against scikit-learn, planted clusters, nulls and interval statistics."""

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import adjusted_rand_score, mutual_info_score, normalized_mutual_info_score

from toylab.analysis.clustering import (
    ari,
    conditional_entropy,
    conditional_nmi,
    contingency,
    kmeans,
    nmi,
    permutation_conditional_nmi,
    permutation_nmi,
    shuffled_tables,
)
from toylab.analysis.stats import compare, mean_ci, permutation_p_value


@pytest.mark.parametrize("seed", range(40))
def test_nmi_and_ari_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    a = rng.integers(0, rng.integers(1, 7), n) * int(rng.integers(1, 5))  # non-contiguous ids too
    b = rng.integers(0, rng.integers(1, 9), n)
    if seed % 4 == 0:
        b = (a + (rng.random(n) < 0.1)) % 5  # strongly dependent
    assert nmi(a, b) == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-12)
    assert ari(a, b) == pytest.approx(adjusted_rand_score(a, b), abs=1e-12)


def test_edge_cases_match_sklearn():
    for a, b in [([0, 0, 0], [1, 1, 1]), ([0, 0, 0], [0, 1, 2]), ([0, 1, 2], [2, 0, 1]), ([3], [5])]:
        assert nmi(np.array(a), np.array(b)) == pytest.approx(normalized_mutual_info_score(a, b))
        assert ari(np.array(a), np.array(b)) == pytest.approx(adjusted_rand_score(a, b))


def test_contingency_counts():
    table = contingency(np.array([0, 0, 1, 2]), np.array([1, 1, 0, 1]), 3, 2)
    np.testing.assert_array_equal(table, [[0, 2], [1, 0], [0, 1]])


def test_planted_clusters_are_found_and_noise_is_not():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 2000)
    centers = rng.normal(size=(4, 16)) * 6
    planted = centers[truth] + rng.normal(size=(2000, 16))
    assert nmi(kmeans(planted, 4, seed=0), truth) > 0.98
    noise = rng.normal(size=(2000, 16))
    assert nmi(kmeans(noise, 4, seed=0), truth) < 0.01
    shuffled = rng.permutation(truth)
    assert nmi(truth, shuffled) < 0.01


def test_permutation_null_keeps_frequencies_and_detects_planted_structure():
    rng = np.random.default_rng(1)
    label = rng.integers(0, 3, 3000)
    aligned = np.where(rng.random(3000) < 0.8, label, rng.integers(0, 3, 3000))
    null = permutation_nmi(aligned, label, 200, seed=0)
    assert null.shape == (200,) and null.max() < 0.01
    assert permutation_p_value(nmi(aligned, label), null) == pytest.approx(1 / 201)
    unrelated = rng.integers(0, 3, 3000)
    p = permutation_p_value(nmi(unrelated, label), permutation_nmi(unrelated, label, 200, seed=0))
    assert p > 0.01


def test_shuffled_tables_have_the_law_of_explicit_shuffles():
    """Tables drawn directly keep both margins, average r_i c_j / n, and their NMI has the distribution of sklearn's
    NMI over explicitly shuffled copies (two-sample Kolmogorov-Smirnov test, 3000 draws each)."""
    rng = np.random.default_rng(4)
    tables = shuffled_tables(np.array([5, 3, 2]), np.array([4, 4, 2]), 4000, rng)
    assert (tables.sum(2) == [5, 3, 2]).all() and (tables.sum(1) == [4, 4, 2]).all() and (tables >= 0).all()
    np.testing.assert_allclose(tables.mean(0), np.outer([5, 3, 2], [4, 4, 2]) / 10, atol=0.05)
    a = rng.integers(0, 4, 400)
    b = np.where(rng.random(400) < 0.3, a, rng.integers(0, 3, 400))
    drawn = permutation_nmi(a, b, 3000, seed=1)
    explicit = [normalized_mutual_info_score(rng.permutation(a), b) for _ in range(3000)]
    assert stats.ks_2samp(drawn, explicit).pvalue > 0.01
    null = permutation_conditional_nmi(a, b, a % 2, 3000, seed=1)  # shuffles within each parity of a
    given = a % 2
    explicit = []
    for _ in range(3000):
        shuffled = a.copy()
        for value in (0, 1):
            shuffled[given == value] = rng.permutation(a[given == value])
        explicit.append(conditional_nmi(shuffled, b, given))
    assert stats.ks_2samp(null, explicit).pvalue > 0.01


def test_mean_ci_matches_t_interval():
    values = [0.2, 0.5, 0.4, 0.9]
    low, high = stats.t.interval(0.95, 3, loc=np.mean(values), scale=stats.sem(values))
    ci = mean_ci(values)
    assert ci["mean"] == pytest.approx(0.5) and ci["n"] == 4
    assert (ci["ci_low"], ci["ci_high"]) == pytest.approx((low, high))
    assert mean_ci([1.0, math.nan, 3.0])["n"] == 2  # failed runs are dropped
    assert math.isnan(mean_ci([1.0])["ci_low"])


def test_bounded_intervals_stay_in_range_and_keep_the_t_interval_inside():
    values = [0.99, 0.7, 1.0]
    free, bounded = mean_ci(values), mean_ci(values, bounds=(0.0, 1.0))
    assert free["ci_high"] > 1 and bounded["ci_high"] == 1.0 and bounded["ci_low"] == free["ci_low"]


def test_compare_four_outcomes():
    assert compare([0.9, 0.8, 0.85], [0.1, 0.2, 0.15])["verdict"] == "more"
    assert compare([0.1, 0.2, 0.15], [0.9, 0.8, 0.85])["verdict"] == "less"
    assert compare([0.5, 0.1, 0.9], [0.4, 0.3, 0.8])["verdict"] == "inconclusive"
    assert compare([0.50, 0.31, 0.60], [0.49, 0.30, 0.61])["verdict"] == "equivalent"
    assert compare([0.50, 0.31, 0.60], [0.49, 0.30, 0.61], margin=0.005)["verdict"] == "inconclusive"
    # the same nonzero difference in every seed: zero spread is not certainty, so no interval and no verdict
    for same in (compare([0.4, 0.5], [0.3, 0.4]), compare([0.4, 0.5, 0.6], [0.3, 0.4, 0.5])):
        assert same["verdict"] == "inconclusive" and same["no_spread"]
    identical = compare([0.3, 0.2, 0.3], [0.3, 0.2, 0.3])  # identical in every seed (exact by construction): said so
    assert identical["verdict"] == "equivalent" and identical["identical"]
    one = compare([0.3], [0.1])
    assert one["verdict"] == "inconclusive" and one["mean"] == pytest.approx(0.2) and math.isnan(one["ci_low"])


def test_compare_interval_is_the_90_percent_t_interval_and_detectable_difference_is_stated():
    a, b = np.array([0.52, 0.61, 0.47, 0.58, 0.55]), np.array([0.50, 0.50, 0.50, 0.50, 0.50])
    c = compare(a, b)
    low, high = stats.t.interval(0.90, 4, loc=np.mean(a - b), scale=stats.sem(a - b))
    assert (c["ci_low"], c["ci_high"]) == pytest.approx((low, high)) and c["confidence"] == pytest.approx(0.9)
    sd = np.std(a - b, ddof=1)
    assert c["detectable"] == pytest.approx((stats.t.ppf(0.95, 4) + stats.t.ppf(0.8, 4)) * sd / np.sqrt(5))
    assert c["p_value"] == pytest.approx(stats.ttest_rel(a, b).pvalue)


@pytest.mark.parametrize("seed", range(10))
def test_conditional_nmi_and_entropy_match_sklearn_per_group(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 2000))
    given = rng.integers(0, rng.integers(1, 6), n) * 3
    b = rng.integers(0, rng.integers(1, 5), n)
    a = (given + b * (rng.random(n) < 0.6) + rng.integers(0, 2, n) * (seed % 2)) % 4
    cmi = h_a = h_b = 0.0
    for value in np.unique(given):
        m = given == value
        w = m.mean()
        cmi += w * mutual_info_score(a[m], b[m])
        h_a += w * stats.entropy(np.bincount(a[m]))
        h_b += w * stats.entropy(np.bincount(b[m]))
    expected = cmi / ((h_a + h_b) / 2) if cmi > 0 else 0.0
    assert conditional_nmi(a, b, given) == pytest.approx(expected, abs=1e-12)
    assert conditional_entropy(a, given) == pytest.approx(h_a / np.log(2), abs=1e-12)
    if len(np.unique(a)) > 1 or len(np.unique(b)) > 1:  # with one condition, the NMI
        assert conditional_nmi(a, b, np.zeros(n)) == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-12)


def test_conditional_null_keeps_the_assignment_within_each_condition():
    rng = np.random.default_rng(3)
    tokens, label = rng.integers(0, 5, 3000), rng.integers(0, 3, 3000)
    hashed = tokens % 3  # a function of the token: nothing about the label beyond it
    assert conditional_entropy(hashed, tokens) == 0 and conditional_nmi(hashed, label, tokens) == 0
    assert (permutation_conditional_nmi(hashed, label, tokens, 20, seed=0) == 0).all()
    informative = np.where(rng.random(3000) < 0.7, label, tokens % 3)
    null = permutation_conditional_nmi(informative, label, tokens, 100, seed=0)
    assert null.max() < 0.02 < conditional_nmi(informative, label, tokens)
