"""Routing paths: the tuple of experts a token takes through the MoE layers, read as one cluster id.

Experts can look polysemantic one layer at a time while their combinations across layers are
monosemantic. For each label, the path id is compared with
- top-1 routing in each single layer,
- k-means on the concatenated router inputs with as many clusters as there are distinct paths
  (NMI grows with the number of clusters, so this is the fair clustering baseline for paths),
- a null: path ids shuffled across tokens (same path frequencies).
Paths have more clusters than one layer has experts, so paths and single layers are compared on their
NMI *above their own null* (`excess`). The Jensen-Shannon divergence of each expert's (and each path's)
class distribution from the global one is scored against a multinomial null: the same number of tokens
drawn from the global class distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from toylab.analysis.clustering import kmeans
from toylab.analysis.specialization import EXPERTS, ROUTER_INPUT, alignment, analysable_labels, token_activations, top_expert
from toylab.analysis.stats import MARGIN, UNIT, compare, mean_ci, permutation_p_value
from toylab.models import Transformer
from toylab.task import IGNORE, Batch, Task


def path_ids(experts: Sequence[np.ndarray]) -> np.ndarray:
    """One id `[n_tokens]` per distinct tuple of experts, from each layer's top-1 experts `[n_tokens]` (ids in order of first tuple value;
    "no expert", `top_expert`'s n_experts, counts as one more expert)."""
    _, ids = np.unique(np.stack(experts, axis=1), axis=0, return_inverse=True)
    return ids.ravel()


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence in bits (0 to 1) of distributions `p` `[..., k]` from `q` `[k]`."""
    m = (p + q) / 2

    def kl(a: np.ndarray) -> np.ndarray:
        return np.where(a > 0, a * np.log2(np.where(a > 0, a, 1.0) / np.where(m > 0, m, 1.0)), 0.0).sum(-1)

    return (kl(p) + kl(np.broadcast_to(q, p.shape))) / 2


def divergence_from_global(assignment: np.ndarray, label: np.ndarray, n_classes: int, n_draws: int, seed: int) -> dict[str, Any]:
    """How far each unit's (expert's or path's) class distribution is from the global one, against a multinomial null.

    Per unit u with n_u tokens: JSD(p_u, q) with q the global class distribution, and its null, JSD of n_u
    tokens drawn from q (`n_draws` times). `mean_jsd` weights units by their tokens; `p_value` is the share of
    null draws of that weighted mean at least as large (add-one).
    """
    table = np.bincount(assignment * n_classes + label, minlength=(int(assignment.max()) + 1) * n_classes)
    table = table.reshape(-1, n_classes)
    table = table[table.sum(1) > 0]
    sizes = table.sum(1)
    q = table.sum(0) / sizes.sum()
    observed = js_divergence(table / sizes[:, None], q)
    rng = np.random.default_rng(seed)
    draws = np.stack([rng.multinomial(n, q, size=n_draws) for n in sizes], axis=1)  # [n_draws, units, classes]
    null = js_divergence(draws / sizes[:, None], q)
    weights = sizes / sizes.sum()
    mean, null_mean = float(weights @ observed), null @ weights
    return {
        "tokens": sizes.tolist(),
        "jsd": observed.tolist(),
        "null_jsd": null.mean(0).tolist(),
        "unit_p_values": ((1 + (null >= observed).sum(0)) / (1 + n_draws)).tolist(),
        "mean_jsd": mean,
        "null_mean_jsd": float(null_mean.mean()),
        "p_value": permutation_p_value(mean, null_mean),
    }


def path_scores(
    experts: Sequence[np.ndarray], router_inputs: np.ndarray, label: np.ndarray, n_classes: int, n_permutations: int, seed: int
) -> dict[str, Any]:
    """Every score of one label (tokens where it is defined): `alignment` of the path, of each layer's routing
    (`layer{i}`, i indexing `experts`) and of k-means on `router_inputs` (concatenated) with as many clusters
    as distinct paths, each with `excess` = NMI - its null's mean; and the JSD of each unit from the global
    class distribution (`divergence_from_global`) for paths and each layer's experts."""
    paths = path_ids(experts)
    n_paths = int(paths.max()) + 1
    assignments = {"path": paths, **{f"layer{i}": e for i, e in enumerate(experts)},
                   "kmeans": kmeans(router_inputs, n_paths, seed) if n_paths > 1 else np.zeros_like(paths)}
    scores: dict[str, Any] = {"n_paths": n_paths}
    for kind, assignment in assignments.items():
        found = alignment(assignment, label, n_classes, n_permutations, seed)
        scores[kind] = {**found, "excess": found["nmi"] - found["null_nmi_mean"]}
        if kind != "kmeans":
            scores[kind]["divergence"] = divergence_from_global(assignment, label, n_classes, n_permutations, seed)
    return scores


