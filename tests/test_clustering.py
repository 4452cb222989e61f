"""Agreement metrics against scikit-learn, planted clusters, nulls and interval statistics."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score, mutual_info_score, normalized_mutual_info_score

from toylab.analysis.clustering import (
    ami,
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
from toylab.analysis.null_routers import balanced_kmeans, random_linear_routers, usage_matched_assignment
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
    assert ami(a, b) == pytest.approx(adjusted_mutual_info_score(a, b), abs=1e-10)


def test_edge_cases_match_sklearn():
    for a, b in [([0, 0, 0], [1, 1, 1]), ([0, 0, 0], [0, 1, 2]), ([0, 1, 2], [2, 0, 1]), ([3], [5]), ([0, 0, 1, 1], [0, 1, 0, 1])]:
        assert nmi(np.array(a), np.array(b)) == pytest.approx(normalized_mutual_info_score(a, b))
        assert ari(np.array(a), np.array(b)) == pytest.approx(adjusted_rand_score(a, b))
        assert ami(np.array(a), np.array(b)) == pytest.approx(adjusted_mutual_info_score(a, b))


def test_ami_is_chance_corrected_where_nmi_is_not():
    """Many small clusters against unrelated labels: NMI well above 0 by chance alone, AMI 0 on average."""
    rng = np.random.default_rng(2)
    a, labels = rng.integers(0, 40, 300), rng.integers(0, 5, (40, 300))
    assert np.mean([nmi(a, b) for b in labels]) > 0.1 and abs(np.mean([ami(a, b) for b in labels])) < 0.01
    b = labels[0]
    assert ami(a, a % 5) == pytest.approx(adjusted_mutual_info_score(a, a % 5)) and ami(b, b) == 1.0


@pytest.mark.parametrize("seed", range(30))
def test_usage_matched_assignment_has_the_counts_and_is_optimal_by_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(2, 8)), int(rng.integers(2, 4))
    scores = rng.normal(size=(n, k)) + (seed % 2) * 3 * np.arange(k)  # odd seeds: every token prefers the last column
    counts = np.bincount(rng.integers(0, k, n), minlength=k)
    found = usage_matched_assignment(scores, counts)
    np.testing.assert_array_equal(np.bincount(found, minlength=k), counts)
    best = max(scores[np.arange(n), list(cols)].sum() for cols in itertools.product(range(k), repeat=n)
               if (np.bincount(cols, minlength=k) == counts).all())
    assert scores[np.arange(n), found].sum() == pytest.approx(best, abs=1e-9)


def test_usage_matched_assignment_is_optimal_with_tied_tokens():
    """Identical router inputs (one token in one context) give exactly tied scores: the optimum of the transportation
    linear program (HiGHS) is still reached, with the counts."""
    from scipy import sparse
    from scipy.optimize import linprog

    rng = np.random.default_rng(5)
    n, k = 200, 4
    scores = rng.normal(size=(3, k))[rng.integers(0, 3, n)]
    counts = np.array([20, 50, 60, 70])
    found = usage_matched_assignment(scores, counts)
    np.testing.assert_array_equal(np.bincount(found, minlength=k), counts)
    constraints = sparse.vstack([sparse.kron(sparse.eye(n), np.ones((1, k))), sparse.kron(np.ones((1, n)), sparse.eye(k))])
    optimum = -linprog(-scores.ravel(), A_eq=constraints, b_eq=np.concatenate([np.ones(n), counts]), bounds=(0, 1)).fun
    assert scores[np.arange(n), found].sum() == pytest.approx(optimum, abs=1e-8)


def test_usage_matched_assignment_is_exact_at_scale_and_rejects_bad_counts():
    """Thousands of tokens, one column preferred by nearly all of them: the counts are met exactly, and the
    result is a biased argmax (each token's column beats every other by at least the bias difference)."""
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(5000, 5)) + [2.0, 0, 0, 0, -1.0]
    counts = np.array([100, 1000, 1500, 2000, 400])
    found = usage_matched_assignment(scores, counts)
    np.testing.assert_array_equal(np.bincount(found, minlength=5), counts)
    gain = scores - scores[np.arange(5000), found][:, None]  # a token never gains by leaving alone: no cheaper swap
    for e, f in itertools.permutations(range(5), 2):
        assert gain[found == e, f].max() + gain[found == f, e].max() <= 1e-9
    with pytest.raises(ValueError):
        usage_matched_assignment(scores, np.array([1, 2, 3, 4, 5]))


def test_random_linear_routers_keep_the_usage_and_find_only_linear_structure():
    """On activations with no label structure, random linear routers score AMI about 0; where the label is the
    dominant direction of the activations, they find it."""
    rng = np.random.default_rng(1)
    label = rng.integers(0, 2, 3000)
    counts = np.bincount(label)
    noise = random_linear_routers(rng.normal(size=(3000, 8)), counts, 5, seed=0)
    assert noise.shape == (5, 3000) and all((np.bincount(draw) == counts).all() for draw in noise)
    assert max(abs(ami(draw, label)) for draw in noise) < 0.01
    planted = rng.normal(size=(3000, 3))
    planted[:, 0] += 6 * label
    found = random_linear_routers(planted, counts, 5, seed=0)
    assert np.mean([ami(draw, label) for draw in found]) > 0.3


def test_balanced_kmeans_keeps_the_usage_and_recovers_planted_clusters_of_those_sizes():
    rng = np.random.default_rng(3)
    truth = np.repeat(np.arange(3), [200, 500, 1300])
    acts = 8 * rng.normal(size=(3, 6))[truth] + rng.normal(size=(2000, 6))
    sizes = np.array([1300, 500, 200])
    found = balanced_kmeans(acts, sizes, seed=0)
    assert sorted(np.bincount(found)) == [200, 500, 1300] and nmi(found, truth) > 0.99
    even = balanced_kmeans(acts, np.array([667, 667, 666]), seed=0)  # the usage of a perfectly balanced router
    assert sorted(np.bincount(even)) == [666, 667, 667] and nmi(kmeans(acts, 3, seed=0), truth) > 0.99


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
