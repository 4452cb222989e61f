"""The specialization analysis finds planted expert-label structure, and nothing in noise."""

import numpy as np
import pytest

from toylab.analysis.specialization import alignment, summarize


def test_planted_assignment_is_found_and_random_is_not():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 5, 4000)
    planted = np.where(rng.random(4000) < 0.9, label % 4, rng.integers(0, 4, 4000))  # 4 experts, 5 classes
    found = alignment(planted, label, 5, n_permutations=200, seed=0)
    assert found["nmi"] > 0.6 and found["p_value"] == pytest.approx(1 / 201)
    assert found["null_nmi_mean"] < 0.01
    table = np.array(found["contingency"])
    assert table.shape == (4, 5) and table.sum() == 4000
    assert table[0, 0] > 0.8 * (label == 0).sum()
    noise = alignment(rng.integers(0, 4, 4000), label, 5, n_permutations=200, seed=0)
    assert noise["nmi"] < 0.01 and noise["p_value"] > 0.01


def fake_seed(routing: float, kmeans: float, p: float = 0.001) -> dict:
    def result(nmi: float) -> dict:
        return {"nmi": nmi, "ari": nmi / 2, "null_nmi_mean": 0.001, "p_value": p}

    return {"0": {"depth": {"routing": result(routing), "kmeans_moe": result(kmeans), "kmeans_dense": result(kmeans)}}}


def test_summary_gives_cis_and_verdicts_over_seeds():
    more = summarize([fake_seed(0.8, 0.3), fake_seed(0.75, 0.35), fake_seed(0.82, 0.31)])["0"]["depth"]
    assert more["routing_nmi"]["mean"] == pytest.approx(0.79)
    assert more["routing_nmi"]["ci_low"] < 0.79 < more["routing_nmi"]["ci_high"]
    assert more["verdict"]["verdict"] == "more"
    same = summarize([fake_seed(0.5, 0.4), fake_seed(0.3, 0.45), fake_seed(0.6, 0.5)])["0"]["depth"]
    assert same["verdict"]["verdict"] == "same"
    failed_seed = summarize([fake_seed(0.8, 0.3), None, fake_seed(0.82, 0.31)])["0"]["depth"]
    assert failed_seed["routing_nmi"]["n"] == 2
