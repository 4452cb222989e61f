"""Representational similarity on planted cases: CKA against its formula, RSA, and Procrustes probe transfer."""

import json

import numpy as np
import pytest
from scipy.stats import ortho_group

from toylab.analysis.similarity import (
    PRIMARY, Procrustes, adjust_families, linear_cka, probe_transfer, rsa, summarize_similarity, transfer_splits,
)
from toylab.analysis.stats import claim_everywhere
from toylab.cli import app
from toylab.errors import ToylabError
from toylab.study import run_study


def direct_cka(x: np.ndarray, y: np.ndarray, debiased: bool) -> float:
    """CKA from the n x n Gram matrices, written as in Kornblith et al. (2019) and Song et al. (2012)."""
    n = len(x)

    def hsic(K: np.ndarray, L: np.ndarray) -> float:
        if not debiased:
            H = np.eye(n) - np.ones((n, n)) / n
            return np.trace(K @ H @ L @ H) / (n - 1) ** 2
        K, L = K - np.diag(np.diag(K)), L - np.diag(np.diag(L))
        one = np.ones(n)
        return (np.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * one @ K @ L @ one) / (n * (n - 3))

    K, L = x @ x.T, y @ y.T
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def signal(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activations `[n, d]` carrying a 3-class label in their first two directions, the label, and sequence ids."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(3, size=n)
    x = rng.normal(size=(n, d))
    x[:, :2] += 2.5 * np.array([[1, 0], [-0.5, 0.9], [-0.5, -0.9]])[labels]
    return x, labels, np.arange(n) // 10


@pytest.mark.parametrize("debiased", [True, False])
@pytest.mark.parametrize("n,dx,dy", [(6, 3, 2), (10, 4, 7), (25, 5, 5)])
def test_cka_matches_the_formula_on_small_cases(debiased: bool, n: int, dx: int, dy: int) -> None:
    rng = np.random.default_rng(n + dx)
    x = rng.normal(size=(n, dx)) + 3.0  # uncentered: the debiased estimator must not depend on centering
    y = x[:, :1] * rng.normal(size=dy) + rng.normal(size=(n, dy))
    assert linear_cka(x, y, debiased) == pytest.approx(direct_cka(x, y, debiased), abs=1e-10)


def test_biased_cka_is_the_feature_space_formula() -> None:
    """Kornblith et al.'s eq.: |Y^T X|_F^2 / (|X^T X|_F |Y^T Y|_F) for centered X, Y."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 6)), rng.normal(size=(40, 3))
    x, y = x - x.mean(0), y - y.mean(0)
    expected = np.sum((y.T @ x) ** 2) / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
    assert linear_cka(x, y, debiased=False) == pytest.approx(expected)


def test_identical_and_rotated_copies_score_one_and_independent_ones_zero() -> None:
    x, _, _ = signal(600, 12, 0)
    rotated = 3.0 * x @ ortho_group.rvs(12, random_state=1) + 5.0
    independent = np.random.default_rng(2).normal(size=x.shape)
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, rotated) == pytest.approx(1.0)
    assert rsa(x, x) == pytest.approx(1.0) and rsa(x, rotated) == pytest.approx(1.0)
    assert abs(linear_cka(x, independent)) < 0.02
    assert abs(rsa(x, independent)) < 0.05


def test_debiasing_removes_the_bias_of_wide_independent_representations() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(100, 50)), rng.normal(size=(100, 50))
    assert linear_cka(x, y, debiased=False) > 0.25
    assert abs(linear_cka(x, y)) < 0.1


def test_procrustes_recovers_a_rotation_and_scale() -> None:
    x, _, _ = signal(200, 8, 3)
    rotation = ortho_group.rvs(8, random_state=4)
    fit = Procrustes.fit(x, 0.5 * x @ rotation - 1.0)
    assert fit.scale == pytest.approx(2.0)
    np.testing.assert_allclose(fit.rotation, rotation.T, atol=1e-8)
    np.testing.assert_allclose(fit(0.5 * x @ rotation - 1.0), x, atol=1e-8)


def test_probe_transfers_exactly_to_a_rotated_copy_and_not_to_an_independent_one() -> None:
    x, labels, groups = signal(2000, 10, 5)
    splits = transfer_splits(groups, seed=0)
    train, align, test = splits
    assert not (set(train) & set(align) or set(train) & set(test) or set(align) & set(test))
    assert len(train) + len(align) + len(test) == len(x)
    rotated = probe_transfer(x, 2.0 * x @ ortho_group.rvs(10, random_state=6) + 1.0, labels, splits, seed=0)
    assert rotated.in_architecture > 0.9
    assert rotated.transfer == pytest.approx(rotated.in_architecture)
    assert rotated.shuffled < rotated.baseline + 0.1  # a map fit to shuffled correspondences carries nothing
    independent = probe_transfer(x, np.random.default_rng(7).normal(size=x.shape), labels, splits, seed=0)
    assert independent.in_architecture == rotated.in_architecture
    assert independent.transfer < independent.baseline + 0.1


def test_mismatched_representations_are_one_line_errors() -> None:
    with pytest.raises(ToylabError, match="same tokens"):
        linear_cka(np.zeros((5, 2)), np.zeros((6, 2)))
    with pytest.raises(ToylabError, match="same width"):
        Procrustes.fit(np.zeros((5, 2)), np.zeros((5, 3)))


def planted_replicates(levels: dict[str, float], transfer: float, rng: np.random.Generator, replicates: int = 4,
                       noise: float = 0.01) -> list[dict]:
    """`summarize_similarity` input for three layers: per replicate, CKA and RSA at `levels[kind]` for the kinds dense–dense,
    MoE–MoE and dense–MoE (two pairs), and a probe of `depth` scoring 0.90 on its own architecture, `transfer` carried to
    the other (0.90 to another seed of its own) and 0.30 with a shuffled alignment; all plus noise."""
    def rows(kind: str) -> list[dict]:
        carried = transfer if kind == "dense-moe" else 0.9
        return [{"layer": layer, **{m: levels[kind] + rng.normal(0, noise) for m in ("cka", "rsa")},
                 "probes": {"depth": {d: {"in_architecture": 0.9, "transfer": carried + rng.normal(0, noise), "shuffled": 0.3,
                                          "baseline": 0.25} for d in ("a_to_b", "b_to_a")}}} for layer in range(3)]

    return [{kind: [rows(kind) for _ in range(2 if kind == "dense-moe" else 1)] for kind in levels} for _ in range(replicates)]


def primary_verdicts(summary: dict) -> list[str]:
    return [v["verdict"] for v in summary["similarity"]["2"]["cka"]["verdicts"].values()]


def test_families_find_planted_differences_and_the_primary_comes_first() -> None:
    """Planted: the dense–MoE CKA 0.3 below the level between seeds, and probes that lose 0.4 accuracy when carried
    across. The primary (last-layer CKA vs both references) is *less* after correction, so the claim *the same
    representation* is contradicted; the probes' transfer is *less* than in-architecture and *more* than shuffled."""
    summary = summarize_similarity(planted_replicates({"dense-dense": 0.85, "moe-moe": 0.8, "dense-moe": 0.525}, 0.5,
                                                      np.random.default_rng(0)))
    families = adjust_families(summary)
    assert list(families)[0] == PRIMARY and families[PRIMARY]["role"].startswith("primary") and families[PRIMARY]["tests"] == 2
    assert {name: f["tests"] for name, f in families.items() if name != PRIMARY} == {
        "CKA, earlier layers": 4, "RSA": 6, "probe transfer vs in-architecture": 6, "probe transfer vs shuffled alignment": 6,
        "probe transfer vs seed transfer": 6}
    assert primary_verdicts(summary) == ["less", "less"]
    assert all(v["family_size"] == 2 and "p_adjusted" in v for v in summary["similarity"]["2"]["cka"]["verdicts"].values())
    assert claim_everywhere(primary_verdicts(summary), ("equivalent", "more")) == "contradicted"
    probes = [p for layers in summary["probes"]["depth"].values() for p in layers.values()]
    assert all(p["vs_in_architecture"]["verdict"] == "less" and p["vs_shuffled"]["verdict"] == "more" for p in probes)


def test_same_representations_read_equivalent_and_no_difference_gives_no_direction() -> None:
    """Planted: the dense–MoE level between two references 0.05 apart, and probes that transfer fully: the primary is
    *equivalent* to both and the claim supported. With no difference at all (every level 0.85, noisier), at most a few
    of 30 planted studies show any *more* or *less* in their primary family after the correction."""
    summary = summarize_similarity(planted_replicates({"dense-dense": 0.85, "moe-moe": 0.8, "dense-moe": 0.825}, 0.9,
                                                      np.random.default_rng(1)))
    adjust_families(summary)
    assert primary_verdicts(summary) == ["equivalent", "equivalent"]
    assert claim_everywhere(primary_verdicts(summary), ("equivalent", "more")) == "supported"
    rng, directional = np.random.default_rng(2), 0
    for _ in range(30):
        found = summarize_similarity(planted_replicates(dict.fromkeys(("dense-dense", "moe-moe", "dense-moe"), 0.85), 0.9, rng,
                                                        replicates=3, noise=0.03))
        adjust_families(found)
        directional += any(v in ("more", "less") for v in primary_verdicts(found))
    assert directional <= 4  # at most 5% expected; 13% leaves room for chance
    assert claim_everywhere(["equivalent", "inconclusive"], ("equivalent", "more")) == "not shown"


def test_tiny_study_writes_results_figures_and_report(tmp_path) -> None:
    tiny = {"competence": 0, "replicates": 1, "n_eval": 24, "n_tokens": 100, "task_options": {"max_length": 12},
            "model": {"d_model": 16, "n_heads": 2, "d_mlp": 32}, "train": {"steps": 16, "n_train": 128, "n_val": 32, "eval_every": 8}}
    outcome = run_study("transfer", tiny, out=tmp_path, progress=False)
    results, directory = outcome.results, outcome.directory
    assert results["replicates_complete"] == 1 and len(results["pairs"]) == 4 and not results["failed_runs"]
    assert set(results["similarity"]) == {"0", "1", "2"}
    first = results["pairs"][0]["layers"][0]
    assert set(first["probes"]["depth"]) == {"a_to_b", "b_to_a"}  # CKA's values: checked against its formula above
    assert set(results["probes"]["depth"]["2"]) == {"dense→moe", "moe→dense"}
    report = (directory / "report.md").read_text()
    assert report.startswith("# Do dense and MoE transformers learn the same representation?") and "## Which labels' probes transfer?" in report
    assert (directory / "figures" / "similarity.png").is_file() and outcome.summary


@pytest.mark.slow
@pytest.mark.parametrize("task", ["brackets", "gridworld", "modes"])
def test_fast_study_through_the_cli_on_every_token_task(task: str, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        app(["study", "run", "transfer", "--fast", "--task", task, "--out", str(tmp_path), "--no-progress"])
    assert exit_info.value.code == 0
    assert "cross vs dense seeds" in capsys.readouterr().out
    (directory,) = (tmp_path / "transfer").iterdir()
    results = json.loads((directory / "results.json").read_text())
    assert results["replicates_complete"] == 3 and results["probes"] and not results["failed_runs"]
    assert (directory / "report.md").is_file() and (directory / "figures" / "probe_transfer.png").is_file()
