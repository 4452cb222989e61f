"""Study `causal-abstraction`: is each variable of the task's planted causal model found, and found alike, in a dense and an MoE transformer?"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from toylab.analysis.causal_abstraction import (
    ARMS, FAMILIES, TRANSFORMERS, abstraction_scores, adjust_abstraction, summarize_abstraction,
)
from toylab.analysis.stats import INTERVAL_NOTE, MARGIN, UNIT, claim_state, mean_ci
from toylab.determinism import torch_threads
from toylab.errors import ToylabError
from toylab.registry import get_task, register_study
from toylab.report import Document, Figure, Section, Table, Text, failed_runs_section, families_section, fmt, fmt_ci, interval_bars, verdict_text
from toylab.study import Study, StudyContext, TrainJob, architecture_models, check_architectures
from toylab.training import TrainConfig, build_model, evaluate, load_trained

QUESTION = ("The study's one primary question: is each variable of the task's planted causal model represented alike in the "
            "dense and the MoE transformer? The one comparison per variable: interchange-intervention accuracy (IIA) of a "
            "learned subspace at each architecture's best site (chosen on pairs it is not scored on), MoE vs dense, paired "
            "by seed; the variables form one family.")

NOTES = """\
- **Interchange pairs**: for a variable V the task draws a *base* and a *source* sequence, both from the held-out part of its sequence space, and gives what its causal model outputs for the base with V set to the source's value (`Task.counterfactuals`; checked against independent implementations in the tests). {n_pairs} pairs per variable, cut into three disjoint thirds.
- **DAS** (distributed alignment search, Geiger et al. 2024): at a site (activations `[batch, pos, d]`, every position), an orthonormal basis Q of rank {rank} is fit on the first third ({steps} Adam steps, the model frozen) so that replacing the base's component in span(Q) by the source's makes the model output the counterfactual. **IIA** is the share of scored positions where the intervened model's top prediction is the counterfactual output, counted only where that output differs from the base's (doing nothing scores 0 there).
- **Sites** of each transformer layer l: `blocks.l.hook_resid_mid` (after attention), `blocks.l.hook_mlp_out` (the FFN's output: the dense MLP, or the MoE's weighted experts), `blocks.l.hook_resid_post` (after the block); of each recurrent layer: `blocks.l.hook_hidden` (the hidden states it adds to the stream; an intervention there changes what the layer passes on, not the state its recurrence carries) and `blocks.l.hook_resid_post`.
- **Recurrent models** (`architectures` naming lstm or gru: as wide and deep as the transformers, trained alike) answer the same question apart: DAS at their chosen site vs dense's, and found vs the random subspace and the untrained twin, in their own family, so the transformers' families and verdicts are the same with or without them.
- **Chosen site**: the site with the best IIA on the second third; every reported IIA is scored on the last third, so the chosen site's score is not the largest of noisy scores.
- **Controls** at every site: a random subspace of the same rank (DAS's starting point), the full swap of the site (it moves every variable of the source, so it is an upper reference only where the pairs differ in V alone, as brackets' do; in `modes` it also brings the source's query), no intervention; at the chosen site, DAS on the same architecture untrained.
- **Verdicts** (paired by seed, at least 3 seeds): *more* / *less* / *equivalent* within ±{margin} IIA / *inconclusive*, each corrected for multiplicity within its family (Benjamini–Hochberg). Claims read *supported*, *contradicted* or *not shown*.
- {interval}
"""


@dataclass(frozen=True)
class CausalAbstractionConfig:
    task: str = "brackets"
    task_options: dict[str, Any] = field(default_factory=dict)
    variables: tuple[str, ...] = ()
    """Causal variables to look for (empty: every one the task names)."""
    architectures: tuple[str, ...] = ("dense", "moe")
    """Models to train: the dense and MoE transformers (both required: the primary question compares them), and any of
    lstm, gru (recurrent models as wide and deep, compared with dense in their own family)."""
    seeds: int = 3
    model: dict[str, Any] = field(default_factory=lambda: {"d_model": 32, "n_heads": 2, "d_mlp": 64, "n_layers": 2})
    """Options shared by the dense and the MoE transformer (see `TransformerConfig`)."""
    n_experts: int = 4
    top_k: int = 1
    train: TrainConfig = TrainConfig(steps=1000, lr=3e-3)
    competence: float | None = None
    """Analyse only models whose held-out primary metric reaches this (None: the task's threshold, `Task.competence`;
    0: every model, a smoke test whose verdicts mean nothing)."""
    n_pairs: int = 900
    rank: int = 4
    das_steps: int = 300
    margin: float = MARGIN
    n_eval: int = 300
    pair_seed: int = 20261204

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.n_pairs < 30 or self.das_steps < 1 or self.n_eval < 1:
            raise ValueError("seeds must be >= 1, n_pairs >= 30, das_steps and n_eval >= 1")
        if not 0 < self.margin < 1:
            raise ValueError(f"margin must be in (0, 1) IIA (got {self.margin})")
        check_architectures(self.architectures)


@register_study("causal-abstraction")
class CausalAbstraction(Study):
    """Interchange interventions (DAS) against the task's planted causal model, in a dense and an MoE transformer."""

    Config = CausalAbstractionConfig
    fast = {"competence": 0.0, "seeds": 3, "n_pairs": 150, "das_steps": 40, "n_eval": 100,
            "train": {"steps": 200, "n_train": 2000, "n_val": 100, "eval_every": 100}}
    config: CausalAbstractionConfig

    def __init__(self, config: CausalAbstractionConfig) -> None:
        super().__init__(config)
        self.task = get_task(config.task, config.task_options)
        if not self.task.causal_variables:
            raise ToylabError(f"task '{config.task}' names no causal variables; tasks with a causal model: brackets, modes")
        self.variables = list(config.variables) or list(self.task.causal_variables)
        for variable in self.variables:
            if variable not in self.task.causal_variables:
                raise ToylabError(f"unknown causal variable '{variable}' of task '{config.task}'; valid: {', '.join(self.task.causal_variables)}")
        self.models = architecture_models(config, config.architectures)
        d_model = build_model(self.task, self.models["dense"]).cfg.d_model
        for options in self.models.values():  # fail early on a bad model option
            build_model(self.task, options)
        if not 1 <= config.rank <= d_model:
            raise ToylabError(f"rank must be in [1, d_model={d_model}] (got {config.rank})")

    def analyse(self, job: TrainJob, run_dir: Path) -> dict[str, Any]:
        """One trained model (in a worker, one torch thread): its performance and, per variable, its IIA at every site."""
        cfg, model = self.config, load_trained(run_dir).model
        seed = job.config.seed
        torch.manual_seed(seed + 1)  # the untrained twin: the same architecture, weights from another draw
        untrained = build_model(self.task, job.model)
        batch = self.task.sample_split(cfg.n_eval, cfg.pair_seed, "heldout")
        with torch_threads(1):
            return {"performance": evaluate(model, self.task, batch),
                    **{variable: abstraction_scores(model, untrained, self.task.counterfactuals(cfg.n_pairs, cfg.pair_seed, variable),
                                                    cfg.rank, cfg.das_steps, seed) for variable in self.variables}}

    def run(self, ctx: StudyContext) -> dict[str, Any]:
        cfg, task = self.config, self.task
        jobs = [TrainJob(f"{kind}-seed{seed}", task, options, replace(cfg.train, seed=seed))
                for seed in range(cfg.seeds) for kind, options in self.models.items()]
        ctx.train(jobs)
        analysed = ctx.analyse_runs(jobs, self.analyse, "intervening")
        runs = {kind: [analysed.get(f"{kind}-seed{seed}") for seed in range(cfg.seeds)] for kind in self.models}
        summaries = {variable: summarize_abstraction({kind: [r and r[variable] for r in found] for kind, found in runs.items()}, cfg.margin)
                     for variable in self.variables}
        return {
            "task": {"name": task.name, "options": task.options, "primary_metric": task.primary_metric},
            "variables": self.variables,
            "performance": {kind: {metric: mean_ci([r["performance"][metric] for r in found if r], bounds=None if metric == "loss" else UNIT)
                                   for metric in next((r["performance"] for r in found if r), {})} for kind, found in runs.items()},
            "abstraction": summaries,
            "test_families": adjust_abstraction(summaries),
            "runs": {job.key: str(ctx.run_dir(job.key).relative_to(ctx.directory)) for job in jobs},
        }

    def summary(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        rows = []
        for variable, s in results["abstraction"].items():
            for kind, iia in s["chosen_iia"].items():
                rows.append({"variable": variable, "model": kind, "chosen sites": ", ".join(sorted(set(s["chosen"][kind]))),
                             "IIA DAS": fmt_ci(iia["das"]), "IIA random": fmt_ci(iia["random"]), "IIA untrained": fmt_ci(iia["untrained"]),
                             "DAS vs random": s["found"][kind]["vs_random"]["verdict"]})
        return rows

    def expert_rows(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"variable": variable, "layer": layer, "experts chosen (per seed)": ", ".join(e["experts_chosen"]),
                 "IIA one expert": fmt_ci(e["expert_iia"]), "IIA whole FFN output": fmt_ci(e["ffn_iia"]), "one expert vs FFN": e["vs_ffn"]["verdict"]}
                for variable, s in results["abstraction"].items() for layer, e in s.get("experts", {}).items()]

    def bottom_line(self, results: dict[str, Any]) -> list[str]:
        lines = []
        for variable, s in results["abstraction"].items():
            if "moe_vs_dense" not in s:
                lines.append(f"- `{variable}`: no seed has both models analysed; nothing is compared.")
                continue
            c = s["moe_vs_dense"]
            found = "; ".join(f"{kind} {fmt_ci(s['chosen_iia'][kind]['das'])} at {', '.join(sorted(set(s['chosen'][kind])))} "
                              f"(random subspace {fmt(s['chosen_iia'][kind]['random']['mean'])}: found is **{claim_state(s['found'][kind]['vs_random']['verdict'], ('more',))}**)"
                              for kind in s["chosen_iia"])
            lines.append(f"- `{variable}`: IIA at the chosen site: {found}. MoE vs dense: **{verdict_text(c)}**; \"both architectures "
                         f"represent it alike\" is **{claim_state(c['verdict'], ('equivalent',))}**.")
            lines += [f"  - {kind} vs dense (its own family): **{verdict_text(v)}**; \"{kind} represents it like the dense "
                      f"transformer\" is **{claim_state(v['verdict'], ('equivalent',))}**." for kind, v in s.get("vs_dense", {}).items()]
        return lines or ["- Nothing was analysed."]

    def report(self, results: dict[str, Any], ctx: StudyContext) -> Document:
        cfg, task = self.config, self.task
        rows, bars = [], []
        for variable, s in results["abstraction"].items():
            for kind, sites in s["sites"].items():
                for site, arms in sites.items():
                    rows.append({"variable": variable, "model": kind, "site": site, **{f"IIA {arm}": fmt_ci(arms[arm]) for arm in ARMS},
                                 "MoE vs dense": s.get("by_site", {}).get(site, {}).get("verdict", "n/a") if kind == "moe" else ""})
                    bars += [{"site": site.replace("blocks.", "").replace("hook_", ""), "arm": arm, "panel": f"{variable}, {kind}", **arms[arm]}
                             for arm in ("das", "random", "full")]
        figures = []
        if bars:
            figures.append(Figure(ctx.figure("iia_by_site", interval_bars(pd.DataFrame(bars), "site", "arm", "panel", "IIA")),
                                  "IIA by site for each architecture side by side (mean, 95% CI over seeds; scored on the last third of the pairs)"))
        perf = [{"model": kind, **{m: fmt_ci(v, 4) for m, v in metrics.items()}} for kind, metrics in results["performance"].items()]
        recurrent = [kind for kind in self.models if kind not in TRANSFORMERS]
        others = (f" Recurrent models ({', '.join(recurrent)}) of the same width and depth, trained alike." if recurrent else "")
        blocks = [
            Section("Bottom line", [Text("\n".join(self.bottom_line(results)))]),
            families_section(QUESTION, results.get("test_families", {}), order=FAMILIES),
            Section("What was run", [Text(
                f"Task `{task.name}` with options `{task.options}`. {task.describe()} Causal variables: "
                + ", ".join(f"`{v}`" for v in results["variables"]) + f". A dense transformer and an MoE ({cfg.n_experts} experts, "
                f"top-{cfg.top_k}) with shared options `{cfg.model}`, each trained for {cfg.train.steps} steps with {cfg.seeds} seeds." + others)]),
            Section("IIA at the chosen site", [Table(self.summary(results))]),
            Section("IIA at every site", [Table(rows)]),
            Section("Is the variable in an expert?", [Text(
                "Per MoE layer: DAS on the FFN output restricted to the tokens the base routes to one expert (the expert chosen on "
                "the second third of the pairs), against DAS on the whole FFN output, paired by seed. *equivalent* or *more*: "
                "one expert's tokens carry the variable's effect; *less*: it is spread over experts."), Table(self.expert_rows(results))]),
            Section("Model performance (held-out, mean [95% CI] over seeds)", [Table(perf)]),
            Section("Figures", figures),
            Section("What the numbers mean", [Text(NOTES.format(n_pairs=cfg.n_pairs, rank=cfg.rank, steps=cfg.das_steps, margin=cfg.margin,
                                                                interval=INTERVAL_NOTE))]),
        ]
        blocks += failed_runs_section(results["failed_runs"])
        return Document(f"Causal abstraction on `{task.name}`: where the planted variables live", blocks)
