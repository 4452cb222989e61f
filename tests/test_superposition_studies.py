"""The superposition studies run end to end on tiny configs and report every claim with its numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from toylab.analysis.stats import compare, mean_ci
from toylab.errors import ToylabError
from toylab.models.superposition import ToyModelConfig, build_toy_model
from toylab.studies.moe_superposition import CLAIMS
from toylab.study import resolve, run_study

TINY = {
    "superposition": {
        "seeds": 2, "sparsities": (0.0, 0.99), "train": {"steps": 150, "batch_size": 128, "lr": 1e-2},
        "geometry_features": 12, "geometry_hidden": 3, "geometry_points": 3,
        "geometry_train": {"steps": 150, "batch_size": 128, "lr": 1e-2},
    },
    "moe-superposition": {
        "seeds": 2, "n_features": 8, "n_groups": 2, "capacity": 4, "experts": (1, 2), "top_k": (1,),
        "train": {"steps": 150, "batch_size": 128, "lr": 1e-2}, "n_eval": 300, "n_permutations": 20,
    },
}


@pytest.mark.parametrize("name", list(TINY))
def test_study_runs_and_reports(name: str, tmp_path: Path) -> None:
    outcome = run_study(name, TINY[name], tmp_path, progress=False)
    results = json.loads((outcome.directory / "results.json").read_text())
    report = (outcome.directory / "report.md").read_text()
    assert results["claims"] and all(claim["measured"] for claim in results["claims"])
    for claim in results["claims"]:
        assert claim["claim"] in report
    figures = sorted(p.name for p in (outcome.directory / "figures").iterdir())
    assert figures and all(f"figures/{f}" in report for f in figures)
    assert outcome.summary
    again = run_study(name, TINY[name], tmp_path, progress=False)  # finished runs are reused: same numbers
    assert json.dumps(again.results, sort_keys=True) == json.dumps(outcome.results, sort_keys=True)


def test_paper_preset_resolves_and_runs_fast(tmp_path: Path) -> None:
    """`preset=paper` fills the fields left unset with the paper's setup (explicit values win) and runs end to end."""
    paper = resolve("moe-superposition", {"preset": "paper", "n_groups": 4}).config
    assert (paper.n_features, paper.n_groups, paper.sparsity, paper.capacity_mode, paper.load_balance_weight) == (20, 4, 0.9, "per_expert", 0.0)
    assert (paper.train.lr, paper.train.weight_decay, paper.hidden(4)) == (1e-3, 0.01, paper.capacity)
    toylab = resolve("moe-superposition").config
    assert (toylab.n_features, toylab.capacity_mode, toylab.hidden(4), toylab.gate_init) == (24, "total", 3, "xavier")
    options = {"preset": "paper", "gate_init": "khot", "train": {"steps": 150, "batch_size": 256}}
    outcome = run_study("moe-superposition", options, tmp_path, fast=True, progress=False)
    claims = {claim["claim"]: claim for claim in outcome.results["claims"]}
    assert any("K-hot" in claim for claim in claims) and not any("planted" in claim for claim in claims)  # no groups
    configs = outcome.results["configurations"]
    assert {c["m"] for c in configs.values()} == {4} and "own_block_share" in configs["E2-k1"]
    assert "How the paper's setup differs" in (outcome.directory / "report.md").read_text()


