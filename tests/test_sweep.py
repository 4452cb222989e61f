"""Sweeps: the grid, its parsing, and one invocation that runs and summarizes every configuration."""

import csv
import json
from pathlib import Path

import pytest

from toylab import ToylabError
from toylab.sweep import grid, parse_sweep, run_sweep


def test_parse_and_grid() -> None:
    sweep = parse_sweep(["n_experts=4, 8", "train.steps=10,20,30"])
    assert sweep == {"n_experts": ["4", "8"], "train.steps": ["10", "20", "30"]}
    points = grid(sweep)
    assert len(points) == 6 and points[0] == {"n_experts": "4", "train.steps": "10"} and points[1]["train.steps"] == "20"


@pytest.mark.parametrize("bad", ["n_experts", "=4,8", "n_experts=", "n_experts=4 n_experts=8"])
def test_bad_sweeps_are_one_line_errors(bad: str) -> None:
    with pytest.raises(ToylabError, match="sweep"):
        parse_sweep(bad.split(" "))


def test_a_bad_point_fails_before_any_configuration_trains(tmp_path) -> None:
    with pytest.raises(ToylabError, match="top_k"):
        run_sweep("expert-specialization", {"top_k": ["1", "7"]}, {"seeds": 2}, tmp_path, fast=True, progress=False)
    assert not list(tmp_path.rglob("final.json"))


def test_a_sweep_runs_every_configuration_and_reuses_them(tmp_path) -> None:
    overrides = {"seeds": 2, "train": {"steps": 20, "eval_every": 20, "n_train": 128, "n_val": 32}}
    outcome = run_sweep("expert-specialization", {"n_experts": ["2", "3"]}, overrides, tmp_path, fast=True, progress=False)
    runs = {row["run"] for row in outcome.rows}
    assert len(runs) == 2 and {row["n_experts"] for row in outcome.rows} == {"2", "3"}
    with open(outcome.directory / "summary.csv") as f:
        assert list(csv.DictReader(f)) == [{k: str(v) for k, v in row.items()} for row in outcome.rows]
    assert json.loads((outcome.directory / "sweep.json").read_text())["runs"] == sorted(runs)
    assert all(json.loads((Path(run) / "config.json").read_text())["n_experts"] in (2, 3) for run in runs)
    again = run_sweep("expert-specialization", {"n_experts": ["2", "3"]}, overrides, tmp_path, fast=True, progress=False)
    assert again.directory == outcome.directory and again.rows == outcome.rows
    for run in runs:
        assert json.loads((Path(run) / "timing.json").read_text())["runs_trained"] == 0
