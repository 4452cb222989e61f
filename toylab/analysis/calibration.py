"""Calibrating the specialization analyses on a dial of planted specialization of known strength.

A dial (`TransformerConfig.label_mix` or `router_supervision`) plants specialization on a label, from none (the
learned router) to complete (the label router). At each setting the models of several seeds are analysed as the
lab analyses any MoE, and each analysis gives per seed one *effect*, the difference its verdict is drawn from
(`ANALYSES`). From these:

- the **dose–response** of each analysis: its effect and verdict per setting, against the *realized*
  specialization, the NMI of the routing with the planted label (what the dial achieved, not what it asked for);
- its **detection rate** at n seeds: the chance that a study with n seeds calls "more", from the effect's mean and
  spread over seeds (`power.detection_rate`; the evaluation batch's own noise, shared by every seed, does not
  shrink with n and is added as `stats.compare` adds it), and its **sensitivity**: the smallest realized
  specialization from which on it is detected in at least `TARGET` of studies;
- its **specificity**: the share of false "more" verdicts at the dial's zero for labels the router cannot see,
  labels drawn at random per evaluation sequence (independent of the input, shared by every seed as a real label
  is), each verdict drawn exactly as the primary one (`random_label_scores`, `random_label_verdicts`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from toylab.analysis.clustering import contingency, kmeans, nmi_from_tables, permutation_nmi, weighted_tables
from toylab.analysis.power import detection_rate, false_positive_rate, sensitivity
from toylab.analysis.specialization import EXPERTS, ROUTER_INPUT, floor_compare, label_margin, token_activations, top_expert
from toylab.analysis.stats import UNIT, adjust, mean_ci, sequence_resamples
from toylab.models import Transformer
from toylab.task import Batch, Task

TARGET = 0.8
"""The detection rate that makes an analysis sensitive to a setting: "more" in at least 80% of studies."""
ALPHA = 0.025
"""One-sided level of a "more" after correction: a primary family of one test is called "more" at two-sided
p < 0.05 (`stats.adjust`)."""
RANDOM_LABEL_SEED = 20261204


@dataclass(frozen=True)
class Analysis:
    """One specialization analysis: its question, where its scores are (`"layer"`: `specialization` scores of
    one label at one layer; `"paths"`: `routing_paths` scores of one label), one seed's effect from them, and
    the key of its verdict in `summarize` / `summarize_paths`."""

    question: str
    source: str
    effect: Callable[[Mapping[str, Any]], float]
    verdict: str


ANALYSES = {
    "nmi_vs_kmeans": Analysis("routing vs k-means on the router input, NMI (the lab's primary verdict)", "layer",
                              lambda s: s["routing"]["nmi"] - s["kmeans_moe"]["nmi"], "verdict"),
    "cnmi_vs_kmeans": Analysis("routing vs k-means, NMI given the token", "layer",
                               lambda s: s["routing"]["cnmi"] - s["kmeans_moe"]["cnmi"], "conditional_verdict"),
    "cnmi_vs_null": Analysis("routing's NMI given the token vs its within-token null", "layer",
                             lambda s: s["routing"]["cnmi"] - s["routing"]["null_cnmi_mean"], "conditional_vs_null"),
    "nmi_vs_kmeans_balanced": Analysis("routing vs size-balanced k-means (the routing's usage), NMI", "layer",
                                       lambda s: s["routing"]["nmi"] - s["kmeans_balanced"]["nmi"], "vs_kmeans_balanced"),
    "nmi_vs_random_linear": Analysis("routing vs random linear routers (the routing's usage), NMI", "layer",
                                     lambda s: s["routing"]["nmi"] - s["random_linear"]["nmi"], "vs_random_linear"),
    "path_vs_layer": Analysis("routing path vs its best single layer (conditional NMI vs its null)", "paths",
                              lambda s: s["gain"]["cnmi"] - s["gain"]["null_cnmi_mean"], "path_vs_layer"),
    "path_vs_kmeans": Analysis("routing path vs k-means with as many clusters, NMI", "paths",
                               lambda s: s["path"]["nmi"] - s["kmeans"]["nmi"], "path_vs_kmeans"),
}
PRIMARY = "nmi_vs_kmeans"


def realized(scores: Mapping[str, Any]) -> float:
    """The specialization a dial achieved in one seed: NMI of the routing with the planted label."""
    return float(scores["routing"]["nmi"])


def ceiling_share(scores: Mapping[str, Any]) -> float:
    """How much of the linearly readable label the routing recovers: its NMI over the linear probe's."""
    ceiling = scores["linear"]["nmi"]
    return float(scores["routing"]["nmi"] / ceiling) if ceiling > 0 else math.nan


