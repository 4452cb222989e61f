"""Study `sparse-probing`: do expert neurons read labels better than pseudo-experts made of dense neurons, more so as routing gets sparser?"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from toylab.analysis.expert_map import N_SHOWN, routing_view, write_expert_map
from toylab.analysis.sparse_probing import (
    BOUNDS, FRACTIONS, KS, PSEUDO, RANKINGS, adjust_comparisons, class_scores, compare_gaps, gap_trend, gaps, macro_scores, skipped_pairs, sparse_probing,
)
from toylab.analysis.stats import INTERVAL_NOTE, MARGIN, UNIT, mean_ci
from toylab.config import build
from toylab.determinism import torch_threads
from toylab.errors import ToylabError
from toylab.models import TransformerConfig
from toylab.registry import get_task, register_study
from toylab.report import (
    Document, Figure, Section, Table, Text, expert_map_section, failed_runs_section, families_section, fmt, fmt_ci, interval_bars, training_curves,
)
from toylab.study import Study, StudyContext, TrainJob
from toylab.training import TrainConfig, evaluate, load_trained

LABEL_ROUTER = "label-router"
PRIMARY = "partition"
"""The primary null: the dense model's neurons on the MoE's own token partition (same tokens, same unit sizes; only the neurons differ)."""
CONTRASTS = {
    "partition": "pseudo-experts: the MoE's partition of the tokens, dense neurons",
    "random": "pseudo-experts: a random partition of matched sizes, dense neurons",
    "kmeans": "pseudo-experts: k-means on the dense router input, dense neurons",
    "dense": "the dense MLP on every token",
    "old": "old design: largest raw F1 over experts vs the dense MLP's, chosen on the split it is scored on",
}
"""What the experts are compared with (every one but `old` on the chosen unit's lift)."""

METRIC_NOTES = """\
- **k-sparse probe** (Gurnee et al. 2023): for each class c of a label, the binary task "this token has class c". The probed tokens are split by sequence into *train* / *select* / *report* ({train:.0%} / {select:.0%} / {report:.0%} of the sequences). Each unit first draws **{n_candidates} candidate neurons** at random (the same number for every model, expert and pseudo-expert, so a wider unit does not win by size); they are ranked on train by the difference of the class means over their pooled standard deviation, a logistic probe (L2, C = 1, balanced class weights) is fit on the top k on train, and it is scored by **F1** of the positive class on select and on report. Per label, scores are averaged over its (at most {max_classes} most frequent) classes.
- **Units**: the dense MLP is one unit (`blocks.{{l}}.mlp.hook_post`, every token); each expert of an MoE is a unit on the tokens routed to it (`hook_post` `[batch, pos, k, d_expert]` selected by `hook_expert_indices`), as Herbst et al. (2026) do. A (unit, class) pair with fewer than {min_count} positives or negatives in any split is skipped.
- **Lift**: a unit's F1 minus the F1 of the same procedure on its own tokens with the targets permuted (its *shuffled* control: what base rates inside the unit give), computed for every unit **before** any maximum. Per class, the unit with the highest lift on *select* is chosen and its lift is scored on *report*: the maximum over E noisy units is not scored on the data it was chosen on. The **mean lift** over units is reported beside it.
- **Pseudo-experts** (the null): E units made of the dense model of the same seed, on the same tokens, probed and chosen exactly like experts: *partition*, the dense neurons on the MoE's own token partition (**primary**: same tokens and unit sizes, only the neurons differ); *random*, a random partition of the tokens with the experts' sizes; *kmeans*, k-means with E clusters on the dense model's router-input site `blocks.{{l}}.ln2.hook_normalized` (a token joins its top-k nearest centroids).
- **Old design** (shown for comparison only): the largest raw F1 over experts, chosen and scored on the same split, against the dense MLP's F1. The maximum of E noisy scores grows with E, so it favours MoEs with more experts even without any signal.
- **Controls**: *random basis*, the candidates of the dense MLP and of every expert in a random orthonormal basis (is a neuron basis better than any basis?; pseudo-experts are the dense neurons, tested by the dense MLP's row); the **label router**, an MoE whose router sends class c of `{router_label}` to expert c mod {label_experts}: its experts see tokens sorted by that label, and so do its *partition* pseudo-experts.
- **Gap**: per seed, the class-averaged k = {k} lift of the experts minus that of the comparison, over the classes both probe. **Routing sparsity**: log2(E / top-k) (dense = 0). **Trend**: per seed, the least-squares slope of the primary gap on routing sparsity over the learned-router MoEs.
- **Robustness**: for the models in `robustness`, neurons are also ranked by their mutual information with the target (16 equal-frequency bins on the training tokens), and the primary comparison is repeated.
- **Verdicts** (paired by seed): from the per-seed differences and their 90% Student-t interval, **more** / **less** when it lies above / below 0, **equivalent** when it lies inside ±δ (two one-sided tests at the 5% level; δ = {margin} in F1; for a trend, δ divided by the span of sparsity swept, so "equivalent" means the gap changes by less than δ across the whole sweep), **inconclusive** otherwise (with the smallest difference the seeds would detect): a difference is then not shown.
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
    competence: float | None = None
    """Analyse only models whose held-out primary metric reaches this (None: the task's threshold, `Task.competence`;
    0: every model, a smoke test whose verdicts mean nothing)."""
    n_eval: int = 300
    """Held-out sequences probed (the same for every model and seed)."""
    ks: tuple[int, ...] = KS
    max_classes: int = 8
    """Probe at most this many classes per label (the most frequent)."""
    min_count: int = 10
    """An (expert, class) pair needs this many positives and negatives on each side of the split."""
    robustness: tuple[str, ...] = ("dense", "moe-k1-e4")
    """Models whose neurons are also ranked by mutual information."""
    n_candidates: int | None = None
    """Candidate neurons drawn at random in every unit (None: the narrowest unit's width, d_mlp // max(top_ks) by default)."""
    margin: float = MARGIN
    eval_seed: int = 20261121

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.n_eval < 8 or self.max_classes < 1 or self.min_count < 1:
            raise ValueError("seeds, max_classes and min_count must be >= 1, n_eval >= 8")
        if not self.top_ks or not self.n_experts or min(self.top_ks) < 1 or min(self.n_experts) < 1:
            raise ValueError(f"top_ks and n_experts must be non-empty and >= 1 (got {self.top_ks}, {self.n_experts})")
        if not self.ks or min(self.ks) < 1 or list(self.ks) != sorted(set(self.ks)):
            raise ValueError(f"ks must be increasing integers >= 1 (got {self.ks})")
        if self.n_candidates is not None and self.n_candidates < max(self.ks):
            raise ValueError(f"n_candidates must be at least the largest k (got {self.n_candidates} < {max(self.ks)})")
        if not 0 < self.margin < 1:
            raise ValueError(f"margin must be in (0, 1) (got {self.margin})")


@register_study("sparse-probing")
class SparseProbing(Study):
    """k-sparse probing of expert neurons vs pseudo-experts of dense neurons over a routing-sparsity sweep, with shuffled,
    random-basis and label-router controls."""

    Config = SparseProbingConfig
    fast = {"competence": 0.0, "seeds": 3, "top_ks": (1,), "n_experts": (2, 4), "robustness": ("dense",), "n_eval": 160, "ks": (1, 4), "max_classes": 4,
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
        built = [build(TransformerConfig, options, vocab_size=len(vocab), max_len=self.task.seq_len)  # fail early on a bad option
                 for options in self.models.values()]
        narrowest = min(c.expert_size if c.ffn == "moe" else c.d_mlp for c in built)
        self.n_candidates = narrowest if config.n_candidates is None else config.n_candidates
        if self.n_candidates > narrowest:
            raise ToylabError(f"n_candidates {self.n_candidates} exceeds the narrowest unit's {narrowest} neurons")
        if max(config.ks) > self.n_candidates:
            raise ToylabError(f"ks go up to {max(config.ks)} but a unit has only {self.n_candidates} candidate neurons")

    def analyses(self, seed: int, runs: dict[str, Path]) -> list[tuple[str, tuple[str, Path, Path | None]]]:
        """A seed's analyses (`StudyContext.train_and_analyse`): one per usable run, with the seed's dense run when usable."""
        dense = runs.get(f"dense-seed{seed}")
        return [(key, (key, run_dir, None if run_dir == dense else dense)) for key, run_dir in runs.items()]

    def analyse(self, key: str, run_dir: Path, dense_dir: Path | None) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, Any] | None]:
        """One finished run (in a worker): its task metrics and k-sparse probing rows on the held-out sequences, with
        pseudo-experts from the dense run of the same seed (`dense_dir`, None when it failed or for the dense model), and
        for the headline MoE its expert-map view."""
        cfg, model = self.config, load_trained(run_dir).model
        batch = self.task.sample_split(cfg.n_eval, cfg.eval_seed, "heldout")
        name, seed = key.rsplit("-seed", 1)
        rankings = RANKINGS if name in cfg.robustness else RANKINGS[:1]
        dense = load_trained(dense_dir).model if dense_dir is not None else None
        with torch_threads(1):
            rows = sparse_probing(model, self.task, batch, cfg.ks, rankings, cfg.min_count, cfg.max_classes, FRACTIONS,
                                  self.n_candidates, int(seed), dense)
            view = routing_view(model, self.task, batch, N_SHOWN, int(seed)) if name == self.headline() else None
            return evaluate(model, self.task, batch), [{"model": name, "seed": int(seed), **row} for row in rows], view

    def run(self, ctx: StudyContext) -> dict[str, Any]:
        cfg = self.config
        jobs = [TrainJob(f"{name}-seed{seed}", self.task, options, replace(cfg.train, seed=seed))
                for seed in range(cfg.seeds) for name, options in reversed(self.models.items())]
        batch = ctx.heldout(self.task, cfg.n_eval, cfg.eval_seed)
        _, analysed = ctx.train_and_analyse(jobs, self.analyse, self.analyses, description="probing")
        views = {key.rsplit("-seed", 1)[1]: view for key, (_, _, view) in analysed.items() if view is not None}
        if views:
            headline = self.models[self.headline()]
            write_expert_map(ctx.directory / "expert_map.json", self.task, batch, views, headline["n_experts"], headline["top_k"])
        rows = sorted((row for _, found, _ in analysed.values() for row in found), key=lambda r: (list(self.models).index(r["model"]), r["seed"]))
        scores = class_scores(rows, cfg.ks)
        scores["kind"] = scores["label"].map({n: l.kind for n, l in self.task.labels.items()})
        comparisons, trends = {}, {}
        for ranking in RANKINGS:
            models = [m for m in self.models if m != "dense" and (ranking == RANKINGS[0] or m in cfg.robustness)]
            for contrast in CONTRASTS if ranking == RANKINGS[0] else (PRIMARY,):
                value = "max_f1" if contrast == "old" else "lift"
                for by in (("layer", "label"), ("label",), ("kind",)):
                    per_model = {m: gaps(scores, *self.contrast(m, contrast, ranking), by, value) for m in models}
                    key = f"{contrast}/{ranking}/{'+'.join(by)}"
                    comparisons[key] = [{"model": m, **row} for m, g in per_model.items()
                                        for row in compare_gaps(g, by, cfg.margin, BOUNDS[value])]
                    learned = {m: g for m, g in per_model.items() if m != LABEL_ROUTER and len(g)}
                    span = max(self.sparsity[m] for m in learned) - min(self.sparsity[m] for m in learned) if learned else 0
                    trends[key] = gap_trend(learned, self.sparsity, by, cfg.margin / span) if span > 0 else []
        return {
            "task": {"name": self.task.name, "options": self.task.options},
            "models": {name: {"options": options, "sparsity": self.sparsity[name]} for name, options in self.models.items()},
            "router_label": self.router_label,
            "n_candidates": self.n_candidates,
            "performance": {job.key: analysed[job.key][0] if job.key in analysed else None for job in jobs},
            "performance_summary": {
                name: {metric: mean_ci([analysed[k][0][metric] for s in range(cfg.seeds) if (k := f"{name}-seed{s}") in analysed],
                               bounds=None if metric == "loss" else UNIT)
                       for metric in next((v[0] for key, v in analysed.items() if key.startswith(f"{name}-seed")), {})}
                for name in self.models
            },
            "macro": macro_scores(scores),
            "test_families": adjust_comparisons(comparisons, trends, f"{PRIMARY}/{RANKINGS[0]}/kind", self.headline()),
            "comparisons": comparisons,
            "trends": trends,
            "skipped": skipped_pairs(rows),
            "probes": rows,
            "runs": {job.key: str(ctx.run_dir(job.key).relative_to(ctx.directory)) for job in jobs},
        }

    def contrast(self, model: str, contrast: str, ranking: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """`gaps` selections of one comparison (`CONTRASTS`): the MoE's experts at the first k, and what they are compared with."""
        experts = {"model": model, "units": "experts", "variant": "neurons", "ranking": ranking, "k": self.config.ks[0]}
        if contrast in PSEUDO:
            return experts, {**experts, "units": contrast}
        return experts, {**experts, "model": "dense", "units": "dense"}

    def headline(self) -> str:
        """The sparsest learned MoE (top-1, most experts when it exists)."""
        learned = [m for m in self.models if m not in ("dense", LABEL_ROUTER)]
        return max(learned, key=lambda m: (self.sparsity[m], -self.models[m]["top_k"]))

    def summary(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        """Per model, layer and label at the first k: the chosen unit's lift (experts or the dense MLP) beside the primary
        pseudo-experts', the mean lift over units, the old design's largest raw F1, and the random-basis lift."""
        k = self.config.ks[0]
        macro = {(r["model"], r["units"], r["layer"], r["label"], r["variant"]): r for r in results["macro"]
                 if r["k"] == k and r["ranking"] == RANKINGS[0]}
        rows = []
        for name in self.models:
            own = "dense" if name == "dense" else "experts"
            for layer in sorted({key[2] for key in macro}):
                for label in self.task.labels:
                    if (name, own, layer, label, "neurons") not in macro:
                        continue
                    r, pseudo = macro[name, own, layer, label, "neurons"], macro.get((name, PRIMARY, layer, label, "neurons"))
                    rows.append({"model": name, "layer": layer, "label": label, "kind": self.task.labels[label].kind,
                                 f"lift k={k}": fmt_ci(r["lift"]), f"pseudo ({PRIMARY}) lift": fmt_ci(pseudo["lift"]) if pseudo else "n/a",
                                 "mean lift": fmt(r["mean_lift"]["mean"]), "F1": fmt(r["f1"]["mean"]),
                                 "max F1 (old)": fmt(r["max_f1"]["mean"]),
                                 "random-basis lift": fmt(macro[name, own, layer, label, "random_basis"]["lift"]["mean"])})
        return rows

    def verdict_text(self, results: dict[str, Any], key: str, model: str, field: str, value: str) -> str:
        """`**verdict** (Δ = mean [90% CI])` of one comparison row, or n/a."""
        row = next((r for r in results["comparisons"].get(key, []) if r["model"] == model and r[field] == value), None)
        if row is None:
            return "n/a"
        gap = row["gap"]
        uncorrected = f", uncorrected {gap['raw_verdict']}" if gap.get("raw_verdict", gap["verdict"]) != gap["verdict"] else ""
        return f"**{gap['verdict']}** (Δ = {fmt_ci(gap)}{uncorrected})"

    def bottom_line(self, results: dict[str, Any]) -> str:
        """The primary verdict, experts of the headline MoE vs pseudo-experts on its own partition, per kind of label."""
        top, key, k = self.headline(), f"{PRIMARY}/{RANKINGS[0]}/kind", self.config.ks[0]
        rows = [r for r in results["comparisons"][key] if r["model"] == top]
        if not rows:
            return f"**Bottom line**: no comparison of `{top}` with its pseudo-experts could be made (no run or no class probed)."
        meaning = {"more": "expert neurons read these labels better than the same tokens' dense neurons",
                   "less": "expert neurons read these labels worse than the same tokens' dense neurons",
                   "equivalent": f"expert and dense neurons read these labels equally well (within ±{self.config.margin})",
                   "inconclusive": "a difference is not shown, and neither is equivalence"}
        parts = [f"{r['kind']} labels {self.verdict_text(results, key, top, 'kind', r['kind'])}: {meaning[r['gap']['verdict']]}" for r in rows]
        return (f"**Bottom line** (primary comparison): k={k} lift over the shuffled control of `{top}`'s best expert (chosen on "
                f"the selection split, scored on the report split) vs the same for pseudo-experts made of the dense model's neurons "
                f"on the MoE's own token partition, paired by seed, pooled over layers — " + "; ".join(parts) + ".")

    def answers(self, results: dict[str, Any]) -> list[str]:
        """Per label and kind: the primary verdict, the other nulls, the dense MLP, the sparsity trend and the old design's verdict."""
        top, first = self.headline(), RANKINGS[0]
        comparisons, lines = results["comparisons"], []

        def slope_text(key: str, field: str, value: str) -> str:
            row = next((r for r in results["trends"].get(key, []) if r[field] == value), None)
            return "n/a (one learned MoE)" if row is None else f"**{row['slope']['verdict']}** (slope {fmt_ci(row['slope'])} per halving)"

        names = {**{n: f"`{n}` ({l.kind})" for n, l in self.task.labels.items()}, "state": "all state labels", "function": "all function labels"}
        for group in ("label", "kind"):
            for value in dict.fromkeys(r[group] for r in comparisons[f"{PRIMARY}/{first}/{group}"] if r["model"] == top):
                def text(contrast: str) -> str:
                    return self.verdict_text(results, f"{contrast}/{first}/{group}", top, group, value)

                lines.append(
                    f"- {names[value]}: `{top}` experts vs pseudo-experts on its partition {text(PRIMARY)}; vs a random partition "
                    f"{text('random')}; vs k-means {text('kmeans')}; vs the dense MLP {text('dense')}. Primary gap vs routing sparsity: "
                    f"{slope_text(f'{PRIMARY}/{first}/{group}', group, value)}. Old design (largest raw F1 over experts vs dense): {text('old')}."
                )
        for row in comparisons.get(f"{PRIMARY}/{RANKINGS[1]}/kind", []):
            lines.append(f"- Robustness ({RANKINGS[1]} ranking), `{row['model']}` experts vs pseudo-experts on its partition, "
                         f"{names[row['kind']]}: **{row['gap']['verdict']}** (Δ = {fmt_ci(row['gap'])}).")
        for row in comparisons[f"{PRIMARY}/{first}/kind"]:
            if row["model"] == LABEL_ROUTER:
                dense = self.verdict_text(results, f"dense/{first}/kind", LABEL_ROUTER, "kind", row["kind"])
                lines.append(f"- Control, label router on `{self.router_label}`, {names[row['kind']]}: vs pseudo-experts on its partition "
                             f"**{row['gap']['verdict']}** (Δ = {fmt_ci(row['gap'])}); vs the dense MLP {dense}.")
        return lines + [f"- Equivalence margin δ = {self.config.margin}; intervals are 90% for verdicts (TOST), 95% elsewhere; "
                        "Δ is in lift (F1 over the shuffled control), except for the old design (raw F1)."]

    def report(self, results: dict[str, Any], ctx: StudyContext) -> Document:
        cfg, task = self.config, self.task
        frame = pd.DataFrame(results["macro"])
        figures = []
        if len(frame):
            order = sorted(self.models, key=lambda m: (self.sparsity[m], m == LABEL_ROUTER))
            units = {"dense": "dense MLP", "experts": "experts", **{p: f"pseudo: {p}" for p in PSEUDO}}
            first = frame[(frame["k"] == cfg.ks[0]) & (frame["ranking"] == RANKINGS[0]) & (frame["variant"] == "neurons")]
            for label in dict.fromkeys(first["label"]):
                sub = first[first["label"] == label]
                long = pd.DataFrame([{"routing": f"{m} ({self.sparsity[m]:.0f})", "units": units[r["units"]], "layer": r["layer"], **r["lift"]}
                                     for m in order for _, r in sub[sub["model"] == m].iterrows()])
                figures.append((f"`{label}`: k={cfg.ks[0]} lift of the chosen unit (report split) for experts and pseudo-experts vs routing "
                                "sparsity log2(E/k) (mean, 95% CI over seeds)",
                                ctx.figure(f"lift_vs_sparsity_{label}", interval_bars(long, "routing", "units", "layer", "lift", reference=0.0))))
            neurons = frame[(frame["variant"] == "neurons") & (frame["ranking"] == RANKINGS[0])
                            & (((frame["model"] == "dense") & (frame["units"] == "dense"))
                               | ((frame["model"] == self.headline()) & frame["units"].isin(["experts", PRIMARY])))]
            long = pd.DataFrame([{"k": r["k"], "units": f"{r['model']} {units[r['units']]} layer {r['layer']}", "label": r["label"], **r["lift"]}
                                 for _, r in neurons.iterrows()])
            figures.append((f"Lift vs k: the dense MLP, `{self.headline()}`'s experts and its pseudo-experts on its partition (mean, 95% CI over seeds)",
                            ctx.figure("lift_vs_k", interval_bars(long, "k", "units", "label", "lift", reference=0.0))))
        logs = {run: ctx.directory / path / "metrics.csv" for run, path in results["runs"].items()
                if (ctx.directory / path / "metrics.csv").is_file()}
        if logs:
            figures.append(("Training curves", ctx.figure("training_curves", training_curves(logs, ["train_loss", f"val_{task.primary_metric}"]))))
        comparison_rows = [
            {"compared with": contrast, "MoE": r["model"], "layer": r["layer"], "label": r["label"], "experts": fmt_ci(r["a"]),
             "compared": fmt_ci(r["b"]), "Δ (90% CI)": fmt_ci(r["gap"]), "verdict": r["gap"]["verdict"]}
            for contrast in CONTRASTS for r in results["comparisons"][f"{contrast}/{RANKINGS[0]}/layer+label"]
        ]
        trend_rows = [
            {"layer": r["layer"], "label": r["label"], "slope per halving (90% CI)": fmt_ci(r["slope"]), "verdict": r["slope"]["verdict"]}
            for r in results["trends"][f"{PRIMARY}/{RANKINGS[0]}/layer+label"]
        ]
        old_vs_new = [
            {"MoE": r["model"], "labels": r["kind"],
             "old: max raw F1, experts vs dense": self.verdict_text(results, f"old/{RANKINGS[0]}/kind", r["model"], "kind", r["kind"]),
             "new: chosen lift, experts vs pseudo-experts": self.verdict_text(results, f"{PRIMARY}/{RANKINGS[0]}/kind", r["model"], "kind", r["kind"])}
            for r in results["comparisons"][f"old/{RANKINGS[0]}/kind"]
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
                f"Probes read {cfg.n_eval} held-out sequences (seed {cfg.eval_seed}), k ∈ {list(cfg.ks)}, {self.n_candidates} candidate "
                f"neurons per unit. Each MoE's experts are compared with pseudo-experts made of the dense model of the same seed.")]),
            Section("Answers", [Text(self.bottom_line(results)),
                                Text(f"Headline MoE: `{self.headline()}` (the sparsest learned router); pooled over layers."),
                                Text("\n".join(self.answers(results)))]),
            families_section("The primary question is the bottom line's comparison: the headline MoE's experts vs pseudo-experts "
                             "on its own partition, per kind of label. Every other comparison and trend is a family of its own "
                             "(one per table key: comparison / ranking / grouping, over models and groups).",
                             results.get("test_families", {})),
            Section("Old design vs new, per MoE (pooled over layers and labels of a kind)", [Table(old_vs_new)]),
            Section("Model performance (held-out, mean [95% CI] over seeds)", [Table(perf)]),
            Section(f"k={cfg.ks[0]} scores by model, layer and label", [Table(self.summary(results))]),
            Section("Experts vs pseudo-experts and the dense MLP, every MoE, layer and label", [Table(comparison_rows)]),
            Section("Does the primary gap widen with sparser routing?",
                    [Table(trend_rows) if trend_rows else Text("(fewer than two learned MoEs)")]),
            Section("Skipped (expert, class) pairs (too few positives or negatives; summed over seeds)", [Table(skipped)]),
            Section("Figures", [Figure(path, caption) for caption, path in figures]),
            *expert_map_section(ctx.directory, N_SHOWN, f"The map shows the headline MoE, `{self.headline()}`."),
            Section("What the numbers mean", [Text(METRIC_NOTES.format(
                train=1 - sum(FRACTIONS), select=FRACTIONS[0], report=FRACTIONS[1], n_candidates=self.n_candidates,
                max_classes=cfg.max_classes, min_count=cfg.min_count, router_label=self.router_label,
                label_experts=getattr(self, "label_experts", "n/a"), k=cfg.ks[0], margin=cfg.margin, interval=INTERVAL_NOTE))]),
        ]
        blocks += failed_runs_section(results["failed_runs"])
        return Document(f"k-sparse probing of expert neurons and pseudo-experts of dense neurons on `{task.name}`", blocks)
