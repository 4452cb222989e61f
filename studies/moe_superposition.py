"""Study `moe-superposition`: network sparsity, monosemanticity and planted feature groups in toy MoEs (Chaudhari et al. 2025)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch

from toylab.analysis.clustering import kmeans
from toylab.analysis.specialization import alignment
from toylab.analysis.stats import (
    INTERVAL_NOTE, MARGIN, NONNEGATIVE, UNIT, at_floor, claim_state, claim_states, compare, correct_families, mean_ci, trend_verdict,
)
from toylab.analysis.superposition import (
    REPRESENTED,
    expert_group_purity,
    expert_usage,
    feature_dimensionality,
    feature_norms,
    features_per_dimension,
    global_dimensionality,
    monosemanticity,
    own_block_share,
    rank_trend,
    represented_dimensionality,
    usage_weighted_mean,
)
from toylab.determinism import torch_threads
from toylab.models.superposition import (
    ToyModel,
    ToyModelConfig,
    ToyMoE,
    ToyTrainConfig,
    build_toy_model,
    train_toy_model,
)
from toylab.registry import get_task, register_study
from toylab.report import (
    Document, Figure, Section, Table, Text, contingency_heatmaps, families_section, fmt, fmt_ci, interval_bars, series_colours,
    verdict_text,
)
from toylab.study import Study, StudyContext
from toylab.task import IGNORE

METRIC_NOTES = """\
- **Network sparsity** k/E: the share of experts active per sample. Total capacity E·m is held fixed, so more experts means smaller ones.
- **Monosemanticity** of an expert: the share of the features it represents (||W_i|| > 0.5) with D_i within the tolerance of 1, i.e. with a hidden dimension of their own; the model's value weights experts by usage (share of routing slots on the evaluation batch) and skips experts that represent nothing.
- **Dimensionality** of an expert: the mean D_i over the features it represents (usage-weighted over experts). Averaging Chaudhari et al.'s global dimensionality Σ_e u_e D_i^(e) over all features instead would mostly measure m/n, since an expert's D_i sum to about its m; the per-feature global values of the showcased model are in `results.json`.
- **Group purity** of an expert: the share of its represented features that belong to its most common planted group (usage-weighted).
- **Router confidence**: the mean router probability of the top expert.
- **NMI** between the top-1 expert of each sample and its planted group (samples with no active feature left out), against **k-means on the inputs** with as many clusters as experts, and a **permutation null** (expert assignment shuffled, same frequencies; p-value add-one, one-sided).
- **Verdicts** compare two quantities paired by seed through the 90% Student-t interval of their differences: *more* / *less* when it lies above / below 0, *equivalent* when it lies inside ±δ (two one-sided tests at 5%), *inconclusive* otherwise, with the smallest difference the seeds would detect; a verdict needs at least 3 seeds. δ = {margin} for NMI, monosemanticity and dimensionality; for the loss and features per dimension, δ is {loss_margin:.0%} of the dense model's mean. Each verdict is then corrected within its family (see *Primary question and families of tests*).
- **Trends**: Spearman rank correlation ρ with k/E over all (configuration, seed) pairs (untrained-gate conditions left out), with its 90% interval (Fisher z, Bonett–Wright standard error); a trend is shown when the interval excludes 0 and is contradicted as "no trend" when it lies inside ±{trend_margin}; the p-values of the same z tests are corrected with the family's other verdicts, and an undefined ρ (no spread) is *not shown*.
- **Claims** read *supported* (the verdict the paper predicts), *contradicted* (the opposite direction, or equivalence within the margin where a direction was claimed) or *not shown* (inconclusive: the seeds could not tell; never read as "no"); a claim checked at several E is *mixed* when the E disagree.
- **Intervals**: {interval}
"""

CONTROL = "-untrained"
"""Name suffix of the untrained-gate control conditions (trained beside toylab's softmax-gated top-1 MoEs)."""
UNTRAINED = "untrained"
"""The gate label of top-1 MoEs with renormalized weights (p / p = 1): the task sends their gate no gradient."""


def gate_label(n_experts: int, top_k: int, gate_weights: str) -> str:
    """How a configuration's gate learns: "–" (dense), "untrained" (renormalized top-1), or "trained"."""
    if n_experts == 1:
        return "–"
    return UNTRAINED if top_k == 1 and gate_weights == "renormalized" else "trained"


BOUNDED = {"monosemanticity", "dimensionality", "group_purity", "router_confidence", "routing_nmi", "kmeans_nmi",
           "own_block_share"}
"""Per-seed scores in [0, 1], whose intervals are kept in it; `represented` (a count of features) stays in
[0, n_features], and the others (loss, features per dimension) are non-negative, their intervals at or above 0."""
TREND_MARGIN = 0.2
"""A trend claim is contradicted as "no trend" when the 90% interval of Spearman's ρ lies inside ±this."""
LOSS_MARGIN = 0.1
"""Equivalence margin of the sparsest network's loss with the dense one's, as a share of the dense mean loss."""
CLAIMS, ALIGNMENT = "the paper's claims", "routing vs k-means, other configurations"
"""The primary family (every verdict behind the paper's claims) and the secondary one."""
TRENDS = {"monosemanticity": "less", "dimensionality": "less", "features_per_dim": "more"}
"""The paper's trend claims: each metric's predicted direction of Spearman's ρ with k/E (greater network sparsity,
i.e. smaller k/E, gives more monosemanticity, more of a dimension per feature, fewer features per dimension)."""
PRIMARY_CLAIM = "Greater network sparsity (smaller k/E) gives greater monosemanticity"
"""The study's primary question, the paper's headline claim: does monosemanticity fall as k/E rises? Answered by
one test, the trend of monosemanticity with k/E (Spearman ρ over (configuration, seed)). Its family is every verdict
behind the paper's claims (the trends, the loss, MoE vs dense, expert specialization), corrected together; the
routing-vs-k-means verdicts of the configurations no claim is about form the one secondary family."""


TOYLAB_TRAIN = ToyTrainConfig(steps=2000, batch_size=512, lr=1e-2)
PRESETS: dict[str, dict[str, Any]] = {
    "toylab": {
        "n_features": 24, "n_groups": 4, "sparsity": 0.3, "capacity": 12, "capacity_mode": "total",
        "experts": (1, 2, 4, 6), "top_k": (1, 2), "load_balance_weight": 0.01, "gate_weights": "softmax",
    },
    "paper": {
        "n_features": 20, "n_groups": 1, "sparsity": 0.9, "capacity": 4, "capacity_mode": "per_expert",
        "experts": (1, 4, 8), "top_k": (1, 2), "load_balance_weight": 0.0, "gate_weights": "renormalized",
        "train": ToyTrainConfig(steps=2000, batch_size=1024, lr=1e-3, weight_decay=0.01),
    },
}
"""Values of the fields left unset (None; `train` left at toylab's) under each preset. `preset=paper`: the setup of Chaudhari et al.'s network-sparsity comparison in their public code
(github.com/MarmikChaudhari/superposition-moe, model/model.py, demo-superposition.ipynb): i.i.d. features (density
0.1, uniform importance, no groups), every expert as wide as the dense model, Xavier gate, no load balancing, AdamW
(its default weight decay 0.01) at lr 1e-3, batch 1024. Scaled to fit two shared CPU cores: 20 features and m = 4
(theirs: 100 and 20; the same ratio 5 and the same 0.5 active features per hidden dimension), E in (1, 4, 8) (theirs:
1, 4, 10, 20), 2,000 steps (theirs: 10,000; their logged losses level off by step 1,000). Their expert-specialization result (Table 1) uses the K-hot gate: add `gate_init=khot`."""

DIFFERENCES = [
    {"aspect": "capacity", "paper": "every expert as wide as the dense model (m = 20 for E = 1, 4, 10, 20): parameters grow with E",
     "toylab default": "total E·m = 12 fixed, m = 12 / E", "preset=paper": "m = 4 for every E (`capacity_mode=per_expert`)"},
    {"aspect": "features and sparsity", "paper": "100 i.i.d. features, each active with probability 0.1, U[0, 1]",
     "toylab default": "24 features in 4 planted groups; one group per sample, its features active with probability 0.7",
     "preset=paper": "20 i.i.d. features, probability 0.1"},
    {"aspect": "importance", "paper": "uniform in the network-sparsity sweep (0.7^i in the demo, 0.9^(random rank) in Table 1)",
     "toylab default": "uniform", "preset=paper": "uniform"},
    {"aspect": "(E, k) sweep", "paper": "(1, 1), (4, 1), (10, 2), (20, 5): k/E 0.2–0.25 at growing size",
     "toylab default": "E in (1, 2, 4, 6), k in (1, 2, E)", "preset=paper": "E in (1, 4, 8), k in (1, 2, E)"},
    {"aspect": "gate initialization", "paper": "Xavier-normal; K-hot (disjoint blocks of n/E features set to 1) for expert specialization",
     "toylab default": "Xavier-normal", "preset=paper": "Xavier (`gate_init=khot` for the specialization claim)"},
    {"aspect": "gate weights", "paper": "top-k probabilities renormalized (k = 1: weight 1, the gate gets no gradient from the loss)",
     "toylab default": "softmax at k = 1 (the router probability, as Switch: the gate trains); each top-1 MoE is also "
                       "trained with the paper's weight 1 as an *untrained gate* condition",
     "preset=paper": "the paper's (its top-1 MoEs have an untrained gate)"},
    {"aspect": "load balancing", "paper": "off in the network-sparsity and specialization runs (on, α = 0.01, in the phase-change grids)",
     "toylab default": "Switch loss, weight 0.01", "preset=paper": "off"},
    {"aspect": "expert weight initialization", "paper": "Xavier on the whole [E, n, m] tensor: std √(2 / (m (n + E)))",
     "toylab default": "Xavier per expert: std √(2 / (m + n))", "preset=paper": "toylab's (not ablated)"},
    {"aspect": "optimizer and length", "paper": "AdamW, weight decay 0.01 (torch default), lr 1e-3 constant, batch 1024, 10,000 steps",
     "toylab default": "AdamW, weight decay 0, lr 1e-2, batch 512, 2,000 steps", "preset=paper": "AdamW 0.01, lr 1e-3, batch 1024, 2,000 steps"},
    {"aspect": "monosemanticity measure", "paper": "features per dimension Σ_e p_e ||W_e||²_F / m / k; per feature, ||Σ_j≠i (Ŵ_i·W_j)|| < 0.2 "
     "(Table 1) or |D_i − 1| < 0.1 with ||W_i|| ≥ 0.1", "toylab default": "share of represented features (||W_i|| > 0.5) with "
     "|D_i − 1| < 0.1, usage-weighted over experts; the paper's features per dimension beside it", "preset=paper": "both"},
    {"aspect": "dimensionality", "paper": "global D_i = Σ_e u_e D_i^(e) (u_e: top-1 usage), per feature",
     "toylab default": "usage-weighted mean D_i over represented features", "preset=paper": "the same as toylab"},
    {"aspect": "specialization", "paper": "no planted groups; experts keep monosemantic the features their K-hot gate gave them",
     "toylab default": "NMI of the top-1 expert with the planted group vs k-means on the inputs",
     "preset=paper": "share of an expert's represented features in its K-hot block vs 1/E (with `gate_init=khot`)"},
    {"aspect": "seeds", "paper": "one model per setting (100 per initialization in Table 1)",
     "toylab default": "3 seeds, 95% CIs, four-outcome verdicts", "preset=paper": "3 seeds"},
]
"""How the paper's setup differs from this study's, read from the paper's public code."""


@dataclass(frozen=True)
class MoESuperpositionConfig:
    preset: Literal["toylab", "paper"] = "toylab"
    """Where the fields left unset (None, or `train` at toylab's) take their values: `PRESETS[preset]`."""
    seeds: int = 3
    n_features: int | None = None
    n_groups: int | None = None
    """Planted feature groups: a sample's active features all come from one group."""
    sparsity: float | None = None
    """Probability that a feature of the sample's group is zero. Low, so that an expert that sees one group's
    samples sees dense features it could give dimensions of their own, while the dense model sees each
    feature in only (1 - sparsity) / n_groups of the samples."""
    importance_decay: float = 1.0
    capacity: int | None = None
    """Hidden dimensions: E·m in total (`capacity_mode="total"`) or m per expert (`"per_expert"`, the paper's)."""
    capacity_mode: Literal["total", "per_expert"] | None = None
    experts: tuple[int, ...] | None = None
    top_k: tuple[int, ...] | None = None
    """k values tried for every E (k = E, every expert on every sample, is always added)."""
    gate_weights: Literal["renormalized", "softmax"] | None = None
    """Weight of the chosen expert at k = 1: the router probability (Switch; toylab's preset), or 1 (Chaudhari et al.;
    the paper's preset), which sends the gate no gradient from the task: an untrained gate."""
    untrained_gate: bool = True
    """With softmax gate weights, also train every top-1 MoE with weight 1, as the labelled "untrained gate" condition."""
    gate_init: Literal["xavier", "khot"] = "xavier"
    load_balance_weight: float | None = None
    train: ToyTrainConfig = TOYLAB_TRAIN
    n_eval: int = 4000
    n_permutations: int = 500
    eval_seed: int = 20261121
    mono_tolerance: float = 0.1

    def __post_init__(self) -> None:
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None or (key == "train" and self.train == TOYLAB_TRAIN):
                object.__setattr__(self, key, value)
        if self.seeds < 1 or self.n_eval < 1 or self.n_permutations < 1:
            raise ValueError("seeds, n_eval and n_permutations must be >= 1")
        if not self.experts or any(e < 1 or (self.capacity_mode == "total" and self.capacity % e) for e in self.experts):
            raise ValueError(f"every number of experts must divide capacity={self.capacity} (got {self.experts})")
        if not self.top_k or min(self.top_k) < 1:
            raise ValueError(f"top_k values must be >= 1 (got {self.top_k})")
        if 1 not in self.experts:
            raise ValueError("experts must include 1, the dense model every MoE is compared with")
        if max(self.top_k) > max(self.experts):
            raise ValueError(f"top_k={max(self.top_k)} exceeds every number of experts (at most {max(self.experts)}); "
                             f"valid: 1..{max(self.experts)}")

    def hidden(self, n_experts: int) -> int:
        """Hidden dimensions m of each of `n_experts` experts."""
        return self.capacity // n_experts if self.capacity_mode == "total" else self.capacity

    def configurations(self) -> list[tuple[int, int]]:
        """(E, k) pairs, from the sparsest network (smallest k/E) to dense ones."""
        pairs = {(e, k) for e in self.experts for k in (*self.top_k, e) if k <= e}
        return sorted(pairs, key=lambda p: (p[1] / p[0], p[0]))

    def conditions(self) -> list[tuple[str, int, int, str]]:
        """(name, E, k, gate weights) of every model trained: the configurations, then the untrained-gate top-1 MoEs."""
        main = [(f"E{e}-k{k}", e, k, self.gate_weights) for e, k in self.configurations()]
        extra = [(f"E{e}-k1{CONTROL}", e, 1, "renormalized") for e, k in self.configurations()
                 if k == 1 < e and self.untrained_gate and self.gate_weights == "softmax"]
        return main + extra


@register_study("moe-superposition")
class MoESuperposition(Study):
    """Toy MoEs at fixed total capacity: monosemanticity vs network sparsity k/E, and expert-group alignment vs k-means."""

    Config = MoESuperpositionConfig
    fast = {"seeds": 3, "experts": (1, 2, 4), "top_k": (1,), "train": {"steps": 600, "lr": 1e-2}, "n_eval": 1000,
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
        batch = task.sample(cfg.n_eval, cfg.eval_seed)  # toy models train on fresh draws of continuous features, not on a split
        group = batch.labels["group"][:, 0]
        defined = group != IGNORE
        inputs = batch.inputs[defined, 0]
        baseline = {
            (e, seed): alignment(kmeans(inputs, e, seed), group[defined], cfg.n_groups, cfg.n_permutations, seed)
            for e in cfg.experts if e > 1 and cfg.n_groups > 1 for seed in range(cfg.seeds)
        }
        configs = {}
        for name, e, k, gate_weights in ctx.bar(cfg.conditions(), len(cfg.conditions()), "training"):
            model_cfg = ToyModelConfig(
                n_features=cfg.n_features, n_hidden=cfg.hidden(e), n_instances=cfg.seeds, n_experts=e, top_k=k,
                gate_weights=gate_weights, load_balance_weight=cfg.load_balance_weight, gate_init=cfg.gate_init,
            )
            result = train_toy_model(build_toy_model(model_cfg), task, cfg.train, run_dir=ctx.run_dir(name))
            configs[name] = {**self.analyse(result.model, result.loss, torch.from_numpy(batch.inputs), group, baseline),
                             "gate": gate_label(e, k, gate_weights), "control": name.endswith(CONTROL)}
        results = {
            "task": {"name": task.name, "options": task.options},
            "configurations": configs,
            "claim_tests": self.claim_tests(configs),
            "kmeans_nmi": {str(e): mean_ci([baseline[e, s]["nmi"] for s in range(cfg.seeds)], bounds=UNIT)
                           for e in cfg.experts if e > 1 and cfg.n_groups > 1},
        }
        results["test_families"] = self.test_families(results)
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
            "features_per_dim": features_per_dimension(W, usage, k).numpy(),
        }
        if e > 1 and cfg.gate_init == "khot":
            per_seed["own_block_share"] = usage_weighted_mean(own_block_share(W, model.khot_blocks), usage).numpy()
        out: dict[str, Any] = {
            "E": e, "k": k, "m": model.cfg.n_hidden, "network_sparsity": k / e,
            **{name: mean_ci(values, bounds=UNIT if name in BOUNDED else (0.0, cfg.n_features) if name == "represented" else NONNEGATIVE)
               for name, values in per_seed.items()},
            "usage": usage.numpy().round(4).tolist(),
            "seed0_dimensionality": feature_dimensionality(W[0]).numpy().round(3).tolist(),
            "seed0_global_dimensionality": global_dimensionality(W[0], usage[0]).numpy().round(3).tolist(),
            "seed0_norms": feature_norms(W[0]).numpy().round(3).tolist(),
        }
        if "own_block_share" in per_seed:
            out["own_block_verdict"] = compare(per_seed["own_block_share"], np.full(cfg.seeds, 1 / e), MARGIN)
        if e > 1 and cfg.n_groups > 1:
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

    def claim_tests(self, configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The verdicts behind the paper's claims, before correction: each `TRENDS` metric's Spearman ρ with k/E over
        (configuration, seed) (untrained-gate controls left out; no trend: |ρ| < `TREND_MARGIN`), the sparsest
        network's loss vs the dense one's, and each top-1 MoE's monosemanticity, dimensionality and features per
        dimension vs the dense model's (paired by seed; monosemanticity `both_at_floor` where neither model has a share
        of monosemantic features above the margin, which says nothing about which is more monosemantic). The top-1
        MoEs' own `verdict` and `own_block_verdict` are the rest."""
        main = [c for c in configs.values() if not c["control"]]
        x = [c["network_sparsity"] for c in main for _ in c["per_seed"]["loss"]]  # one point per (config, seed)
        sparsest = min(main, key=lambda c: (c["network_sparsity"], c["E"]))
        dense = configs["E1-k1"]
        margins = {"monosemanticity": MARGIN, "dimensionality": MARGIN, "features_per_dim": LOSS_MARGIN * dense["features_per_dim"]["mean"]}

        def trend(metric: str) -> dict[str, float | str]:
            rank = rank_trend(x, [v for c in main for v in c["per_seed"][metric]])
            return trend_verdict(rank["rho"], rank["n"], TREND_MARGIN)

        return {
            "trends": {metric: trend(metric) for metric in TRENDS},
            "sparsest": f"E{sparsest['E']}-k{sparsest['k']}",
            "loss": compare(sparsest["per_seed"]["loss"], dense["per_seed"]["loss"], LOSS_MARGIN * dense["loss"]["mean"]),
            "vs_dense": {metric: {name: at_floor(compare(c["per_seed"][metric], dense["per_seed"][metric], margin),
                                                 metric == "monosemanticity" and max(c[metric]["mean"], dense[metric]["mean"]) <= margin)
                                  for name, c in top1(configs).items()}
                         for metric, margin in margins.items()},
        }

    def test_families(self, results: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Correct the verdicts for multiplicity (in place; each keeps its `raw_verdict`): the primary family is every
        verdict behind the paper's claims (`PRIMARY_CLAIM` first); the secondary one, routing vs k-means of the MoE
        configurations no claim is about (untrained gates, k > 1)."""
        tests, configs = results["claim_tests"], results["configurations"]
        claimed = top1(configs)
        members = [(tests["trends"], metric) for metric in TRENDS] + [(tests, "loss")]
        members += [(verdicts, name) for verdicts in tests["vs_dense"].values() for name in verdicts]
        members += [(c, key) for c in claimed.values() for key in ("own_block_verdict", "verdict") if key in c]
        others = [(c, "verdict") for name, c in configs.items() if "verdict" in c and name not in claimed]
        return correct_families({CLAIMS: members, ALIGNMENT: others}, {
            CLAIMS: f"every verdict behind the paper's claims, the headline first ({PRIMARY_CLAIM.replace('Greater', 'greater', 1)})",
            ALIGNMENT: "NMI with the planted groups, routing vs k-means, MoEs with an untrained gate or k > 1"}, CLAIMS)

    def claims(self, results: dict[str, Any]) -> list[dict[str, str]]:
        """The paper's qualitative results beside the measured ones, each supported, contradicted or not shown, from
        the corrected verdicts of `claim_tests` (a claim checked at several E takes each E's state)."""
        tests, configs = results["claim_tests"], results["configurations"]
        sparsest, dense = configs[tests["sparsest"]], configs["E1-k1"]

        def trend(name: str) -> dict[str, str]:
            t = tests["trends"][name]
            return {"measured": trend_text(t, name), "state": claim_state(t["verdict"], (TRENDS[name],))}

        claims = [
            {"claim": PRIMARY_CLAIM, **trend("monosemanticity")},
            {"claim": "... represented features get more of a dimension each (usage-weighted mean D_i)", **trend("dimensionality")},
            {"claim": "... fewer features per dimension (the paper's Σ_e u_e ||W_e||²_F / (m k))", **trend("features_per_dim")},
            {"claim": "... without sacrificing performance",
             "measured": f"loss of the sparsest network (E={sparsest['E']}, k={sparsest['k']}) {fmt_ci(sparsest['loss'], 5)} "
                         f"vs dense {fmt_ci(dense['loss'], 5)}, sparsest minus dense: {verdict_text(tests['loss'], 5)}",
             "state": claim_state(tests["loss"]["verdict"], ("equivalent", "less"))},
        ]
        moes = top1(configs)
        names = [f"E={c['E']}" for c in moes.values()]
        for name, label, better in (("monosemanticity", "more monosemantic", "more"), ("dimensionality", "give features more of a dimension", "more"),
                                    ("features_per_dim", "have fewer features per dimension", "less")):
            verdicts = tests["vs_dense"][name]
            claims.append({
                "claim": f"Top-1 MoEs {label} than the dense model (the paper's MoE-vs-dense comparison)",
                "measured": "; ".join(f"E={c['E']}: {fmt_ci(c[name], 2)} vs dense {fmt_ci(dense[name], 2)}, {verdict_text(verdicts[n], 2)}"
                                      for n, c in moes.items()),
                "state": claim_states([claim_state(verdicts[n]["verdict"], (better,)) for n in moes], names)})
        if any("own_block_verdict" in c for c in moes.values()):
            claims.append({
                "claim": "Experts specialize on coherent feature sets when initialized K-hot (k = 1)",
                "measured": "; ".join(f"E={c['E']}: own-block share {fmt_ci(c['own_block_share'])} vs chance 1/E, "
                                      f"{verdict_text(c['own_block_verdict'])}" for c in moes.values()),
                "state": claim_states([claim_state(c["own_block_verdict"]["verdict"], ("more",)) for c in moes.values()], names)})
        if any("verdict" in c for c in moes.values()):
            claims.append({
                "claim": "Top-1 routing organizes around coherent (planted) feature groups, as k-means on the inputs does",
                "measured": "; ".join(f"E={c['E']}: NMI {fmt_ci(c['routing_nmi'])} vs k-means {fmt_ci(c['kmeans_nmi'])}, "
                                      f"{verdict_text(c['verdict'])}" for c in moes.values()),
                "state": claim_states([claim_state(c["verdict"]["verdict"], ("more", "equivalent")) for c in moes.values()], names)})
        return claims

    def summary(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {
                "E": c["E"], "k": c["k"], "m": c["m"], "k/E": fmt(c["network_sparsity"], 3), "gate": c["gate"],
                "monosemanticity": fmt_ci(c["monosemanticity"], 2),
                "mean D (represented)": fmt_ci(c["dimensionality"], 2),
                "represented": fmt_ci(c["represented"], 1),
                "group purity": fmt_ci(c["group_purity"], 2),
                "features per dim (paper)": fmt_ci(c["features_per_dim"], 2),
                **({"own K-hot block": fmt_ci(c["own_block_share"], 2) if c["E"] > 1 else "–"} if self.config.gate_init == "khot" else {}),
                "loss": fmt_ci(c["loss"], 5),
                "router confidence": fmt(c["router_confidence"]["mean"], 2),
            }
            for c in results["configurations"].values()
        ]

    def alignment_rows(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {
                "E": c["E"], "k": c["k"], "gate": c["gate"],
                "NMI routing": fmt_ci(c["routing_nmi"]), "NMI k-means (inputs)": fmt_ci(c["kmeans_nmi"]),
                "NMI null": fmt(c["null_nmi"]["mean"]), "routing max p": fmt(c["routing_max_p_value"], 4),
                "ARI routing": fmt_ci(c["routing_ari"]),
                "routing vs k-means": verdict_text(c["verdict"]),
            }
            for c in results["configurations"].values() if "verdict" in c
        ]

    def report(self, results: dict[str, Any], ctx: StudyContext) -> Document:
        cfg, configs = self.config, results["configurations"]
        moe = [name for name, c in configs.items() if "verdict" in c]  # MoEs scored against planted groups
        frame = pd.DataFrame(
            [{"config": name, "assignment": label, "label": "group", **configs[name][key]}
             for name in moe for key, label in (("routing_nmi", "routing (top-1 expert)"), ("kmeans_nmi", "k-means on inputs"),
                                                ("null_nmi", "shuffled null"))]
        )
        showcase = max((c for c in configs.values() if c["k"] == 1 and not c["control"]), key=lambda c: c["E"])
        figures = [
            ("Monosemanticity, mean D_i of represented features, the paper's features per dimension and loss vs network "
             "sparsity k/E (one dot per seed)",
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
        states = [c["state"] for c in results["claims"]]
        trained = [name for name in moe if configs[name]["gate"] != UNTRAINED]  # (under preset=paper, no top-1 MoE)
        aligned = {v: sum(configs[name]["verdict"]["verdict"] == v for name in trained) for v in ("more", "less", "equivalent", "inconclusive")}
        blocks = [
            Text(f"**Bottom line.** Of the paper's {len(states)} results checked here, "
                 + ", ".join(f"{states.count(state)} {state}" for state in ("supported", "contradicted", "not shown"))
                 + (f", {sum(s.startswith('mixed') for s in states)} mixed across E" if any(s.startswith("mixed") for s in states) else "")
                 + " (*not shown*: the seeds could not tell, which is not a *no*). "
                 + ("Top-1 routing aligned with the planted feature groups, compared with k-means on the inputs: "
                    + ", ".join(f"{v} for {n}" for v, n in aligned.items() if n) + f" of {len(trained)} MoE configurations "
                    "whose gate trains" + (" (top-1 MoEs with the paper's weight 1 have an untrained gate: "
                                           + "; ".join(f"E={configs[n]['E']}: NMI {fmt_ci(configs[n]['routing_nmi'])}, "
                                                       f"{verdict_text(configs[n]['verdict'])}" for n in moe if n not in trained) + ")"
                                           if len(trained) < len(moe) else "") + "."
                    if moe else "")),
            families_section(
                f"The primary question is the paper's headline claim, *{PRIMARY_CLAIM}*, answered by one test: the "
                f"trend of monosemanticity with k/E, here {results['claims'][0]['state']} ({results['claims'][0]['measured']}). "
                "Its family is every verdict behind the paper's claims (the claims table), corrected together; the "
                "routing-vs-k-means verdicts of the configurations no claim is about are one secondary family.",
                results["test_families"], order=(CLAIMS, ALIGNMENT)),
            Section("What was run", [Text(
                f"Preset `{cfg.preset}`. Task `superposition` with options `{self.task.options}`: {cfg.n_features} features in {cfg.n_groups} planted "
                f"group(s); each sample draws its active features from one group (each active with probability {1 - cfg.sparsity:.2f}). "
                f"Toy MoEs x' = Σ_j w_j ReLU(W_eᵀW_e x + b_e) over the top-k experts of a linear softmax gate ({cfg.gate_init} "
                f"initialization), at " + (f"fixed total capacity E·m = {cfg.capacity}" if cfg.capacity_mode == "total" else
                                           f"m = {cfg.capacity} hidden dimensions per expert") +
                f", for (E, k) in {cfg.configurations()}, {cfg.gate_weights} gate weights"
                + (" (each top-1 MoE also with weight 1, the *untrained gate*: renormalized top-1 weights are p / p = 1, so the "
                   "task sends the gate no gradient and routing stays near its initialization)"
                   if any(c["control"] for c in configs.values()) else
                   " (at k = 1 this weight is 1: the task sends the gate no gradient, so top-1 routing is an *untrained gate*)"
                   if cfg.gate_weights == "renormalized" else "") + ", "
                f"load-balancing weight {cfg.load_balance_weight}; {cfg.seeds} seeds as instances of one model per (E, k), {cfg.train.steps} steps "
                f"(batch {cfg.train.batch_size}, lr {cfg.train.lr}, weight decay {cfg.train.weight_decay}). Analysis on {cfg.n_eval} held-out samples (seed {cfg.eval_seed}); "
                f"nulls use {cfg.n_permutations} shuffles.")]),
            Section("The paper's results beside the measured ones", [
                Table(results["claims"]),
                Text(f"Each claim is checked under this run's preset (`{cfg.preset}`); the other preset is one invocation away "
                     f"(`toylab study run moe-superposition --set preset=paper`, or without it for toylab's), and "
                     f"docs/studies/moe-superposition.md records both outcomes."),
            ]),
            Section("How the paper's setup differs from this study's", [Table(DIFFERENCES)]),
            Section("Per configuration (mean [95% CI] over seeds)", [Table(self.summary(results))]),
            Section("Do experts align with the planted groups beyond k-means on the inputs?",
                    [Table(self.alignment_rows(results)) if moe else Text("(none: no MoE configuration, or the task has a single feature group)")]),
            Section("Figures", [Figure(path, caption) for caption, path in figures]),
            Section("What the numbers mean", [Text(METRIC_NOTES.replace("the tolerance", f"±{cfg.mono_tolerance}").format(
                margin=MARGIN, loss_margin=LOSS_MARGIN, trend_margin=TREND_MARGIN, interval=INTERVAL_NOTE))]),
        ]
        return Document("Superposition in mixtures of experts (Chaudhari et al. 2025)", blocks)


def top1(configs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The top-1 MoEs the paper's MoE-vs-dense claims are about (E > 1, k = 1, no untrained-gate control), by name."""
    return {name: c for name, c in configs.items() if c["E"] > 1 and c["k"] == 1 and not c["control"]}


def trend_text(t: dict[str, Any], name: str) -> str:
    """A corrected `trend_verdict` as a phrase: ρ with its 90% interval, n, the verdict and its adjusted p."""
    if not math.isfinite(t["rho"]):
        return f"Spearman ρ(k/E, {name}) undefined (no spread in one of them), n = {t['n']}: inconclusive"
    text = (f"Spearman ρ(k/E, {name}) = {fmt(t['rho'], 2)} [{fmt(t['ci_low'], 2)}, {fmt(t['ci_high'], 2)}] (90% CI), n = {t['n']}: "
            f"{t['verdict']}")
    if "p_adjusted" in t:
        p = t["p_equivalent_adjusted"] if t["verdict"] == "equivalent" else t["p_adjusted"]
        text += (f" ({t['adjustment']}-adjusted over {t['family_size']} tests: p = {fmt(p, 4)}"
                 + (f", uncorrected {t['raw_verdict']}" if t["raw_verdict"] != t["verdict"] else "") + ")")
    return text


SPARSITY_METRICS = ("monosemanticity", "dimensionality", "features_per_dim", "loss")


def sparsity_figure(results: dict[str, Any]) -> plt.Figure:
    rows = [
        {"k/E": c["network_sparsity"], "E": str(c["E"]), "metric": metric, "value": value}
        for c in results["configurations"].values() if not c["control"]
        for metric in SPARSITY_METRICS
        for value in c["per_seed"][metric]
    ]
    frame = pd.DataFrame(rows)
    fig, axes = plt.subplots(1, len(SPARSITY_METRICS), figsize=(17, 3.6))
    palette = series_colours(frame["E"].nunique())
    for ax, metric in zip(axes, SPARSITY_METRICS):
        sub = frame[frame["metric"] == metric]
        sns.stripplot(data=sub, x="k/E", y="value", hue="E", ax=ax, dodge=False, jitter=0.15, size=5, native_scale=True,
                      log_scale=(2, False), legend=metric == SPARSITY_METRICS[-1], palette=palette)
        ax.set(title=metric, ylabel=metric, xlabel="network sparsity k/E")
    fig.tight_layout()
    if axes[-1].get_legend() is not None:
        sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.02, 1), frameon=False, title="experts E")  # outside the data
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
