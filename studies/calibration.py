"""Study `calibration`: how much planted specialization can each specialization analysis see, and how often does it see some in none?"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from scipy import stats

from toylab.analysis.calibration import (
    ANALYSES, ALPHA, PRIMARY, TARGET, ceiling_share, dose_response, model_random_label_scores, random_label_verdicts, realized,
    seed_effects,
)
from toylab.analysis.paths import routing_paths, summarize_paths
from toylab.analysis.specialization import specialization, summarize
from toylab.analysis.stats import INTERVAL_NOTE, MARGIN, UNIT, correct_families, mean_ci, verdict_label
from toylab.determinism import torch_threads
from toylab.registry import get_task, register_study
from toylab.report import Document, Figure, Section, Table, Text, failed_runs_section, families_section, fmt, fmt_ci, interval_lines
from toylab.study import Study, StudyContext, TrainJob
from toylab.training import TrainConfig, build_model, evaluate, load_trained

GRIDS = {"label_mix": (0.0, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0), "router_supervision": (0.0, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)}
"""The default settings of each dial: from 0 (the learned router) to the label router (label_mix = 1) or a strong
supervision (λ = 1, an auxiliary loss the size of the language-model loss at the start)."""
SYMBOLS = {"label_mix": "p", "router_supervision": "λ"}
DEFAULT_SEEDS = 5
"""The seeds `expert-specialization` runs by default, whose verdicts the bottom line reads."""
FAMILIES = {
    "primary": "routing vs k-means NMI on the planted label at every setting of the dial (the lab's primary verdict)",
    "analyses": "every other analysis at every setting of the dial",
}
QUESTION = ("The study's question: how much planted specialization does each analysis detect, and how often does it "
            "claim some where there is none? Its verdicts are the analyses' own, at each setting of the dial, corrected "
            "within two families; its answers are rates (sensitivity, specificity), with their intervals.")

NOTES = """\
- **Dial**: `{dial}` plants specialization on the label `{label}` (class c → expert c mod {e}) while the model learns its task. `label_mix` = p routes a share p of (position, token) cells by the label (weight 1) and the rest by the learned router, fixed by a seeded table drawn with the weights: p = 0 is the learned router, p = 1 the label router (the tests check both ends route identically to them on the same inputs). `router_supervision` = λ adds λ · CE(router logits, class mod {e}) to the training loss; λ = 0 is the learned router.
- **Realized specialization**: the NMI of the last MoE layer's top-1 routing with `{label}` on the held-out sequences, per seed: what the dial achieved (the x axis of every curve), not what it asked for.
- **Effect** of an analysis: the per-seed difference its verdict is drawn from (e.g. routing's NMI minus k-means'), at the last MoE layer for `{label}`. Its **verdict** at each setting is the lab's own (`stats.compare`, corrected within the family).
- **Detection rate** at n seeds: the chance a study with n seeds calls *more*, from the effect's mean and spread over this study's {seeds} seeds (the noncentral t of a paired test at one-sided level {alpha}, i.e. a family of one test at two-sided 5% after correction; the evaluation batch's noise, which more seeds do not average out, added as the verdicts add it). It is an estimate: with {seeds} seeds the mean and spread are themselves uncertain.
- **Sensitivity** at n seeds: the smallest realized specialization from which on (every higher setting too) an analysis is detected in at least {target:.0%} of studies; *not reached* when even the top setting is not.
- **Specificity**: at the dial's zero (the learned router), {labels} labels drawn at random per held-out sequence (constant within one, as `mode` is; independent of the input, so no router can see them) are tested exactly as the primary verdict tests a real label, over the same seeds: routing vs k-means NMI with the evaluation batch's noise, margin {margin} (a label no probe can read), both-at-floor rule, then corrected as a family of one. The share called *more* is the false-positive rate, with its 95% Clopper–Pearson interval; the nominal level is 2.5% (one direction of a two-sided 5% test).
- **Ceiling share**: routing's NMI with the label over the linear probe's (how much of what the router input makes readable routing recovers).
- {interval}
"""


@dataclass(frozen=True)
class CalibrationConfig:
    task: str = "modes"
    task_options: dict[str, Any] = field(default_factory=dict)
    label: str = "mode"
    """The label the dial plants specialization on (one class per token)."""
    dial: Literal["label_mix", "router_supervision"] = "label_mix"
    grid: tuple[float, ...] = ()
    """The dial's settings, ascending from 0 (empty: `GRIDS[dial]`)."""
    seeds: int = 10
    model: dict[str, Any] = field(default_factory=lambda: {"d_model": 32, "n_heads": 2, "d_mlp": 64, "n_layers": 2})
    """Options of every MoE transformer (see `TransformerConfig`)."""
    n_experts: int = 4
    train: TrainConfig = TrainConfig(steps=1000, lr=3e-3)
    competence: float | None = None
    """Analyse only models whose held-out primary metric reaches this (None: the task's threshold, `Task.competence`;
    0: every model, a smoke test whose verdicts mean nothing)."""
    n_eval: int = 300
    """Held-out sequences analysed (the same for every model)."""
    n_permutations: int = 200
    null_draws: int = 5
    random_labels: int = 200
    """Random labels of the specificity check."""
    power_seeds: tuple[int, ...] = (3, 5, 10, 20)
    """Seed counts at which detection rates and sensitivity are given."""
    eval_seed: int = 20261121

    def __post_init__(self) -> None:
        grid = self.settings
        if len(grid) < 2 or grid[0] != 0 or any(b <= a for a, b in zip(grid, grid[1:])):
            raise ValueError(f"grid must rise strictly from 0 with at least two settings (got {grid})")
        if self.dial == "label_mix" and grid[-1] > 1:
            raise ValueError(f"label_mix is a share of tokens: grid must lie in [0, 1] (got {grid})")
        if self.seeds < 2 or self.n_eval < 8 or self.n_permutations < 1 or self.null_draws < 0 or self.random_labels < 1:
            raise ValueError("seeds must be >= 2, n_eval >= 8, n_permutations and random_labels >= 1, null_draws >= 0")
        if not self.power_seeds or min(self.power_seeds) < 2:
            raise ValueError(f"power_seeds must be seed counts >= 2 (got {self.power_seeds})")

    @property
    def settings(self) -> tuple[float, ...]:
        return self.grid or GRIDS[self.dial]


@register_study("calibration")
class Calibration(Study):
    """Plant specialization of known strength with a dial; measure each analysis's sensitivity and specificity."""

    Config = CalibrationConfig
    fast = {"competence": 0.0, "seeds": 3, "grid": (0.0, 0.5, 1.0), "n_eval": 80, "n_permutations": 50, "null_draws": 2, "random_labels": 40,
            "train": {"steps": 300, "n_train": 2000, "n_val": 100, "eval_every": 150}}
    config: CalibrationConfig

    def __init__(self, config: CalibrationConfig) -> None:
        super().__init__(config)
        self.task = get_task(config.task, config.task_options)
        for value in config.settings:  # fail early on a bad model option or label
            build_model(self.task, self.moe(value))

    def key(self, value: float) -> str:
        return f"{self.config.dial}={value:g}"

    def moe(self, value: float) -> dict[str, Any]:
        """The MoE at one setting of the dial (at 0, the learned router)."""
        dial = {self.config.dial: value, "router_label": self.config.label} if value else {}
        return {**self.config.model, "ffn": "moe", "n_experts": self.config.n_experts, **dial}

    def analyse(self, value: float, seed: int, moe_dir: Path) -> dict[str, Any]:
        """One MoE (in a worker, one torch thread, as soon as it is trained): its performance, the label's scores at the
        last MoE layer (what every analysis reads; no dense control, which none reads) and along paths, and at the
        dial's zero the primary verdict's scores for random labels."""
        cfg, task = self.config, self.task
        batch = task.sample_split(cfg.n_eval, cfg.eval_seed, "heldout")
        moe = load_trained(moe_dir).model
        with torch_threads(1):
            found = {"performance": evaluate(moe, task, batch),
                     "scores": specialization(moe, None, task, batch, cfg.n_permutations, seed, cfg.null_draws, [cfg.label],
                                              moe.moe_layers()[-1:]),
                     "paths": routing_paths(moe, task, batch, cfg.n_permutations, seed, [cfg.label]) if len(moe.moe_layers()) > 1 else None}
            if value == 0:
                found["random_labels"] = model_random_label_scores(moe, task, batch, task.labels[cfg.label].n_classes, cfg.random_labels,
                                                                   cfg.n_permutations, seed)
        return found

    def run(self, ctx: StudyContext) -> dict[str, Any]:
        cfg, task = self.config, self.task
        ctx.heldout(task, cfg.n_eval, cfg.eval_seed)
        jobs = {(v, s): TrainJob(f"{self.key(v)}-seed{s}", task, self.moe(v), replace(cfg.train, seed=s))
                for s in range(cfg.seeds) for v in cfg.settings}
        setting_seed = {job.key: key for key, job in jobs.items()}
        _, analysed = ctx.train_and_analyse(list(jobs.values()), self.analyse, lambda key, runs: [(key, (*key, *runs.values()))],
                                            group_by=lambda job: setting_seed[job.key])
        points = [self.point(v, [analysed[v, s] for s in range(cfg.seeds) if (v, s) in analysed]) for v in cfg.settings]
        points = [p for p in points if p is not None]
        zero = [analysed[0.0, s]["random_labels"] for s in range(cfg.seeds) if (0.0, s) in analysed]
        families = correct_families(
            {"primary": [(p["verdicts"], PRIMARY) for p in points],
             "analyses": [(p["verdicts"], name) for p in points for name in p["verdicts"] if name != PRIMARY]}, FAMILIES)
        curves = dose_response([{**p, "verdicts": {n: verdict_label(c) for n, c in p["verdicts"].items()}} for p in points], cfg.power_seeds)
        realized_means = [mean_ci(p["realized"], bounds=UNIT)["mean"] for p in points]
        rho = float(stats.spearmanr([p["dial"] for p in points], realized_means).statistic) if len(points) > 2 else float("nan")
        return {
            "task": {"name": task.name, "options": task.options, "primary_metric": task.primary_metric},
            "dial": {"name": cfg.dial, "label": cfg.label, "settings": list(cfg.settings), "spearman_realized": rho,
                     "realized": {str(p["dial"]): mean_ci(p["realized"], bounds=UNIT) for p in points}},
            "performance": {str(p["dial"]): p["performance"] for p in points},
            "curves": curves,
            "comparisons": [{"dial": p["dial"], **p["verdicts"]} for p in points],
            "ceiling_share": {str(p["dial"]): mean_ci(p["ceiling_share"]) for p in points},
            "specificity": random_label_verdicts(zero) if len(zero) >= 2 else None,
            "test_families": families,
            "runs": {job.key: str(ctx.run_dir(job.key).relative_to(ctx.directory)) for job in jobs.values()},
        }

    def point(self, value: float, runs: list[dict[str, Any]]) -> dict[str, Any] | None:
        """One setting's per-seed scores and the lab's verdicts on them (None when fewer than two seeds finished)."""
        if len(runs) < 2:
            return None
        label, last = self.config.label, str(max(int(layer) for layer in runs[0]["scores"]))
        layer_scores = [r["scores"][last][label] for r in runs]
        paths = [r["paths"][label] for r in runs] if runs[0]["paths"] else None
        summary = summarize([r["scores"] for r in runs], None)[last][label]
        path_summary = summarize_paths([r["paths"] for r in runs], MARGIN)[label] if paths else {}
        effects = seed_effects(layer_scores, paths)
        verdicts = {name: (summary if ANALYSES[name].source == "layer" else path_summary)[ANALYSES[name].verdict] for name in effects}
        return {"dial": value, "realized": [realized(s) for s in layer_scores], "ceiling_share": [ceiling_share(s) for s in layer_scores],
                "effects": effects, "verdicts": verdicts, "evaluation_se": {PRIMARY: summary["verdict"].get("evaluation_se", 0.0)},
                "performance": {metric: mean_ci([r["performance"][metric] for r in runs], bounds=None if metric == "loss" else UNIT)
                                for metric in runs[0]["performance"]}}

    def summary(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        """Per analysis: its sensitivity (realized NMI detected in >= TARGET of studies) at each seed count."""
        return [{"analysis": name, **{f"sensitivity, {n} seeds": fmt(c["sensitivity"][str(n)]) if c["sensitivity"][str(n)] is not None
                                      else "not reached" for n in self.config.power_seeds}}
                for name, c in results["curves"].items()]

    def bottom_line(self, results: dict[str, Any]) -> list[str]:
        cfg, dial = self.config, results["dial"]
        symbol, lines = SYMBOLS[cfg.dial], []
        realized = dial["realized"]
        if not realized:
            return ["- No setting of the dial has two finished seeds: nothing is shown."]
        top, zero = realized[max(realized, key=float)], realized.get("0", realized.get("0.0"))
        lines.append(f"- The dial `{cfg.dial}` planted specialization on `{cfg.label}`: the realized NMI of routing with it rises "
                     f"from {fmt_ci(zero) if zero else 'n/a'} at {symbol} = 0 (the learned router) to {fmt_ci(top)} at the top setting "
                     f"(Spearman ρ of realized NMI with the dial over {len(realized)} settings: {fmt(dial['spearman_realized'])}).")
        primary = results["curves"].get(PRIMARY)
        if primary:
            for n in cfg.power_seeds:
                found = primary["sensitivity"][str(n)]
                lines.append(f"- With {n} seeds, routing vs k-means (the primary verdict of `expert-specialization`) calls *more* in "
                             f"≥ {TARGET:.0%} of studies from a realized NMI of **{fmt(found)}** on." if found is not None else
                             f"- With {n} seeds, routing vs k-means calls *more* in ≥ {TARGET:.0%} of studies at **no** setting of this grid.")
        if primary and primary.get("missed"):
            gaps = primary["missed"]
            n = max(cfg.power_seeds)
            lines.append(f"- Detection does **not** rise with specialization: routing vs k-means calls *more* in fewer than {TARGET:.0%} of "
                         f"studies even with {n} seeds at " + ", ".join(f"{symbol} = {g['dial']:g} (realized NMI {fmt(g['realized'])}, "
                         f"rate {fmt(g['rate'], 2)})" for g in gaps) + ", above settings it does detect. There routing is no more "
                         "aligned with the label than k-means on the router input is: the planted label is in the residual stream the "
                         "router reads, so clustering it finds the label too. The verdict measures specialization *beyond* the "
                         "residual stream's clusters, not specialization as such.")
        spec = results["specificity"]
        if spec:
            rate = spec["adjusted"]
            lines.append(f"- Specificity: on {spec['labels']} random labels the router cannot see, at {symbol} = 0 with {spec['seeds']} seeds, "
                         f"routing vs k-means called *more* in {fmt(rate['share'])} of them (95% CI {fmt(rate['ci_low'])}–{fmt(rate['ci_high'])}; "
                         f"nominal 0.025).")
        if primary and zero:
            for n, found in primary["sensitivity"].items():
                if int(n) == DEFAULT_SEEDS:
                    caught = (f"catches a planted specialization of realized NMI ≥ {fmt(found)} in ≥ {TARGET:.0%} of studies, so an "
                              f"*inconclusive* or *equivalent* verdict there leaves specialization up to about {fmt(found)} possible"
                              if found is not None else "catches no setting of this grid reliably")
                    lines.append(f"- What the learned router's verdicts elsewhere could have missed: `expert-specialization` runs "
                                 f"{DEFAULT_SEEDS} seeds by default; at {DEFAULT_SEEDS} seeds routing vs k-means {caught} (on this "
                                 f"task and model; the learned router here realizes {fmt(zero['mean'])}).")
        return lines

    def report(self, results: dict[str, Any], ctx: StudyContext) -> Document:
        cfg, task = self.config, self.task
        symbol = SYMBOLS[cfg.dial]
        curve_rows, rate_rows, figures = [], [], []
        for name, c in results["curves"].items():
            for point in c["points"]:
                curve_rows.append({"analysis": name, "realized NMI": point["realized"]["mean"], **point["effect"]})
                rate_rows += [{"analysis": name, "seeds": f"{n} seeds", "realized NMI": point["realized"]["mean"],
                               **dict.fromkeys(("mean", "ci_low", "ci_high"), point["detection"][str(n)])} for n in cfg.power_seeds]
        if curve_rows:
            frame = pd.DataFrame(curve_rows).assign(panel="effect of each analysis")
            figures.append(Figure(ctx.figure("dose_response", interval_lines(frame, "realized NMI", "analysis", "panel", "effect (mean, 95% CI)", 0.0)),
                                  "Dose–response: each analysis's effect against the realized specialization (mean, 95% CI over seeds)"))
            rates = pd.DataFrame(rate_rows)
            rates["panel"] = rates["analysis"]
            figures.append(Figure(ctx.figure("detection", interval_lines(rates, "realized NMI", "seeds", "panel", "detection rate", TARGET)),
                                  f"Detection rate per analysis and seed count against the realized specialization (dashed: {TARGET:.0%})"))
        points = [{"analysis": name, symbol: fmt(point["dial"], 3), "realized NMI": fmt_ci(point["realized"]), "effect": fmt_ci(point["effect"]),
                   "verdict": point["verdict"], **{f"rate, {n} seeds": fmt(point["detection"][str(n)], 2) for n in cfg.power_seeds}}
                  for name, c in results["curves"].items() for point in c["points"]]
        perf = [{symbol: value, **{m: fmt_ci(v, 4) for m, v in metrics.items()}} for value, metrics in results["performance"].items()]
        blocks = [
            Section("Bottom line", [Text("\n".join(self.bottom_line(results)))]),
            families_section(QUESTION, results.get("test_families", {}), order=FAMILIES),
            Section("What was run", [Text(
                f"Task `{task.name}` with options `{task.options}`. {task.describe()} An MoE ({cfg.n_experts} experts, top-1, options "
                f"`{cfg.model}`) at each of {len(cfg.settings)} settings of `{cfg.dial}` ({', '.join(f'{v:g}' for v in cfg.settings)}) on "
                f"`{cfg.label}`, each trained for {cfg.train.steps} steps with "
                f"{cfg.seeds} seeds; {cfg.n_eval} held-out sequences analysed (seed {cfg.eval_seed}).")]),
            Section("Sensitivity per analysis (realized NMI detected in ≥ 80% of studies)", [Table(self.summary(results))]),
            Section("Dose–response per analysis", [Table(points)]),
            Section("Model performance per setting (held-out, mean [95% CI] over seeds)", [Table(perf)]),
            Section("Figures", figures),
            Section("What the numbers mean", [Text(NOTES.format(
                dial=cfg.dial, label=cfg.label, e=cfg.n_experts, seeds=cfg.seeds, alpha=ALPHA, target=TARGET, labels=cfg.random_labels,
                margin=(results["specificity"] or {}).get("margin", "n/a"), interval=INTERVAL_NOTE))]),
        ]
        blocks += failed_runs_section(results["failed_runs"])
        return Document(f"Calibration on `{task.name}`: what each specialization analysis can see", blocks)
