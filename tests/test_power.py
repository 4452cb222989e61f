"""Power: the noncentral-t detection rate agrees with simulated t-tests and with resampling, and sensitivity reads
the smallest specialization detected from there on."""

import math

import numpy as np
import pytest
from scipy import stats

from toylab.analysis.power import detection_rate, false_positive_rate, resampled_detection_rate, sensitivity


@pytest.mark.parametrize("mean, n", [(0.5, 5), (1.0, 8), (0.3, 20)])
def test_detection_rate_matches_simulated_t_tests(mean, n):
    x = np.random.default_rng(0).normal(mean, 1.0, (20000, n))
    t = x.mean(1) / (x.std(1, ddof=1) / math.sqrt(n))
    assert detection_rate(mean, 1.0, n) == pytest.approx(np.mean(t > stats.t.isf(0.05, n - 1)), abs=0.02)


def test_detection_rate_is_alpha_at_no_effect_and_rises_with_seeds_and_effect():
    for n in (3, 5, 10, 40):
        assert abs(detection_rate(0.0, 0.7, n) - 0.05) < 1e-9
    by_seeds = [detection_rate(0.4, 1.0, n) for n in range(3, 30)]
    by_mean = [detection_rate(m, 1.0, 6) for m in np.linspace(0, 2, 11)]
    assert all(b > a for a, b in zip(by_seeds, by_seeds[1:])) and all(b > a for a, b in zip(by_mean, by_mean[1:]))
    assert detection_rate(0.1, 0.0, 5) == 1.0 and detection_rate(0.0, 0.0, 5) == 0.0 and detection_rate(5.0, 1.0, 2) == 0.0


def test_resampling_a_large_pool_approaches_the_analytic_rate():
    pool = np.random.default_rng(0).normal(0.5, 1.0, 5000)
    for n in (6, 12):
        assert resampled_detection_rate(pool, n, draws=4000, margin=0.0) == pytest.approx(detection_rate(0.5, 1.0, n), abs=0.03)
    assert resampled_detection_rate(pool, 12, evaluation_se=0.3) < resampled_detection_rate(pool, 12)  # extra noise costs power
    assert resampled_detection_rate([0.01, 0.02, 0.015], 5, margin=0.05) == 0.0  # inside the margin: equivalent, not more
    assert resampled_detection_rate([0.2, 0.2], 4) == 0.0  # no spread: compare draws no verdict


def test_sensitivity_is_the_smallest_value_detected_from_there_on():
    x = [0.0, 0.1, 0.2, 0.3, 0.4]
    assert sensitivity(x, [0.05, 0.3, 0.85, 0.9, 0.99]) == 0.2
    assert sensitivity(x, [0.9, 0.95, 0.99, 0.99, 1.0]) == 0.0
    assert sensitivity(x, [0.05, 0.9, 0.5, 0.95, 0.99]) == 0.3  # a dip after a detected point moves it past the dip
    assert sensitivity(x, [0.05, 0.9, 0.95, 0.99, 0.6]) is None  # the largest falls short
    assert sensitivity(x, [0.05, 0.3, 0.85, 0.9, 0.99], target=0.9) == 0.3
    assert sensitivity([], []) is None


def test_false_positive_rate_has_an_exact_interval_around_the_share():
    found = false_positive_rate(["more"] * 7 + ["inconclusive"] * 180 + ["less"] * 5 + ["equivalent"] * 8)
    assert found["more"] == 7 and found["n"] == 200 and found["share"] == 0.035
    assert 0 < found["ci_low"] < 0.035 < found["ci_high"] < 0.08
    assert math.isnan(false_positive_rate([])["share"])
