"""k-sparse probing: a planted neuron is found at k=1, noise is at chance, the fits match scikit-learn, the unit is chosen
on a split it is not scored on, and with no signal experts are not more than pseudo-experts (the old maximum was)."""

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, mutual_info_score

from toylab import get_task
from toylab.analysis.sparse_probing import (
    LIFT,
    PSEUDO,
    binary_targets,
    binned_mutual_info,
    class_scores,
    compare_gaps,
    f1_scores,
    fit_logistic,
    gap_trend,
    gaps,
    layer_sources,
    macro_scores,
    neuron_bins,
    partition_units,
    probe_units,
    pseudo_assignments,
    random_rotation,
    rank_neurons,
    sample_weights,
    select_unit,
    sequence_splits,
    skipped_pairs,
    sparse_probe,
    sparse_probes,
    sparse_probing,
)
from toylab.analysis import sparse_probing as sparse_probing_module
from toylab.cli import app
from toylab.errors import ToylabError
from toylab.registry import list_studies, list_tasks
from toylab.study import resolve
from toylab.models import Transformer, TransformerConfig
from toylab.determinism import torch_threads
from toylab.task import IGNORE, Label


def sequences(n: int, length: int, seed: int) -> np.ndarray:
    """Each row's split (0 train, 1 select, 2 report), by sequences of `length` tokens."""
    return sequence_splits(np.arange(n) // length, seed)


def test_splits_keep_sequences_whole_in_the_given_shares() -> None:
    sequence = np.repeat(np.arange(200), 7)
    part = sequence_splits(sequence, 3, (0.2, 0.3))
    per_sequence = part.reshape(200, 7)
    assert (per_sequence == per_sequence[:, :1]).all()
    assert np.bincount(per_sequence[:, 0]).tolist() == [100, 40, 60]
    with pytest.raises(ToylabError, match="sum to less than 1"):
        sequence_splits(sequence, 0, (0.5, 0.5))


def fit_binary_logistic(x: torch.Tensor, y: torch.Tensor, C: float = 1.0, balanced: bool = True, mask: torch.Tensor | None = None,
                        init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`fit_logistic` on features `x [B, n, k]` (an intercept row put first): weights `[B, k]` and intercepts `[B]`."""
    batch, n, _ = x.shape
    design = torch.cat([torch.ones(batch, 1, n), x.float().transpose(1, 2)], 1)
    theta = fit_logistic(design, y, *sample_weights(y, mask, C, balanced), None if init is None else torch.cat([init[1].unsqueeze(1), init[0]], 1))
    return theta[:, 1:], theta[:, 0]


@pytest.mark.parametrize("balanced", [True, False])
def test_batched_logistic_fits_match_scikit_learn(balanced: bool) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 400, 3))
    y = np.stack([x[0, :, 0] + 0.5 * rng.normal(size=400) > 0.8, x[1, :, 1] - x[1, :, 2] > 0]).astype(int)
    for C in (0.1, 1.0, 100.0):
        w, b = fit_binary_logistic(torch.from_numpy(x), torch.from_numpy(y), C, balanced)
        for i in range(2):
            theirs = LogisticRegression(C=C, tol=1e-10, max_iter=5000, class_weight="balanced" if balanced else None).fit(x[i], y[i])
            np.testing.assert_allclose(w[i].numpy(), theirs.coef_[0], atol=5e-4)
            assert float(b[i]) == pytest.approx(theirs.intercept_[0], abs=5e-4)


def planted_problems(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Binary problems `[B, n, d]` from a sparse linear rule on 3 of d features (B = 6: three signal strengths, each
    clean and with 20% of labels flipped), and `[B, n]` labels independent of the features (the negative control)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(6, n, d))
    rule = np.zeros(d)
    rule[[1, 4, 6]] = (2.0, -1.5, 1.0)
    strength = np.repeat([0.5, 1.0, 3.0], 2)[:, None]
    y = (strength * (x @ rule) + rng.logistic(size=(6, n)) > 0.5)
    y[1::2] ^= rng.random((3, n)) < 0.2
    return x, y.astype(int), (rng.random((6, n)) < 0.3).astype(int)


def test_padded_and_warm_started_fits_match_scikit_learn_on_planted_data() -> None:
    """Problems of different lengths padded into one batch, and warm-started from fewer features, reach scikit-learn's
    coefficients (within 5e-4: the fits stop at a gradient of `TOL` per row) and held-out F1 (within 1e-3); labels
    independent of the features are at chance for both."""
    x, y, noise = planted_problems(800, 8, seed=3)
    lengths = np.array([800, 650, 500, 800, 300, 720])
    mask = torch.from_numpy(np.arange(800) < lengths[:, None])
    train = mask & torch.from_numpy(np.arange(800) < (0.6 * lengths)[:, None])  # the rest of each problem's rows are held out
    held_out = mask & ~train
    for labels, signal in ((y, True), (noise, False)):
        xs, ys = torch.from_numpy(x), torch.from_numpy(labels)
        start = fit_binary_logistic(xs[..., :3], ys, mask=train)
        for init in (None, start):
            w, b = fit_binary_logistic(xs, ys, mask=train, init=init)
            ours = f1_scores((torch.bmm(xs.float(), w.unsqueeze(-1)).squeeze(-1) + b.unsqueeze(-1) > 0) & held_out, ys.bool() & held_out)
            for i in range(6):
                rows, test = train[i].numpy(), held_out[i].numpy()
                theirs = LogisticRegression(tol=1e-10, max_iter=5000, class_weight="balanced").fit(x[i, rows], labels[i, rows])
                np.testing.assert_allclose(w[i].numpy(), theirs.coef_[0], atol=5e-4)
                assert float(b[i]) == pytest.approx(theirs.intercept_[0], abs=5e-4)
                their_f1 = f1_score(labels[i, test], theirs.predict(x[i, test]))
                assert float(ours[i]) == pytest.approx(their_f1, abs=1e-3)
                prevalence = labels[i, test].mean()
                chance = 2 * prevalence / (2 * prevalence + 1)  # a balanced probe with no signal predicts half the rows positive
                assert (their_f1 > chance + 0.1) if signal else (abs(their_f1 - chance) < 0.1)


def test_a_problem_fits_the_same_in_a_batch_as_alone() -> None:
    """Problems that stop at different steps (planted rules of three strengths, clean and noisy, and labels independent
    of the features) fitted together give each one's own fit: a stopped problem stays put until it leaves the batch."""
    x, y, noise = planted_problems(600, 8, seed=5)
    xs, ys = torch.from_numpy(np.concatenate([x, x])), torch.from_numpy(np.concatenate([y, noise]))
    w, b = fit_binary_logistic(xs, ys)
    for i in range(len(xs)):
        alone = fit_binary_logistic(xs[i : i + 1], ys[i : i + 1])
        np.testing.assert_allclose(w[i].numpy(), alone[0][0].numpy(), atol=1e-7)
        assert float(b[i]) == pytest.approx(float(alone[1][0]), abs=1e-7)


def sklearn_sparse_probe(acts: np.ndarray, targets: np.ndarray, part: np.ndarray, ks: tuple[int, ...], seed: tuple[int, int],
                         n_candidates: int, min_count: int) -> dict:
    """`sparse_probe` written out one scikit-learn fit at a time (mean-difference ranking): the reference for the batched path."""
    rng = np.random.default_rng(seed)
    acts = acts[:, np.sort(rng.choice(acts.shape[1], n_candidates, replace=False))]
    shuffled = targets[rng.permutation(len(targets))]
    views = {"neurons": (acts, targets), "shuffled": (acts, shuffled),
             "random_basis": (acts @ random_rotation(acts.shape[1], rng.integers(2**32)), targets)}
    kept = np.array([all(min_count <= targets[part == s, c].sum() <= (part == s).sum() - min_count for s in range(3))
                     for c in range(targets.shape[1])])
    f1 = {}
    train = part == 0
    for variant, (x, t) in views.items():
        x = (x - x[train].mean(0)) / np.maximum(x[train].std(0), 1e-6)
        f1[variant] = np.full((targets.shape[1], 2, len(ks)), np.nan)
        for c in np.flatnonzero(kept):
            order = rank_neurons(x[train], t[train][:, c:c + 1])[0]
            for j, k in enumerate(ks):
                fit = LogisticRegression(tol=1e-10, max_iter=5000, class_weight="balanced").fit(x[train][:, order[:k]], t[train, c])
                for s in (1, 2):
                    truth, predicted = t[part == s, c], fit.predict(x[part == s][:, order[:k]]) == 1
                    f1[variant][c, s - 1, j] = 2 * (truth & predicted).sum() / (truth.sum() + predicted.sum())
    return {"kept": kept, "f1": f1}


def test_batched_sparse_probes_match_one_scikit_learn_fit_at_a_time(monkeypatch) -> None:
    """Units of different sizes, their probes fitted in several padded batches, give scikit-learn's F1 within 1e-3."""
    monkeypatch.setattr(sparse_probing_module, "BATCH_BYTES", 2**21)  # several batches even for this small input
    units = []
    for u, n in enumerate((900, 500, 250)):
        acts, targets, _ = planted(n, 12, seed=u)
        acts[:, 2] += 0.8 * targets[:, 1]  # a weaker neuron for class 1
        units.append((acts, targets[:, :2], sequences(n, 10, u), (7, u), True))
    ks = (1, 2, 4)
    ours = sparse_probes(units, ks, ("mean_difference",), min_count=5, n_candidates=10)
    for (acts, targets, part, seed, _), result in zip(units, ours):
        theirs = sklearn_sparse_probe(acts, targets, part, ks, seed, 10, 5)
        assert (result["kept"] == theirs["kept"]).all() and result["kept"].any()
        for variant in theirs["f1"]:
            np.testing.assert_allclose(result["f1"][variant]["mean_difference"], theirs["f1"][variant], atol=1e-3)


def test_f1_matches_scikit_learn() -> None:
    rng = np.random.default_rng(1)
    truth, predicted = rng.random((5, 300)) < 0.2, rng.random((5, 300)) < 0.3
    ours = f1_scores(torch.from_numpy(predicted), torch.from_numpy(truth)).numpy()
    np.testing.assert_allclose(ours, [f1_score(t, p) for t, p in zip(truth, predicted)])


def planted(n: int = 3000, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise neurons; neuron 5 fires exactly for class 0 of a 4-class label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    acts = rng.normal(size=(n, d))
    acts[:, 5] = 3.0 * (labels == 0) + 0.1 * rng.normal(size=n)
    return acts, labels[:, None] == np.arange(4), sequences(n, 20, seed)


def test_planted_neuron_gives_k1_f1_of_one_and_noise_gives_chance() -> None:
    acts, targets, part = planted()
    result = sparse_probe(acts, targets, part, ks=(1, 4))
    assert result["kept"].all()
    for ranking in ("mean_difference", "mutual_info"):
        assert (result["f1"]["neurons"][ranking][0, :, 0] > 0.98).all()  # the planted class, k = 1, on select and report
        assert (result["f1"]["shuffled"][ranking][0] < 0.45).all()  # no signal once the labels are permuted
    assert (result["f1"]["random_basis"]["mean_difference"][0, :, 0] < 0.8).all()  # one random direction mixes the neuron away

    rng = np.random.default_rng(2)
    noise = sparse_probe(rng.normal(size=acts.shape), targets, part, ks=(1, 4), rankings=("mean_difference",))
    chance = noise["f1"]["shuffled"]["mean_difference"]
    assert np.abs(noise["f1"]["neurons"]["mean_difference"] - chance).max() < 0.07  # noise is at the shuffled control
    assert np.abs(chance - 1 / 3).max() < 0.07  # balanced probe, prevalence 1/4: F1 = 2 (1/4)(1/2) / (1/4 + 1/2)


def test_candidate_neurons_are_a_random_subset_of_the_given_size() -> None:
    acts, targets, part = planted(d=64)
    found = [sparse_probe(acts, targets[:, :1], part, ks=(1,), rankings=("mean_difference",), seed=s, n_candidates=8)
             ["f1"]["neurons"]["mean_difference"][0, 1, 0] for s in range(12)]
    # the planted neuron is among 8 of 64 candidates in about 1 draw of 8: F1 near 1 then, near chance otherwise
    assert 1 <= sum(f > 0.95 for f in found) <= 6 and min(found) < 0.5
    every = sparse_probe(acts, targets[:, :1], part, ks=(1,), rankings=("mean_difference",), n_candidates=64)
    assert every["f1"]["neurons"]["mean_difference"][0, 1, 0] > 0.98  # as many candidates as neurons: all of them


def test_ranking_puts_the_planted_neuron_first() -> None:
    acts, targets, _ = planted()
    for ranking in ("mean_difference", "mutual_info"):
        assert rank_neurons(acts, targets, ranking)[0, 0] == 5
    with pytest.raises(ToylabError, match="valid: mean_difference, mutual_info"):
        rank_neurons(acts, targets, "l2")


def test_binned_mutual_info_matches_scikit_learn() -> None:
    acts, targets, _ = planted(n=1500, d=6)
    acts[:, 2] = np.maximum(acts[:, 2], 0)  # ties (a ReLU's zeros) share a bin
    bins = neuron_bins(acts, 8)
    assert bins.min() == 0 and bins.max() == 7
    assert np.abs(np.bincount(bins[:, 0], minlength=8) - 1500 / 8).max() <= 1  # equal-frequency bins
    scores = binned_mutual_info(acts, targets, 8)
    for c in range(targets.shape[1]):
        for j in range(acts.shape[1]):
            assert scores[c, j] == pytest.approx(mutual_info_score(bins[:, j], targets[:, c]), abs=1e-12)
    assert scores[0].argmax() == 5 and scores[0, 5] > 10 * np.delete(scores[0], 5).max()  # planted vs noise


def test_rare_classes_are_skipped() -> None:
    acts, targets, part = planted()
    targets[:, 3] = False
    targets[:8, 3] = True
    result = sparse_probe(acts, targets, part, ks=(1,), rankings=("mean_difference",), min_count=10)
    assert result["kept"].tolist() == [True, True, True, False]
    assert np.isnan(result["f1"]["neurons"]["mean_difference"][3]).all()


def test_binary_targets_of_single_and_multi_hot_labels() -> None:
    single = Label("x", "state", "", ("a", "b", "c"))
    targets, defined, classes = binary_targets(np.array([0, 2, IGNORE, 2]), single)
    assert classes == [0, 2] and defined.tolist() == [True, True, False, True]
    assert targets.tolist() == [[True, False], [False, True], [False, False], [False, True]]
    assert binary_targets(np.array([0, 2, 1, 2]), single, max_classes=1)[2] == [2]
    multi = Label("m", "function", "", ("u", "d"), multi_hot=True)
    targets, defined, classes = binary_targets(np.array([[1, 1], [0, 1], [IGNORE, IGNORE]]), multi)
    assert classes == [0, 1] and targets.tolist() == [[True, True], [False, True], [False, False]]


def fake_result(select: list[float], report: list[float], shuffled: float = 0.5) -> dict:
    """A `sparse_probe` result of one class and one k: F1 on select and report, and a flat shuffled control."""
    f1 = {"neurons": {"mean_difference": np.array([[[select[0]], [report[0]]]])},
          "shuffled": {"mean_difference": np.full((1, 2, 1), shuffled)},
          "random_basis": {"mean_difference": np.array([[[select[1]], [report[1]]]])}}
    return {"kept": np.array([True]), "f1": f1}


def test_the_unit_is_chosen_on_select_and_scored_on_report() -> None:
    results = [fake_result([0.9, 0.5], [0.6, 0.5]), fake_result([0.7, 0.6], [0.95, 0.8]),
               {**fake_result([1.0, 1.0], [1.0, 1.0]), "kept": np.array([False])}]  # a skipped unit is never chosen
    chosen = select_unit(results, 0, "neurons", "mean_difference")
    assert chosen["unit"] == [0] and chosen["f1"] == [0.6] and chosen["lift"] == pytest.approx([0.1])
    assert chosen["mean_lift"] == pytest.approx([(0.1 + 0.45) / 2]) and chosen["max_f1"] == [0.95]  # max_f1: the old design
    assert select_unit(results, 0, "random_basis", "mean_difference")["unit"] == [1]
    control = select_unit(results, 0, "shuffled", "mean_difference")
    assert control["unit"] == [0] and control["f1"] == [0.5] and np.isnan(control["lift"]).all()


def test_pseudo_experts_match_the_moe_partition() -> None:
    rng = np.random.default_rng(0)
    routing = np.stack([rng.permutation(6)[:2] for _ in range(300)])  # top-2 of 6
    router_input = rng.normal(size=(300, 3)) + 4 * (routing[:, :1] == np.arange(3))  # the router input predicts the first expert a bit
    pseudo = pseudo_assignments(routing, router_input, 6, seed=1)
    assert set(pseudo) == set(PSEUDO) and (pseudo["partition"] == routing).all()
    sizes = np.bincount(routing.ravel(), minlength=6)
    assert (np.bincount(pseudo["random"].ravel(), minlength=6) == sizes).all() and (pseudo["random"] != routing).any()
    assert pseudo["kmeans"].shape == (300, 2) and (pseudo["kmeans"][:, 0] != pseudo["kmeans"][:, 1]).all()
    post, dense = rng.normal(size=(300, 2, 5)), rng.normal(size=(300, 7))
    experts = partition_units(post, routing, 6)
    for e, (acts, tokens) in enumerate(experts):
        slot = (routing[tokens] == e).argmax(1)
        assert len(tokens) == sizes[e] and (acts == post[tokens, slot]).all()
    sources = layer_sources(post, routing, 6, dense, router_input, seed=1)
    assert set(sources) == {"experts", *PSEUDO}
    assert all((acts == dense[tokens]).all() for acts, tokens in sources["partition"])
    assert [len(t) for _, t in sources["partition"]] == sizes.tolist() == [len(t) for _, t in sources["random"]]
    assert list(layer_sources(dense, None)) == ["dense"]


def test_model_probing_covers_every_expert_and_its_pseudo_experts() -> None:
    task = get_task("brackets")
    torch.manual_seed(0)
    shared = {"vocab_size": len(task.vocab), "max_len": task.seq_len, "d_model": 16, "n_heads": 2, "d_mlp": 16, "n_layers": 1}
    moe = Transformer(TransformerConfig(**shared, ffn="moe", n_experts=4, top_k=2)).eval()
    dense = Transformer(TransformerConfig(**shared)).eval()
    batch = task.sample(60, 0)
    with torch_threads(1):
        rows = sparse_probing(moe, task, batch, ks=(1, 2), rankings=("mean_difference",), min_count=5, n_candidates=8, dense=dense)
        dense_rows = sparse_probing(dense, task, batch, ks=(1,), rankings=("mean_difference",), min_count=5)
    assert {r["variant"] for r in rows if r["units"] == "experts"} == {"neurons", "shuffled", "random_basis"}
    assert {r["variant"] for r in rows if r["units"] in PSEUDO} == {"neurons", "shuffled"}  # pseudo-experts: no random basis
    assert {r["units"] for r in rows} == {"experts", *PSEUDO}
    for row in rows:
        assert len(row["f1"]) == len(row["lift"]) == 2 and row["n_units"] == 4
        assert all(u in range(4) and u not in row["skipped"] for u in row["unit"])
        assert row["max_f1"][0] >= row["f1"][0]
    probed = [r for r in rows if r["variant"] == "neurons" and r["units"] == "experts"]
    counts = skipped_pairs([{"model": "moe", **r} for r in rows])["moe"]
    assert counts == {"pairs": sum(len(r["skipped"]) for r in probed), "of": 4 * len(probed)} and counts["pairs"] > 0
    assert {r["units"] for r in dense_rows} == {"dense"}


def test_labels_on_the_same_tokens_are_probed_together_as_each_alone() -> None:
    """Three labels (a planted one, a noise one, one defined on half the tokens) over experts: the rows of one call
    equal those of each label alone, in the same order, and the planted label is read at k=1 by the planted expert."""
    rng = np.random.default_rng(0)
    n, d = 1600, 8
    values = {"planted": rng.integers(0, 3, n), "noise": rng.integers(0, 3, n), "half": np.where(rng.random(n) < 0.5, rng.integers(0, 2, n), IGNORE)}
    labels = {name: Label(name, "function", "", ("a", "b", "c")) for name in values}
    routing = rng.integers(0, 2, (n, 1))
    post = rng.normal(size=(n, 1, d))
    post[routing[:, 0] == 1, 0, :3] += 4.0 * (values["planted"][routing[:, 0] == 1, None] == np.arange(3))
    part, sources = sequences(n, 10, 0), layer_sources(post, routing, 2)
    options = {"ks": (1, 2), "rankings": ("mean_difference",), "min_count": 10, "n_candidates": d, "seed": 0}
    with torch_threads(1):
        together = probe_units([sources], values, labels, part, **options)
        alone = [row for name in labels for row in probe_units([sources], {name: values[name]}, {name: labels[name]}, part, **options)]
    assert json.dumps(together) == json.dumps(alone) and {row["label"] for row in together} == set(labels)
    planted = [r for r in together if r["label"] == "planted" and r["variant"] == "neurons"]
    assert all(r["unit"][0] == 1 and r["f1"][0] > 0.95 for r in planted)
    assert all(r["lift"][0] < 0.2 for r in together if r["label"] == "noise" and r["variant"] == "neurons")


BINARY = Label("y", "function", "", ("a", "b", "c", "d"))


def simulated_rows(seed: int, n_experts: int = 16, signal: float = 0.0, sequences: int = 800, length: int = 20, d: int = 8) -> list[dict]:
    """One seed of a simulated top-1 MoE layer beside a dense one: Gaussian activations, random routing, a 4-class label
    independent of both. With `signal`, neurons 0-3 of expert 3 carry the label (one class each) on its tokens."""
    rng = np.random.default_rng(seed)
    n = sequences * length
    y = rng.integers(0, 4, n)
    routing = rng.integers(0, n_experts, (n, 1))
    post = rng.normal(size=(n, 1, d))
    planted = routing[:, 0] == 3
    post[planted, 0, :4] += signal * (y[planted, None] == np.arange(4))
    dense_post, router_input = rng.normal(size=(n, 2 * d)), rng.normal(size=(n, 4))
    part = sequence_splits(np.arange(n) // length, seed)
    common = {"values": {"y": y}, "labels": {"y": BINARY}, "part": part, "ks": (1,), "rankings": ("mean_difference",),
              "min_count": 10, "n_candidates": d, "seed": seed}
    with torch_threads(1):
        moe = probe_units([layer_sources(post, routing, n_experts, dense_post, router_input, seed)], **common)
        dense = probe_units([layer_sources(dense_post, None)], **common)
    return [{"model": model, "seed": seed, "layer": 0, **row} for model, rows in (("moe", moe), ("dense", dense)) for row in rows]


def verdicts(rows: list[dict]) -> dict[str, dict]:
    """The new design's comparisons (experts vs each pseudo-expert source, lift of the unit chosen on select) and the
    old design's (largest raw F1 over experts vs the dense MLP's, chosen and scored on one split), paired by seed."""
    scores = class_scores(rows, ks=(1,))
    experts = {"model": "moe", "units": "experts", "variant": "neurons"}
    out = {p: compare_gaps(gaps(scores, experts, {**experts, "units": p}, ("label",), "lift"), ("label",), bounds=LIFT)[0]
           for p in PSEUDO}
    out["old"] = compare_gaps(gaps(scores, experts, {"model": "dense", "units": "dense", "variant": "neurons"}, ("label",), "max_f1"),
                              ("label",))[0]
    return out


def test_no_signal_experts_are_not_more_than_pseudo_experts_though_the_old_max_is() -> None:
    found = verdicts([row for seed in range(6) for row in simulated_rows(seed)])
    assert found["old"]["gap"]["verdict"] == "more" and found["old"]["gap"]["mean"] > 0.04  # the max of 16 noisy F1s
    for pseudo in PSEUDO:
        assert found[pseudo]["gap"]["verdict"] in ("equivalent", "inconclusive"), pseudo
        assert abs(found[pseudo]["gap"]["mean"]) < 0.03 and abs(found[pseudo]["a"]["mean"]) < 0.03  # chosen lift ~ 0 off the select split
    assert found[PSEUDO[0]]["gap"]["verdict"] == "equivalent"


def test_a_planted_expert_is_more_than_pseudo_experts() -> None:
    found = verdicts([row for seed in range(4) for row in simulated_rows(seed, signal=3.0)])
    for pseudo in PSEUDO:
        assert found[pseudo]["gap"]["verdict"] == "more" and found[pseudo]["gap"]["ci_low"] > 0.3, pseudo


def fake_rows(model: str, gap: float, seeds: int = 3) -> list[dict]:
    rng = np.random.default_rng(sum(map(ord, model)))  # each model its own noise, so gaps vary over seeds
    return [{"model": model, "seed": s, "layer": 0, "label": "depth", "class": c, "units": "experts", "variant": "neurons",
             "ranking": "mean_difference", "f1": [0.5 + gap + 0.01 * rng.normal(), 0.9], "lift": [gap, 0.4], "mean_lift": [0.0, 0.1],
             "max_f1": [0.6, 0.9]}
            for s in range(seeds) for c in ("0", "1")]


def test_gaps_verdicts_and_trend() -> None:
    scores = class_scores(fake_rows("dense", 0) + fake_rows("moe-a", 0.1) + fake_rows("moe-b", 0.2) + fake_rows("moe-c", 0.0), ks=(1, 2))
    summary = pd.DataFrame(macro_scores(scores))
    assert summary.query("model == 'moe-b' and k == 1")["f1"].item()["mean"] == pytest.approx(0.7, abs=0.02)
    assert summary.query("model == 'moe-b' and k == 2")["lift"].item()["mean"] == pytest.approx(0.4)
    dense = {"model": "dense", "variant": "neurons", "ranking": "mean_difference", "k": 1}
    per_model = {m: gaps(scores, {**dense, "model": m}, dense) for m in ("moe-a", "moe-b", "moe-c")}
    assert compare_gaps(per_model["moe-b"])[0]["gap"]["verdict"] == "more"
    assert compare_gaps(per_model["moe-c"])[0]["gap"]["verdict"] == "equivalent"
    assert gap_trend({m: per_model[m] for m in ("moe-a", "moe-b")}, {"moe-a": 1, "moe-b": 2})[0]["slope"]["verdict"] == "more"
    assert gap_trend({m: per_model[m] for m in ("moe-b", "moe-c")}, {"moe-b": 1, "moe-c": 2})[0]["slope"]["verdict"] == "less"
    lifts = gaps(scores, {**dense, "model": "moe-b"}, dense, value="lift")
    assert lifts["gap"].to_numpy() == pytest.approx(0.2)


def token_tasks() -> list[str]:
    """Registered tasks with token inputs (the studies' domain)."""
    def has_vocab(name: str) -> bool:
        try:
            return bool(get_task(name).vocab)
        except NotImplementedError:
            return False

    return [name for name in list_tasks() if has_vocab(name)]


@pytest.mark.parametrize("overrides,message", [
    ({"router_label": "nope"}, "router_label 'nope' is not a single-class label of 'brackets'; valid: token_type"),
    ({"robustness": ("moe-k9-e9",)}, "robustness names unknown model 'moe-k9-e9'; valid: dense, moe-k1-e4"),
    ({"task": "superposition"}, "needs a token task"),
    ({"ks": (4, 1)}, "ks must be increasing"),
    ({"ks": (1, 64)}, "ks go up to 64 but a unit has only 32 candidate neurons"),
    ({"n_candidates": 40}, "n_candidates 40 exceeds the narrowest unit's 32 neurons"),
    ({"n_experts": ()}, "top_ks and n_experts must be non-empty"),
])
def test_bad_study_options_are_one_line_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ToylabError, match=re.escape(message)):
        resolve("sparse-probing", overrides)


def test_study_sweeps_routing_sparsity_at_fixed_active_parameters() -> None:
    study = resolve("sparse-probing")
    assert "sparse-probing" in list_studies()
    assert set(study.models) == {"dense", "label-router", *(f"moe-k{k}-e{e}" for k in (1, 2) for e in (4, 8, 16))}
    assert study.sparsity["moe-k2-e4"] == 1 and study.sparsity["moe-k1-e16"] == 4 and study.headline() == "moe-k1-e16"
    assert study.models["label-router"]["router_label"] == "depth"  # brackets' first function label
    assert all("d_expert" not in m for m in study.models.values())  # d_expert = d_mlp // top_k: active parameters match
    assert study.n_candidates == 32  # top-2 experts have 64 // 2 neurons: every unit draws 32 candidates


@pytest.mark.slow
@pytest.mark.parametrize("task", token_tasks())
def test_fast_study_through_the_cli_on_every_token_task(task: str, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        app(["study", "run", "sparse-probing", "--fast", "--task", task, "--out", str(tmp_path), "--no-progress"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    (directory,) = (tmp_path / "sparse-probing").iterdir()
    results = json.loads((directory / "results.json").read_text())
    assert not results["failed_runs"] and results["macro"] and results["comparisons"]["partition/mean_difference/kind"]
    report = (directory / "report.md").read_text()
    for label in {row["label"] for row in results["macro"]}:
        assert f"figures/lift_vs_sparsity_{label}.png" in report and (directory / "figures" / f"lift_vs_sparsity_{label}.png").is_file()
    assert "## Answers\n\n**Bottom line** (primary comparison)" in report


def test_comparisons_are_corrected_within_families_with_the_headline_primary():
    """No effect: noise gaps for 3 models x 10 groups in two comparison keys; the headline model's rows of the primary
    key form the primary family; after the correction few families keep any directional verdict."""
    from toylab.analysis.sparse_probing import adjust_comparisons
    from toylab.analysis.stats import compare

    rng = np.random.default_rng(0)
    raw = adjusted = 0
    for _ in range(30):
        comparisons = {key: [{"model": m, "label": g, "gap": compare(rng.normal(size=5), np.zeros(5))} for m in ("a", "b", "c")
                             for g in range(10)] for key in ("partition/x/label", "random/x/label")}
        trends = {"partition/x/label": [{"label": g, "slope": compare(rng.normal(size=5), np.zeros(5))} for g in range(10)]}
        families = adjust_comparisons(comparisons, trends, "partition/x/label", "b")
        assert {name: f["tests"] for name, f in families.items()} == {
            "primary": 10, "partition/x/label": 20, "random/x/label": 30, "trend: partition/x/label": 10}
        assert all("raw_verdict" in row["gap"] for rows in comparisons.values() for row in rows)
        raw += sum(f["raw"]["more"] + f["raw"]["less"] > 0 for f in families.values())
        adjusted += sum(f["adjusted"]["more"] + f["adjusted"]["less"] > 0 for f in families.values())
    assert raw > 0.6 * 120 and adjusted <= 0.1 * 120
