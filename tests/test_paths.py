"""Routing paths on planted assignments: polysemantic experts with monosemantic paths, and the JSD null."""

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from toylab.analysis.paths import divergence_from_global, js_divergence, path_ids, path_scores, routing_paths, summarize_paths
from toylab.models import Transformer, TransformerConfig
from toylab.registry import get_task


def planted(n: int, seed: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """A 4-class label whose class is the path: layer 0's expert is its low bit, layer 1's its high bit (each
    expert holds two classes), and router inputs that carry it only in a quiet direction beside loud noise."""
    rng = np.random.default_rng(seed)
    label = rng.integers(4, size=n)
    experts = [label % 2, label // 2]
    inputs = rng.normal(size=(n, 6)) * np.array([4, 4, 4, 4, 0.3, 0.3])
    inputs[:, 4:] += 0.3 * np.stack(experts, axis=1)
    return experts, inputs, label


def test_path_ids_number_distinct_tuples() -> None:
    ids = path_ids([np.array([0, 1, 0, 1, 0]), np.array([0, 0, 1, 1, 0])])
    assert len(set(ids)) == 4 and ids[0] == ids[4]
    assert len(set(zip(ids, [0, 1, 0, 1, 0], [0, 0, 1, 1, 0]))) == 4


def test_js_divergence_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(5), size=3), rng.dirichlet(np.ones(5))
    p[0, 2] = 0
    p[0] /= p[0].sum()
    np.testing.assert_allclose(js_divergence(p, q), [jensenshannon(row, q, base=2) ** 2 for row in p])


def test_monosemantic_paths_beat_polysemantic_layers_and_kmeans() -> None:
    experts, inputs, label = planted(2000, 1)
    scores = path_scores(experts, inputs, label, 4, n_permutations=100, seed=0)
    assert scores["n_paths"] == 4
    assert scores["path"]["nmi"] == pytest.approx(1.0)
    # one bit of two: I = 1, H(expert) = 1, H(label) = 2, so NMI = 1 / 1.5
    assert scores["layer0"]["nmi"] == pytest.approx(2 / 3, abs=0.02) and scores["layer1"]["nmi"] == pytest.approx(2 / 3, abs=0.02)
    assert scores["kmeans"]["nmi"] < 0.1 and scores["path"]["p_value"] < 0.02
    divergence = scores["path"]["divergence"]
    assert divergence["p_value"] < 0.02 and divergence["mean_jsd"] > 0.5  # each path holds one class of four
    assert divergence["null_mean_jsd"] < 0.01


def test_random_paths_sit_at_the_null() -> None:
    rng = np.random.default_rng(2)
    label = rng.integers(3, size=3000)
    experts = [rng.integers(4, size=3000), rng.integers(4, size=3000)]
    scores = path_scores(experts, rng.normal(size=(3000, 4)), label, 3, n_permutations=200, seed=0)
    assert scores["n_paths"] == 16 and abs(scores["path"]["excess"]) < 0.01
    assert scores["path"]["p_value"] > 0.01
    divergence = scores["path"]["divergence"]
    assert divergence["p_value"] > 0.01 and divergence["mean_jsd"] < 2 * divergence["null_mean_jsd"] + 0.01


def test_an_expert_with_one_class_diverges_by_its_known_amount() -> None:
    label = np.array([0] * 50 + [1] * 50)
    expert = np.array([0] * 50 + [1] * 25 + [2] * 25)  # expert 0 holds class 0 only; experts 1 and 2 class 1 only
    found = divergence_from_global(expert, label, 2, n_draws=200, seed=0)
    assert found["tokens"] == [50, 25, 25]
    np.testing.assert_allclose(found["jsd"], jensenshannon([1, 0], [0.5, 0.5], base=2) ** 2)


def test_summary_verdicts_on_planted_and_random_seeds() -> None:
    per_seed = [{"class": path_scores(*planted(800, seed), 4, 50, seed)} for seed in range(3)]
    summary = summarize_paths(per_seed)["class"]
    assert summary["path_vs_layer"]["verdict"] == "more" and summary["path_vs_kmeans"]["verdict"] == "more"
    assert summary["path_vs_null"]["verdict"] == "more"


def test_routing_paths_on_a_label_routed_model() -> None:
    """A label router sends mode c to expert c in every layer: one path per mode, NMI 1 with the mode."""
    task = get_task("modes")
    model = Transformer(TransformerConfig(len(task.vocab), task.seq_len, d_model=16, n_heads=2, d_mlp=16, ffn="moe",
                                          router="label", router_label="mode")).eval()
    found = routing_paths(model, task, task.sample(40, 0), n_permutations=20, seed=0)
    assert found["mode"]["n_paths"] == 4 and found["mode"]["path"]["nmi"] == pytest.approx(1.0)
    assert found["mode"]["layer0"]["nmi"] == pytest.approx(1.0)
    assert set(found) == {"token_type", "position", "segment", "mode", "symbol", "source"}
