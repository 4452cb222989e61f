"""Representational similarity on planted cases: CKA against its formula, RSA, Procrustes probe transfer, and every pair
of architectures against the seed-to-seed levels."""

import json

import numpy as np
import pytest
from scipy.stats import ortho_group

from toylab.analysis.similarity import (
    OTHER_PAIRS, PRIMARY, Procrustes, adjust_families, linear_cka, pair_similarity, probe_transfer, rsa, summarize_pairs,
    summarize_similarity, transfer_splits,
)
from toylab.analysis.stats import claim_everywhere
from toylab.cli import app
from toylab.errors import ToylabError
from toylab.registry import get_task
from toylab.schema import validate_results
from toylab.study import resolve, run_study


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
    task = get_task("brackets", max_length=8)
    batch = task.sample(4, seed=0)
    tokens = int(task.positions(batch).sum())
    with pytest.raises(ToylabError, match="same depth"):
        pair_similarity(np.zeros((3, tokens, 4)), np.zeros((2, tokens, 4)), task, batch, 10, 0)


def planted_replicates(levels: dict[str, float], transfer: float, rng: np.random.Generator, replicates: int = 4,
                       noise: float = 0.01) -> list[dict]:
    """`summarize_similarity` input for three layers: per replicate, CKA and RSA at `levels[kind]` for each kind (`x-x`: two
    seeds of architecture x, one pair; `x-y`: across, two pairs), and a probe of `depth` scoring 0.90 on its own
    architecture, `transfer` carried to another (0.90 to another seed of its own) and 0.30 with a shuffled alignment; all
    plus noise."""
    def rows(kind: str) -> list[dict]:
        a, b = kind.split("-")
        carried = transfer if a != b else 0.9
        return [{"layer": layer, **{m: levels[kind] + rng.normal(0, noise) for m in ("cka", "rsa")},
                 "probes": {"depth": {d: {"in_architecture": 0.9, "transfer": carried + rng.normal(0, noise), "shuffled": 0.3,
                                          "baseline": 0.25} for d in ("a_to_b", "b_to_a")}}} for layer in range(3)]

    return [{kind: [rows(kind) for _ in range(1 if kind.split("-")[0] == kind.split("-")[1] else 2)] for kind in levels}
            for _ in range(replicates)]


def primary_verdicts(summary: dict) -> list[str]:
    return [v["verdict"] for v in summary["similarity"]["2"]["cka"]["verdicts"].values()]


def test_families_find_planted_differences_and_the_primary_comes_first() -> None:
    """Planted: the dense–MoE CKA 0.3 below the level between seeds, and probes that lose 0.4 accuracy when carried
    across. The primary (last-layer CKA vs both references) is *less* after correction, so the claim *the same
    representation* is contradicted; the probes' transfer is *less* than in-architecture and *more* than shuffled."""
    summary = summarize_similarity(planted_replicates({"dense-dense": 0.85, "moe-moe": 0.8, "dense-moe": 0.525}, 0.5,
                                                      np.random.default_rng(0)))
    families = adjust_families({"dense-moe": summary}, "dense-moe")
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
    adjust_families({"dense-moe": summary}, "dense-moe")
    assert primary_verdicts(summary) == ["equivalent", "equivalent"]
    assert claim_everywhere(primary_verdicts(summary), ("equivalent", "more")) == "supported"
    rng, directional = np.random.default_rng(2), 0
    for _ in range(30):
        found = summarize_similarity(planted_replicates(dict.fromkeys(("dense-dense", "moe-moe", "dense-moe"), 0.85), 0.9, rng,
                                                        replicates=3, noise=0.03))
        adjust_families({"dense-moe": found}, "dense-moe")
        directional += any(v in ("more", "less") for v in primary_verdicts(found))
    assert directional <= 4  # at most 5% expected; 13% leaves room for chance
    assert claim_everywhere(["equivalent", "inconclusive"], ("equivalent", "more")) == "not shown"


