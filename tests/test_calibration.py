"""Calibration on a dial of planted specialization: the specificity check finds nothing in labels no router sees
and finds a label a router does follow; detection rates and sensitivity behave as power must; the study runs end to end."""

import json
import math

import numpy as np
import pytest

from toylab.analysis.calibration import (
    ALPHA, detection, dose_response, random_label_scores, random_label_verdicts, random_labels, seed_effects,
)
from toylab.errors import ToylabError
from toylab.study import resolve, run_study

N_SEQUENCES, LENGTH = 120, 10
SEQUENCES = np.repeat(np.arange(N_SEQUENCES), LENGTH)


def assignments(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 'routing' and a 'k-means' of 4 groups per token, structured by position but blind to any random label."""
    rng = np.random.default_rng(seed)
    position = np.tile(np.arange(LENGTH), N_SEQUENCES)
    routing = np.where(rng.random(len(position)) < 0.7, position % 4, rng.integers(0, 4, len(position)))
    kmeans = np.where(rng.random(len(position)) < 0.7, (position // 3) % 4, rng.integers(0, 4, len(position)))
    return routing, kmeans


def test_random_labels_are_per_sequence_and_shared_by_every_model():
    labels = random_labels(SEQUENCES, 4, 5)
    assert labels.shape == (5, len(SEQUENCES)) and set(np.unique(labels)) <= set(range(4))
    assert (labels.reshape(5, N_SEQUENCES, LENGTH) == labels.reshape(5, N_SEQUENCES, LENGTH)[..., :1]).all()
    assert np.array_equal(labels, random_labels(SEQUENCES, 4, 5))


def test_no_false_more_on_labels_no_router_sees():
    """Negative control: routing and k-means blind to the random labels give (almost) no *more*, within the
    nominal level's binomial interval."""
    per_seed = [random_label_scores(*assignments(seed), SEQUENCES, 4, 60, 30, seed) for seed in range(5)]
    found = random_label_verdicts(per_seed)
    assert found["labels"] == 60 and found["seeds"] == 5
    assert found["adjusted"]["ci_low"] <= 0.025 and found["adjusted"]["share"] <= 0.1
    assert found["raw"]["more"] >= found["adjusted"]["more"]


def test_a_router_that_follows_a_label_is_seen():
    """Positive control: a routing that is the first random label is called *more* than k-means for that label."""
    label = random_labels(SEQUENCES, 4, 1)[0]
    per_seed = []
    for seed in range(5):
        routing, kmeans = assignments(seed)
        noisy = np.where(np.random.default_rng(seed).random(len(label)) < 0.9, label, routing)
        per_seed.append(random_label_scores(noisy, kmeans, SEQUENCES, 4, 3, 30, seed))
    found = random_label_verdicts(per_seed)
    assert found["adjusted"]["more"] >= 1 and per_seed[0]["routing_nmi"][0] > 0.5


def test_detection_rates_rise_with_seeds_and_effect_and_sit_at_alpha_without_one():
    rng = np.random.default_rng(0)
    null = detection(rng.normal(0, 1, 10_000) - 0.0, 0.0, (3, 10))
    assert all(abs(rate - ALPHA) < 0.01 for rate in null.values())
    rates = detection([0.5, 0.7, 0.3, 0.6, 0.4], 0.0, (3, 5, 10, 20))
    assert rates["3"] < rates["5"] < rates["10"] <= rates["20"] <= 1
    # the evaluation batch's noise does not shrink with seeds: it caps the rate
    assert detection([0.5, 0.7, 0.3, 0.6, 0.4], 0.5, (20,))["20"] < rates["20"]
    assert math.isnan(detection([0.5], 0.0, (3,))["3"])


def test_dose_response_finds_the_smallest_detected_specialization():
    """Effects that grow with the dial: sensitivity falls (improves) with more seeds and is None where never reached."""
    rng = np.random.default_rng(1)
    points = [{"dial": d, "realized": list(np.clip(d + rng.normal(0, 0.02, 8), 0, 1)),
               "effects": {"nmi_vs_kmeans": list(0.3 * d + rng.normal(0, 0.1, 8))},
               "verdicts": {"nmi_vs_kmeans": "inconclusive"}, "evaluation_se": {}} for d in (0.0, 0.1, 0.2, 0.4, 0.7, 1.0)]
    curves = dose_response(points, (3, 5, 10, 20))
    assert list(curves) == ["nmi_vs_kmeans"]
    found = curves["nmi_vs_kmeans"]["sensitivity"]
    assert found["20"] is not None and found["20"] <= found["10"] <= found["5"]
    flat = [{**p, "effects": {"nmi_vs_kmeans": list(rng.normal(0, 0.1, 8))}} for p in points]
    assert dose_response(flat, (3,))["nmi_vs_kmeans"]["sensitivity"]["3"] is None


def test_seed_effects_leave_out_analyses_without_scores():
    layer = {"routing": {"nmi": 0.5, "cnmi": 0.2, "null_cnmi_mean": 0.1}, "kmeans_moe": {"nmi": 0.3, "cnmi": 0.1}}
    effects = seed_effects([layer, layer], None)
    assert set(effects) == {"nmi_vs_kmeans", "cnmi_vs_kmeans", "cnmi_vs_null"}
    assert effects["nmi_vs_kmeans"] == pytest.approx([0.2, 0.2])


@pytest.mark.parametrize("options,message", [
    ({"grid": (0.5, 1.0)}, "grid must rise strictly from 0"),
    ({"grid": (0.0, 1.0, 0.5)}, "grid must rise strictly from 0"),
    ({"grid": (0.0, 2.0)}, "label_mix is a share of tokens"),
    ({"label": "depth"}, "router_label 'depth' is not a label of task 'modes'"),
    ({"dial": "hash"}, "valid: label_mix, router_supervision"),
])
def test_bad_calibration_options_are_one_line_errors(options, message):
    with pytest.raises(ToylabError, match=message) as error:
        resolve("calibration", options, fast=True)
    assert "\n" not in str(error.value)


def test_the_calibration_study_runs_end_to_end(tmp_path):
    """The fast preset (smoke test): every analysis has a curve over the grid, the dial's ends realize none and all
    of the planted label, and the report states sensitivity and specificity."""
    outcome = run_study("calibration", {"train": {"steps": 150}, "random_labels": 20}, tmp_path, fast=True, progress=False, workers=2)
    results = json.loads((outcome.directory / "results.json").read_text())
    assert results["dial"]["settings"] == [0.0, 0.5, 1.0]
    realized = results["dial"]["realized"]
    assert realized["1.0"]["mean"] == pytest.approx(1.0) and realized["0.0"]["mean"] < 0.5
    assert {"nmi_vs_kmeans", "cnmi_vs_null", "path_vs_kmeans"} <= set(results["curves"])
    assert all(len(c["points"]) == 3 for c in results["curves"].values())
    assert results["specificity"]["labels"] == 20 and results["test_families"]["primary"]["tests"] == 3
    report = (outcome.directory / "report.md").read_text()
    assert "Specificity: on 20 random labels" in report and "With 5 seeds, routing vs k-means" in report
    assert (outcome.directory / "figures" / "dose_response.png").is_file()


def test_settings_missed_above_a_detected_one_are_named():
    """Specialization the analysis stops seeing at higher settings (effects that fall back to 0) is reported as missed."""
    rng = np.random.default_rng(2)
    effects = {0.0: 0.0, 0.1: 0.3, 0.3: 0.3, 1.0: 0.0}
    points = [{"dial": d, "realized": list(np.full(8, 0.1 + 0.8 * d)), "effects": {"nmi_vs_kmeans": list(e + rng.normal(0, 0.05, 8))},
               "verdicts": {"nmi_vs_kmeans": "inconclusive"}, "evaluation_se": {}} for d, e in effects.items()]
    curve = dose_response(points, (3, 10))["nmi_vs_kmeans"]
    assert [g["dial"] for g in curve["missed"]] == [1.0] and curve["missed"][0]["rate"] < 0.8
    monotone = [{**p, "effects": {"nmi_vs_kmeans": list(p["dial"] + rng.normal(0, 0.05, 8))}} for p in points]
    assert dose_response(monotone, (3, 10))["nmi_vs_kmeans"]["missed"] == []