def seed_effects(layer_scores: Sequence[Mapping[str, Any]], path_scores: Sequence[Mapping[str, Any]] | None) -> dict[str, list[float]]:
    """Per analysis, each seed's effect; analyses without scores (paths of a one-layer MoE, null routers without
    `null_draws`) are left out."""
    sources = {"layer": layer_scores, "paths": path_scores or ()}
    effects = {}
    for name, analysis in ANALYSES.items():
        try:
            effects[name] = [analysis.effect(s) for s in sources[analysis.source]]
        except KeyError:
            continue
    return {name: found for name, found in effects.items() if found}


def detection(effects: Sequence[float], evaluation_se: float, seeds: Sequence[int], alpha: float = ALPHA) -> dict[str, float]:
    """Per number of seeds n, the chance a study with n seeds calls "more" given the per-seed effects' mean and sd,
    with the evaluation batch's standard error `evaluation_se` (which n seeds do not average out) in quadrature."""
    x = np.asarray(effects, dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return {str(n): math.nan for n in seeds}
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    return {str(n): detection_rate(mean, math.sqrt(sd**2 + n * evaluation_se**2), n, alpha) for n in seeds}


def dose_response(points: Sequence[Mapping[str, Any]], seeds: Sequence[int], target: float = TARGET) -> dict[str, Any]:
    """Each analysis's curve over the dial's settings and its sensitivity per number of seeds.

    `points`, one per setting in dial order: `dial` (its value), `realized` and `ceiling_share` (per seed),
    `effects` (per analysis, per seed), `verdicts` (per analysis, the setting's verdict) and `evaluation_se` (per
    analysis, the standard error of the evaluation batch, 0 where not estimated)."""
    curves: dict[str, Any] = {}
    realized_mean = [mean_ci(p["realized"], bounds=UNIT)["mean"] for p in points]
    order = np.argsort(realized_mean, kind="stable")
    for name in ANALYSES:
        if not all(name in p["effects"] for p in points):
            continue
        rates = [detection(p["effects"][name], p["evaluation_se"].get(name, 0.0), seeds) for p in points]
        curves[name] = {
            "question": ANALYSES[name].question,
            "points": [{"dial": p["dial"], "realized": mean_ci(p["realized"], bounds=UNIT), "effect": mean_ci(p["effects"][name]),
                        "verdict": p["verdicts"][name], "detection": rate} for p, rate in zip(points, rates)],
            "sensitivity": {str(n): sensitivity([realized_mean[i] for i in order], [rates[i][str(n)] for i in order], target)
                            for n in seeds},
            "missed": missed([realized_mean[i] for i in order], [rates[i][str(max(seeds))] for i in order], [points[i]["dial"] for i in order], target),
        }
    return curves


def missed(realized: Sequence[float], rates: Sequence[float], dials: Sequence[float], target: float = TARGET) -> list[dict[str, float]]:
    """The settings (sorted by realized specialization) that an analysis misses (rate below `target`) although it
    detects a smaller realized specialization: where detection does not rise with specialization, "sensitivity" alone
    would mislead."""
    first = next((i for i, rate in enumerate(rates) if rate >= target), None)
    if first is None:
        return []
    return [{"dial": dials[i], "realized": realized[i], "rate": rates[i]} for i in range(first + 1, len(rates)) if not rates[i] >= target]


def random_labels(sequences: np.ndarray, n_classes: int, n_labels: int) -> np.ndarray:
    """`[n_labels, n_tokens]` labels drawn uniformly per evaluation sequence (constant within one, as `mode` is),
    independent of everything the model sees; the same draws for every model analysed on the same batch."""
    n = int(sequences.max()) + 1
    draws = np.random.default_rng(RANDOM_LABEL_SEED).integers(0, n_classes, size=(n_labels, n))
    return draws[:, sequences]


def random_label_scores(routing: np.ndarray, kmeans: np.ndarray, sequences: np.ndarray, n_classes: int, n_labels: int,
                        n_permutations: int, seed: int) -> dict[str, list[Any]]:
    """One seed's scores of the primary verdict for `n_labels` random labels (`random_labels`): NMI of the routing
    and of k-means (same tokens) with each, their shuffled nulls' means, and routing minus k-means on the
    resamples of the evaluation sequences, as `specialization.label_scores` scores a real label."""
    labels = random_labels(sequences, n_classes, n_labels)
    resamples = sequence_resamples(sequences)
    n_experts = max(int(routing.max()), int(kmeans.max())) + 1
    out: dict[str, list[Any]] = {"routing_nmi": [], "kmeans_nmi": [], "routing_null": [], "kmeans_null": [], "resampled": []}
    for label in labels:
        for kind, assignment in (("routing", routing), ("kmeans", kmeans)):
            out[f"{kind}_nmi"].append(float(nmi_from_tables(contingency(assignment, label, n_experts, n_classes))))
            out[f"{kind}_null"].append(float(permutation_nmi(assignment, label, n_permutations, seed).mean()))
        routed, clustered = (nmi_from_tables(weighted_tables(a, label, resamples, n_experts, n_classes)) for a in (routing, kmeans))
        out["resampled"].append((routed - clustered).tolist())
    return out


def model_random_label_scores(moe: Transformer, task: Task, batch: Batch, n_classes: int, n_labels: int, n_permutations: int,
                              seed: int) -> dict[str, list[Any]]:
    """`random_label_scores` of an MoE's last layer: its top-1 routing and k-means on its router input (the primary
    verdict's two assignments) over the batch's real tokens."""
    layer = moe.moe_layers()[-1]
    acts = token_activations(moe, task, batch, [EXPERTS.format(layer=layer), ROUTER_INPUT.format(layer=layer)])
    keep = task.positions(batch)
    sequences = np.broadcast_to(np.arange(len(batch))[:, None], keep.shape)[keep]
    return random_label_scores(top_expert(acts[EXPERTS.format(layer=layer)], moe.cfg.n_experts),
                               kmeans(acts[ROUTER_INPUT.format(layer=layer)], moe.cfg.n_experts, seed), sequences, n_classes, n_labels,
                               n_permutations, seed)


def random_label_verdicts(per_seed: Sequence[Mapping[str, list[Any]]]) -> dict[str, Any]:
    """Per random label, the primary verdict over seeds (`floor_compare` with the evaluation batch's noise, the
    margin of a label no probe can read, `label_margin(0)`), raw and corrected as a primary family of one
    (`stats.adjust`), and the shares of false "more" verdicts with their 95% Clopper–Pearson intervals."""
    delta = label_margin(0.0)["delta"]
    raw, adjusted = [], []
    for j in range(len(per_seed[0]["routing_nmi"])):
        found = floor_compare([s["routing_nmi"][j] for s in per_seed], [s["kmeans_nmi"][j] for s in per_seed],
                              [s["routing_null"][j] for s in per_seed], [s["kmeans_null"][j] for s in per_seed], delta,
                              np.array([s["resampled"][j] for s in per_seed]))
        raw.append(found["verdict"])
        adjusted.append(adjust([found])[0]["verdict"])
    return {"labels": len(raw), "seeds": len(per_seed), "margin": delta, "raw": false_positive_rate(raw),
            "adjusted": false_positive_rate(adjusted), "verdicts": {v: adjusted.count(v) for v in sorted(set(adjusted))}}