def test_every_pair_is_summarized_on_its_own_replicates_and_other_pairs_form_secondary_families() -> None:
    """Planted: dense–MoE within the seed-to-seed range, dense–LSTM and MoE–LSTM 0.3 below it, and one replicate without
    its LSTM seed pair (a failed run). The LSTM pairs are summarized over the 3 replicates that hold all their kinds and
    read *less*, in their own families; the primary family and its verdicts are those of a dense-and-MoE-only study."""
    levels = {"dense-dense": 0.85, "moe-moe": 0.8, "lstm-lstm": 0.8, "dense-moe": 0.825, "dense-lstm": 0.5, "moe-lstm": 0.5}
    replicates = planted_replicates(levels, 0.9, np.random.default_rng(3))
    del replicates[0]["lstm-lstm"]
    pairs = summarize_pairs(replicates, ["dense", "moe", "lstm"])
    assert {pair: s["replicates"] for pair, s in pairs.items()} == {"dense-moe": 4, "dense-lstm": 3, "moe-lstm": 3}
    alone = summarize_similarity([{k: v for k, v in r.items() if "lstm" not in k} for r in replicates])
    assert adjust_families(pairs, "dense-moe")[PRIMARY] == adjust_families({"dense-moe": alone}, "dense-moe")[PRIMARY]
    assert pairs["dense-moe"]["similarity"] == alone["similarity"]
    families = adjust_families(summarize_pairs(replicates, ["dense", "moe", "lstm"]), "dense-moe")
    assert families[PRIMARY]["tests"] == 2 and families[f"{PRIMARY}, {OTHER_PAIRS}"]["tests"] == 4
    assert families[f"RSA, {OTHER_PAIRS}"]["tests"] == 12 and families[f"probe transfer vs seed transfer, {OTHER_PAIRS}"]["tests"] == 12
    assert families[f"{PRIMARY}, {OTHER_PAIRS}"]["role"].startswith("secondary")
    assert primary_verdicts(pairs["dense-moe"]) == ["equivalent", "equivalent"]
    assert primary_verdicts(pairs["dense-lstm"]) == primary_verdicts(pairs["moe-lstm"]) == ["less", "less"]
    assert set(pairs["moe-lstm"]["probes"]["depth"]["2"]) == {"moe→lstm", "lstm→moe"}
    assert summarize_pairs(replicates[:1], ["dense", "lstm"]) == {}  # no replicate holds both seed pairs: nothing to say


def test_identical_representations_read_as_two_seeds_and_random_ones_less() -> None:
    """Planted residual streams on real tokens: dense, MoE and LSTM models of one seed carry the same representation
    (rotated, plus 1% noise; two seeds differ more), GRU models independent noise. Every pair of the first three reads
    as similar as two seeds (CKA about 1 between two architectures of one seed); every pair with the GRU reads *less*."""
    task = get_task("brackets", max_length=12)
    batch = task.sample(30, seed=0)
    n, d, rng = int(task.positions(batch).sum()), 8, np.random.default_rng(4)
    architectures = ["dense", "moe", "lstm", "gru"]
    rotations = {arch: ortho_group.rvs(d, random_state=i) for i, arch in enumerate(architectures)}
    replicates = []
    for _ in range(4):
        shared = rng.normal(size=(2, n, d))
        seeds = [shared + 0.5 * rng.normal(size=shared.shape) for _ in range(2)]
        streams = {(arch, u): (seed + 0.01 * rng.normal(size=seed.shape)) @ rotations[arch] if arch != "gru"
                   else rng.normal(size=seed.shape) for arch in architectures for u, seed in enumerate(seeds)}
        kinds = {f"{a}-{a}": [((a, 0), (a, 1))] for a in architectures}
        kinds |= {f"{a}-{b}": [((a, 0), (b, 1)), ((a, 1), (b, 0))] for i, a in enumerate(architectures) for b in architectures[i + 1:]}
        replicates.append({kind: [pair_similarity(streams[x], streams[y], task, batch, 200, 0, min_rows=n + 1) for x, y in runs]
                           for kind, runs in kinds.items()})
    assert linear_cka(streams["dense", 0][1], streams["lstm", 0][1]) > 0.99
    pairs = summarize_pairs(replicates, architectures)
    adjust_families(pairs, "dense-moe")
    study = resolve("transfer", {"architectures": ",".join(architectures)})
    results = {"architectures": architectures, "architecture_pairs": pairs}
    similar = {"dense-moe", "dense-lstm", "moe-lstm"}
    assert study.pair_states(results) == {pair: "supported" if pair in similar else "contradicted" for pair in pairs}
    assert all(pairs[pair]["similarity"]["1"]["cka"][pair]["mean"] < 0.05 for pair in set(pairs) - similar)
    line = study.bottom_line(results)
    assert "**supported**" in line and "two seeds (*equivalent* or *more* against both seed-to-seed levels): dense–MoE, dense–LSTM, MoE–LSTM." in line
    assert "(*less* against either): dense–GRU, MoE–GRU, LSTM–GRU. not shown (some verdict inconclusive): none." in line
    values, notes = study.similarity_matrices(results)
    assert values["CKA"].loc["LSTM", "dense"] == pytest.approx(values["CKA"].loc["dense", "dense"], abs=0.02)
    assert notes["CKA"].loc["dense", "GRU"] == "less" and notes["CKA"].loc["GRU", "GRU"] == "seeds"


