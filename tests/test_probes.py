"""Linear probes: planted linear structure is found, noise is at chance, and the fits match scikit-learn."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression, Ridge

from toylab.analysis.probes import (
    ahead,
    conditional_probe,
    fit_logistic,
    fit_ridge,
    multi_hot_classes,
    probe,
    probe_residual_stream,
    residual_stream,
    split,
    summarize_against,
    summarize_conditional_probes,
    summarize_probes,
)
from toylab.errors import ToylabError
from toylab.models import Transformer, TransformerConfig
from toylab.task import IGNORE


def planted(n: int, d: int, n_classes: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Activations whose class is a random direction plus Gaussian noise, in a random basis."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(n_classes, size=n)
    directions = rng.normal(size=(n_classes, d))
    acts = directions[labels] + noise * rng.normal(size=(n, d))
    return acts.astype(np.float32), labels


def test_planted_classes_are_decoded_and_controls_are_at_chance() -> None:
    acts, labels = planted(3000, 32, 6, noise=1.0, seed=0)
    result = probe(acts, labels)
    assert result.accuracy > 0.95
    assert 0.1 < result.baseline < 0.25 and abs(result.shuffled - 1 / 6) < 0.05
    assert result.n_train + result.n_test == 3000 and result.n_classes == 6 and result.r2 is None


def test_noise_is_at_chance() -> None:
    rng = np.random.default_rng(1)
    acts, labels = rng.normal(size=(3000, 32)), rng.integers(4, size=3000)
    result = probe(acts, labels)
    assert abs(result.accuracy - 0.25) < 0.05 and abs(result.shuffled - 0.25) < 0.05


def test_majority_baseline_with_imbalanced_classes() -> None:
    rng = np.random.default_rng(2)
    labels = (rng.random(4000) < 0.1).astype(int)
    result = probe(rng.normal(size=(4000, 16)), labels)
    assert result.baseline == pytest.approx(0.9, abs=0.02)
    assert result.accuracy == pytest.approx(result.baseline, abs=0.02)


def test_logistic_fit_matches_scikit_learn() -> None:
    acts, labels = planted(1500, 12, 4, noise=2.0, seed=3)
    x = (acts - acts.mean(0)) / acts.std(0, ddof=1)
    x = x.astype(np.float64)  # scikit-learn fits float32 data in float32
    for C in (0.1, 1.0):
        theirs = LogisticRegression(C=C, tol=1e-10, max_iter=5000).fit(x, labels)
        exact = fit_logistic(torch.from_numpy(x), torch.from_numpy(labels), 4, C, max_iter=2000, tol=1e-9)
        probs = exact(torch.from_numpy(x).double()).softmax(-1).numpy()
        np.testing.assert_allclose(probs, theirs.predict_proba(x), atol=1e-5)
        default = fit_logistic(torch.from_numpy(x), torch.from_numpy(labels), 4, C)
        assert (default(torch.from_numpy(x).double()).argmax(-1).numpy() == theirs.predict(x)).mean() > 0.99


def test_ridge_fit_matches_scikit_learn_and_decodes_ordinal_labels() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(800, 10))
    y = x @ rng.normal(size=10) + 0.1 * rng.normal(size=800)
    w, b = fit_ridge(torch.from_numpy(x), torch.from_numpy(y), alpha=3.0)
    theirs = Ridge(alpha=3.0).fit(x, y)
    np.testing.assert_allclose(w.numpy(), theirs.coef_, atol=1e-8)
    assert float(b) == pytest.approx(theirs.intercept_, abs=1e-8)

    distance = rng.integers(0, 9, size=3000)
    acts = np.outer(distance, rng.normal(size=24)) + 0.05 * rng.normal(size=(3000, 24))
    result = probe(acts, distance, kind="ridge")
    assert result.accuracy > 0.95 and result.r2 > 0.99
    assert result.shuffled < 0.2
    noise = probe(rng.normal(size=(3000, 24)), distance, kind="ridge")
    assert noise.r2 < 0.02 and noise.accuracy < 0.2


def test_split_keeps_groups_whole() -> None:
    groups = np.repeat(np.arange(100), 7)
    train, test = split(len(groups), 0.25, seed=0, groups=groups)
    assert set(groups[train]).isdisjoint(groups[test])
    assert len(set(groups[test])) == 25 and len(train) + len(test) == 700
    plain_train, plain_test = split(40, 0.25, seed=0)
    assert len(plain_test) == 10 and sorted([*plain_train, *plain_test]) == list(range(40))


def test_multi_hot_sets_become_classes() -> None:
    labels = np.array([[[0, 1, 0, 0], [1, 0, 0, 1], [0, 0, 0, 0], [IGNORE] * 4]])
    assert multi_hot_classes(labels).tolist() == [[2, 9, 0, IGNORE]]


def test_ahead_moves_labels_back() -> None:
    labels = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    assert ahead(labels, 0).tolist() == labels.tolist()
    assert ahead(labels, 1).tolist() == [[1, 2, 3, IGNORE], [5, 6, 7, IGNORE]]
    assert (ahead(labels, 9) == IGNORE).all()
    moves = np.arange(16).reshape(1, 4, 4)
    assert ahead(moves, 2)[0, 0].tolist() == [8, 9, 10, 11] and (ahead(moves, 2)[0, 2:] == IGNORE).all()


def test_every_layer_and_position_type_is_probed() -> None:
    rng = np.random.default_rng(5)
    batch, pos, d = 1000, 6, 16
    labels = rng.integers(3, size=(batch, pos))
    labels[:, 0] = IGNORE
    types = np.tile(np.array([0, 0, 1, 1, 3, 4]), (batch, 1))  # type 4 has no name: never probed
    types[:10, 5] = 2  # "rare": fewer rows than min_rows, skipped
    noise = rng.normal(size=(batch, pos, d))
    signal = noise.copy()
    signal[..., :3] += 3 * np.eye(3)[labels.clip(0)]
    resid = torch.from_numpy(np.stack([noise, signal])).float()
    rows = probe_residual_stream(resid, labels, types, ["first", "middle", "rare", "last"], min_rows=50)
    assert [(r["layer"], r["position"]) for r in rows] == [
        (0, "first"), (1, "first"), (0, "middle"), (1, "middle"), (0, "last"), (1, "last")
    ]
    for row in rows:
        assert row["n_train"] + row["n_test"] == {"first": 1000, "middle": 2000, "last": 1000}[row["position"]]
        if row["layer"] == 0:
            assert abs(row["accuracy"] - 1 / 3) < 0.1
        else:
            assert row["accuracy"] > 0.95 and abs(row["shuffled"] - 1 / 3) < 0.1
    with pytest.raises(ToylabError, match="shapes do not match"):
        probe_residual_stream(resid[:, :10], labels, types, ["first"])


def test_residual_stream_reads_embeddings_and_every_block() -> None:
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=11, max_len=8, d_model=16, n_layers=3, n_heads=2, d_mlp=32)).eval()
    tokens = torch.randint(11, (5, 8))
    resid = residual_stream(model, tokens)
    assert resid.shape == (4, 5, 8, 16)
    x = model.W_E(tokens) + model.W_pos
    torch.testing.assert_close(resid[0], x)
    for layer, block in enumerate(model.blocks):
        x = block(x)
        torch.testing.assert_close(resid[layer + 1], x)


def test_bad_arguments_are_one_line_errors() -> None:
    acts, labels = planted(100, 4, 2, noise=1.0, seed=6)
    with pytest.raises(ToylabError, match="valid: logistic, ridge"):
        probe(acts, labels, kind="lasso")
    with pytest.raises(ToylabError, match="test_fraction"):
        probe(acts, labels, test_fraction=1.0)


def test_summary_over_seeds_finds_planted_signal_and_not_noise() -> None:
    rows = []
    for seed in range(3):
        signal = probe(*planted(600, 8, 3, 0.5, seed), seed=seed).as_dict()
        acts, _ = planted(600, 8, 3, 0.5, seed)
        noise = probe(acts, np.random.default_rng(seed + 100).integers(3, size=600), seed=seed).as_dict()
        rows += [{"site": "signal", "seed": seed, **signal}, {"site": "noise", "seed": seed, **noise}]
    summary = {row["site"]: row for row in summarize_probes(rows, ["site"])}
    assert summary["signal"]["verdict"]["verdict"] == "more" and summary["noise"]["verdict"]["verdict"] != "more"
    assert summary["signal"]["accuracy"]["n"] == 3
    assert summary["signal"]["accuracy"]["mean"] == pytest.approx(np.mean([r["accuracy"] for r in rows if r["site"] == "signal"]))
    assert summary["signal"]["r2"]["n"] == 0  # logistic probes have no R^2


def test_summary_compares_with_the_stronger_control_of_each_seed() -> None:
    scores = [(0.60, 0.50, 0.40), (0.62, 0.40, 0.52), (0.61, 0.45, 0.50)]  # (accuracy, baseline, shuffled)
    rows = [{"seed": s, "accuracy": a, "baseline": b, "shuffled": c, "r2": None} for s, (a, b, c) in enumerate(scores)]
    (summary,) = summarize_probes(rows, [])
    differences = [a - max(b, c) for a, b, c in scores]
    assert summary["verdict"]["mean"] == pytest.approx(np.mean(differences))
    assert summary["verdict"]["verdict"] == "more"


def next_move_world(n: int, seed: int, carries_ahead: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Moves now and one step later (4 classes; the later one repeats the first 60% of the time) and activations that
    carry the move now in a random basis, plus, if `carries_ahead`, the later move too. Sequences of 10 rows."""
    rng = np.random.default_rng(seed)
    now = rng.integers(4, size=n)
    later = np.where(rng.random(n) < 0.6, now, rng.integers(4, size=n))
    codes = np.eye(4)[now] if not carries_ahead else np.concatenate([np.eye(4)[now], np.eye(4)[later]], axis=1)
    acts = 2 * codes @ rng.normal(size=(codes.shape[1], 16)) + 0.5 * rng.normal(size=(n, 16))
    return acts, later, now, np.arange(n) // 10


