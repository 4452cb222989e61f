"""Study `moe-superposition`: network sparsity, monosemanticity and planted feature groups in toy MoEs (Chaudhari et al. 2025)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch

from toylab.analysis.clustering import kmeans
from toylab.analysis.specialization import alignment
from toylab.analysis.stats import INTERVAL_NOTE, MARGIN, UNIT, compare, mean_ci
from toylab.analysis.superposition import (
    REPRESENTED,
    expert_group_purity,
    expert_usage,
    feature_dimensionality,
    feature_norms,
    global_dimensionality,
    monosemanticity,
    rank_trend,
    represented_dimensionality,
    usage_weighted_mean,
)
from toylab.models.superposition import (
    ToyModel,
    ToyModelConfig,
    ToyMoE,
    ToyTrainConfig,
    build_toy_model,
    torch_threads,
    train_toy_model,
)
from toylab.registry import get_task, register_study
from toylab.report import contingency_heatmaps, fmt, fmt_ci, interval_bars, markdown_table, verdict_text
from toylab.study import Study, StudyContext
from toylab.task import IGNORE

METRIC_NOTES = """\
- **Network sparsity** k/E: the share of experts active per sample. Total capacity E·m is held fixed, so more experts means smaller ones.
- **Monosemanticity** of an expert: the share of the features it represents (||W_i|| > 0.5) with D_i within the tolerance of 1, i.e. with a hidden dimension of their own; the model's value weights experts by usage (share of routing slots on the evaluation batch) and skips experts that represent nothing.
- **Dimensionality** of an expert: the mean D_i over the features it represents (usage-weighted over experts). Averaging Chaudhari et al.'s global dimensionality Σ_e u_e D_i^(e) over all features instead would mostly measure m/n, since an expert's D_i sum to about its m; the per-feature global values of the showcased model are in `results.json`.
- **Group purity** of an expert: the share of its represented features that belong to its most common planted group (usage-weighted).
- **Router confidence**: the mean router probability of the top expert.
- **NMI** between the top-1 expert of each sample and its planted group (samples with no active feature left out), against **k-means on the inputs** with as many clusters as experts, and a **permutation null** (expert assignment shuffled, same frequencies; p-value add-one, one-sided).
- **Verdicts** compare two quantities paired by seed through the 90% Student-t interval of their differences: *more* / *less* when it lies above / below 0, *equivalent* when it lies inside ±δ (two one-sided tests at 5%), *inconclusive* otherwise, with the smallest difference the seeds would detect. δ = {margin} for NMI; for the loss, δ is {loss_margin:.0%} of the dense model's mean loss.
- **Trends**: Spearman rank correlation with k/E over all (configuration, seed) pairs.
- **Intervals**: {interval}
"""

BOUNDED = {"monosemanticity", "dimensionality", "group_purity", "router_confidence", "routing_nmi", "kmeans_nmi"}
"""Per-seed scores in [0, 1], whose intervals are kept in it."""
LOSS_MARGIN = 0.1
"""Equivalence margin of the sparsest network's loss with the dense one's, as a share of the dense mean loss."""


@dataclass(frozen=True)
class MoESuperpositionConfig:
    seeds: int = 3
    n_features: int = 24
    n_groups: int = 4
    """Planted feature groups: a sample's active features all come from one group."""
    sparsity: float = 0.3
    """Probability that a feature of the sample's group is zero. Low, so that an expert that sees one group's
    samples sees dense features it could give dimensions of their own, while the dense model sees each
    feature in only (1 - sparsity) / n_groups of the samples."""
    importance_decay: float = 1.0
    capacity: int = 12
    """Total hidden dimensions E·m, the same for every configuration."""
    experts: tuple[int, ...] = (1, 2, 4, 6)
    top_k: tuple[int, ...] = (1, 2)
    """k values tried for every E (k = E, every expert on every sample, is always added)."""
    gate_weights: Literal["renormalized", "softmax"] = "renormalized"
    """Weight of the chosen expert at k = 1: 1 (Chaudhari et al.) or the router probability (Switch)."""
    load_balance_weight: float = 0.01
    train: ToyTrainConfig = ToyTrainConfig(steps=2000, batch_size=512, lr=1e-2)
    n_eval: int = 4000
    n_permutations: int = 500
    eval_seed: int = 20261121
    mono_tolerance: float = 0.1

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.n_eval < 1 or self.n_permutations < 1:
            raise ValueError("seeds, n_eval and n_permutations must be >= 1")
        if not self.experts or any(e < 1 or self.capacity % e for e in self.experts):
            raise ValueError(f"every number of experts must divide capacity={self.capacity} (got {self.experts})")
        if not self.top_k or min(self.top_k) < 1:
            raise ValueError(f"top_k values must be >= 1 (got {self.top_k})")
        if 1 not in self.experts:
            raise ValueError("experts must include 1, the dense model every MoE is compared with")
        if max(self.top_k) > max(self.experts):
            raise ValueError(f"top_k={max(self.top_k)} exceeds every number of experts (at most {max(self.experts)}); "
                             f"valid: 1..{max(self.experts)}")

    def configurations(self) -> list[tuple[int, int]]:
        """(E, k) pairs, from the sparsest network (smallest k/E) to dense ones."""
        pairs = {(e, k) for e in self.experts for k in (*self.top_k, e) if k <= e}
        return sorted(pairs, key=lambda p: (p[1] / p[0], p[0]))