def test_architectures_must_hold_the_primary_pair_and_name_known_models() -> None:
    with pytest.raises(ToylabError, match="architectures must name dense and moe"):
        resolve("transfer", {"architectures": "dense,lstm"})
    with pytest.raises(ToylabError, match="each once"):
        resolve("transfer", {"architectures": "dense,moe,moe"})
    with pytest.raises(ToylabError, match="invalid value 'rnn' for 'architectures'"):
        resolve("transfer", {"architectures": "dense,moe,rnn"})
    study = resolve("transfer", {"architectures": "gru,moe,dense", "model": {"d_model": 16, "n_layers": 3}})
    assert list(study.models) == ["dense", "moe", "gru"] and study.models["gru"] == {"arch": "gru", "d_model": 16, "n_layers": 3}


def test_tiny_study_with_an_lstm_writes_results_figures_and_report(tmp_path, checked_figures) -> None:
    tiny = {"competence": 0, "replicates": 1, "n_eval": 24, "n_tokens": 100, "task_options": {"max_length": 12},
            "model": {"d_model": 16, "n_heads": 2, "d_mlp": 32, "n_layers": 1},
            "train": {"steps": 16, "n_train": 128, "n_val": 32, "eval_every": 8}}
    outcome = run_study("transfer", tiny, out=tmp_path, progress=False)
    results, directory = outcome.results, outcome.directory
    validate_results(results, "transfer")
    assert results["architectures"] == ["dense", "moe", "lstm"] and len(results["pairs"]) == 9 and not results["failed_runs"]
    assert {pair: s["replicates"] for pair, s in results["architecture_pairs"].items()} == {"dense-moe": 1, "dense-lstm": 1, "moe-lstm": 1}
    assert set(results["architecture_pairs"]["dense-lstm"]["similarity"]) == {"0", "1"}
    first = results["pairs"][0]["layers"][0]
    assert set(first["probes"]["depth"]) == {"a_to_b", "b_to_a"}  # CKA's values: checked against its formula above
    assert set(results["architecture_pairs"]["moe-lstm"]["probes"]["depth"]["1"]) == {"moe→lstm", "lstm→moe"}
    assert results["performance"]["lstm-seed1"] is not None and set(results["performance_summary"]) == {"dense", "moe", "lstm"}
    assert set(results["test_families"]) >= {PRIMARY, f"{PRIMARY}, {OTHER_PAIRS}"}
    report = (directory / "report.md").read_text()
    assert report.startswith("# Do dense and MoE transformers learn the same representation?") and "## Which labels' probes transfer?" in report
    assert "MoE–LSTM" in report and "not shown (some verdict inconclusive): dense–MoE, dense–LSTM, MoE–LSTM." in report
    assert {"similarity_matrix", "similarity", "probe_transfer", "probe_transfer_dense-lstm", "probe_transfer_moe-lstm"} <= set(checked_figures)
    assert {name: problems for name, problems in checked_figures.items() if problems} == {}
    assert {row["pair"] for row in outcome.summary} == {"dense–MoE", "dense–LSTM", "MoE–LSTM"}


@pytest.mark.slow
@pytest.mark.parametrize("task", ["brackets", "gridworld", "modes"])
def test_fast_study_through_the_cli_on_every_token_task(task: str, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        app(["study", "run", "transfer", "--fast", "--task", task, "--out", str(tmp_path), "--no-progress"])
    assert exit_info.value.code == 0
    assert "dense–LSTM" in capsys.readouterr().out
    (directory,) = (tmp_path / "transfer").iterdir()
    results = json.loads((directory / "results.json").read_text())
    assert all(s["replicates"] == 3 and s["probes"] for s in results["architecture_pairs"].values()) and not results["failed_runs"]
    assert (directory / "report.md").is_file() and (directory / "figures" / "probe_transfer.png").is_file()
