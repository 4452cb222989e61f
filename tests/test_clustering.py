"""Agreement metrics against scikit-learn, planted clusters, nulls and interval statistics."""

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from toylab.analysis.clustering import ari, contingency, kmeans, nmi, permutation_nmi
from toylab.analysis.stats import mean_ci, paired_comparison, permutation_p_value


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
    # a shuffle equals sklearn's NMI of an explicitly shuffled copy with the same generator
    single = permutation_nmi(aligned, label, 1, seed=5)[0]
    explicit = np.random.default_rng(5).permuted(aligned[None], axis=1)[0]
    assert single == pytest.approx(normalized_mutual_info_score(explicit, label))


def test_mean_ci_matches_t_interval():
    values = [0.2, 0.5, 0.4, 0.9]
    low, high = stats.t.interval(0.95, 3, loc=np.mean(values), scale=stats.sem(values))
    ci = mean_ci(values)
    assert ci["mean"] == pytest.approx(0.5) and ci["n"] == 4
    assert (ci["ci_low"], ci["ci_high"]) == pytest.approx((low, high))
    assert mean_ci([1.0, math.nan, 3.0])["n"] == 2  # failed runs are dropped
    assert math.isnan(mean_ci([1.0])["ci_low"])


def test_paired_comparison_verdicts():
    assert paired_comparison([0.9, 0.8, 0.85], [0.1, 0.2, 0.15])["verdict"] == "more"
    assert paired_comparison([0.1, 0.2, 0.15], [0.9, 0.8, 0.85])["verdict"] == "less"
    assert paired_comparison([0.5, 0.1, 0.9], [0.4, 0.3, 0.8])["verdict"] == "same"
    assert paired_comparison([0.3, 0.3], [0.3, 0.3])["verdict"] == "same"
    assert paired_comparison([0.4, 0.5], [0.3, 0.4])["verdict"] == "more"  # identical differences: no spread
    assert paired_comparison([0.3], [0.1])["verdict"].startswith("undetermined")
