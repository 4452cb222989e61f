"""The superposition studies run end to end on tiny configs and report every claim with its numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toylab.errors import ToylabError
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
