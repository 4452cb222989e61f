"""The superposition studies run end to end on tiny configs and report every claim with its numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toylab.errors import ToylabError
from toylab.study import run_study

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


@pytest.mark.parametrize(("name", "options", "message"), [
    ("superposition", {"sparsities": (0.5, 0.9)}, "must start at 0"),
    ("superposition", {"sparsities": (0.0, 1.0)}, "increasing values in"),
    ("moe-superposition", {"experts": (1, 5)}, "must divide capacity=12"),
    ("moe-superposition", {"experts": (2, 4)}, "must include 1"),
])
def test_bad_study_configs_are_one_line_errors(name: str, options: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(ToylabError, match=message):
        run_study(name, options, tmp_path, progress=False)
