"""Study `expert-specialization`: do MoE experts recover planted labels beyond residual-stream clustering?"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd

from toylab.analysis.specialization import ASSIGNMENTS, analysable_labels, specialization, summarize
from toylab.analysis.stats import mean_ci
from toylab.config import build
from toylab.models import TransformerConfig
from toylab.registry import get_task, register_study
from toylab.report import contingency_heatmaps, fmt, fmt_ci, interval_bars, markdown_table, training_curves
from toylab.study import Study, StudyContext, TrainJob
from toylab.training import TrainConfig, evaluate

ASSIGNMENT_NAMES = {
    "routing": "MoE routing (top-1 expert)",
    "kmeans_moe": "k-means on MoE router input",
    "kmeans_dense": "k-means on dense, same site",
}

METRIC_NOTES = """\
- **NMI** (normalized mutual information) measures how much knowing the expert tells you about the label, scaled so 0 means independent and 1 means each determines the other. It is computed over all real tokens where the label is defined.
- **ARI** (adjusted Rand index) counts token pairs put together or apart by both the expert assignment and the label, corrected for chance: 0 is chance, 1 is identical partitions, and it can be negative.
- **k-means baseline**: k-means with as many clusters as experts on the activations the router reads (`blocks.{l}.ln2.hook_normalized`). If routing scores no higher, experts find nothing that clustering the residual stream would not.
- **Dense control**: the same k-means at the same site of a dense model trained alike, asking whether the structure is there without any routing.
- **Null and p-value**: the expert assignment shuffled across tokens (expert frequencies kept) gives the NMI of a router that ignores its input; the p-value is the share of shuffles scoring at least the observed NMI (add-one, one-sided).
- **Verdict**: per-seed differences NMI(routing) − NMI(k-means on router input) with their 95% t-interval (a two-sided paired t-test over seeds): *more* if the interval is above 0, *less* if below, otherwise *same*.
- **Intervals**: every `mean [low, high]` is a mean over seeds with its 95% Student-t confidence interval.
"""


@dataclass(frozen=True)
class ExpertSpecializationConfig:
    task: str = "brackets"
    task_options: dict[str, Any] = field(default_factory=dict)
    seeds: int = 3
    model: dict[str, Any] = field(default_factory=lambda: {"d_model": 32, "n_heads": 2, "d_mlp": 64, "n_layers": 2})
    """Options shared by the dense and the MoE transformer (see `TransformerConfig`)."""
    n_experts: int = 4
    top_k: int = 1
    train: TrainConfig = TrainConfig(steps=1000, lr=3e-3)
    n_eval: int = 500
    """Held-out sequences on which activations are analysed (the same for every seed)."""
    n_permutations: int = 500
    eval_seed: int = 20261121

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.n_eval < 1 or self.n_permutations < 1:
            raise ValueError("seeds, n_eval and n_permutations must be >= 1")


@register_study("expert-specialization")
class ExpertSpecialization(Study):
    """Train dense and MoE transformers over seeds; compare expert routing with planted labels, k-means and a null."""

    Config = ExpertSpecializationConfig
    fast = {"train": {"steps": 120, "n_train": 2000, "n_val": 200, "eval_every": 60}, "n_eval": 100, "n_permutations": 100}
    config: ExpertSpecializationConfig

    def __init__(self, config: ExpertSpecializationConfig) -> None:
        super().__init__(config)
        self.task = get_task(config.task, config.task_options)
        self.models = {
            "dense": {**config.model, "ffn": "dense"},
            "moe": {**config.model, "ffn": "moe", "n_experts": config.n_experts, "top_k": config.top_k},
        }
        for options in self.models.values():  # fail early on a bad model option
            build(TransformerConfig, options, vocab_size=len(self.task.vocab), max_len=self.task.seq_len)

    def run(self, ctx: StudyContext) -> dict[str, Any]:
        cfg, task = self.config, self.task
        eval_batch = task.sample(cfg.n_eval, cfg.eval_seed)
        models = ctx.train([TrainJob(f"{kind}-seed{seed}", task, options, replace(cfg.train, seed=seed))
                          for seed in range(cfg.seeds) for kind, options in self.models.items()])
        trained = {(seed, kind): models[f"{kind}-seed{seed}"] for seed in range(cfg.seeds) for kind in self.models}
        performance = {
            kind: {
                f"seed{seed}": evaluate(trained[seed, kind].model, task, eval_batch) if trained[seed, kind] else None
                for seed in range(cfg.seeds)
            }
            for kind in self.models
        }
        per_seed = [
            specialization(trained[seed, "moe"].model, trained[seed, "dense"].model, task, eval_batch, cfg.n_permutations, seed)
            if trained[seed, "moe"] and trained[seed, "dense"]
            else None
            for seed in ctx.bar(range(cfg.seeds), cfg.seeds, "analysing")
        ]
        return {
            "task": {"name": task.name, "options": task.options, "primary_metric": task.primary_metric},
            "performance": performance,
            "performance_summary": {
                kind: {
                    metric: mean_ci([runs[s][metric] for s in runs if runs[s]])
                    for metric in next((r for r in runs.values() if r), {})
                }
                for kind, runs in performance.items()
            },
            "specialization": summarize(per_seed) if any(per_seed) else {},
            "per_seed": per_seed,
            "runs": {key: str(ctx.run_dir(key).relative_to(ctx.directory)) for key in models},
        }

    def summary(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        rows = []
        for layer, labels in results["specialization"].items():
            for label, s in labels.items():
                rows.append({
                    "layer": layer,
                    "label": label,
                    "kind": self.task.labels[label].kind,
                    "NMI routing": fmt_ci(s["routing_nmi"]),
                    "NMI k-means (router input)": fmt_ci(s["kmeans_moe_nmi"]),
                    "NMI k-means (dense)": fmt_ci(s["kmeans_dense_nmi"]),
                    "NMI null": fmt(s["null_nmi"]["mean"]),
                    "routing max p": fmt(s["routing_max_p_value"], 4),
                    "routing vs k-means": s["verdict"]["verdict"],
                })
        return rows

    def verdict_lines(self, results: dict[str, Any]) -> list[str]:
        lines = []
        n = self.config.seeds
        for layer, labels in results["specialization"].items():
            for label, s in labels.items():
                v = s["verdict"]
                amount = {"more": "**more** than", "less": "**less** than", "same": "**as much as**"}.get(v["verdict"], v["verdict"])
                against_null = "beats" if s["routing_max_p_value"] < 0.05 else "does not clearly beat"
                lines.append(
                    f"- Layer {layer}, `{label}` ({self.task.labels[label].kind}): routing recovers {amount} "
                    f"k-means on the router input (ΔNMI = {fmt_ci(v)}, paired t-test over {v['n']} of {n} seeds, "
                    f"p = {fmt(v['p_value'], 3)}); routing {against_null} the shuffled-assignment null in every seed "
                    f"(largest p = {fmt(s['routing_max_p_value'], 4)})."
                )
        return lines

    def report(self, results: dict[str, Any], ctx: StudyContext) -> str:
        cfg, task = self.config, self.task
        figures = []
        if results["specialization"]:
            frame = pd.DataFrame(
                [
                    {"layer": layer, "label": label, "assignment": ASSIGNMENT_NAMES[kind], **s[f"{kind}_nmi"]}
                    for layer, labels in results["specialization"].items()
                    for label, s in labels.items()
                    for kind in ASSIGNMENTS
                ]
                + [
                    {"layer": layer, "label": label, "assignment": "shuffled null", **s["null_nmi"]}
                    for layer, labels in results["specialization"].items()
                    for label, s in labels.items()
                ]
            )
            figures.append(("NMI with each label: routing vs k-means vs null (mean, 95% CI over seeds)",
                            ctx.figure("nmi_comparison", interval_bars(frame, "label", "assignment", "layer", "NMI"))))
            first = next(s for s in results["per_seed"] if s)
            names = {name: task.labels[name].classes for name in analysable_labels(task)}
            for layer, labels in first.items():
                tables = {name: labels[name]["routing"]["contingency"] for name in labels}
                figures.append((f"Layer {layer}: share of each class's tokens routed to each expert (first seed)",
                                ctx.figure(f"experts_layer{layer}", contingency_heatmaps(tables, names, f"layer {layer}"))))
        logs = {run: ctx.directory / path / "metrics.csv" for run, path in results["runs"].items()
                if (ctx.directory / path / "metrics.csv").is_file()}
        if logs:
            curves = training_curves(logs, ["train_loss", f"val_{task.primary_metric}"])
            figures.append(("Training curves (training loss; validation metric)", ctx.figure("training_curves", curves)))

        perf_rows = [
            {"model": kind, **{metric: fmt_ci(stat, 4) for metric, stat in metrics.items()}}
            for kind, metrics in results["performance_summary"].items()
        ]
        sections = [
            f"# Expert specialization on `{task.name}`",
            "## What was run",
            f"Task `{task.name}` with options `{task.options}`. {task.describe()}",
            f"A dense transformer and an MoE transformer ({cfg.n_experts} experts, top-{cfg.top_k} routing) with shared "
            f"options `{cfg.model}`, each trained for {cfg.train.steps} steps (batch {cfg.train.batch_size}, lr {cfg.train.lr}) "
            f"with {cfg.seeds} seeds. Activations were collected on {cfg.n_eval} held-out sequences (seed {cfg.eval_seed}); "
            f"nulls use {cfg.n_permutations} shuffles.",
            "## Model performance (held-out, mean [95% CI] over seeds)",
            markdown_table(perf_rows),
            f"The task's metric is `{task.primary_metric}`. " + " ".join((task.metrics.__doc__ or "").split("\n\n")[-1].split()),
            "## Verdicts",
            "\n".join(self.verdict_lines(results)),
            "## Results",
            markdown_table(self.summary(results)),
            *[f"### {caption}\n\n![{caption}]({path})" for caption, path in figures],
            "## What the numbers mean",
            METRIC_NOTES,
        ]
        if results["failed_runs"]:
            sections += ["## Failed runs", *[f"- `{f['run']}`: {f['error']}" for f in results["failed_runs"]]]
        return "\n\n".join(sections) + "\n"
