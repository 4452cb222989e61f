"""Function vs state: a label planted at one site is found there and not elsewhere; the contrast, its verdict and the
families of tests."""

import json
import re

import numpy as np
import pytest
import torch
from test_sparse_probing import token_tasks

from toylab import get_task
from toylab.analysis.function_state import (
    PLANTED, SITES, adjust_function_state, contrasts, function_state, planted_probes, planted_site, site_probes,
    summarize_function_state,
)
from toylab.analysis.stats import compare
from toylab.cli import app
from toylab.errors import ToylabError
from toylab.models import Transformer, TransformerConfig
from toylab.registry import list_studies
from toylab.study import resolve
from toylab.task import IGNORE


def test_label_planted_at_one_site_is_found_there_only() -> None:
    """`computed` is only in the expert output, `identity` only in the router input and the residual."""
    rng = np.random.default_rng(0)
    n, d = 2400, 12
    computed, identity = rng.integers(0, 3, n), rng.integers(0, 4, n)
    directions = rng.normal(size=(2, 4, d))
    noise = lambda: rng.normal(size=(n, d))  # noqa: E731
    acts = {
        "router_input": directions[1][identity] + noise(),
        "ffn_out": directions[0][computed] + noise(),
        "resid_post": directions[1][identity] + noise(),
    }
    identity[:100] = IGNORE  # undefined rows are left out
    rows = site_probes(acts, {"computed": computed, "identity": identity}, groups=np.arange(n) // 24)
    share = {(r["site"], r["label"]): r["share"] for r in rows}
    assert share["ffn_out", "computed"] > 0.8 and share["resid_post", "identity"] > 0.8 and share["router_input", "identity"] > 0.8
    assert abs(share["router_input", "computed"]) < 0.1 and abs(share["ffn_out", "identity"]) < 0.1
    assert {r["n_train"] + r["n_test"] for r in rows if r["label"] == "identity"} == {n - 100}


def fake_rows(model: str, seed: int, function_gap: float, layer: int = 0) -> list[dict]:
    """Share rows where the FFN output is `function_gap` closer to the residual for the function label than for the state
    one, and a planted site of equal shares."""
    jitter = 0.01 * np.random.default_rng(seed).normal()
    rows = []
    for label, ffn in (("depth", 0.8 + function_gap + jitter), ("token", 0.8)):
        for site, value in (("router_input", 0.9), ("ffn_out", ffn), ("resid_post", 0.9), (PLANTED, 0.5)):
            rows.append({"model": model, "seed": seed, "layer": layer, "label": label, "site": site,
                         "accuracy": value, "baseline": 0.3, "shuffled": 0.3, "share": value})
    return rows


def test_contrast_verdicts() -> None:
    kinds = {"depth": "function", "token": "state"}
    rows = [r for s in range(3) for r in fake_rows("moe", s, 0.2 + 0.01 * s) + fake_rows("dense", s, 0.005 * s)]  # seeds differ a little
    summary = summarize_function_state(rows, kinds)
    verdicts = {c["model"]: c for c in summary["contrasts"]}
    assert verdicts["moe"]["vs_planted"]["verdict"] == "more" and verdicts["moe"]["contrast"]["mean"] == pytest.approx(0.2, abs=0.02)
    assert verdicts["dense"]["vs_planted"]["verdict"] == "equivalent" and verdicts["dense"]["planted"]["mean"] == pytest.approx(0)
    (primary,) = summary["primary"]
    assert primary["verdict"]["verdict"] == "more" and primary["verdict"]["mean"] == pytest.approx(0.2, abs=0.02)
    assert len(summary["sites"]) == 2 * 2 * 4 and summary["sites"][0]["kind"] in kinds.values()


def test_primary_family_finds_a_planted_difference_at_every_layer_and_states_the_claim() -> None:
    """The MoE's FFN output favours function labels by 0.2 at both layers, the dense one's not at all: after the
    correction over the two layers the primary verdicts read *more* (claim supported), and each model's contrast vs its
    planted reference is a secondary family of its own (MoE *more*, dense *equivalent*)."""
    kinds = {"depth": "function", "token": "state"}
    rows = [r for s in range(3) for layer in (0, 1) for r in fake_rows("moe", s, 0.2 + 0.01 * s, layer) + fake_rows("dense", s, 0.005 * s, layer)]
    summary = summarize_function_state(rows, kinds)
    families = adjust_function_state(summary)
    assert list(families) == ["primary", "vs_planted"] and families["primary"]["role"].startswith("primary: ")
    assert families["primary"]["tests"] == 2 and families["primary"]["adjusted"]["more"] == 2 and families["vs_planted"]["tests"] == 4
    assert all(row["verdict"]["family_size"] == 2 and row["verdict"]["p_adjusted"] < 0.05 for row in summary["primary"])
    assert {(c["model"], c["vs_planted"]["verdict"]) for c in summary["contrasts"]} == {("moe", "more"), ("dense", "equivalent")}
    lines = resolve("function-state", fast=True).bottom_line(summary)
    assert len(lines) == 2 and all("a dense MLP is **supported**" in line for line in lines)


def test_without_a_difference_the_corrected_primary_family_rarely_says_more_or_less() -> None:
    """200 studies of 4 layers, 3 seeds, MoE and dense excess drawn alike: any *more* or *less* in the primary family
    after the correction in at most ~5% of them, where the uncorrected verdicts give one far more often; the claim of
    an inconclusive layer reads "not shown"."""
    rng = np.random.default_rng(0)
    raw = adjusted = 0
    for _ in range(200):
        summary = {"primary": [{"layer": layer, "verdict": compare(rng.normal(0, 0.1, 3), rng.normal(0, 0.1, 3))} for layer in range(4)],
                   "contrasts": []}
        family = adjust_function_state(summary)["primary"]
        raw += family["raw"]["more"] + family["raw"]["less"] > 0
        adjusted += family["adjusted"]["more"] + family["adjusted"]["less"] > 0
    assert raw / 200 > 0.2 and adjusted / 200 <= 0.08, (raw, adjusted)
    row = {"layer": 0, "excess": {"moe": {"mean": 0.0}, "dense": {"mean": 0.0}},
           "verdict": compare([0.1, -0.2, 0.15], [0.0, 0.0, 0.0])}
    adjust_function_state({"primary": [row], "contrasts": []})
    (line,) = resolve("function-state", fast=True).bottom_line({"primary": [row]})
    assert row["verdict"]["verdict"] == "inconclusive" and "is **not shown**" in line


def test_planted_site_has_the_same_share_for_every_label() -> None:
    """Equal shares for labels of any class count and skew, and for labels that depend on each other."""
    rng = np.random.default_rng(0)
    n = 4000
    depth = rng.integers(0, 5, n)
    labels = {"binary": (rng.random(n) < 0.7).astype(int), "many": rng.integers(0, 12, n),
              "skewed": rng.choice(4, n, p=[0.55, 0.25, 0.15, 0.05]), "depth": depth, "depth_parity": depth % 2}
    labels["many"][:300] = IGNORE
    site = planted_site(labels["many"], 0.5, seed=1)
    assert site.shape == (n, 12) and not site[:300].any() and (site[300:].sum(1) == 1).all()
    rows = planted_probes(labels, groups=np.arange(n) // 20)
    assert {r["site"] for r in rows} == {PLANTED} and {r["label"] for r in rows} == set(labels)
    assert all(abs(r["share"] - 0.5) < 0.06 for r in rows), [(r["label"], r["share"]) for r in rows]


def embed(labels: dict[str, np.ndarray], keep: dict[str, float], rng: np.random.Generator, d: int = 24) -> np.ndarray:
    """Activations `[n, d]` that carry each label with share `keep[label]`: the true class with that probability (else a
    constant), as random class directions plus noise."""
    x = 0.1 * rng.normal(size=(len(next(iter(labels.values()))), d))
    for name, values in labels.items():
        shown = np.where(rng.random(len(values)) < keep[name], values, 0)
        x += 3 * rng.normal(size=(values.max() + 1, d))[shown]
    return x


def test_a_site_of_equal_shares_is_not_function_more_than_state() -> None:
    """The FFN output carries every label equally; the residual carries state labels at the ceiling and function labels
    less (more so in the MoE). Today's contrast against 0 says "function more than state"; the contrast against the
    planted site of equal shares, and the MoE-vs-dense primary result, must not."""
    kinds = {"token": "state", "depth": "function"}
    rows = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        n = 600
        labels, groups = {"token": rng.integers(0, 4, n), "depth": rng.integers(0, 3, n)}, np.arange(n) // 24
        planted = planted_probes(labels, groups, seed)
        for model, function_in_resid in (("moe", 0.5), ("dense", 0.9)):
            acts = {"ffn_out": embed(labels, {"token": 0.6, "depth": 0.6}, rng), "resid_post": embed(labels, {"token": 1.0, "depth": function_in_resid}, rng)}
            rows += [{"model": model, "seed": seed, "layer": 0, **row} for row in site_probes(acts, labels, groups, seed) + planted]
    summary = summarize_function_state(rows, kinds)
    contrasts_ = {c["model"]: c for c in summary["contrasts"]}
    assert contrasts_["moe"]["contrast"]["ci_low"] > 0.2  # the old verdict, contrast vs 0: "more"
    for model in ("moe", "dense"):
        assert contrasts_[model]["vs_planted"]["verdict"] in ("equivalent", "inconclusive")
    (primary,) = summary["primary"]
    assert primary["verdict"]["verdict"] in ("equivalent", "inconclusive")
    raw = contrasts(rows, kinds).pivot_table(index="seed", columns="model", values="contrast")
    assert compare(raw["moe"], raw["dense"])["verdict"] == "more"  # the MoE-vs-dense difference of raw contrasts is fooled


def test_model_sites_and_ffn_output_is_the_weighted_expert_sum() -> None:
    task = get_task("brackets")
    torch.manual_seed(0)
    cfg = TransformerConfig(len(task.vocab), task.seq_len, d_model=16, n_heads=2, d_mlp=16, ffn="moe", n_experts=4, top_k=2, n_layers=1)
    model, batch = Transformer(cfg).eval(), task.sample(60, 0)
    _, cache = model.run_with_cache(torch.from_numpy(batch.inputs), names=["blocks.0.hook_mlp_out", "blocks.0.mlp.*"])
    weighted = (cache["blocks.0.mlp.hook_expert_out"] * cache["blocks.0.mlp.hook_expert_weights"].unsqueeze(-1)).sum(2)
    torch.testing.assert_close(cache[SITES["ffn_out"].format(layer=0)], weighted)
    rows = function_state(model, task, batch, names=["depth", "stack_top"])
    assert {(r["site"], r["label"], r["layer"]) for r in rows} == {(s, n, 0) for s in (*SITES, PLANTED) for n in ("depth", "stack_top")}


@pytest.mark.parametrize("overrides,message", [
    ({"task": "superposition"}, "function-state needs a token task"),
    ({"margin": 0}, "margin must be in (0, 1)"),
    ({"model": {"n_heads": 3}}, "divisible by n_heads=3"),
])
def test_bad_study_options_are_one_line_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ToylabError, match=re.escape(message)):
        resolve("function-state", overrides)


@pytest.mark.slow
@pytest.mark.parametrize("task", token_tasks())
def test_fast_study_through_the_cli_on_every_token_task(task: str, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        app(["study", "run", "function-state", "--fast", "--task", task, "--out", str(tmp_path), "--no-progress"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    assert "function-state" in list_studies()
    (directory,) = (tmp_path / "function-state").iterdir()
    results = json.loads((directory / "results.json").read_text())
    assert not results["failed_runs"] and {c["model"] for c in results["contrasts"]} == {"dense", "moe"}
    assert {r["site"] for r in results["sites"]} == {*SITES, PLANTED} and results["primary"]
    report = (directory / "report.md").read_text()
    assert "## Bottom line" in report and (directory / "figures" / "shares.png").is_file() and "figures/shares.png" in report
