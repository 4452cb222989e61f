"""k-sparse probing: a planted neuron is found at k=1, noise is at chance, the fits match scikit-learn."""

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
    binary_targets,
    binned_mutual_info,
    class_scores,
    compare_gaps,
    f1_scores,
    fit_binary_logistic,
    gap_trend,
    gaps,
    macro_f1,
    neuron_bins,
    rank_neurons,
    skipped_pairs,
    sparse_probe,
    sparse_probing,
)
from toylab.cli import app
from toylab.errors import ToylabError
from toylab.registry import list_studies, list_tasks
from toylab.study import resolve
from toylab.models import Transformer, TransformerConfig
from toylab.task import IGNORE, Label


def sequences(n: int, length: int, seed: int) -> np.ndarray:
    """Held-out rows: a quarter of the sequences of `length` tokens each."""
    ids = np.arange(n) // length
    return np.isin(ids, np.random.default_rng(seed).permutation(ids.max() + 1)[: (ids.max() + 1) // 4])


@pytest.mark.parametrize("balanced", [True, False])
def test_batched_logistic_fits_match_scikit_learn(balanced: bool) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 400, 3))
    y = np.stack([x[0, :, 0] + 0.5 * rng.normal(size=400) > 0.8, x[1, :, 1] - x[1, :, 2] > 0]).astype(int)
    for C in (0.1, 1.0, 100.0):
        w, b = fit_binary_logistic(torch.from_numpy(x), torch.from_numpy(y), C, balanced)
        for i in range(2):
            theirs = LogisticRegression(C=C, tol=1e-10, max_iter=5000, class_weight="balanced" if balanced else None).fit(x[i], y[i])
            np.testing.assert_allclose(w[i].numpy(), theirs.coef_[0], atol=1e-5)
            assert float(b[i]) == pytest.approx(theirs.intercept_[0], abs=1e-5)


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
    acts, targets, test = planted()
    result = sparse_probe(acts, targets, test, ks=(1, 4))
    assert result["kept"].all()
    for ranking in ("mean_difference", "mutual_info"):
        assert result["f1"]["neurons"][ranking][0, 0] > 0.98  # the planted class, k = 1
    assert (result["f1"]["shuffled"]["mean_difference"][0] < 0.45).all()  # no signal once the labels are permuted
    assert result["f1"]["random_basis"]["mean_difference"][0, 0] < 0.8  # one random direction mixes the neuron away

    rng = np.random.default_rng(2)
    noise = sparse_probe(rng.normal(size=acts.shape), targets, test, ks=(1, 4), rankings=("mean_difference",))
    chance = noise["f1"]["shuffled"]["mean_difference"]
    assert np.abs(noise["f1"]["neurons"]["mean_difference"] - chance).max() < 0.05  # noise is at the shuffled control
    assert np.abs(chance - 1 / 3).max() < 0.05  # balanced probe, prevalence 1/4: F1 = 2 (1/4)(1/2) / (1/4 + 1/2)


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
    acts, targets, test = planted()
    targets[:, 3] = False
    targets[:8, 3] = True
    result = sparse_probe(acts, targets, test, ks=(1,), rankings=("mean_difference",), min_count=10)
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


def test_model_probing_covers_every_expert_and_records_skips() -> None:
    task = get_task("brackets")
    torch.manual_seed(0)
    cfg = TransformerConfig(len(task.vocab), task.seq_len, d_model=16, n_heads=2, d_mlp=16, ffn="moe", n_experts=4, top_k=2, n_layers=1)
    rows = sparse_probing(Transformer(cfg).eval(), task, task.sample(60, 0), ks=(1, 2), rankings=("mean_difference",), min_count=5)
    assert {r["variant"] for r in rows} == {"neurons", "shuffled", "random_basis"}
    for row in rows:
        assert len(row["f1"]) == 2 and row["expert"] in range(4) and len(row["expert_f1"]) == 4
        assert row["f1"][0] == max(f[0] for f in row["expert_f1"] if f is not None)
        assert all((f is None) == (e in row["skipped"]) for e, f in enumerate(row["expert_f1"]))
    probed = [r for r in rows if r["variant"] == "neurons"]
    counts = skipped_pairs([{"model": "moe", **r} for r in rows])["moe"]
    assert counts == {"pairs": sum(len(r["skipped"]) for r in probed), "of": 4 * len(probed)} and counts["pairs"] > 0


def fake_rows(model: str, gap: float, seeds: int = 3) -> list[dict]:
    rng = np.random.default_rng(len(model))
    return [{"model": model, "seed": s, "layer": 0, "label": "depth", "class": c, "variant": "neurons", "ranking": "mean_difference",
             "f1": [0.5 + gap + 0.01 * rng.normal(), 0.9]}
            for s in range(seeds) for c in ("0", "1")]


def test_gaps_verdicts_and_trend() -> None:
    scores = class_scores(fake_rows("dense", 0) + fake_rows("moe-a", 0.1) + fake_rows("moe-b", 0.2) + fake_rows("moe-c", 0.0), ks=(1, 2))
    summary = pd.DataFrame(macro_f1(scores))
    assert summary.query("model == 'moe-b' and k == 1")["f1"].item()["mean"] == pytest.approx(0.7, abs=0.02)
    dense = {"model": "dense", "variant": "neurons", "ranking": "mean_difference", "k": 1}
    per_model = {m: gaps(scores, {**dense, "model": m}, dense) for m in ("moe-a", "moe-b", "moe-c")}
    assert compare_gaps(per_model["moe-b"])[0]["gap"]["verdict"] == "more"
    assert compare_gaps(per_model["moe-c"])[0]["gap"]["verdict"] == "equivalent"
    assert gap_trend({m: per_model[m] for m in ("moe-a", "moe-b")}, {"moe-a": 1, "moe-b": 2})[0]["slope"]["verdict"] == "more"
    assert gap_trend({m: per_model[m] for m in ("moe-b", "moe-c")}, {"moe-b": 1, "moe-c": 2})[0]["slope"]["verdict"] == "less"


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


@pytest.mark.slow
@pytest.mark.parametrize("task", token_tasks())
def test_fast_study_through_the_cli_on_every_token_task(task: str, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        app(["study", "run", "sparse-probing", "--fast", "--task", task, "--out", str(tmp_path), "--no-progress"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    (directory,) = (tmp_path / "sparse-probing").iterdir()
    results = json.loads((directory / "results.json").read_text())
    assert not results["failed_runs"] and results["macro_f1"] and results["comparisons"]["raw/mean_difference/kind"]
    report = (directory / "report.md").read_text()
    for label in {row["label"] for row in results["macro_f1"]}:
        assert f"figures/f1_vs_sparsity_{label}.png" in report and (directory / "figures" / f"f1_vs_sparsity_{label}.png").is_file()
    assert "## Answers" in report