@pytest.mark.parametrize(("name", "options", "message"), [
    ("superposition", {"sparsities": (0.5, 0.9)}, "must start at 0"),
    ("superposition", {"sparsities": (0.0, 1.0)}, "increasing values in"),
    ("moe-superposition", {"experts": (1, 5)}, "must divide capacity=12"),
    ("moe-superposition", {"experts": (2, 4)}, "must include 1"),
    ("moe-superposition", {"preset": "papers"}, "valid: toylab, paper"),
])
def test_bad_study_configs_are_one_line_errors(name: str, options: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(ToylabError, match=message):
        run_study(name, options, tmp_path, progress=False)


def moe_configs(rng: np.random.Generator, effect: float, seeds: int = 4) -> dict[str, dict]:
    """Per-seed results of the (E, k) configurations of `moe-superposition` drawn around known means: with `effect`,
    monosemanticity and dimensionality fall and features per dimension rise with k/E as the paper says, the loss is
    flat and routing matches k-means; with 0, every score is the same noise in every configuration."""
    configs = {}
    for e, k in ((4, 1), (2, 1), (1, 1), (2, 2), (4, 4)):
        ratio = k / e
        per_seed = {"loss": 0.1 + rng.normal(0, 0.001 if effect else 0.01, seeds),
                    "monosemanticity": 0.5 - effect * ratio + rng.normal(0, 0.05, seeds),
                    "dimensionality": 0.5 - effect * ratio + rng.normal(0, 0.05, seeds),
                    "features_per_dim": 2 + 4 * effect * ratio + rng.normal(0, 0.1, seeds)}
        c = {"E": e, "k": k, "network_sparsity": ratio, "control": False, "per_seed": per_seed}
        if e > 1:
            per_seed["kmeans_nmi"] = rng.uniform(0.7, 0.9, seeds)
            per_seed["routing_nmi"] = per_seed["kmeans_nmi"] + rng.normal(0, 0.005 if effect else 0.05, seeds)
            c["verdict"] = compare(per_seed["routing_nmi"], per_seed["kmeans_nmi"])
        configs[f"E{e}-k{k}"] = c | {name: mean_ci(v) for name, v in per_seed.items()}
    return configs


def test_claims_family_finds_the_planted_claims_and_no_direction_in_a_null() -> None:
    """Results planted as the paper predicts support every claim after the correction, the primary first; where
    nothing differs, the chance of any "more" or "less" among the claims' verdicts stays near 5%."""
    study = resolve("moe-superposition", {"seeds": 4, "n_features": 8, "n_groups": 2, "capacity": 4, "experts": (1, 2, 4)})
    rng = np.random.default_rng(0)
    results = {"configurations": moe_configs(rng, 0.6)}
    results["claim_tests"] = study.claim_tests(results["configurations"])
    families = study.test_families(results)
    assert families[CLAIMS]["role"].startswith("primary") and families[CLAIMS]["tests"] == 12
    claims = study.claims(results)
    assert claims[0]["claim"].startswith("Greater network sparsity") and "adjusted over 12 tests" in claims[0]["measured"]
    assert [c["state"] for c in claims] == ["supported"] * 8
    false = []
    for _ in range(50):
        null = {"configurations": moe_configs(rng, 0.0)}
        null["claim_tests"] = study.claim_tests(null["configurations"])
        adjusted = study.test_families(null)[CLAIMS]["adjusted"]
        false.append(adjusted["more"] + adjusted["less"] > 0)
    assert np.mean(false) <= 0.1


def test_non_negative_summaries_keep_their_intervals_in_range() -> None:
    """A loss near 0 and a count of represented features near its maximum give intervals inside their ranges."""
    study = resolve("moe-superposition", {"seeds": 3, "n_features": 8, "n_groups": 1, "capacity": 4, "experts": (1, 2)})
    model = build_toy_model(ToyModelConfig(n_features=8, n_hidden=2, n_instances=3, n_experts=2), [0, 1, 2])
    with torch.no_grad():
        model.W[1].mul_(0.1)  # seed 1's experts represent almost nothing: a large spread of `represented`
    batch = study.task.sample(200, 0)
    out = study.analyse(model, np.array([0.0, 1e-6, 3e-5]), torch.from_numpy(batch.inputs), batch.labels["group"][:, 0], {})
    assert out["loss"]["ci_low"] == 0.0 < out["loss"]["ci_high"]
    assert 0.0 <= out["represented"]["ci_low"] and out["represented"]["ci_high"] <= 8
    assert out["features_per_dim"]["ci_low"] >= 0.0


def test_no_monosemantic_feature_in_either_model_is_not_shown_never_contradicted() -> None:
    """Monosemanticity 0 in every seed of every model (as at the defaults): MoE and dense agree exactly, but at the
    floor, which says nothing about which is more monosemantic: both at floor, the claim not shown."""
    study = resolve("moe-superposition", {"seeds": 4, "n_features": 8, "n_groups": 2, "capacity": 4, "experts": (1, 2, 4)})
    results = {"configurations": moe_configs(np.random.default_rng(0), 0.6)}
    for c in results["configurations"].values():
        c["per_seed"]["monosemanticity"] = np.zeros(4)
        c["monosemanticity"] = mean_ci(np.zeros(4))
    results["claim_tests"] = study.claim_tests(results["configurations"])
    study.test_families(results)
    found = results["claim_tests"]["vs_dense"]["monosemanticity"]["E4-k1"]
    assert found["identical"] and found["both_at_floor"] and found["verdict"] == "inconclusive"
    (claim,) = [c for c in study.claims(results) if c["claim"].startswith("Top-1 MoEs more monosemantic")]
    assert claim["state"] == "not shown" and "both at floor" in claim["measured"]
