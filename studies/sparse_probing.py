"""Study `sparse-probing`: are expert neurons less polysemantic than dense neurons, more so as routing gets sparser?"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from toylab.analysis.expert_map import N_SHOWN
from toylab.analysis.sparse_probing import (
    KS, LIFT, RANKINGS, UNIT, class_scores, compare_gaps, gap_trend, gaps, macro_f1, skipped_pairs, sparse_probing, with_lift,
)
from toylab.analysis.stats import INTERVAL_NOTE, MARGIN, mean_ci
from toylab.config import build
from toylab.errors import ToylabError
from toylab.models import TransformerConfig
from toylab.registry import get_task, register_study
from toylab.report import (
    Document, Figure, Section, Table, Text, expert_map_section, failed_runs_section, fmt, fmt_ci, interval_bars, training_curves,
)
from toylab.study import Study, StudyContext, TrainJob
from toylab.training import TrainConfig, evaluate, load_trained

LABEL_ROUTER = "label-router"

METRIC_NOTES = """\
- **k-sparse probe** (Gurnee et al. 2023): for each class c of a label, the binary task "this token has class c". Neurons are ranked on the training split by the difference of the class means over their pooled standard deviation; a logistic probe (L2, C = 1, balanced class weights) is fit on the top k and scored by **F1** of the positive class on held-out sequences (75/25 split by sequence). Per label, F1 is averaged over its (at most {max_classes} most frequent) classes.
- **Expert neurons**: each expert is probed only on the tokens routed to it (`hook_post` `[batch, pos, k, d_expert]` selected by `hook_expert_indices`), as Herbst et al. (2026) do; an (expert, class) pair with fewer than {min_count} positives or negatives on either side of the split is skipped. A class's MoE score is its **best expert**'s F1 (chosen at k = 1). Dense neurons: every neuron of `blocks.{{l}}.mlp.hook_post` on every token.
- **Controls**: *shuffled*, the same procedure with the targets permuted across the probed tokens (its F1 is what base rates alone give: an expert that sees a class often scores higher here too); *random basis*, the same layer's activations in a random orthonormal basis (is a neuron basis better than any basis?); the **label router**, an MoE whose router sends class c of `{router_label}` to expert c mod {label_experts}, so its experts specialize by that label by construction.
- **Gap**: per seed, macro F1 at k = 1 of the MoE's best experts minus the dense model's, over the classes both probe; *raw* compares F1, *above shuffled* compares each model's F1 minus its own shuffled control (what base rates inside an expert do not explain).
- **Routing sparsity**: log2(E / top-k), the number of halvings of the share of experts a token uses (dense = 0). **Trend**: per seed, the least-squares slope of the gap on routing sparsity over the learned-router MoEs.
- **Robustness**: for the models in `robustness`, neurons are also ranked by their mutual information with the target (each neuron cut into 16 equal-frequency bins on the training tokens).
- **Verdicts** (paired by seed): from the per-seed differences and their 90% Student-t interval, **more** / **less** when it lies above / below 0, **equivalent** when it lies inside ±δ (two one-sided tests at the 5% level; δ = {margin} in F1; for a trend, δ divided by the span of sparsity swept, so "equivalent" means the gap changes by less than δ across the whole sweep), **inconclusive** otherwise (with the smallest difference the seeds would detect).
- {interval}
"""


@dataclass(frozen=True)
class SparseProbingConfig:
    task: str = "brackets"
    task_options: dict[str, Any] = field(default_factory=dict)
    seeds: int = 3
    model: dict[str, Any] = field(default_factory=lambda: {"d_model": 32, "n_heads": 2, "d_mlp": 64, "n_layers": 2})
    """Options shared by every model; d_expert is d_mlp // top_k, so active parameters match the dense MLP."""
    top_ks: tuple[int, ...] = (1, 2)
    n_experts: tuple[int, ...] = (4, 8, 16)
    """The routing-sparsity sweep: one MoE per (top_k, n_experts)."""
    router_label: str | None = "auto"
    """Label of the label-router control ("auto": the task's first single-class `function` label; None: no control)."""
    train: TrainConfig = TrainConfig(steps=1000, lr=3e-3)
    n_eval: int = 300
    """Held-out sequences probed (the same for every model and seed)."""
    ks: tuple[int, ...] = KS
    max_classes: int = 8
    """Probe at most this many classes per label (the most frequent)."""
    min_count: int = 10
    """An (expert, class) pair needs this many positives and negatives on each side of the split."""
    robustness: tuple[str, ...] = ("dense", "moe-k1-e4")
    """Models whose neurons are also ranked by mutual information."""
    margin: float = MARGIN
    eval_seed: int = 20261121

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.n_eval < 8 or self.max_classes < 1 or self.min_count < 1:
            raise ValueError("seeds, max_classes and min_count must be >= 1, n_eval >= 8")
        if not self.top_ks or not self.n_experts or min(self.top_ks) < 1 or min(self.n_experts) < 1:
            raise ValueError(f"top_ks and n_experts must be non-empty and >= 1 (got {self.top_ks}, {self.n_experts})")
        if not self.ks or min(self.ks) < 1 or list(self.ks) != sorted(set(self.ks)):
            raise ValueError(f"ks must be increasing integers >= 1 (got {self.ks})")
        if not 0 < self.margin < 1:
            raise ValueError(f"margin must be in (0, 1) (got {self.margin})")