@register_study("moe-superposition")
class MoESuperposition(Study):
    """Toy MoEs at fixed total capacity: monosemanticity vs network sparsity k/E, and expert-group alignment vs k-means."""

    Config = MoESuperpositionConfig
    fast = {"seeds": 2, "experts": (1, 2, 4), "top_k": (1,), "train": {"steps": 600, "lr": 1e-2}, "n_eval": 1000,
            "n_permutations": 100}
    config: MoESuperpositionConfig

    def __init__(self, config: MoESuperpositionConfig) -> None:
        super().__init__(config)
        self.task = get_task(
            "superposition", n_features=config.n_features, n_groups=config.n_groups, sparsity=config.sparsity,
            importance_decay=config.importance_decay,
        )

    def run(self, ctx: StudyContext) -> dict[str, Any]:
        cfg, task = self.config, self.task
        batch = task.sample(cfg.n_eval, cfg.eval_seed)
        group = batch.labels["group"][:, 0]
        defined = group != IGNORE
        inputs = batch.inputs[defined, 0]
        baseline = {
            (e, seed): alignment(kmeans(inputs, e, seed), group[defined], cfg.n_groups, cfg.n_permutations, seed)
            for e in cfg.experts if e > 1 for seed in range(cfg.seeds)
        }
        configs = {}
        for e, k in ctx.bar(cfg.configurations(), len(cfg.configurations()), "training"):
            model_cfg = ToyModelConfig(
                n_features=cfg.n_features, n_hidden=cfg.capacity // e, n_instances=cfg.seeds, n_experts=e, top_k=k,
                gate_weights=cfg.gate_weights, load_balance_weight=cfg.load_balance_weight,
            )
            run_dir = ctx.directory / "models" / f"E{e}-k{k}"
            result = train_toy_model(build_toy_model(model_cfg), task, cfg.train, run_dir=run_dir)
            configs[f"E{e}-k{k}"] = self.analyse(result.model, result.loss, torch.from_numpy(batch.inputs), group, baseline)
        x = [c["network_sparsity"] for c in configs.values() for _ in range(cfg.seeds)]  # one point per (config, seed)
        trends = {
            metric: rank_trend(x, [v for c in configs.values() for v in c["per_seed"][metric]])
            for metric in ("monosemanticity", "dimensionality", "loss")
        }
        results = {
            "task": {"name": task.name, "options": task.options},
            "configurations": configs,
            "trends": trends,
            "kmeans_nmi": {str(e): mean_ci([baseline[e, s]["nmi"] for s in range(cfg.seeds)], bounds=UNIT) for e in cfg.experts if e > 1},
        }
        results["claims"] = self.claims(results)
        return results

    @torch.no_grad()
    def analyse(
        self, model: ToyModel | ToyMoE, loss: np.ndarray, x: torch.Tensor, group: np.ndarray,
        baseline: dict[tuple[int, int], dict[str, Any]],
    ) -> dict[str, Any]:
        """Per-seed geometry, routing and group alignment of one (E, k) model on the evaluation batch."""
        cfg, e, k = self.config, model.cfg.n_experts, model.cfg.top_k
        W = model.W.detach() if e > 1 else model.W.detach().unsqueeze(1)  # [seed, E, m, n]
        if e > 1:
            with torch_threads(cfg.train.threads):
                _, cache = model.run_with_cache(x)
            experts = cache["hook_expert_indices"]  # [batch, seed, k]
            usage = expert_usage(experts, e)
            confidence = cache["hook_router_logits"].double().softmax(-1).max(-1).values.mean(0)
        else:
            usage, confidence = torch.ones(cfg.seeds, 1, dtype=torch.float64), torch.ones(cfg.seeds, dtype=torch.float64)
        per_seed = {
            "loss": loss,
            "monosemanticity": usage_weighted_mean(monosemanticity(W, cfg.mono_tolerance), usage).numpy(),
            "dimensionality": usage_weighted_mean(represented_dimensionality(W), usage).numpy(),
            "represented": (feature_norms(W) > REPRESENTED).any(-2).sum(-1).double().numpy(),
            "group_purity": usage_weighted_mean(expert_group_purity(W, self.task.feature_groups), usage).numpy(),
            "router_confidence": confidence.numpy(),
        }
        out: dict[str, Any] = {
            "E": e, "k": k, "m": model.cfg.n_hidden, "network_sparsity": k / e,
            **{name: mean_ci(values, bounds=UNIT if name in BOUNDED else None) for name, values in per_seed.items()},
            "usage": usage.numpy().round(4).tolist(),
            "seed0_dimensionality": feature_dimensionality(W[0]).numpy().round(3).tolist(),
            "seed0_global_dimensionality": global_dimensionality(W[0], usage[0]).numpy().round(3).tolist(),
            "seed0_norms": feature_norms(W[0]).numpy().round(3).tolist(),
        }
        if e > 1:
            defined = group != IGNORE
            routed = [
                alignment(experts[defined, seed, 0].numpy(), group[defined], cfg.n_groups, cfg.n_permutations, seed)
                for seed in range(cfg.seeds)
            ]
            per_seed["routing_nmi"] = np.array([r["nmi"] for r in routed])
            per_seed["kmeans_nmi"] = np.array([baseline[e, seed]["nmi"] for seed in range(cfg.seeds)])
            out.update({
                "routing_nmi": mean_ci(per_seed["routing_nmi"], bounds=UNIT),
                "routing_ari": mean_ci([r["ari"] for r in routed], bounds=(-1.0, 1.0)),
                "kmeans_nmi": mean_ci(per_seed["kmeans_nmi"], bounds=UNIT),
                "null_nmi": mean_ci([r["null_nmi_mean"] for r in routed], bounds=UNIT),
                "routing_max_p_value": max(r["p_value"] for r in routed),
                "verdict": compare(per_seed["routing_nmi"], per_seed["kmeans_nmi"], MARGIN),
                "seed0_contingency": routed[0]["contingency"],
            })
        out["per_seed"] = {name: np.asarray(values, dtype=np.float64).tolist() for name, values in per_seed.items()}
        return out

    def claims(self, results: dict[str, Any]) -> list[dict[str, str]]:
        """The paper's qualitative results beside the measured trends."""
        trends, configs = results["trends"], results["configurations"]
        sparsest, dense = next(iter(configs.values())), configs["E1-k1"]
        loss = compare(sparsest["per_seed"]["loss"], dense["per_seed"]["loss"], LOSS_MARGIN * dense["loss"]["mean"])

        def trend(name: str) -> str:
            t = trends[name]
            return f"Spearman ρ(k/E, {name}) = {fmt(t['rho'], 2)}, p = {fmt(t['p_value'], 4)}, n = {t['n']}"

        def falls(name: str) -> bool:
            return trends[name]["rho"] < 0 and trends[name]["p_value"] < 0.05

        return [
            {"claim": "Greater network sparsity (smaller k/E) gives greater monosemanticity",
             "measured": trend("monosemanticity"), "held": "yes" if falls("monosemanticity") else "**no**"},
            {"claim": "... represented features get more of a dimension each (usage-weighted mean D_i)",
             "measured": trend("dimensionality"), "held": "yes" if falls("dimensionality") else "**no**"},
            {"claim": "... without sacrificing performance",
             "measured": f"loss of the sparsest network (E={sparsest['E']}, k={sparsest['k']}) {fmt_ci(sparsest['loss'], 5)} "
                         f"vs dense {fmt_ci(dense['loss'], 5)}, sparsest minus dense: {verdict_text(loss, 5)}",
             "held": {"equivalent": "yes", "less": "yes", "more": "**no**"}.get(loss["verdict"], "unclear")},
        ]

    def summary(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {
                "E": c["E"], "k": c["k"], "m": c["m"], "k/E": fmt(c["network_sparsity"], 3),
                "monosemanticity": fmt_ci(c["monosemanticity"], 2),
                "mean D (represented)": fmt_ci(c["dimensionality"], 2),
                "represented": fmt_ci(c["represented"], 1),
                "group purity": fmt_ci(c["group_purity"], 2),
                "loss": fmt_ci(c["loss"], 5),
                "router confidence": fmt(c["router_confidence"]["mean"], 2),
            }
            for c in results["configurations"].values()
        ]

    def alignment_rows(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {
                "E": c["E"], "k": c["k"],
                "NMI routing": fmt_ci(c["routing_nmi"]), "NMI k-means (inputs)": fmt_ci(c["kmeans_nmi"]),
                "NMI null": fmt(c["null_nmi"]["mean"]), "routing max p": fmt(c["routing_max_p_value"], 4),
                "ARI routing": fmt_ci(c["routing_ari"]),
                "routing vs k-means": verdict_text(c["verdict"]),
            }
            for c in results["configurations"].values() if c["E"] > 1
        ]

    def report(self, results: dict[str, Any], ctx: StudyContext) -> str:
        cfg, configs = self.config, results["configurations"]
        moe = [name for name, c in configs.items() if c["E"] > 1]
        frame = pd.DataFrame(
            [{"config": name, "assignment": label, "label": "group", **configs[name][key]}
             for name in moe for key, label in (("routing_nmi", "routing (top-1 expert)"), ("kmeans_nmi", "k-means on inputs"),
                                                ("null_nmi", "shuffled null"))]
        )
        showcase = max((c for c in configs.values() if c["k"] == 1), key=lambda c: c["E"])
        figures = [
            ("Monosemanticity, mean D_i of represented features and loss vs network sparsity k/E (one dot per seed)",
             ctx.figure("network_sparsity", sparsity_figure(results))),
            (f"Feature dimensionality D_i per expert and feature, E={showcase['E']}, k=1, seed 0 (dashed lines: planted groups)",
             ctx.figure("experts_features", expert_feature_figure(showcase, self.task.feature_groups))),
        ]
        if moe:
            figures.insert(1, ("Expert-group NMI: routing vs k-means on the inputs vs null (mean, 95% CI over seeds)",
                               ctx.figure("group_nmi", interval_bars(frame, "config", "assignment", "label", "NMI"))))
            tables = {name: np.array(configs[name]["seed0_contingency"]) for name in moe}
            groups = {name: [str(g) for g in range(cfg.n_groups)] for name in moe}
            figures.append(("Share of each group's samples routed to each expert (top-1, seed 0)",
                            ctx.figure("experts_groups", contingency_heatmaps(tables, groups, "group → expert"))))
        held = sum(c["held"] == "yes" for c in results["claims"])
        aligned = {v: sum(configs[name]["verdict"]["verdict"] == v for name in moe) for v in ("more", "less", "equivalent", "inconclusive")}
        sections = [
            "# Superposition in mixtures of experts (Chaudhari et al. 2025)",
            f"**Bottom line.** {held} of the paper's {len(results['claims'])} results checked here held. "
            + (f"Top-1 routing aligned with the planted feature groups, compared with k-means on the inputs: "
               + ", ".join(f"{v} for {n}" for v, n in aligned.items() if n) + f" of {len(moe)} MoE configurations."
               if moe else ""),
            "## What was run",
            f"Task `superposition` with options `{self.task.options}`: {cfg.n_features} features in {cfg.n_groups} planted "
            f"groups; each sample draws its active features from one group (each active with probability {1 - cfg.sparsity:.2f}). "
            f"Toy MoEs x' = Σ_j w_j ReLU(W_eᵀW_e x + b_e) over the top-k experts of a linear softmax gate, at fixed total "
            f"capacity E·m = {cfg.capacity}, for (E, k) in {cfg.configurations()}, {cfg.gate_weights} gate weights, "
            f"load-balancing weight {cfg.load_balance_weight}; {cfg.seeds} seeds as instances of one model per (E, k), {cfg.train.steps} steps "
            f"(batch {cfg.train.batch_size}, lr {cfg.train.lr}). Analysis on {cfg.n_eval} held-out samples (seed {cfg.eval_seed}); "
            f"nulls use {cfg.n_permutations} shuffles.",
            "## The paper's results beside the measured ones",
            markdown_table(results["claims"]),
            "## Per configuration (mean [95% CI] over seeds)",
            markdown_table(self.summary(results)),
            "## Do experts align with the planted groups beyond k-means on the inputs?",
            markdown_table(self.alignment_rows(results)) if moe else "(no configuration with more than one expert)",
            *[f"### {caption}\n\n![{caption}]({path})" for caption, path in figures],
            "## What the numbers mean",
            METRIC_NOTES.replace("the tolerance", f"±{cfg.mono_tolerance}").format(
                margin=MARGIN, loss_margin=LOSS_MARGIN, interval=INTERVAL_NOTE),
        ]
        return "\n\n".join(sections) + "\n"


