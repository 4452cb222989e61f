"""Study `expert-specialization`: do MoE experts recover planted labels beyond residual-stream clustering?"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from toylab.analysis.expert_map import N_SHOWN, routing_view, write_expert_map
from toylab.analysis.paths import routing_paths, summarize_paths
from toylab.analysis.specialization import (
    ASSIGNMENTS,
    FAMILIES,
    MARGIN_FLOOR,
    MARGIN_FRACTION,
    NULL_ROUTERS,
    adjust_families,
    analysable_labels,
    primary_labels,
    routing_given_token,
    specialization,
    summarize,
)
from toylab.analysis.stats import FLOOR, INTERVAL_NOTE, MARGIN, UNIT, mean_ci, verdict_label
from toylab.models.routing import RouterName
from toylab.determinism import torch_threads
from toylab.registry import get_task, register_study
from toylab.report import (
    Document, Figure, Section, Table, Text, contingency_heatmaps, expert_map_section, failed_runs_section, families_section, fmt, fmt_ci,
    interval_bars, margin_text, training_curves, verdict_text,
)
from toylab.study import Study, StudyContext, TrainJob, dense_and_moe
from toylab.task import Task
from toylab.training import TrainConfig, build_model, evaluate, load_trained

ASSIGNMENT_NAMES = {
    "routing": "MoE routing (top-1 expert)",
    "kmeans_moe": "k-means on MoE router input",
    "kmeans_dense": "k-means on dense, same site",
}

ROUTERS = {
    "learned": "learned top-{k} softmax router",
    "hash": "hash router (a fixed random token → expert map; routing carries token identity only)",
    "label": "label router on `{label}` (class c → expert c mod {e}; experts specialize by it by construction)",
}

METRIC_NOTES = """\
- **NMI** (normalized mutual information) measures how much knowing the expert tells you about the label, scaled so 0 means independent and 1 means each determines the other. It is computed over all real tokens where the label is defined.
- **ARI** (adjusted Rand index) counts token pairs put together or apart by both the expert assignment and the label, corrected for chance: 0 is chance, 1 is identical partitions, and it can be negative.
- **NMI given the token** (cNMI): I(expert; label | token) / mean(H(expert | token), H(label | token)), each term averaged over token ids weighted by frequency. Token identity dominates every token-level NMI; cNMI asks what the assignment says about the label *beyond* which token it is (0 for a router that only looks at the token). Its null shuffles experts only among tokens with the same id.
- **k-means baseline**: k-means with as many clusters as experts on the activations the router reads (`blocks.{l}.ln2.hook_normalized`). If routing scores no higher, experts find nothing that clustering the residual stream would not.
- **Dense control**: the same k-means at the same site of a dense model trained alike, asking whether the structure is there without any routing.
- **Linear ceiling**: a multinomial logistic probe from the router input to the label, fit on 75% of the held-out sequences and scored on the rest: its accuracy (beside the majority class's) and the NMI of its predictions with the label. It says how much of the label the router could read linearly at all, so "routing recovers 0.3 of 1.0 available" can be told from "0.3 of 0.35". For labels with more classes than experts the probe may use every class; an assignment to {e} experts cannot.
- **Null and p-value**: the expert assignment shuffled across tokens (expert frequencies kept) gives the NMI of a router that ignores its input; the p-value is the share of shuffles scoring at least the observed NMI (add-one, one-sided).
- **AMI** (adjusted mutual information) is NMI corrected for chance: 0 in expectation for any grouping unrelated to the label, whatever its number and sizes of groups, 1 for a perfect match. NMI of an unrelated grouping sits at its shuffled null (above 0); AMI sits at 0.
- **Usage-matched nulls**: what a router with the learned router's expert usage could do without learning anything about the label. *Size-balanced k-means*: k-means centroids on the router input, tokens assigned to the nearest centroids under exactly the routing's expert counts (the largest count to the largest cluster). *Random linear routers*: {draws} draws of scores x W on the router input with W random Gaussian, tokens assigned under the same counts (mean NMI over the draws). Both assignments maximize the total score under the counts exactly (a transportation problem), which makes each a linear router with a bias tuned to the learned router's usage. A load-balanced router is compared with them as with groupings of its own sizes; they share the routing's shuffled null.
- **Verdicts** (routing vs k-means on the router input, and vs each usage-matched null, paired by seed): from the per-seed differences in NMI and their 90% Student-t interval, **more** / **less** when the interval lies above / below 0, **equivalent** when it lies inside ±δ (two one-sided tests at the 5% level), **inconclusive** otherwise. {margin} An inconclusive verdict states the smallest difference the seeds would detect (80% power, 5% one-sided): a difference smaller than that may well be there.
- **Both at floor**: when neither routing nor the baseline exceeds its shuffled null's mean NMI by more than δ, the two agree only in saying nothing about the label: such a verdict reads **both at floor** instead of *equivalent* (it counts as not shown, never as equivalence); a directional verdict there is marked as such.
- **Intervals**: {interval}
"""

CONTROLS = """\
Three routers with known assignments (`--set router=...`) show what the analysis can and cannot see; run them on the `modes` task, whose rule (`mode`) is planted, e.g. `toylab study run expert-specialization --task modes --set router=label --set router_label=mode`.
- **Label router** (positive control): the expert is the class of a named label (`router_label`), in training and analysis. Experts specialize by that label by construction, so with as many experts as classes routing must recover it fully (NMI 1 in every seed) and **more** than k-means, unless k-means on the router input happens to find the label too.
- **Hash router** (state control, Roller et al. 2021): a fixed random token → expert map. Its routing is a function of the token (H(expert | token) = 0 bits, reported below), so its NMI with any label is what token identity alone explains, and its NMI given the token must sit at the null. A learned router that scores like the hash router carries nothing beyond the token.
- **Learned router**: what this study is about. Read its verdicts against the two controls: near the label router means experts specialize by the label; near the hash router, that they route by token.
- The planted unit tests (`tests/test_specialization.py`) check the analysis itself: activations carrying a label only in a quiet direction (so k-means misses it) give **more** when the assignment is the label and **both at floor** when it is k-means of the same activations or random; with the label in the loud direction, the label and k-means are **equivalent** above the floor.
"""


def metric_text(task: Task) -> str:
    """What the task's metric measures: the last paragraph of its own `metrics` docstring (a task's words, not the
    base class's), and the competence threshold a model must reach to be analysed."""
    own = type(task).metrics is not Task.metrics and type(task).metrics.__doc__
    what = " ".join(own.split("\n\n")[-1].split()) if own else "the share of scored positions whose top prediction is the next token."
    bar = f" Models are analysed only when it reaches {task.competence:g} on held-out validation." if task.competence else ""
    return what + bar


@dataclass(frozen=True)
class ExpertSpecializationConfig:
    task: str = "brackets"
    task_options: dict[str, Any] = field(default_factory=dict)
    seeds: int = 5
    model: dict[str, Any] = field(default_factory=lambda: {"d_model": 32, "n_heads": 2, "d_mlp": 64, "n_layers": 2})
    """Options shared by the dense and the MoE transformer (see `TransformerConfig`)."""
    n_experts: int = 4
    top_k: int = 1
    router: RouterName = "learned"
    """The MoE's router: learned, hash (token identity only), label (the label `router_label` picks the expert), or
    any other router of `toylab.models.routing` (noisy, expert_choice, kmeans, sparsity)."""
    router_label: str | None = None
    train: TrainConfig = TrainConfig(steps=700, lr=5e-3)
    """700 steps at a peak of 5e-3 (until December 2026: 1,000 at 3e-3, `--set train.steps=1000 --set train.lr=0.003`):
    the quickstart's 5 seeds in 90 s on 2 cores, with its primary verdicts unchanged (docs/studies/expert-specialization.md)."""
    competence: float | None = None
    """Analyse only models whose held-out primary metric reaches this (None: the task's threshold, `Task.competence`;
    0: every model, a smoke test whose verdicts mean nothing)."""
    n_eval: int = 500
    """Held-out sequences on which activations are analysed (the same for every seed)."""
    n_permutations: int = 500
    null_draws: int = 5
    """Random linear routers drawn per seed and layer (the usage-matched nulls; 0 for none, and no size-balanced k-means)."""
    margin: float | None = None
    """Equivalence margin δ in NMI: routing and a baseline are equivalent when the 90% interval of their difference lies
    inside ±δ. None: per label, `MARGIN_FRACTION` of its linear ceiling's NMI (at least `MARGIN_FLOOR`); a number: that δ
    for every verdict."""
    primary_labels: tuple[str, ...] = ()
    """The labels of the primary question, declared before the run (empty: the task's function labels, `kind ==
    "function"`), e.g. `mode` on visible `modes`, where the rule is named by a token and so counts as state."""
    eval_seed: int = 20261121

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.n_eval < 1 or self.n_permutations < 1 or self.null_draws < 0:
            raise ValueError("seeds, n_eval and n_permutations must be >= 1, null_draws >= 0")
        if self.margin is not None and not 0 < self.margin < 1:
            raise ValueError(f"margin must be in (0, 1) NMI, or None for a share of each label's linear ceiling (got {self.margin})")


@register_study("expert-specialization")
class ExpertSpecialization(Study):
    """Train dense and MoE transformers over seeds; compare expert routing with planted labels, k-means and a null."""

    Config = ExpertSpecializationConfig
    fast = {"competence": 0.0, "seeds": 3, "train": {"steps": 120, "n_train": 2000, "n_val": 200, "eval_every": 60}, "n_eval": 100,
            "n_permutations": 100}
    config: ExpertSpecializationConfig

    def __init__(self, config: ExpertSpecializationConfig) -> None:
        super().__init__(config)
        self.task = get_task(config.task, config.task_options)
        self.models = dense_and_moe(config)
        primary_labels(self.task, config.primary_labels)  # fail early on an unknown primary label
        for options in self.models.values():  # fail early on a bad model or router option
            build_model(self.task, options)

    def run(self, ctx: StudyContext) -> dict[str, Any]:
        cfg, task = self.config, self.task
        eval_batch = ctx.heldout(task, cfg.n_eval, cfg.eval_seed)
        models, analysed = ctx.train_and_analyse([TrainJob(f"{kind}-seed{seed}", task, options, replace(cfg.train, seed=seed))
                                                  for seed in range(cfg.seeds) for kind, options in self.models.items()],
                                                 self.analyse, self.analyses)
        trained = {(seed, kind): models[f"{kind}-seed{seed}"] for seed in range(cfg.seeds) for kind in self.models}
        performance = {
            kind: {
                f"seed{seed}": evaluate(trained[seed, kind].model, task, eval_batch) if trained[seed, kind] else None
                for seed in range(cfg.seeds)
            }
            for kind in self.models
        }
        pairs = list(analysed)
        per_seed = [analysed[seed][0] if seed in analysed else None for seed in range(cfg.seeds)]
        given_token = [analysed[seed][1] for seed in pairs]
        paths = [analysed[seed][2] for seed in pairs if analysed[seed][2] is not None]
        if pairs:
            write_expert_map(ctx.directory / "expert_map.json", task, eval_batch, {str(s): analysed[s][3] for s in pairs},
                             cfg.n_experts, cfg.top_k)
        specialization = summarize(per_seed, cfg.margin) if any(per_seed) else {}
        paths_summary = summarize_paths(paths, self.path_margin()) if paths else {}
        return {
            "task": {"name": task.name, "options": task.options, "primary_metric": task.primary_metric},
            "performance": performance,
            "performance_summary": {
                kind: {
                    metric: mean_ci([runs[s][metric] for s in runs if runs[s]], bounds=None if metric == "loss" else UNIT)
                    for metric in next((r for r in runs.values() if r), {})
                }
                for kind, runs in performance.items()
            },
            "specialization": specialization,
            "expert_entropy_given_token": {
                layer: {**mean_ci([g[layer] for g in given_token]), "max": max(g[layer] for g in given_token)}
                for layer in (given_token[0] if given_token else {})
            },
            "paths": paths_summary,
            "families": adjust_families(specialization, paths_summary, task, cfg.primary_labels),
            "per_seed": per_seed,
            "runs": {key: str(ctx.run_dir(key).relative_to(ctx.directory)) for key in models},
        }

    def analyses(self, seed: int, runs: dict[str, Path]) -> list[tuple[int, tuple[int, Path, Path]]]:
        """A seed's analysis (`StudyContext.train_and_analyse`), once its MoE and dense runs are both usable."""
        moe, dense = runs.get(f"moe-seed{seed}"), runs.get(f"dense-seed{seed}")
        return [(seed, (seed, moe, dense))] if moe and dense else []

    def analyse(self, seed: int, moe_dir: Path, dense_dir: Path) -> tuple[dict[str, Any], dict[str, float], dict[str, Any] | None, dict[str, Any]]:
        """One seed's analysis (in a worker, on one torch thread): its specialization scores, H(expert | token),
        with two or more MoE layers the routing paths' scores, and its expert map."""
        cfg = self.config
        batch = self.task.sample_split(cfg.n_eval, cfg.eval_seed, "heldout")
        moe, dense = load_trained(moe_dir).model, load_trained(dense_dir).model
        with torch_threads(1):
            paths = routing_paths(moe, self.task, batch, cfg.n_permutations, seed) if len(moe.moe_layers()) > 1 else None
            return (specialization(moe, dense, self.task, batch, cfg.n_permutations, seed, cfg.null_draws),
                    routing_given_token(moe, self.task, batch), paths, routing_view(moe, self.task, batch, N_SHOWN, seed))

    def path_margin(self) -> float:
        """The margin of the path verdicts: `margin`, or the absolute default (a path's verdicts span every layer)."""
        return MARGIN if self.config.margin is None else self.config.margin

    def margin_rule(self) -> str:
        """Which margin the verdicts used, in a sentence."""
        if self.config.margin is not None:
            return f"Every verdict uses the absolute margin δ = ±{self.config.margin:g} NMI."
        return (f"Each label's verdicts use δ = {MARGIN_FRACTION:.0%} of its linear ceiling (the probe's NMI with the label at "
                f"that layer, mean over seeds), at least {MARGIN_FLOOR:g} NMI, given per (layer, label) in the tables: a "
                f"difference that small is small beside what the router could read. The same δ serves the verdicts given the "
                f"token. Path verdicts use the absolute δ = ±{self.path_margin():g} NMI.")

    def path_section(self, results: dict[str, Any]) -> list[Section]:
        """Routing paths across layers: is the tuple of experts a token takes more aligned with a label than
        any single layer's expert, than k-means with as many clusters, and than a null?"""
        if not results["paths"]:
            return []
        rows = [{"label": label, "paths": fmt(s["n_paths"]["mean"], 1), "NMI path": fmt_ci(s["path_nmi"]),
                 "NMI k-means (as many clusters)": fmt_ci(s["kmeans_nmi"]), "JSD path": fmt_ci(s["path_jsd"]),
                 "JSD null": fmt(s["path_null_jsd"]["mean"]), "best layer (per seed)": ", ".join(map(str, s["best_layers"])),
                 "NMI given best layer [null]": f"{fmt_ci(s['gain_cnmi'])} [{fmt(s['gain_null_cnmi']['mean'])}]",
                 "path vs best layer": s["path_vs_layer"]["verdict"],
                 "path vs k-means": s["path_vs_kmeans"]["verdict"], "path vs null": s["path_vs_null"]["verdict"]}
                for label, s in results["paths"].items()]
        return [Section("Routing paths across layers", [Text(
            "A token's path is the tuple of its top-1 experts through the MoE layers, taken as one cluster id. It is "
            "compared with the best single layer by what the other layers add about the label given that layer's expert: "
            "I(path; label) = I(best layer; label) + I(other layers; label | best layer), so the conditional NMI of the "
            "other layers with the label given the best layer, against its null (those experts shuffled among tokens that "
            "share the best layer's expert), is the path's gain on one scale whatever the numbers of clusters. The best "
            "layer (0 = the first MoE layer) is chosen by NMI on half of the held-out sequences and the gain is scored on the "
            "other half, so the choice is not fit to the tokens it is scored on. *more* means the path says more about the "
            "label than the best single layer; *equivalent* that it adds less than ±δ. The path is also compared with "
            "k-means with as many clusters as distinct paths on the concatenated router inputs, and with its null; JSD is "
            "the mean Jensen–Shannon divergence (bits) of each path's class distribution from the global one, beside its "
            "multinomial null."), Table(rows)])]

    def question(self) -> str:
        """The primary question, naming its labels and where they come from."""
        labels = ", ".join(f"`{n}`" for n in primary_labels(self.task, self.config.primary_labels))
        what = (f"the labels declared primary before the run: {labels}" if self.config.primary_labels
                else f"what the model must compute, the task's function labels: {labels}")
        return (f"The study's one primary question: do the experts of the last MoE layer specialize in {what}, beyond k-means "
                "on the router input? One test per label, corrected within this family.")

    def router_description(self) -> str:
        cfg = self.config
        description = ROUTERS.get(cfg.router, "`{router}` router (see `toylab.models.routing`), top-{k}")
        return description.format(k=cfg.top_k, label=cfg.router_label, e=cfg.n_experts, router=cfg.router)

    def summary(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        rows = []
        for layer, labels in results["specialization"].items():
            for label, s in labels.items():
                rows.append({
                    "layer": layer,
                    "label": label,
                    "kind": self.task.labels[label].kind,
                    "routing vs k-means": verdict_label(s["verdict"]),
                    "given the token": s["conditional_verdict"]["verdict"] if s["label_entropy_given_token"] > 1e-9 else "n/a",
                    "NMI routing": fmt_ci(s["routing_nmi"]),
                    "NMI k-means (router input)": fmt_ci(s["kmeans_moe_nmi"]),
                    "NMI k-means (dense)": fmt_ci(s["kmeans_dense_nmi"]),
                    "NMI null": fmt(s["null_nmi"]["mean"]),
                    "AMI routing": fmt_ci(s["routing_ami"]),
                    "AMI k-means (router input)": fmt_ci(s["kmeans_moe_ami"]),
                    "linear probe acc.": fmt(s["linear_accuracy"]["mean"]),
                    "δ": margin_text(s["margin"]),
                })
        return rows

    def detail_rows(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        """ARI, the NMI given the token and the linear ceiling, per (layer, label)."""
        return [
            {
                "layer": layer, "label": label,
                "ARI routing": fmt_ci(s["routing_ari"]), "ARI k-means (router input)": fmt_ci(s["kmeans_moe_ari"]),
                "cNMI routing": fmt_ci(s["routing_cnmi"]), "cNMI k-means": fmt_ci(s["kmeans_moe_cnmi"]),
                "cNMI null": fmt(s["null_cnmi"]["mean"]), "routing cNMI max p": fmt(s["routing_max_cnmi_p_value"], 4),
                "probe acc. [majority]": f"{fmt_ci(s['linear_accuracy'])} [{fmt(s['linear_baseline']['mean'])}]",
                "probe NMI": fmt_ci(s["linear_nmi"]),
            }
            for layer, labels in results["specialization"].items()
            for label, s in labels.items()
        ]

    def primary_rows(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        """The primary family: routing vs k-means for the function labels at the last MoE layer."""
        if not results["specialization"]:
            return []
        last = max(results["specialization"], key=int)
        return [{"layer": last, "label": label, "NMI routing": fmt_ci(s["routing_nmi"]),
                 "NMI k-means (router input)": fmt_ci(s["kmeans_moe_nmi"]), "AMI routing": fmt_ci(s["routing_ami"]),
                 "AMI k-means": fmt_ci(s["kmeans_moe_ami"]), "linear probe NMI": fmt_ci(s["linear_nmi"]),
                 "δ": margin_text(s["margin"]), "routing vs k-means": verdict_text(s["verdict"])}
                for label, s in results["specialization"][last].items() if label in primary_labels(self.task, self.config.primary_labels)]

    def null_rows(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        """Routing beside the usage-matched nulls, per (layer, label), where they were run."""
        return [{"layer": layer, "label": label, "NMI routing": fmt_ci(s["routing_nmi"]),
                 **{f"NMI {name}": fmt_ci(s[f"{kind}_nmi"]) for kind, name in NULL_ROUTERS.items()},
                 "NMI shuffled null": fmt(s["null_nmi"]["mean"]), "AMI routing": fmt_ci(s["routing_ami"]),
                 **{f"AMI {name}": fmt_ci(s[f"{kind}_ami"]) for kind, name in NULL_ROUTERS.items()},
                 **{f"routing vs {name}": verdict_label(s[f"vs_{kind}"]) for kind, name in NULL_ROUTERS.items()}}
                for layer, labels in results["specialization"].items() for label, s in labels.items() if "vs_random_linear" in s]

    def null_summary(self, results: dict[str, Any]) -> list[Text]:
        """What the usage-matched nulls show for the primary labels at the last MoE layer, in a sentence (none if not run)."""
        if not self.null_rows(results):
            return []
        last = results["specialization"][max(results["specialization"], key=int)]
        parts = [f"`{label}`: NMI {fmt(s['kmeans_balanced_nmi']['mean'])} for size-balanced k-means and "
                 f"{fmt(s['random_linear_nmi']['mean'])} for random linear routers (routing {fmt(s['routing_nmi']['mean'])}); "
                 f"routing vs balanced k-means {verdict_label(s['vs_kmeans_balanced'])}, vs random linear routers "
                 f"{verdict_label(s['vs_random_linear'])}"
                 for label, s in last.items() if label in primary_labels(self.task, self.config.primary_labels)]
        return [Text("The primary family compares routing with unconstrained k-means; beside it, the usage-matched nulls "
                     "(secondary, each family corrected on its own) ask the same of groupings with the learned router's expert "
                     "counts, at the last layer: " + "; ".join(parts) + ".")]

    def bottom_line(self, results: dict[str, Any]) -> str:
        cfg, task = self.config, self.task
        pairs = [(f"`{label}` (layer {layer})", s) for layer, labels in results["specialization"].items() for label, s in labels.items()]
        if not pairs:
            return "No pair of dense and MoE runs finished, so there is nothing to compare."
        primary = self.primary_rows(results)
        what = "the declared primary labels" if cfg.primary_labels else "what the model must compute"
        answer = (f"**Primary question**: do the last MoE layer's experts align with {what}, beyond k-means "
                  "on the router input? " + "; ".join(f"`{r['label']}`: {r['routing vs k-means']}" for r in primary) + ". ")
        seeds = max(s["verdict"]["n"] for _, s in pairs)
        groups = {v: [name for name, s in pairs if verdict_label(s["verdict"]) == v] for v in ("more", "less", "equivalent", FLOOR, "inconclusive")}
        counts = "; ".join(f"{v} for {len(names)}" + (f" ({', '.join(names)})" if names and v != "inconclusive" else "")
                           for v, names in groups.items() if names)
        moe = results["performance_summary"].get("moe", {}).get(task.primary_metric)
        raw = sum(s["verdict"]["raw_verdict"] in ("more", "less") for _, s in pairs)
        margin = (f"δ = ±{cfg.margin:g} NMI" if cfg.margin is not None
                  else f"δ = {MARGIN_FRACTION:.0%} of each label's linear ceiling, at least {MARGIN_FLOOR:g} NMI")
        text = answer + (
            f"With the {self.router_description()} on `{task.name}`, over {seeds} seed{'s' if seeds != 1 else ''}, "
            f"routing aligned with the planted labels, compared with k-means on the router input ({margin}, "
            f"verdicts Benjamini–Hochberg-adjusted within each family of tests): {counts} of {len(pairs)} (label, layer) pairs "
            f"({raw} directional without the correction).")
        if moe is not None:
            text += f" The MoE model's held-out {task.primary_metric} is {fmt_ci(moe)}."
        entropy = results["expert_entropy_given_token"]
        if entropy:
            worst = max(e["max"] for e in entropy.values())
            text += (f" Routing is a function of the token (H(expert | token) ≤ {fmt(worst)} bits in every layer and seed)."
                     if worst < 0.01 else f" Routing is not a function of the token alone (H(expert | token) up to {fmt(worst)} bits).")
        return text

    def verdict_lines(self, results: dict[str, Any]) -> list[str]:
        lines = []
        for layer, labels in results["specialization"].items():
            for label, s in labels.items():
                against_null = "beats" if s["routing_max_p_value"] < 0.05 else "does not clearly beat"
                given = (f"given the token, {verdict_text(s['conditional_verdict'])}"
                         if s["label_entropy_given_token"] > 1e-9 else "given the token, nothing is left to recover (the token determines the label)")
                nulls = "".join(f" Routing vs {name}: {verdict_text(s[f'vs_{kind}'])}." for kind, name in NULL_ROUTERS.items() if f"vs_{kind}" in s)
                lines.append(
                    f"- Layer {layer}, `{label}` ({self.task.labels[label].kind}), δ = {margin_text(s['margin'])}: routing vs "
                    f"k-means on the router input: {verdict_text(s['verdict'])}; {given}.{nulls} A linear probe reads the label "
                    f"with accuracy {fmt_ci(s['linear_accuracy'])} (majority class {fmt(s['linear_baseline']['mean'])}). Routing "
                    f"{against_null} the shuffled-assignment null in every seed (largest p = {fmt(s['routing_max_p_value'], 4)})."
                )
        return lines

    def report(self, results: dict[str, Any], ctx: StudyContext) -> Document:
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
                    {"layer": layer, "label": label, "assignment": name, **s[key]}
                    for layer, labels in results["specialization"].items()
                    for label, s in labels.items()
                    for key, name in (*((f"{kind}_nmi", name) for kind, name in NULL_ROUTERS.items() if f"{kind}_nmi" in s),
                                      ("null_nmi", "shuffled null"), ("linear_nmi", "linear probe (ceiling)"))
                ]
            )
            figures.append(Figure(ctx.figure("nmi_comparison", interval_bars(frame, "label", "assignment", "layer", "NMI")),
                                  "NMI with each label: routing vs k-means, the usage-matched nulls and the shuffled null, and the linear "
                                  "probe's NMI (mean, 95% CI over seeds)"))
            first = next(s for s in results["per_seed"] if s)
            names = {name: task.labels[name].classes for name in analysable_labels(task)}
            for layer, labels in first.items():
                tables = {name: labels[name]["routing"]["contingency"] for name in labels}
                figures.append(Figure(ctx.figure(f"experts_layer{layer}", contingency_heatmaps(tables, names, f"layer {layer}")),
                                      f"Layer {layer}: share of each class's tokens routed to each expert (first seed)"))
        logs = {run: ctx.directory / path / "metrics.csv" for run, path in results["runs"].items()
                if (ctx.directory / path / "metrics.csv").is_file()}
        if logs:
            curves = training_curves(logs, ["train_loss", f"val_{task.primary_metric}"])
            figures.append(Figure(ctx.figure("training_curves", curves), "Training curves (training loss; validation metric)"))

        perf_rows = [
            {"model": kind, **{metric: fmt_ci(stat, 4) for metric, stat in metrics.items()}}
            for kind, metrics in results["performance_summary"].items()
        ]
        entropy_rows = [{"layer": layer, "H(expert \\| token), bits": fmt_ci(e), "largest over seeds": fmt(e["max"])}
                        for layer, e in results["expert_entropy_given_token"].items()]
        blocks = [
            Text(f"**Bottom line.** {self.bottom_line(results)}"),
            families_section(self.question(), results.get("families", {}), [Table(self.primary_rows(results)), *self.null_summary(results)], FAMILIES),
            Section("What was run", [Text(
                f"Task `{task.name}` with options `{task.options}`. {task.describe()}\n\n"
                f"A dense transformer and an MoE transformer ({cfg.n_experts} experts, {self.router_description()}) with shared "
                f"options `{cfg.model}`, each trained for {cfg.train.steps} steps (batch {cfg.train.batch_size}, lr {cfg.train.lr}) "
                f"with {cfg.seeds} seeds. Activations were collected on {cfg.n_eval} held-out sequences (seed {cfg.eval_seed}); "
                f"nulls use {cfg.n_permutations} shuffles and {cfg.null_draws} random linear routers. {self.margin_rule()}")]),
            Section("Model performance (held-out, mean [95% CI] over seeds)", [
                Table(perf_rows),
                Text(f"The task's metric is `{task.primary_metric}`: {metric_text(task)}"),
            ]),
            Section("Verdicts", [Text("\n".join(self.verdict_lines(results)))]),
            Section("Results", [Table(self.summary(results)),
                                Section("ARI, NMI given the token, and the linear ceiling", [Table(self.detail_rows(results))])]),
            *([Section("Usage-matched nulls", [Text(
                "Size-balanced k-means and random linear routers on the router input, each with exactly the routing's expert "
                "counts (see *What the numbers mean*): groupings of the routing's own sizes that a linear router could make "
                "without learning the label. Routing *more* than them is specialization beyond what its usage and a linear map "
                "give for free; *both at floor* means none of them says anything about the label."),
                Table(self.null_rows(results))])] if self.null_rows(results) else []),
            Section("Controls", [
                Text(CONTROLS),
                Text(f"This run's router: {self.router_description()}. How far routing is a function of the token:"),
                Table(entropy_rows) if entropy_rows else Text("(no MoE run finished)"),
            ]),
        ]
        blocks += [
            *expert_map_section(ctx.directory, N_SHOWN),
            Section("Figures", figures),
            *self.path_section(results),
            Section("What the numbers mean", [Text(METRIC_NOTES.format(margin=self.margin_rule(), draws=cfg.null_draws, e=cfg.n_experts,
                                                                       interval=INTERVAL_NOTE, l="{l}"))]),
        ]
        blocks += failed_runs_section(results["failed_runs"])
        return Document(f"Expert specialization on `{task.name}`", blocks)
