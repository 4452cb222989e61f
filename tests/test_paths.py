"""Routing paths on planted assignments: polysemantic experts with monosemantic paths, and the JSD null."""

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from toylab.analysis.paths import (
    divergence_from_global, js_divergence, path_gain, path_ids, path_scores, routing_paths, summarize_paths,
)
from toylab.analysis.probes import split
from toylab.models import Transformer, TransformerConfig
from toylab.registry import get_task


def sequences(n: int) -> np.ndarray:
    """Sequence ids of n tokens in sequences of 20."""
    return np.arange(n) // 20


def planted(n: int, seed: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """A 4-class label whose class is the path: layer 0's expert is its low bit, layer 1's its high bit (each
    expert holds two classes), and router inputs that carry it only in a quiet direction beside loud noise."""
    rng = np.random.default_rng(seed)
    label = rng.integers(4, size=n)
    experts = [label % 2, label // 2]
    inputs = rng.normal(size=(n, 6)) * np.array([4, 4, 4, 4, 0.3, 0.3])
    inputs[:, 4:] += 0.3 * np.stack(experts, axis=1)
    return experts, inputs, label, sequences(n)


def relabelled_copy(n: int, seed: int, noise: float) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Layer 0's expert is the label's class 70% of the time; layer 1 is a relabelled copy of layer 0 except that a
    share `noise` of tokens goes to a random expert whatever the label: the path says nothing more than layer 0."""
    rng = np.random.default_rng(seed)
    label = rng.integers(4, size=n)
    first = np.where(rng.random(n) < 0.7, label, rng.integers(4, size=n))
    second = np.where(rng.random(n) < noise, rng.integers(4, size=n), (first + 1) % 4)
    return [first, second], rng.normal(size=(n, 4)), label, sequences(n)


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
    experts, inputs, label, groups = planted(2000, 1)
    scores = path_scores(experts, inputs, label, 4, groups, n_permutations=100, seed=0)
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
    scores = path_scores(experts, rng.normal(size=(3000, 4)), label, 3, sequences(3000), n_permutations=200, seed=0)
    assert scores["n_paths"] == 16 and abs(scores["path"]["nmi"] - scores["path"]["null_nmi_mean"]) < 0.01
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
    per_seed = []
    for seed in range(3):
        experts, inputs, label, groups = planted(800, seed)
        per_seed.append({"class": path_scores(experts, inputs, label, 4, groups, 50, seed)})
    summary = summarize_paths(per_seed)["class"]
    assert summary["path_vs_layer"]["verdict"] == "more" and summary["path_vs_kmeans"]["verdict"] == "more"
    assert summary["path_vs_null"]["verdict"] == "more"
    assert summary["gain_cnmi"]["mean"] > 0.5 and summary["gain_null_cnmi"]["mean"] < 0.02


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_a_relabelled_copy_of_a_layer_adds_nothing_to_the_path(noise: float) -> None:
    """Layer 1 copies layer 0 (relabelled, with label-blind noise): the path is equivalent to the best layer, not more.
    Comparing excess NMI (NMI minus its null) across the path's and the layer's different cluster counts, as before,
    called the noisy copy *less* than the best layer, which no path can be: I(path; label) >= I(layer; label)."""
    per_seed = []
    for seed in range(5):
        experts, inputs, label, groups = relabelled_copy(1000, seed, noise)
        per_seed.append({"class": path_scores(experts, inputs, label, 4, groups, 100, seed)})
    summary = summarize_paths(per_seed)["class"]
    assert summary["path_vs_layer"]["verdict"] == "equivalent"
    assert summary["best_layers"] == [0] * 5  # chosen on the other half of the sequences: the informative layer
    if noise == 0:  # an exact copy: nothing left once layer 0 is known
        assert summary["gain_cnmi"]["mean"] == 0.0 and summary["gain_null_cnmi"]["mean"] == 0.0


def test_the_best_layer_is_chosen_on_other_sequences_than_it_is_scored_on() -> None:
    experts, _, label, groups = relabelled_copy(1000, 0, 0.3)  # layer 0 says more about the label than its noisy copy
    found = path_gain(experts[::-1], label, groups, n_permutations=20, seed=0)
    assert found["best_layer"] == 1 and found["n_scored"] == 500  # half of the 50 sequences
    select, score = split(1000, 0.5, 0, groups=groups)
    assert not set(groups[select]) & set(groups[score])


def test_routing_paths_on_a_label_routed_model() -> None:
    """A label router sends mode c to expert c in every layer: one path per mode, NMI 1 with the mode."""
    task = get_task("modes")
    model = Transformer(TransformerConfig(len(task.vocab), task.seq_len, d_model=16, n_heads=2, d_mlp=16, ffn="moe",
                                          router="label", router_label="mode")).eval()
    found = routing_paths(model, task, task.sample(40, 0), n_permutations=20, seed=0)
    assert found["mode"]["n_paths"] == 4 and found["mode"]["path"]["nmi"] == pytest.approx(1.0)
    assert found["mode"]["layer0"]["nmi"] == pytest.approx(1.0)
    assert found["mode"]["gain"]["cnmi"] == 0.0  # the second layer repeats the first
    assert set(found) == {"token_type", "position", "segment", "mode", "symbol", "source"}