@register_study("sparse-probing")
class SparseProbing(Study):
    """k-sparse probing of expert vs dense neurons over a routing-sparsity sweep, with shuffled, random-basis and label-router controls."""

    Config = SparseProbingConfig
    fast = {"seeds": 2, "top_ks": (1,), "n_experts": (2, 4), "robustness": ("dense",), "n_eval": 80, "ks": (1, 4), "max_classes": 4,
            "min_count": 5, "train": {"steps": 60, "n_train": 1000, "n_val": 100, "eval_every": 60}}
    config: SparseProbingConfig

    def __init__(self, config: SparseProbingConfig) -> None:
        super().__init__(config)
        self.task = get_task(config.task, config.task_options)
        try:
            vocab = self.task.vocab
        except NotImplementedError:
            raise ToylabError(f"task '{config.task}' has real-valued inputs; sparse-probing needs a token task") from None
        shared = {**config.model, "ffn": "moe"}
        self.sparsity = {"dense": 0.0}
        self.models = {"dense": {**config.model, "ffn": "dense"}}
        for k in config.top_ks:
            for e in config.n_experts:
                if k <= e:
                    self.models[f"moe-k{k}-e{e}"] = {**shared, "n_experts": e, "top_k": k}
                    self.sparsity[f"moe-k{k}-e{e}"] = math.log2(e / k)
        self.router_label = config.router_label
        if self.router_label == "auto":
            self.router_label = next((n for n, l in self.task.labels.items() if l.kind == "function" and not l.multi_hot), None)
        if self.router_label is not None:
            label = self.task.labels.get(self.router_label)
            if label is None or label.multi_hot:
                valid = ", ".join(n for n, l in self.task.labels.items() if not l.multi_hot)
                raise ToylabError(f"router_label '{self.router_label}' is not a single-class label of '{config.task}'; valid: {valid}")
            self.label_experts = min(config.n_experts)
            self.models[LABEL_ROUTER] = {**shared, "n_experts": self.label_experts, "top_k": 1, "router": "label",
                                         "router_label": self.router_label}
            self.sparsity[LABEL_ROUTER] = math.log2(self.label_experts)
        unknown = sorted(set(config.robustness) - set(self.models))
        if unknown:
            raise ToylabError(f"robustness names unknown model '{unknown[0]}'; valid: {', '.join(self.models)}")
        for options in self.models.values():  # fail early on a bad model option
            build(TransformerConfig, options, vocab_size=len(vocab), max_len=self.task.seq_len)

    def analyse(self, job: TrainJob, run_dir: Path) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """One finished run (in a worker): its task metrics and k-sparse probing rows on the held-out sequences."""
        cfg, model = self.config, load_trained(run_dir).model
        batch = self.task.sample(cfg.n_eval, cfg.eval_seed)
        name, seed = job.key.rsplit("-seed", 1)
        rankings = RANKINGS if name in cfg.robustness else RANKINGS[:1]
        rows = sparse_probing(model, self.task, batch, cfg.ks, rankings, cfg.min_count, cfg.max_classes, seed=int(seed))
        return evaluate(model, self.task, batch), [{"model": name, "seed": int(seed), **row} for row in rows]

    def run(self, ctx: StudyContext) -> dict[str, Any]:
        cfg = self.config
        jobs = [TrainJob(f"{name}-seed{seed}", self.task, options, replace(cfg.train, seed=seed))
                for seed in range(cfg.seeds) for name, options in reversed(self.models.items())]
        ctx.train(jobs)
        analysed = ctx.analyse_runs(jobs, self.analyse, "probing")
        ctx.expert_map([job for job in jobs if job.key.rsplit("-seed", 1)[0] == self.headline()], self.task.sample(cfg.n_eval, cfg.eval_seed))
        rows = sorted((row for _, found in analysed.values() for row in found), key=lambda r: (list(self.models).index(r["model"]), r["seed"]))
        scores = with_lift(class_scores(rows, cfg.ks))
        scores["kind"] = scores["label"].map({n: l.kind for n, l in self.task.labels.items()})
        k1 = {"variant": "neurons", "ranking": RANKINGS[0], "k": cfg.ks[0]}
        comparisons, trends = {}, {}
        for measure, variant in (("raw", "neurons"), ("above_shuffled", "lift")):
            for ranking in RANKINGS:
                if ranking != RANKINGS[0] and (measure != "raw" or "dense" not in cfg.robustness):
                    continue
                select = {**k1, "variant": variant, "ranking": ranking}
                models = [m for m in self.models if m != "dense" and (ranking == RANKINGS[0] or m in cfg.robustness)]
                for by in (("layer", "label"), ("label",), ("kind",)):
                    per_model = {m: gaps(scores, {**select, "model": m}, {**select, "model": "dense"}, by) for m in models}
                    key = f"{measure}/{ranking}/{'+'.join(by)}"
                    bounds = UNIT if measure == "raw" else LIFT
                    comparisons[key] = [{"model": m, **row} for m, g in per_model.items() for row in compare_gaps(g, by, cfg.margin, bounds)]
                    learned = {m: g for m, g in per_model.items() if m != LABEL_ROUTER and len(g)}
                    span = max(self.sparsity[m] for m in learned) - min(self.sparsity[m] for m in learned) if learned else 0
                    trends[key] = gap_trend(learned, self.sparsity, by, cfg.margin / span) if span > 0 else []
        return {
            "task": {"name": self.task.name, "options": self.task.options},
            "models": {name: {"options": options, "sparsity": self.sparsity[name]} for name, options in self.models.items()},
            "router_label": self.router_label,
            "performance": {job.key: analysed[job.key][0] if job.key in analysed else None for job in jobs},
            "performance_summary": {
                name: {metric: mean_ci([analysed[k][0][metric] for s in range(cfg.seeds) if (k := f"{name}-seed{s}") in analysed],
                               bounds=None if metric == "loss" else UNIT)
                       for metric in next((v[0] for key, v in analysed.items() if key.startswith(f"{name}-seed")), {})}
                for name in self.models
            },
            "macro_f1": macro_f1(scores),
            "comparisons": comparisons,
            "trends": trends,
            "skipped": skipped_pairs(rows),
            "probes": rows,
            "runs": {job.key: str(ctx.run_dir(job.key).relative_to(ctx.directory)) for job in jobs},
        }

    def headline(self) -> str:
        """The sparsest learned MoE (top-1, most experts when it exists)."""
        learned = [m for m in self.models if m not in ("dense", LABEL_ROUTER)]
        return max(learned, key=lambda m: (self.sparsity[m], -self.models[m]["top_k"]))

    def summary(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        k = self.config.ks[0]
        f1 = {(r["model"], r["layer"], r["label"], r["variant"]): r["f1"] for r in results["macro_f1"]
              if r["k"] == k and r["ranking"] == RANKINGS[0]}
        rows = []
        for name in self.models:
            for layer in sorted({key[1] for key in f1}):
                for label in self.task.labels:
                    if (name, layer, label, "neurons") in f1:
                        rows.append({"model": name, "layer": layer, "label": label, "kind": self.task.labels[label].kind,
                                     f"F1 k={k}": fmt_ci(f1[name, layer, label, "neurons"]),
                                     "shuffled": fmt(f1[name, layer, label, "shuffled"]["mean"]),
                                     "random basis": fmt(f1[name, layer, label, "random_basis"]["mean"])})
        return rows

    def answers(self, results: dict[str, Any]) -> list[str]:
        """The three questions, one line each (per label or kind), with verdicts and intervals."""
        top, margin = self.headline(), self.config.margin
        comparisons, trends, lines = results["comparisons"], results["trends"], []

        def gap_text(key: str, model: str, field: str, value: str) -> str:
            row = next((r for r in comparisons[key] if r["model"] == model and r[field] == value), None)
            return "n/a" if row is None else f"**{row['gap']['verdict']}** (Δ = {fmt_ci(row['gap'])})"

        def slope_text(key: str, field: str, value: str) -> str:
            row = next((r for r in trends[key] if r[field] == value), None)
            return "n/a (one learned MoE)" if row is None else f"**{row['slope']['verdict']}** (slope {fmt_ci(row['slope'])} per halving)"

        names = {**{n: f"`{n}` ({l.kind})" for n, l in self.task.labels.items()}, "state": "all state labels", "function": "all function labels"}
        for group, values in (("label", [n for n in self.task.labels if any(r["label"] == n for r in comparisons[f"raw/{RANKINGS[0]}/label"])]),
                              ("kind", ["state", "function"])):
            for value in values:
                if not any(r.get(group) == value for r in comparisons[f"raw/{RANKINGS[0]}/{group}"]):
                    continue
                lines.append(
                    f"- {names[value]}: k=1 F1 of `{top}` expert neurons vs dense is {gap_text(f'raw/{RANKINGS[0]}/{group}', top, group, value)}; "
                    f"above each model's shuffled control {gap_text(f'above_shuffled/{RANKINGS[0]}/{group}', top, group, value)}. "
                    f"Gap vs routing sparsity: {slope_text(f'raw/{RANKINGS[0]}/{group}', group, value)}; "
                    f"above shuffled {slope_text(f'above_shuffled/{RANKINGS[0]}/{group}', group, value)}."
                )
        robust = f"raw/{RANKINGS[1]}/kind"
        for row in comparisons.get(robust, []):
            lines.append(f"- Robustness ({RANKINGS[1]} ranking), `{row['model']}` vs dense, {names[row['kind']]}: "
                         f"**{row['gap']['verdict']}** (Δ = {fmt_ci(row['gap'])}).")
        for row in comparisons[f"raw/{RANKINGS[0]}/kind"]:
            if row["model"] == LABEL_ROUTER:
                lines.append(f"- Control, label router on `{self.router_label}` vs dense, {names[row['kind']]}: "
                             f"**{row['gap']['verdict']}** (Δ = {fmt_ci(row['gap'])}).")
        return lines + [f"- Equivalence margin δ = {margin}; intervals are 90% for verdicts (TOST), 95% elsewhere."]

    def report(self, results: dict[str, Any], ctx: StudyContext) -> Document:
        cfg, task = self.config, self.task
        frame = pd.DataFrame(results["macro_f1"])
        figures = []
        if len(frame):
            order = sorted(self.models, key=lambda m: (self.sparsity[m], m == LABEL_ROUTER))
            first = frame[(frame["k"] == cfg.ks[0]) & (frame["ranking"] == RANKINGS[0]) & (frame["variant"] != "lift")]
            for label in dict.fromkeys(first["label"]):
                sub = first[first["label"] == label]
                long = pd.DataFrame([{"routing": f"{m} ({self.sparsity[m]:.0f})", "probe": r["variant"], "layer": r["layer"], **r["f1"]}
                                     for m in order for _, r in sub[sub["model"] == m].iterrows()])
                figures.append((f"`{label}`: k={cfg.ks[0]} F1 vs routing sparsity log2(E/k) (mean, 95% CI over seeds)",
                                ctx.figure(f"f1_vs_sparsity_{label}", interval_bars(long, "routing", "probe", "layer", "F1"))))
            neurons = frame[(frame["variant"] == "neurons") & (frame["ranking"] == RANKINGS[0]) & frame["model"].isin(["dense", self.headline()])]
            long = pd.DataFrame([{"k": r["k"], "model": f"{r['model']} layer {r['layer']}", "label": r["label"], **r["f1"]} for _, r in neurons.iterrows()])
            figures.append(("F1 vs k: dense and the sparsest MoE (mean, 95% CI over seeds)",
                            ctx.figure("f1_vs_k", interval_bars(long, "k", "model", "label", "F1"))))
        logs = {run: ctx.directory / path / "metrics.csv" for run, path in results["runs"].items()
                if (ctx.directory / path / "metrics.csv").is_file()}
        if logs:
            figures.append(("Training curves", ctx.figure("training_curves", training_curves(logs, ["train_loss", f"val_{task.primary_metric}"]))))
        comparison_rows = [
            {"measure": key.split("/")[0], "MoE": r["model"], "layer": r["layer"], "label": r["label"],
             "MoE F1": fmt_ci(r["a"]), "dense F1": fmt_ci(r["b"]), "Δ (90% CI)": fmt_ci(r["gap"]), "verdict": r["gap"]["verdict"]}
            for key in (f"raw/{RANKINGS[0]}/layer+label", f"above_shuffled/{RANKINGS[0]}/layer+label") for r in results["comparisons"][key]
        ]
        trend_rows = [
            {"measure": key.split("/")[0], "layer": r["layer"], "label": r["label"], "slope per halving (90% CI)": fmt_ci(r["slope"]),
             "verdict": r["slope"]["verdict"]}
            for key in (f"raw/{RANKINGS[0]}/layer+label", f"above_shuffled/{RANKINGS[0]}/layer+label") for r in results["trends"][key]
        ]
        skipped = [{"model": name, "skipped (expert, class) pairs": s["pairs"], "of": s["of"]} for name, s in results["skipped"].items()]
        perf = [{"model": name, **{m: fmt_ci(v, 4) for m, v in metrics.items()}} for name, metrics in results["performance_summary"].items()]
        blocks = [
            Section("What was run", [Text(
                f"Task `{task.name}` with options `{task.options}`. {task.describe()}\n\n"
                f"A dense transformer and MoEs with top-k ∈ {list(cfg.top_ks)} and E ∈ {list(cfg.n_experts)} (d_expert = d_mlp / top-k, so "
                f"active parameters match the dense MLP), shared options `{cfg.model}`"
                + (f", and a label-router MoE on `{self.router_label}` ({self.label_experts} experts)" if self.router_label else "")
                + f"; each trained for {cfg.train.steps} steps (batch {cfg.train.batch_size}, lr {cfg.train.lr}) with {cfg.seeds} seeds. "
                f"Probes read {cfg.n_eval} held-out sequences (seed {cfg.eval_seed}), k ∈ {list(cfg.ks)}.")]),
            Section("Answers", [Text(f"Headline MoE: `{self.headline()}` (the sparsest learned router); pooled over layers."),
                                Text("\n".join(self.answers(results)))]),
            Section("Model performance (held-out, mean [95% CI] over seeds)", [Table(perf)]),
            Section("k=1 F1 by model, layer and label", [Table(self.summary(results))]),
            Section("Expert vs dense neurons, every MoE, layer and label", [Table(comparison_rows)]),
            Section("Does the gap widen with sparser routing?",
                    [Table(trend_rows) if trend_rows else Text("(fewer than two learned MoEs)")]),
            Section("Skipped (expert, class) pairs (too few positives or negatives; summed over seeds)", [Table(skipped)]),
            Section("Figures", [Figure(path, caption) for caption, path in figures]),
            *expert_map_section(ctx.directory, N_SHOWN, f"The map shows the headline MoE, `{self.headline()}`."),
            Section("What the numbers mean", [Text(METRIC_NOTES.format(
                max_classes=cfg.max_classes, min_count=cfg.min_count, router_label=self.router_label,
                label_experts=getattr(self, "label_experts", "n/a"), margin=cfg.margin, interval=INTERVAL_NOTE))]),
        ]
        blocks += failed_runs_section(results["failed_runs"])
        return Document(f"k-sparse probing of expert and dense neurons on `{task.name}`", blocks)

