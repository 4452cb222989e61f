"""Study `routing-variants`: which MoE designs give experts that recover planted labels beyond residual-stream clustering?"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from toylab.analysis.expert_map import N_SHOWN
from toylab.analysis.load_balance import routing_load
from toylab.analysis.sparse_probing import class_scores, compare_gaps, gaps, sparse_probing
from toylab.analysis.paths import matched_routing, summarize_matched
from toylab.analysis.specialization import primary_labels
from toylab.analysis.stats import INTERVAL_NOTE, MARGIN, UNIT, claim_state, mean_ci
from toylab.analysis.variants import FAMILIES, PRIMARY, adjust_variant_families, primary_verdicts, variant_claim
from toylab.models import Transformer
from toylab.determinism import torch_threads
from toylab.registry import get_task, register_study
from toylab.report import (
    Document, Figure, Section, Table, Text, expert_map_section, failed_runs_section, families_section, fmt, fmt_ci, interval_bars,
    verdict_text,
)
from toylab.study import Study, StudyContext, TrainJob, dense_and_moe
from toylab.task import Batch
from toylab.training import TrainConfig, build_model, evaluate, load_trained

VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "switch": ({}, "learned top-k softmax router, dropless (Switch Transformer, Fedus et al. 2021)"),
    "noisy": ({"router": "noisy"}, "noisy top-k gating (Shazeer et al. 2017)"),
    "capacity": ({"capacity_factor": 1.0}, "learned top-k with capacity factor 1 and token dropping (Switch / GShard)"),
    "expert-choice": ({"router": "expert_choice", "capacity_factor": 1.0},
                      "expert-choice routing, capacity factor 1: each expert takes its top tokens among all tokens of the batch "
                      "(Zhou et al. 2022); not causal: a token's experts depend on later tokens and on other sequences"),
    "kmeans": ({"router": "kmeans"}, "parameter-free k-means router: cosine to running centroids of the router inputs"),
    "moe-x": ({"router": "sparsity", "activation": "relu"}, "ReLU experts with sparsity-aware routing (MoE-X, Yang et al. 2025)"),
    "fine-grained": ({"n_experts": 16, "top_k": 4}, "16 experts of a quarter the size, top-4 (fine-grained, DeepSeekMoE)"),
    "shared": ({"n_experts": 16, "top_k": 3, "shared_experts": 1},
               "16 fine-grained experts, top-3, plus one shared expert on every token (DeepSeekMoE)"),
    "orthogonal": ({"orthogonality_weight": 0.1}, "learned top-k with an orthogonality penalty (weight 0.1) between experts' weights"),
}
"""Variant name -> (MoE options over the study's base MoE, description). Every variant keeps (top_k + shared_experts) *
d_expert equal to the dense MLP's d_mlp, so active parameters match."""

QUESTION = ("The study's one primary question: does some MoE design make its experts align with what the model must "
            "compute (the task's function labels: {labels}) beyond clustering the residual stream? The one comparison that "
            "answers it: per variant and function label, the NMI of routing vs that of k-means on the router input with as "
            "many clusters as the routing uses, at the last MoE layer, paired by seed. All {tests} tests (every variant × "
            "label) form one family: naming the variants that beat k-means is a choice among the candidates, and the "
            "correction over all of them makes that choice part of the test.")
"""The primary question of `routing-variants` and the family that answers it (`variants.FAMILIES`), for the report."""

METRIC_NOTES = """\
- **Matched active parameters**: every MoE gives a token (top_k + shared experts) × d_expert = d_mlp hidden neurons (expert choice: top_k experts per token on average), as many as the dense MLP.
- **Load balance**: *usage entropy*, the entropy of the share of routed slots each expert gets over log(E) (1 = all experts used equally); *no expert*, the share of held-out tokens routed to no expert at all (expert choice leaves some; a capacity drops some). Empty slots have index -1 and weight 0 in `hook_expert_indices` / `hook_expert_weights`.
- **Specialization**: per MoE layer and label, NMI of each token's best expert with the label (tokens with no expert form one cluster of their own, "no expert"), against **k-means with as many clusters as the routing uses** on the router input (`blocks.{{l}}.ln2.hook_normalized`), a **shuffled null** with the same expert frequencies, and the **linear ceiling** (NMI of a logistic probe's predictions from the router input). NMI grows with the number of clusters, so the count is matched per layer and seed: a token-dropping router (expert choice, a capacity factor) that uses E + 1 clusters, the no-expert one included, is compared with k-means with E + 1, a router that uses fewer experts than it has with as few, and 16 experts with 16 clusters. All tokens are scored (not only routed ones), so every variant is scored on the same tokens and what dropping says about a label counts as routing.
- **Expert choice is not causal**: each expert picks its top tokens among all tokens of the batch, so a token's experts depend on later positions of its own sequence and on other sequences. Its scores here come from one forward pass over the {n_eval} held-out sequences at once; such a router cannot route token by token at generation, and its numbers depend on the batch.
- **k = 1 sparse-probing F1** (Gurnee et al. 2023; as in `sparse-probing`): for each class of each label, the single best neuron (ranked by the standardized difference of class means on the training split) of the best expert (probed on its own tokens), scored by held-out F1 and averaged over classes and FFN layers; the dense MLP's neurons beside it, and the same F1 with shuffled targets as the base-rate control.
- **Verdicts** (paired by seed, at least 3 seeds): from the per-seed differences, **more** / **less** (a paired t-test), **equivalent** inside ±δ (δ = {margin}; two one-sided tests), **inconclusive** otherwise (with the smallest difference the seeds could detect), each at the 5% level after the Benjamini–Hochberg correction within its family (see *Primary question and families of tests*); the 90% intervals shown are uncorrected.
- **Claims** read **supported** (*more*), **contradicted** (*equivalent* within ±δ, or *less*) or **not shown** (*inconclusive*): a comparison that fails to reach *more* says nothing about whether routing is no better than clustering.
- {interval}
"""


@dataclass(frozen=True)
class RoutingVariantsConfig:
    task: str = "brackets"
    task_options: dict[str, Any] = field(default_factory=dict)
    seeds: int = 3
    model: dict[str, Any] = field(default_factory=lambda: {"d_model": 32, "n_heads": 2, "d_mlp": 64, "n_layers": 2})
    """Options shared by the dense transformer and every MoE (see `TransformerConfig`)."""
    n_experts: int = 4
    top_k: int = 1
    """The base MoE every variant starts from (a variant may change them, e.g. fine-grained experts)."""
    variants: tuple[str, ...] = tuple(VARIANTS)
    train: TrainConfig = TrainConfig(steps=600, lr=3e-3, n_train=10000, n_val=500)
    competence: float | None = None
    """Analyse only models whose held-out primary metric reaches this (None: the task's threshold, `Task.competence`;
    0: every model, a smoke test whose verdicts mean nothing)."""
    n_eval: int = 300
    """Held-out sequences on which every analysis runs (the same for every model and seed)."""
    n_permutations: int = 200
    max_classes: int = 8
    """Sparse probing: at most this many classes per label (the most frequent)."""
    min_count: int = 10
    """Sparse probing: an (expert, class) pair needs this many positives and negatives on each side of the split."""
    margin: float = MARGIN
    eval_seed: int = 20261121

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.n_eval < 8 or self.n_permutations < 1 or self.max_classes < 1 or self.min_count < 1:
            raise ValueError("seeds, n_permutations, max_classes and min_count must be >= 1, n_eval >= 8")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants or len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants must be distinct, at least one; valid: {', '.join(VARIANTS)} (got {', '.join(self.variants) or 'none'})")
        if not 0 < self.margin < 1:
            raise ValueError(f"margin must be in (0, 1) (got {self.margin})")


@register_study("routing-variants")
class RoutingVariants(Study):
    """Routing and expert variants (expert choice, k-means, MoE-X, fine-grained, shared, orthogonal, noisy, capacity) at matched active parameters."""

    Config = RoutingVariantsConfig
    fast = {"competence": 0.0, "seeds": 3, "model": {"d_model": 16, "n_heads": 2, "d_mlp": 32, "n_layers": 1},
            "train": {"steps": 30, "n_train": 256, "n_val": 32, "eval_every": 30, "warmup_steps": 5},
            "n_eval": 24, "n_permutations": 10, "max_classes": 3, "min_count": 3}
    config: RoutingVariantsConfig

    def __init__(self, config: RoutingVariantsConfig) -> None:
        super().__init__(config)
        self.task = get_task(config.task, config.task_options)
        self.models = {"dense": dense_and_moe(config)["dense"],
                       **{v: dense_and_moe(config, **VARIANTS[v][0])["moe"] for v in config.variants}}
        for options in self.models.values():  # fail early on a bad model option
            build_model(self.task, options)

    def run(self, ctx: StudyContext) -> dict[str, Any]:
        cfg, task = self.config, self.task
        jobs = [TrainJob(f"{kind}-seed{seed}", task, options, replace(cfg.train, seed=seed))
                for seed in range(cfg.seeds) for kind, options in self.models.items()]
        trained = ctx.train(jobs)
        eval_batch = ctx.heldout(task, cfg.n_eval, cfg.eval_seed)
        ctx.expert_map([job for job in jobs if job.key.rsplit("-seed", 1)[0] == cfg.variants[0]], eval_batch)
        performance = {kind: [evaluate(trained[f"{kind}-seed{s}"].model, task, eval_batch)[task.primary_metric]
                              for s in range(cfg.seeds) if trained[f"{kind}-seed{s}"]] for kind in self.models}
        pairs = [(kind, seed) for kind in cfg.variants for seed in range(cfg.seeds) if trained[f"{kind}-seed{seed}"]]
        analysed = dict(zip(pairs, ctx.map(self.analyse, [k for k, _ in pairs], [s for _, s in pairs],
                                           [ctx.run_dir(f"{k}-seed{s}") for k, s in pairs], description="analysing")))
        dense = [s for s in range(cfg.seeds) if trained[f"dense-seed{s}"]]
        dense_probes = ctx.map(self.probe_run, ["dense"] * len(dense), dense, [ctx.run_dir(f"dense-seed{s}") for s in dense],
                               description="probing dense")
        rows = [row for result in [*(a["probing"] for a in analysed.values()), *dense_probes] for row in result]
        scores = class_scores(rows, ks=(1,)) if rows else None
        variants = {kind: self.summarize_variant(kind, performance[kind], analysed, scores) for kind in cfg.variants}
        return {
            "task": {"name": task.name, "options": task.options, "primary_metric": task.primary_metric},
            "test_families": adjust_variant_families(variants, primary_labels(task)),
            "variants": variants,
            "dense": {"metric": mean_ci(performance["dense"], bounds=UNIT), "probe_f1": self.probe_summary("dense", scores)},
            "runs": {job.key: str(ctx.run_dir(job.key).relative_to(ctx.directory)) for job in jobs},
        }

    def analyse(self, kind: str, seed: int, moe_dir: Path) -> dict[str, Any]:
        """One (variant, seed) in a worker on one torch thread: routing against k-means with as many clusters as it
        uses, the null and the linear ceiling (`matched_routing`), load balance, and k = 1 sparse probing."""
        cfg = self.config
        batch = self.task.sample_split(cfg.n_eval, cfg.eval_seed, "heldout")
        moe = load_trained(moe_dir).model
        with torch_threads(1):
            return {"specialization": matched_routing(moe, self.task, batch, cfg.n_permutations, seed),
                    "load": routing_load(moe, self.task, batch), "probing": self.probe(kind, seed, moe, batch)}

    def probe_run(self, kind: str, seed: int, directory: Path) -> list[dict[str, Any]]:
        """`probe` of a finished run (in a worker, on one torch thread)."""
        with torch_threads(1):
            return self.probe(kind, seed, load_trained(directory).model, self.task.sample_split(self.config.n_eval, self.config.eval_seed, "heldout"))

    def probe(self, kind: str, seed: int, model: Transformer, batch: Batch) -> list[dict[str, Any]]:
        """k = 1 sparse probing of one model's FFN neurons on `batch` (rows tagged with model and seed)."""
        cfg = self.config
        rows = sparse_probing(model, self.task, batch, ks=(1,), rankings=("mean_difference",), min_count=cfg.min_count,
                              max_classes=cfg.max_classes, seed=seed)
        return [{**row, "model": kind, "seed": seed} for row in rows]

    def summarize_variant(self, kind: str, metric: list[float], analysed: dict[tuple[str, int], dict[str, Any]],
                          scores: pd.DataFrame | None) -> dict[str, Any]:
        """Across seeds: the task metric, load balance (mean over MoE layers), specialization summary and verdicts, probe F1."""
        runs = [a for (k, _), a in sorted(analysed.items()) if k == kind]
        load = {key: mean_ci([sum(layer[key] for layer in r["load"].values()) / len(r["load"]) for r in runs],
                             bounds=None if key == "experts_per_token" else UNIT)
                for key in ("usage_entropy", "unrouted", "dropped_slots", "experts_per_token")} if runs else {}
        return {
            "metric": mean_ci(metric, bounds=UNIT),
            "load": load,
            "specialization": summarize_matched([r["specialization"] for r in runs], self.config.margin) if runs else {},
            "probe_f1": self.probe_summary(kind, scores),
        }

    def probe_summary(self, kind: str, scores: pd.DataFrame | None) -> dict[str, Any]:
        """Per label: k = 1 F1 of the best neuron (mean over classes and layers, mean [95% CI] over seeds), the shuffled
        control, and for an MoE the verdict on its F1 minus the dense model's (paired by seed, classes both probe)."""
        if scores is None or kind not in set(scores["model"]):
            return {}
        own = scores[scores["model"] == kind]
        out = {}
        for label, part in own.groupby("label", sort=False):
            per_seed = part.groupby(["variant", "seed"])["f1"].mean()
            out[label] = {"f1": mean_ci(per_seed["neurons"].tolist(), bounds=UNIT),
                          "shuffled": mean_ci(per_seed["shuffled"].tolist(), bounds=UNIT)}
        if kind != "dense" and "dense" in set(scores["model"]):
            gap = gaps(scores, {"model": kind, "variant": "neurons"}, {"model": "dense", "variant": "neurons"}, by=("label",))
            for row in compare_gaps(gap, ("label",), self.config.margin):
                out[row["label"]]["vs_dense"] = row["gap"]
        return out

    def summary(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        metric = results["task"]["primary_metric"]
        rows = [{"variant": "dense", metric: fmt_ci(results["dense"]["metric"]), "usage entropy": "", "no expert": "",
                 "k=1 F1": fmt(self.mean_f1(results["dense"]["probe_f1"])), "routing vs k-means, equal clusters (more/equiv./less/inconcl.)": ""}]
        for kind, v in results["variants"].items():
            verdicts = [s["verdict"]["verdict"] for labels in v["specialization"].values() for s in labels.values()]
            rows.append({
                "variant": kind, metric: fmt_ci(v["metric"]),
                "usage entropy": fmt_ci(v["load"]["usage_entropy"]) if v["load"] else "n/a",
                "no expert": fmt_ci(v["load"]["unrouted"]) if v["load"] else "n/a",
                "k=1 F1": fmt(self.mean_f1(v["probe_f1"])),
                "routing vs k-means, equal clusters (more/equiv./less/inconcl.)": "/".join(str(verdicts.count(x)) for x in ("more", "equivalent", "less", "inconclusive")),
            })
        return rows

    @staticmethod
    def mean_f1(probe: dict[str, Any]) -> float | None:
        return sum(p["f1"]["mean"] for p in probe.values()) / len(probe) if probe else None

    def detail_rows(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"variant": kind, "layer": layer, "label": label, "clusters used": fmt(s["n_clusters"]["mean"], 1),
             "NMI routing": fmt_ci(s["routing_nmi"]), "NMI k-means (as many clusters)": fmt_ci(s["kmeans_nmi"]), "NMI ceiling": fmt_ci(s["linear_nmi"]), "NMI null": fmt(s["null_nmi"]["mean"]),
             "routing vs k-means": s["verdict"]["verdict"],
             "k=1 F1 [shuffled]": (f"{fmt_ci(v['probe_f1'][label]['f1'])} [{fmt(v['probe_f1'][label]['shuffled']['mean'])}]"
                                   if label in v["probe_f1"] else "n/a"),
             "F1 vs dense": v["probe_f1"].get(label, {}).get("vs_dense", {}).get("verdict", "n/a")}
            for kind, v in results["variants"].items()
            for layer, labels in v["specialization"].items()
            for label, s in labels.items()
        ]

    def primary_rows(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        """One row per test of the primary family: variant, function label, claim state and corrected verdict."""
        labels = primary_labels(self.task)
        return [{"variant": kind, "label": f"`{label}`", "claim": claim_state(c["verdict"], ("more",)), "routing vs k-means": verdict_text(c)}
                for kind, v in results["variants"].items() for label, c in primary_verdicts(v["specialization"], labels).items()]

    def conclusion(self, results: dict[str, Any]) -> str:
        """The primary question's answer: per variant, the state of "its routing recovers the function labels beyond
        k-means with as many clusters", supported, contradicted or not shown (with what the seeds could detect)."""
        cfg, labels = self.config, primary_labels(self.task)
        claims: dict[str, list[str]] = {}
        for kind, v in results["variants"].items():
            claims.setdefault(variant_claim(v["specialization"], labels), []).append(kind)
        detectable = [c["detectable"] for v in results["variants"].values() for c in primary_verdicts(v["specialization"], labels).values()
                      if c["verdict"] == "inconclusive" and math.isfinite(c["detectable"])]
        meaning = {
            "supported": "routing recovered more than k-means for every function label",
            "contradicted": f"routing was equivalent to k-means within ±{cfg.margin:g} NMI or less, for every function "
                            "label: shown to carve up the residual stream no better than clustering it, within the margin",
            "not shown": f"inconclusive, neither more nor equivalence within ±{cfg.margin:g} NMI was shown"
                         + (f" (differences below {fmt(min(detectable))}–{fmt(max(detectable))} NMI were not reliably detected)"
                            if detectable else ""),
        }
        parts = [f"**{state}** for {', '.join(f'`{k}`' for k in kinds)}: {meaning[state]}"
                 for state in meaning if (kinds := claims.get(state))]
        parts += [f"`{kind}` {state}" for state, kinds in claims.items() if state not in meaning for kind in kinds]
        text = (f"Does some design's routing recover what the model must compute ({', '.join(f'`{n}`' for n in labels)}) beyond "
                f"k-means on its router input with as many clusters, at the last MoE layer? Over {cfg.seeds} seeds, with the "
                f"verdicts corrected over every variant and label (δ = ±{cfg.margin:g} NMI): " + "; ".join(parts) + ".")
        if "supported" not in claims:
            text += " No design was shown to beat clustering; where the claim is not shown, that is no evidence that none does."
        return text

    def report(self, results: dict[str, Any], ctx: StudyContext) -> Document:
        cfg, task = self.config, self.task
        frame = pd.DataFrame([
            {"layer": layer, "label": label, "variant": kind, **{k: s["verdict"][k] for k in ("mean", "ci_low", "ci_high")}}
            for kind, v in results["variants"].items() for layer, labels in v["specialization"].items() for label, s in labels.items()
        ])
        families = results.get("test_families", {})
        question = QUESTION.format(labels=", ".join(f"`{n}`" for n in primary_labels(task)), tests=families.get(PRIMARY, {"tests": 0})["tests"])
        blocks: list[Any] = [Text(f"**Bottom line.** {self.conclusion(results)}"),
                             families_section(question, families, [Table(self.primary_rows(results))], FAMILIES)]
        blocks.append(Section("What was run", [Text(
            f"Task `{task.name}` with options `{task.options}`. {task.describe()}\n\n"
            f"A dense transformer and one MoE per variant, with shared options `{cfg.model}` and base MoE {cfg.n_experts} experts, "
            f"top-{cfg.top_k}, each trained for {cfg.train.steps} steps (batch {cfg.train.batch_size}, lr {cfg.train.lr}) with "
            f"{cfg.seeds} seeds. Analyses ran on {cfg.n_eval} held-out sequences (seed {cfg.eval_seed}); nulls use "
            f"{cfg.n_permutations} shuffles.\n\n" + "\n".join(f"- **{k}**: {VARIANTS[k][1]}; options `{VARIANTS[k][0]}`" for k in cfg.variants)
            + ("\n\nExpert choice sees the whole batch: its routing of a token depends on later tokens of the sequence and on "
               f"the other held-out sequences of the batch of {cfg.n_eval}, so it is not causal, could not route token by token "
               "at generation, and its scores are not comparable with a causal router's as a deployable design."
               if "expert-choice" in cfg.variants else ""))]))
        blocks.append(Section("All variants side by side", [Table(self.summary(results), caption=(
            f"Held-out `{task.primary_metric}`, load balance (mean over MoE layers) and mean k = 1 probe F1 over labels, mean [95% CI] "
            "over seeds; the last column counts the (label, layer) verdicts of routing vs k-means on the router input with as "
            "many clusters as the routing uses (the no-expert cluster of token-dropping routers counted), corrected within "
            "their families."))]))
        if not frame.empty:
            fig = interval_bars(frame, "label", "variant", "layer", "NMI(routing) − NMI(k-means)", reference=0.0)
            blocks.append(Figure(ctx.figure("routing_vs_kmeans", fig),
                                 "Routing minus k-means with as many clusters on the router input, NMI with each label per variant "
                                 "(mean, 90% CI of the paired difference)"))
        blocks.append(Section("Per label: routing vs k-means vs the linear ceiling vs null, and k = 1 probing",
                              [Table(self.detail_rows(results))]))
        lines = [f"- **{kind}**, layer {layer}, `{label}`: {verdict_text(s['verdict'])}"
                 for kind, v in results["variants"].items() for layer, labels in v["specialization"].items() for label, s in labels.items()]
        blocks.append(Section("Verdicts", [Text("\n".join(lines) or "(no variant finished)")]))
        blocks += expert_map_section(ctx.directory, N_SHOWN, f"The map shows the first variant, `{cfg.variants[0]}`.")
        blocks.append(Section("What the numbers mean", [Text(METRIC_NOTES.format(margin=cfg.margin, interval=INTERVAL_NOTE, n_eval=cfg.n_eval))]))
        blocks.append(Section("Conclusion", [Text(self.conclusion(results))]))
        blocks += failed_runs_section(results["failed_runs"])
        return Document(f"Routing variants on `{task.name}`", blocks)
