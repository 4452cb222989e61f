"""Do experts recover planted labels, or only what clustering the residual stream would find?

For each ground-truth label and each MoE layer, the top-1 expert assignment is compared with
the label (NMI, ARI, expert x class table) against three controls:
- k-means with as many clusters as experts on the router's input (`blocks.{l}.ln2.hook_normalized`),
- the same k-means on the same site of a dense model trained alike,
- a permutation null: the expert assignment shuffled across tokens (same expert frequencies).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from toylab.analysis.clustering import ari_from_table, contingency, kmeans, nmi_from_tables, permutation_nmi
from toylab.analysis.stats import mean_ci, paired_comparison, permutation_p_value
from toylab.models import Transformer
from toylab.task import IGNORE, Batch, Task

ROUTER_INPUT = "blocks.{layer}.ln2.hook_normalized"
EXPERTS = "blocks.{layer}.mlp.hook_expert_indices"
ASSIGNMENTS = ("routing", "kmeans_moe", "kmeans_dense")
"""The labelings compared with each label: top-1 experts, k-means on the MoE's router input, k-means on the dense model's same site."""


def analysable_labels(task: Task) -> list[str]:
    """Labels with one class per token (multi-hot labels need other measures)."""
    return [name for name, label in task.labels.items() if not label.multi_hot]


@torch.no_grad()
def token_activations(model: Transformer, task: Task, batch: Batch, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Activations at hook points, flattened over the task's real positions: `[n_tokens, ...]`."""
    _, cache = model.run_with_cache(torch.from_numpy(batch.inputs), names=list(names))
    keep = torch.from_numpy(task.positions(batch))
    return {name: cache[name][keep].numpy() for name in names}


def alignment(assignment: np.ndarray, label: np.ndarray, n_classes: int, n_permutations: int, seed: int) -> dict[str, Any]:
    """NMI and ARI of a cluster assignment with a label, its permutation null, and the contingency table."""
    table = contingency(assignment, label, int(assignment.max()) + 1, n_classes)
    observed = float(nmi_from_tables(table))
    null = permutation_nmi(assignment, label, n_permutations, seed)
    return {
        "nmi": observed,
        "ari": ari_from_table(table),
        "null_nmi_mean": float(null.mean()),
        "null_nmi_q95": float(np.quantile(null, 0.95)),
        "p_value": permutation_p_value(observed, null),
        "contingency": table.tolist(),
    }


def expert_assignments(moe: Transformer, dense: Transformer, task: Task, batch: Batch, seed: int) -> dict[int, dict[str, np.ndarray]]:
    """Per MoE layer: top-1 experts, k-means on the router input, and k-means on the dense model's same site."""
    layers = moe.moe_layers()
    moe_acts = token_activations(
        moe, task, batch, [ROUTER_INPUT.format(layer=l) for l in layers] + [EXPERTS.format(layer=l) for l in layers]
    )
    dense_acts = token_activations(dense, task, batch, [ROUTER_INPUT.format(layer=l) for l in layers])
    n_experts = moe.cfg.n_experts
    return {
        layer: {
            "routing": moe_acts[EXPERTS.format(layer=layer)][:, 0],
            "kmeans_moe": kmeans(moe_acts[ROUTER_INPUT.format(layer=layer)], n_experts, seed),
            "kmeans_dense": kmeans(dense_acts[ROUTER_INPUT.format(layer=layer)], n_experts, seed),
        }
        for layer in layers
    }


def specialization(
    moe: Transformer, dense: Transformer, task: Task, batch: Batch, n_permutations: int, seed: int
) -> dict[str, dict[str, dict[str, Any]]]:
    """`{layer: {label: {assignment: alignment}}}` for one seed's pair of models."""
    keep = task.positions(batch)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for layer, assignments in expert_assignments(moe, dense, task, batch, seed).items():
        results[str(layer)] = {}
        for name in analysable_labels(task):
            label = batch.labels[name][keep]
            defined = label != IGNORE
            results[str(layer)][name] = {
                kind: alignment(assignment[defined], label[defined], task.labels[name].n_classes, n_permutations, seed)
                for kind, assignment in assignments.items()
            }
    return results


def verdict(routing: Sequence[float], baseline: Sequence[float]) -> dict[str, Any]:
    """Does routing recover more of a label than residual-stream k-means, less, or the same (paired over seeds)?"""
    comparison = paired_comparison(routing, baseline)
    return {**comparison, "test": "paired t-test over seeds on NMI(routing) - NMI(k-means on router input), 95% CI"}


def summarize(per_seed: Sequence[dict[str, dict[str, dict[str, Any]]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Across seeds: mean and 95% CI of every score, the null, the largest p-value, and the verdict."""
    per_seed = [s for s in per_seed if s is not None]
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for layer in per_seed[0]:
        summary[layer] = {}
        for label in per_seed[0][layer]:
            scores = {kind: [s[layer][label][kind] for s in per_seed] for kind in ASSIGNMENTS}
            summary[layer][label] = {
                **{
                    f"{kind}_{metric}": mean_ci([r[metric] for r in runs])
                    for kind, runs in scores.items()
                    for metric in ("nmi", "ari")
                },
                "null_nmi": mean_ci([r["null_nmi_mean"] for r in scores["routing"]]),
                "routing_max_p_value": max(r["p_value"] for r in scores["routing"]),
                "kmeans_max_p_value": max(r["p_value"] for r in scores["kmeans_moe"]),
                "verdict": verdict([r["nmi"] for r in scores["routing"]], [r["nmi"] for r in scores["kmeans_moe"]]),
            }
    return summary