def routing_paths(moe: Transformer, task: Task, batch: Batch, n_permutations: int, seed: int) -> dict[str, dict[str, Any]]:
    """`{label: path_scores}` for one MoE model on a batch (real tokens; each label where it is defined)."""
    layers = moe.moe_layers()
    names = [EXPERTS.format(layer=layer) for layer in layers] + [ROUTER_INPUT.format(layer=layer) for layer in layers]
    acts = token_activations(moe, task, batch, names)
    experts = [top_expert(acts[EXPERTS.format(layer=layer)], moe.cfg.n_experts) for layer in layers]
    router_inputs = np.concatenate([acts[ROUTER_INPUT.format(layer=layer)] for layer in layers], axis=1)
    keep = task.positions(batch)
    results = {}
    for name in analysable_labels(task):
        label = batch.labels[name][keep]
        defined = label != IGNORE
        results[name] = path_scores([e[defined] for e in experts], router_inputs[defined], label[defined],
                                    task.labels[name].n_classes, n_permutations, seed)
    return results


def summarize_paths(per_seed: Sequence[dict[str, dict[str, Any]] | None], margin: float = MARGIN) -> dict[str, dict[str, Any]]:
    """Across seeds, per label: mean and 95% CI of NMI, excess NMI and mean JSD of every assignment, and verdicts:
    `path_vs_layer` (path's excess NMI vs the best single layer's, per seed), `path_vs_kmeans` (NMI, same number
    of clusters) and `path_vs_null` (path NMI vs its null's mean)."""
    per_seed = [s for s in per_seed if s is not None]
    summary: dict[str, dict[str, Any]] = {}
    for label in per_seed[0]:
        runs = [s[label] for s in per_seed]
        kinds = [k for k in runs[0] if k != "n_paths"]
        layers = [k for k in kinds if k.startswith("layer")]
        best_layer = [max(r[k]["excess"] for k in layers) for r in runs]
        summary[label] = {
            "n_paths": mean_ci([r["n_paths"] for r in runs]),
            **{f"{kind}_{metric}": mean_ci([r[kind][metric] for r in runs], bounds=bounds)
               for kind in kinds for metric, bounds in (("nmi", UNIT), ("excess", (-1.0, 1.0)))},
            **{f"{kind}_jsd": mean_ci([r[kind]["divergence"]["mean_jsd"] for r in runs], bounds=UNIT) for kind in kinds if kind != "kmeans"},
            **{f"{kind}_null_jsd": mean_ci([r[kind]["divergence"]["null_mean_jsd"] for r in runs], bounds=UNIT)
               for kind in kinds if kind != "kmeans"},
            "path_max_p_value": max(r["path"]["p_value"] for r in runs),
            "path_jsd_max_p_value": max(r["path"]["divergence"]["p_value"] for r in runs),
            "path_vs_layer": compare([r["path"]["excess"] for r in runs], best_layer, margin),
            "path_vs_kmeans": compare([r["path"]["nmi"] for r in runs], [r["kmeans"]["nmi"] for r in runs], margin),
            "path_vs_null": compare([r["path"]["nmi"] for r in runs], [r["path"]["null_nmi_mean"] for r in runs], margin),
        }
    return summary
