"""Causal abstraction: the site is chosen on pairs it is not scored on, verdicts compare architectures paired by seed,
bad options are one line, and the study runs end to end."""

import json

import numpy as np
import pytest

from toylab import get_task
from toylab.analysis.causal_abstraction import PARTS, abstraction_scores, adjust_abstraction, summarize_abstraction, thirds
from toylab.errors import ToylabError
from toylab.study import resolve, run_study
from toylab.training import build_model


def fake_run(rng: np.random.Generator, best: float, sites: int = 3) -> dict:
    """One model's scores: the first site holds the variable at IIA about `best`, the others at chance."""
    scores = {f"s{i}": {"das": {"iia": float(np.clip(best + rng.normal(0, 0.02), 0, 1)) if i == 0 else float(rng.uniform(0, 0.1))},
                        "random": {"iia": float(rng.uniform(0, 0.05))}, "full": {"iia": 1.0}, "none": {"iia": 0.0}} for i in range(sites)}
    return {"sites": scores, "chosen": "s0", "untrained": {"iia": float(rng.uniform(0, 0.1))}}


def test_alike_architectures_are_equivalent_and_unlike_ones_differ():
    rng = np.random.default_rng(0)
    alike = summarize_abstraction({"dense": [fake_run(rng, 0.9) for _ in range(6)], "moe": [fake_run(rng, 0.9) for _ in range(6)]}, 0.05)
    unlike = summarize_abstraction({"dense": [fake_run(rng, 0.9) for _ in range(6)], "moe": [fake_run(rng, 0.4) for _ in range(6)]}, 0.05)
    families = adjust_abstraction({"alike": alike, "unlike": unlike})
    assert alike["moe_vs_dense"]["verdict"] == "equivalent" and unlike["moe_vs_dense"]["verdict"] == "less"
    assert all(s["found"][kind]["vs_random"]["verdict"] == "more" for s in (alike, unlike) for kind in ("dense", "moe"))
    assert families["primary"]["tests"] == 2 and families["found"]["tests"] == 8 and families["sites"]["tests"] == 6
    assert alike["chosen"]["moe"] == ["s0"] * 6 and alike["chosen_iia"]["dense"]["das"]["mean"] > 0.85


def test_a_recurrent_model_is_compared_with_dense_in_its_own_family():
    """Adding an LSTM leaves the transformers' families as they were; its own tests (vs dense, found) form another."""
    rng = np.random.default_rng(2)
    runs = {kind: [fake_run(rng, best, sites) for _ in range(6)] for kind, best, sites in
            (("dense", 0.9, 3), ("moe", 0.9, 3), ("lstm", 0.5, 2))}
    alone = adjust_abstraction({"v": summarize_abstraction({k: runs[k] for k in ("dense", "moe")}, 0.05)})
    both = summarize_abstraction(runs, 0.05)
    families = adjust_abstraction({"v": both})
    assert both["vs_dense"]["lstm"]["verdict"] == "less" and len(both["sites"]["lstm"]) == 2
    assert {k: families[k] for k in alone} == alone and families["recurrent"]["tests"] == 3


def test_interventions_run_at_every_site_of_a_recurrent_model():
    task = get_task("brackets")
    model = build_model(task, {"arch": "lstm", "d_model": 8, "n_layers": 2})
    scores = abstraction_scores(model, build_model(task, {"arch": "lstm", "d_model": 8, "n_layers": 2}),
                                task.counterfactuals(30, 0, "stack_top"), rank=2, steps=2, seed=0)
    assert list(scores["sites"]) == [f"blocks.{layer}.{site}" for layer in (0, 1) for site in ("hook_hidden", "hook_resid_post")]
    assert scores["chosen"] in scores["sites"] and scores["experts"] == {}
    assert all(0 <= arm["iia"] <= 1 for site in scores["sites"].values() for arm in site.values())


def test_a_failed_seed_drops_out_of_every_comparison():
    rng = np.random.default_rng(1)
    runs = {"dense": [fake_run(rng, 0.9) for _ in range(4)], "moe": [fake_run(rng, 0.9) for _ in range(3)] + [None]}
    assert summarize_abstraction(runs, 0.05)["seeds"] == [0, 1, 2]


def test_the_pairs_are_cut_into_three_disjoint_thirds():
    pairs = get_task("modes").counterfactuals(90, 0, "mode")
    parts = thirds(pairs)
    assert list(parts) == list(PARTS) and [len(p) for p in parts.values()] == [30, 30, 30]
    rows = [{r.tobytes() for r in np.concatenate([p.base.inputs, p.source.inputs], 1)} for p in parts.values()]
    assert not (rows[0] & rows[1]) and not (rows[1] & rows[2]) and not (rows[0] & rows[2])


@pytest.mark.parametrize("options,message", [
    ({"variables": ["depth"]}, "unknown causal variable 'depth' of task 'brackets'; valid: stack_top"),
    ({"rank": 64}, r"rank must be in \[1, d_model=32\] \(got 64\)"),
    ({"task": "superposition"}, "names no causal variables"),
    ({"architectures": ["dense", "lstm"]}, "architectures must name dense and moe .* and may add lstm, gru"),
    ({"architectures": ["dense", "moe", "drc"]}, "valid: dense, moe, lstm, gru"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(ToylabError, match=message) as error:
        resolve("causal-abstraction", options, fast=True)
    assert "\n" not in str(error.value)


def test_the_study_runs_end_to_end(tmp_path):
    """Fast preset on `modes` (a smoke test): a verdict per variable, IIA at every site of both architectures."""
    overrides = {"task": "modes", "n_pairs": 90, "das_steps": 20, "train": {"steps": 150}}
    outcome = run_study("causal-abstraction", overrides, tmp_path, fast=True, progress=False, workers=2)
    results = json.loads((outcome.directory / "results.json").read_text())
    s = results["abstraction"]["mode"]
    assert set(s["sites"]) == {"dense", "moe"} and len(s["sites"]["moe"]) == 6
    assert s["moe_vs_dense"]["verdict"] in ("more", "less", "equivalent", "inconclusive")
    assert set(s["experts"]) == {"0", "1"} and s["experts"]["1"]["vs_ffn"]["verdict"] in ("more", "less", "equivalent", "inconclusive")
    assert results["test_families"]["experts"]["tests"] == 2
    report = (outcome.directory / "report.md").read_text()
    assert "IIA at the chosen site" in report and "Is the variable in an expert?" in report