@pytest.mark.parametrize("carries_ahead", [False, True])
def test_knowing_the_next_move_is_not_planning_ahead(carries_ahead: bool) -> None:
    """A representation of the next move alone reads the later move above both controls (it follows the next move
    60% of the time), which the plain probe calls signal; given the next move it adds nothing (*equivalent*). One that
    also carries the later move is *more* given the next move."""
    plain, conditional = [], []
    for seed in range(4):
        acts, later, now, groups = next_move_world(2000, seed, carries_ahead)
        plain.append({"seed": seed, **probe(acts, later, groups=groups, seed=seed).as_dict()})
        conditional.append({"seed": seed, **conditional_probe(acts, later, now, groups=groups, seed=seed).as_dict()})
    [found], [given] = summarize_probes(plain, []), summarize_conditional_probes(conditional, [])
    assert found["verdict"]["verdict"] == "more"  # the plain probe "finds the plan" either way
    assert given["given_only"]["mean"] == pytest.approx(0.7, abs=0.05)  # 0.6 + 0.4 / 4: the best guess from the next move
    if carries_ahead:
        assert given["verdict"]["verdict"] == "more" and given["accuracy"]["mean"] > 0.95
    else:
        assert given["verdict"]["verdict"] == "equivalent"


def test_conditional_probe_uses_the_condition_and_checks_its_input() -> None:
    now = np.arange(400) % 4
    found = conditional_probe(np.zeros((400, 3)), now, now, seed=0)  # the label is the condition: no activations needed
    assert found.accuracy == 1.0 and found.given_only == 1.0 and found.n_given == 4 and found.baseline < 0.5
    with pytest.raises(ToylabError):
        conditional_probe(np.zeros((3, 2)), np.arange(3), np.arange(3))
    resid = torch.zeros(2, 4, 30, 3)
    labels = np.tile(np.arange(30) % 2, (4, 1))
    with pytest.raises(ToylabError, match="logistic"):
        probe_residual_stream(resid, labels, np.zeros_like(labels), ["all"], kind="ridge", given=labels)
    rows = probe_residual_stream(resid, labels, np.zeros_like(labels), ["all"], given=labels, min_rows=10)
    assert [r["layer"] for r in rows] == [0, 1] and all(r["given_only"] == 1.0 for r in rows)


def test_summary_against_a_control_network_pairs_by_seed() -> None:
    rows = [{"target": "t", "weights": weights, "seed": seed, "accuracy": accuracy}
            for seed, (trained, untrained) in enumerate([(0.9, 0.5), (0.8, 0.45), (0.85, 0.5)])
            for weights, accuracy in (("trained", trained), ("random init", untrained))]
    rows.append({"target": "t", "weights": "trained", "seed": 3, "accuracy": 0.1})  # no control for seed 3: left out
    [found] = summarize_against(rows, ["target"], "weights", "random init")
    assert found["weights"] == "trained" and found["verdict"]["verdict"] == "more" and found["verdict"]["n"] == 3
    assert found["accuracy"]["mean"] == pytest.approx(0.85) and found["control"]["mean"] == pytest.approx(14.5 / 30)
