"""Targeted ablations on planted cases: an expert that alone handles a class, and the hooks against edited weights."""

import copy
import json

import numpy as np
import pytest
import torch

from toylab import get_task
from toylab.analysis.ablation import (
    FAMILIES,
    Ablation,
    ablation_analysis,
    ablation_hooks,
    balanced_kmeans,
    class_selectivity,
    diagonal_damage,
    neuron_groups,
    neuron_means,
    routing_agreement,
    selective_groups,
    summarize_ablations,
)
from toylab.cli import app
from toylab.errors import ToylabError
from toylab.models import Transformer, TransformerConfig
from toylab.study import resolve, run_study
from toylab.training import TrainConfig, train

TINY = {"d_model": 16, "n_heads": 2, "d_mlp": 32}


@pytest.fixture(scope="module")
def modes_runs(tmp_path_factory) -> dict:
    """Label-routed (mode c -> expert c), hash-routed and dense models briefly trained on `modes`, ablated."""
    task, out = get_task("modes"), tmp_path_factory.mktemp("runs")
    batch, reference = task.sample(100, 1), task.sample(100, 2)
    models = {"label": {**TINY, "ffn": "moe", "router": "label", "router_label": "mode"},
              "hash": {**TINY, "ffn": "moe", "router": "hash"}, "dense": TINY}
    cfg = TrainConfig(steps=150, n_train=2000, n_val=100, eval_every=150)
    return {name: ablation_analysis(train(task, options, cfg, out / name, progress=False).model, task, batch, reference, 4, 0)
            for name, options in models.items()}


def test_ablating_the_expert_that_alone_handles_a_mode_hurts_that_mode_only(modes_runs) -> None:
    mode = modes_runs["label"]["modes"]["zero"]["labels"]["mode"]
    for layer, causal in mode["causal"].items():
        causal = np.array(causal)
        assert (np.diag(causal) > 0.05).all(), layer  # its own mode breaks
        assert (causal[~np.eye(4, dtype=bool)] == 0).all(), layer  # the others are untouched, exactly
        assert diagonal_damage(causal, 4)["largest_other"] == 0
    rows = mode["selectivity"]["experts"]
    assert [r["class"] for r in rows] == [0, 1, 2, 3]
    assert all(r["ablation"] % 4 == r["class"] and r["other"] == 0 and r["index"] > 0.9 for r in rows)
    assert all(layer["agreement"] == 1 for layer in mode["routing"].values())


def test_hash_routed_experts_and_random_neuron_groups_are_not_mode_selective(modes_runs) -> None:
    """Negative controls: experts chosen by token id, and random groups, hurt every mode."""
    for run, family in (("hash", "experts"), ("dense", "random")):
        rows = modes_runs[run]["modes"]["zero"]["labels"]["mode"]["selectivity"][family]
        assert len(rows) == 4 and np.mean([r["index"] for r in rows]) < 0.4, run
        assert min(r["other"] for r in rows) > 0.02, run
    summary = summarize_ablations([modes_runs["label"]] * 2, [modes_runs["dense"]] * 2)
    assert set(summary["mean"]["mode"]["families"]) == {"experts", "random", "kmeans", "selective"}
    assert summary["zero"]["mode"]["verdicts"]["random"]["verdict"] == "more"


def test_class_selectivity_on_a_planted_matrix() -> None:
    damage = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.0, 0.0, -0.2]])
    counts = np.array([30, 10, 10])
    rows = class_selectivity(damage, counts, np.arange(3), min_count=5, floor=0.0)
    assert rows[0] == {"class": 0, "ablation": 0, "damage": 1.0, "other": 0.0, "index": 1.0}
    assert rows[1]["ablation"] == 1 and rows[1]["other"] == pytest.approx(0.5) and rows[1]["index"] == 0.0
    assert class_selectivity(damage, counts, np.arange(3), min_count=20) == []  # one class left: nothing to compare
    assert class_selectivity(damage, counts, np.array([2]), min_count=5, floor=0.0)[0]["index"] == 0.0  # nothing hurt


def test_routing_agreement_on_planted_matrices() -> None:
    shares = np.eye(4)[:, [0, 1, 2, 3, 0]]
    assert routing_agreement(shares, shares, np.full(5, 50)) == {"spearman": pytest.approx(1.0), "agreement": 1.0}
    assert routing_agreement(shares[[1, 2, 3, 0]], shares, np.full(5, 50))["agreement"] == 0.0


def test_balanced_kmeans_recovers_planted_groups_of_equal_size() -> None:
    rng = np.random.default_rng(0)
    truth = rng.permutation(np.repeat(np.arange(4), 8))
    vectors = np.eye(6)[truth] * 5 + 0.1 * rng.normal(size=(32, 6))
    groups = balanced_kmeans(vectors, 4, 8, seed=0)
    assert groups.shape == (4, 8) and len(set(groups.ravel())) == 32
    assert all(len(set(truth[g])) == 1 for g in groups)