def sparsity_figure(results: dict[str, Any]) -> plt.Figure:
    rows = [
        {"k/E": c["network_sparsity"], "E": str(c["E"]), "metric": metric, "value": value}
        for c in results["configurations"].values()
        for metric in ("monosemanticity", "dimensionality", "loss")
        for value in c["per_seed"][metric]
    ]
    frame = pd.DataFrame(rows)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, metric in zip(axes, ("monosemanticity", "dimensionality", "loss")):
        sub = frame[frame["metric"] == metric]
        sns.stripplot(data=sub, x="k/E", y="value", hue="E", ax=ax, dodge=False, jitter=0.15, size=5, native_scale=True,
                      log_scale=(2, False), legend=metric == "loss")
        ax.set(title=metric, ylabel="", xlabel="network sparsity k/E")
    fig.tight_layout()
    return fig


def expert_feature_figure(config: dict[str, Any], feature_groups: np.ndarray) -> plt.Figure:
    D = np.array(config["seed0_dimensionality"])
    represented = np.array(config["seed0_norms"]) > REPRESENTED
    fig, ax = plt.subplots(figsize=(0.3 * D.shape[1] + 1.5, 0.4 * D.shape[0] + 1.2))
    sns.heatmap(np.where(represented, D, np.nan), ax=ax, vmin=0, vmax=1, cmap="viridis", cbar_kws={"label": "D_i"},
                yticklabels=[f"E{e}" for e in range(len(D))])
    for boundary in np.flatnonzero(np.diff(feature_groups)) + 1:
        ax.axvline(boundary, color="white", ls="--", lw=1)
    ax.set(xlabel="feature (blank: not represented by this expert)", ylabel="expert")
    return fig
