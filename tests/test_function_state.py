"""Function vs state: a label planted at one site is found there and not elsewhere; the contrast and its verdict."""

import json
import re

import numpy as np
import pytest
import torch
from test_sparse_probing import token_tasks

from toylab import get_task
from toylab.analysis.function_state import SITES, function_state, site_probes, summarize_function_state
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


def fake_rows(model: str, seed: int, function_gap: float) -> list[dict]:
    """Share rows where the FFN output is `function_gap` closer to the residual for the function label than for the state one."""
    jitter = 0.01 * np.random.default_rng(seed).normal()
    rows = []
    for label, ffn in (("depth", 0.8 + function_gap + jitter), ("token", 0.8)):
        for site, value in (("router_input", 0.9), ("ffn_out", ffn), ("resid_post", 0.9)):
            rows.append({"model": model, "seed": seed, "layer": 0, "label": label, "site": site,
                         "accuracy": value, "baseline": 0.3, "shuffled": 0.3, "share": value})
    return rows


def test_contrast_verdicts() -> None:
    kinds = {"depth": "function", "token": "state"}
    rows = [r for s in range(3) for r in fake_rows("moe", s, 0.2) + fake_rows("dense", s, 0.0)]
    summary = summarize_function_state(rows, kinds)
    verdicts = {c["model"]: c["contrast"] for c in summary["contrasts"]}
    assert verdicts["moe"]["verdict"] == "more" and verdicts["moe"]["mean"] == pytest.approx(0.2, abs=0.02)
    assert verdicts["dense"]["verdict"] == "equivalent"
    assert len(summary["sites"]) == 2 * 2 * 3 and summary["sites"][0]["kind"] in kinds.values()


def test_model_sites_and_ffn_output_is_the_weighted_expert_sum() -> None:
    task = get_task("brackets")
    torch.manual_seed(0)
    cfg = TransformerConfig(len(task.vocab), task.seq_len, d_model=16, n_heads=2, d_mlp=16, ffn="moe", n_experts=4, top_k=2, n_layers=1)
    model, batch = Transformer(cfg).eval(), task.sample(60, 0)
    _, cache = model.run_with_cache(torch.from_numpy(batch.inputs), names=["blocks.0.hook_mlp_out", "blocks.0.mlp.*"])
    weighted = (cache["blocks.0.mlp.hook_expert_out"] * cache["blocks.0.mlp.hook_expert_weights"].unsqueeze(-1)).sum(2)
    torch.testing.assert_close(cache[SITES["ffn_out"].format(layer=0)], weighted)
    rows = function_state(model, task, batch, names=["depth", "stack_top"])
    assert {(r["site"], r["label"], r["layer"]) for r in rows} == {(s, n, 0) for s in SITES for n in ("depth", "stack_top")}


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
    assert {r["site"] for r in results["sites"]} == set(SITES)
    report = (directory / "report.md").read_text()
    assert "## Answers" in report and (directory / "figures" / "shares.png").is_file() and "figures/shares.png" in report