def test_hooks_equal_ablations_by_edited_weights() -> None:
    """Zero-ablating an expert leaves its output bias on its tokens; zeroing a dense neuron group equals zeroing its
    output weights. Mean-ablating with the mean of constant activations changes nothing."""
    task = get_task("modes")
    batch = task.sample(20, 0)
    tokens = torch.from_numpy(batch.inputs)
    moe = Transformer(TransformerConfig(len(task.vocab), task.seq_len, **TINY, ffn="moe")).eval()
    edited = copy.deepcopy(moe)
    with torch.no_grad():
        edited.blocks[1].mlp.W_out[2] = 0
        hooked = moe.run_with_hooks(tokens, fwd_hooks=ablation_hooks(Ablation("experts", 1, 2), "zero", neuron_means(moe, task, batch)))
    torch.testing.assert_close(hooked, edited(tokens))
    dense = Transformer(TransformerConfig(len(task.vocab), task.seq_len, **TINY)).eval()
    (group,) = [g for g in neuron_groups(dense, 4, seed=0) if (g.family, g.layer, g.unit) == ("random", 1, 1)]
    assert len(group.neurons) == 8
    edited = copy.deepcopy(dense)
    with torch.no_grad():
        edited.blocks[1].mlp.W_out.weight[:, list(group.neurons)] = 0
        hooked = dense.run_with_hooks(tokens, fwd_hooks=ablation_hooks(group, "zero", neuron_means(dense, task, batch)))
    torch.testing.assert_close(hooked, edited(tokens))


def test_selective_groups_take_the_neurons_most_active_on_each_class() -> None:
    task = get_task("modes")
    reference = task.sample(60, 0)
    dense = Transformer(TransformerConfig(len(task.vocab), task.seq_len, **TINY)).eval()
    planted = torch.zeros(60, task.seq_len, 32)
    planted[..., 7] = torch.from_numpy(reference.labels["mode"] == 2).float()  # neuron 7 of layer 0 fires on mode 2 only
    dense.blocks[0].mlp.hook_post.register_forward_hook(lambda module, args, out: planted)
    groups = [g for g in selective_groups(dense, task, reference, 8) if g.label == "mode" and g.layer == 0]
    assert [g.unit for g in groups] == [0, 1, 2, 3] and all(len(g.neurons) == 8 for g in groups)
    assert [7 in g.neurons for g in groups] == [False, False, True, False]


TINY_STUDY = {"seeds": 1, "control_seeds": 1, "n_eval": 24, "min_count": 5, "model": {**TINY, "n_layers": 2},
              "train": {"steps": 16, "n_train": 128, "n_val": 32, "eval_every": 8}}


def test_tiny_study_writes_results_figures_and_report(tmp_path) -> None:
    outcome = run_study("ablation", {**TINY_STUDY, "task_options": {"max_length": 12}}, out=tmp_path, progress=False)
    results, directory = outcome.results, outcome.directory
    assert set(results["per_seed"]) == {"dense", "moe", "control"} and not results["failed_runs"]
    assert results["control"]["zero"]["0"]["largest_other"] == 0  # the label-routed control never leaks
    assert set(results["selectivity"]["zero"]["depth"]["families"]) == set(FAMILIES)
    report = (directory / "report.md").read_text()
    assert report.startswith("# Targeted ablations on `brackets`\n\n**Bottom line.**") and "## Positive control" in report
    assert {p.name for p in (directory / "figures").iterdir()} >= {"selectivity.png", "causal_moe.png", "control.png"}
    assert outcome.summary and "vs selective" in outcome.summary[0]


@pytest.mark.parametrize("overrides,message", [
    ({"model": {"d_mlp": 2}}, "cannot form 4 neuron groups"),
    ({"margin": 2}, "margin must be in (0, 1)"),
    ({"task": "superposition"}, "real-valued inputs"),
])
def test_bad_study_options_are_one_line_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ToylabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve("ablation", overrides)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["brackets", "gridworld", "modes"])
def test_fast_study_through_the_cli_on_every_token_task(task: str, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        app(["study", "run", "ablation", "--fast", "--task", task, "--out", str(tmp_path), "--no-progress"])
    assert exit_info.value.code == 0
    assert "vs selective" in capsys.readouterr().out
    (directory,) = (tmp_path / "ablation").iterdir()
    results = json.loads((directory / "results.json").read_text())
    assert results["selectivity"] and not results["failed_runs"]
    assert (directory / "report.md").is_file() and (directory / "figures" / "selectivity.png").is_file()


@pytest.mark.slow
def test_default_study_shows_the_positive_control_in_every_layer(tmp_path) -> None:
    """Acceptance (issue 13): ablating the expert of mode c hurts mode c and leaves the others."""
    results = run_study("ablation", {"seeds": 2}, out=tmp_path, progress=False, workers=2).results
    for mode, layers in results["control"].items():
        for layer, found in layers.items():
            assert found["verdict"]["verdict"] == "more" and found["largest_other"] == 0, (mode, layer)
