"""Routing paths: the tuple of experts a token takes through the MoE layers, read as one cluster id.

Experts can look polysemantic one layer at a time while their combinations across layers are
monosemantic. For each label, the path id is compared with
- the best single layer, by what the path says about the label *beyond* that layer: the conditional
  information I(other layers; label | best layer), as conditional NMI, against the null that shuffles the
  other layers' experts among tokens that share the best layer's expert (`path_gain`). Since
  I(path; label) = I(best layer; label) + I(other layers; label | best layer), this is exactly the path's
  gain, in one information scale, whatever the numbers of clusters;
- k-means on the concatenated router inputs with as many clusters as there are distinct paths
  (NMI grows with the number of clusters, so this is the fair clustering baseline for paths),
- a null: path ids shuffled across tokens (same path frequencies).
The Jensen-Shannon divergence of each expert's (and each path's) class distribution from the global one
is scored against a multinomial null: the same number of tokens drawn from the global class distribution.

A single layer's routing is a path of one layer: `matched_routing` compares it with k-means with as many
clusters as it uses, counting the "no expert" cluster of token-dropping routers (`matched_scores`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from toylab.analysis.clustering import conditional_nmi, kmeans, nmi, permutation_conditional_nmi
from toylab.analysis.probes import split
from toylab.analysis.specialization import (
    EXPERTS, ROUTER_INPUT, alignment, analysable_labels, floor_compare, linear_ceiling, token_activations, top_expert,
)
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


def matched_kmeans(assignment: np.ndarray, inputs: np.ndarray, seed: int) -> np.ndarray:
    """k-means on `inputs` with as many clusters as `assignment` uses (one cluster: all tokens in it)."""
    n_clusters = len(np.unique(assignment))
    return kmeans(inputs, n_clusters, seed) if n_clusters > 1 else np.zeros(len(assignment), dtype=np.int64)


def path_gain(experts: Sequence[np.ndarray], label: np.ndarray, sequences: np.ndarray, n_permutations: int, seed: int) -> dict[str, Any]:
    """What the path says about `label` beyond the best single layer, with its within-condition null.

    The best layer is chosen by NMI with the label on half of the sequences (`split` by sequence) and the gain is
    scored on the other half only, so the choice is not fit to the tokens it is scored on (choosing on the scored
    tokens would pick the layer whose noise happens to align with the label there). On the scored half: the
    conditional NMI of the other layers' path with the label given the best layer's expert, and its null, those
    experts shuffled among tokens with the same best-layer expert (`permutation_conditional_nmi`); `p_value` is
    one-sided. A second layer that is a relabelled copy of the first adds nothing: gain 0, null 0.
    """
    select, score = split(len(label), 0.5, seed, groups=sequences)
    best = max(range(len(experts)), key=lambda i: nmi(experts[i][select], label[select]))
    rest = path_ids([e[score] for i, e in enumerate(experts) if i != best])
    given = experts[best][score]
    observed = conditional_nmi(rest, label[score], given)
    null = permutation_conditional_nmi(rest, label[score], given, n_permutations, seed)
    return {"best_layer": best, "cnmi": observed, "null_cnmi_mean": float(null.mean()),
            "p_value": permutation_p_value(observed, null), "n_scored": len(score)}


def path_scores(
    experts: Sequence[np.ndarray], router_inputs: np.ndarray, label: np.ndarray, n_classes: int, sequences: np.ndarray,
    n_permutations: int, seed: int,
) -> dict[str, Any]:
    """Every score of one label (tokens where it is defined; `sequences` gives each token's sequence): `alignment`
    of the path, of each layer's routing (`layer{i}`, i indexing `experts`) and of k-means on `router_inputs`
    (concatenated) with as many clusters as distinct paths; the path's gain over the best single layer
    (`path_gain`); and the JSD of each unit from the global class distribution (`divergence_from_global`) for
    paths and each layer's experts."""
    paths = path_ids(experts)
    assignments = {"path": paths, **{f"layer{i}": e for i, e in enumerate(experts)}, "kmeans": matched_kmeans(paths, router_inputs, seed)}
    scores: dict[str, Any] = {"n_paths": int(paths.max()) + 1, "gain": path_gain(experts, label, sequences, n_permutations, seed)}
    for kind, assignment in assignments.items():
        scores[kind] = alignment(assignment, label, n_classes, n_permutations, seed)
        if kind != "kmeans":
            scores[kind]["divergence"] = divergence_from_global(assignment, label, n_classes, n_permutations, seed)
    return scores


def _labelled_tokens(task: Task, batch: Batch) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Each real token's sequence index, and each analysable label at the real tokens (in `token_activations`' order)."""
    keep = task.positions(batch)
    sequences = np.broadcast_to(np.arange(len(batch))[:, None], keep.shape)[keep]
    return sequences, {name: batch.labels[name][keep] for name in analysable_labels(task)}


def routing_paths(moe: Transformer, task: Task, batch: Batch, n_permutations: int, seed: int,
                  labels: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """`{label: path_scores}` for one MoE model on a batch (real tokens; each of `labels`, default every analysable
    label, where it is defined)."""
    layers = moe.moe_layers()
    names = [EXPERTS.format(layer=layer) for layer in layers] + [ROUTER_INPUT.format(layer=layer) for layer in layers]
    acts = token_activations(moe, task, batch, names)
    experts = [top_expert(acts[EXPERTS.format(layer=layer)], moe.cfg.n_experts) for layer in layers]
    router_inputs = np.concatenate([acts[ROUTER_INPUT.format(layer=layer)] for layer in layers], axis=1)
    sequences, found = _labelled_tokens(task, batch)
    found = {name: found[name] for name in labels} if labels else found
    results = {}
    for name, label in found.items():
        defined = label != IGNORE
        results[name] = path_scores([e[defined] for e in experts], router_inputs[defined], label[defined],
                                    task.labels[name].n_classes, sequences[defined], n_permutations, seed)
    return results


def summarize_paths(per_seed: Sequence[dict[str, dict[str, Any]] | None], margin: float = MARGIN) -> dict[str, dict[str, Any]]:
    """Across seeds, per label: mean and 95% CI of the NMI and mean JSD of every assignment, of the path's gain over
    the best single layer and its null, the best layers chosen, and verdicts: `path_vs_layer` (the gain's conditional
    NMI vs its within-condition null's mean, per seed: *more* when the path says more about the label than the best
    single layer), `path_vs_kmeans` (NMI, same number of clusters) and `path_vs_null` (path NMI vs its null's mean)."""
    per_seed = [s for s in per_seed if s is not None]
    summary: dict[str, dict[str, Any]] = {}
    for label in per_seed[0]:
        runs = [s[label] for s in per_seed]
        kinds = [k for k in runs[0] if k not in ("n_paths", "gain")]
        gains = [r["gain"] for r in runs]
        summary[label] = {
            "n_paths": mean_ci([r["n_paths"] for r in runs]),
            **{f"{kind}_nmi": mean_ci([r[kind]["nmi"] for r in runs], bounds=UNIT) for kind in kinds},
            **{f"{kind}_jsd": mean_ci([r[kind]["divergence"]["mean_jsd"] for r in runs], bounds=UNIT) for kind in kinds if kind != "kmeans"},
            **{f"{kind}_null_jsd": mean_ci([r[kind]["divergence"]["null_mean_jsd"] for r in runs], bounds=UNIT)
               for kind in kinds if kind != "kmeans"},
            "gain_cnmi": mean_ci([g["cnmi"] for g in gains], bounds=UNIT),
            "gain_null_cnmi": mean_ci([g["null_cnmi_mean"] for g in gains], bounds=UNIT),
            "gain_max_p_value": max(g["p_value"] for g in gains),
            "best_layers": [g["best_layer"] for g in gains],
            "path_max_p_value": max(r["path"]["p_value"] for r in runs),
            "path_jsd_max_p_value": max(r["path"]["divergence"]["p_value"] for r in runs),
            "path_vs_layer": compare([g["cnmi"] for g in gains], [g["null_cnmi_mean"] for g in gains], margin),
            "path_vs_kmeans": compare([r["path"]["nmi"] for r in runs], [r["kmeans"]["nmi"] for r in runs], margin),
            "path_vs_null": compare([r["path"]["nmi"] for r in runs], [r["path"]["null_nmi_mean"] for r in runs], margin),
        }
    return summary


def matched_scores(
    assignment: np.ndarray, router_input: np.ndarray, label: np.ndarray, n_classes: int, sequences: np.ndarray,
    n_permutations: int, seed: int,
) -> dict[str, Any]:
    """One layer's routing against k-means on its router input at equal cluster counts, for one label (defined tokens).

    Token-dropping routers (expert choice, a capacity factor) give some tokens no expert, and `top_expert` puts
    those in one more cluster, so routing may use E + 1 clusters; a collapsed router uses fewer than E. NMI grows
    with the number of clusters, so k-means gets exactly as many clusters as the routing uses, on every token.
    The alternative, scoring routed tokens only, is not used: the router itself would choose which tokens are
    scored (expert choice drops the tokens no expert ranks high, which may be whole classes), so variants would be
    scored on different tokens, and what the dropping says about the label, part of what routing does, would be
    lost. Returns `n_clusters`, the `alignment` of `routing` and of `kmeans`, and the `linear` ceiling.
    """
    return {"n_clusters": len(np.unique(assignment)),
            "routing": alignment(assignment, label, n_classes, n_permutations, seed),
            "kmeans": alignment(matched_kmeans(assignment, router_input, seed), label, n_classes, n_permutations, seed),
            "linear": linear_ceiling(router_input, label, sequences, seed)}


def matched_routing(moe: Transformer, task: Task, batch: Batch, n_permutations: int, seed: int) -> dict[str, dict[str, dict[str, Any]]]:
    """`{layer: {label: matched_scores}}` for one MoE model on a batch (real tokens; each label where it is defined)."""
    layers = moe.moe_layers()
    names = [EXPERTS.format(layer=layer) for layer in layers] + [ROUTER_INPUT.format(layer=layer) for layer in layers]
    acts = token_activations(moe, task, batch, names)
    sequences, labels = _labelled_tokens(task, batch)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for layer in layers:
        routing, router_input = top_expert(acts[EXPERTS.format(layer=layer)], moe.cfg.n_experts), acts[ROUTER_INPUT.format(layer=layer)]
        results[str(layer)] = {}
        for name, label in labels.items():
            defined = label != IGNORE
            results[str(layer)][name] = matched_scores(routing[defined], router_input[defined], label[defined],
                                                       task.labels[name].n_classes, sequences[defined], n_permutations, seed)
    return results


def summarize_matched(per_seed: Sequence[dict[str, dict[str, dict[str, Any]]]], margin: float = MARGIN) -> dict[str, dict[str, dict[str, Any]]]:
    """Across seeds, per layer and label: mean and 95% CI of the clusters used, of the NMI of routing, of k-means with as
    many clusters and of the linear ceiling, routing's shuffled null, its largest p-value, and `verdict`: routing's NMI
    vs k-means' (paired by seed, margin `margin`; "both at floor" where both lie within it of their nulls, `floor_compare`)."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for layer in per_seed[0]:
        summary[layer] = {}
        for label in per_seed[0][layer]:
            runs = [s[layer][label] for s in per_seed]
            routing, clustered = [r["routing"]["nmi"] for r in runs], [r["kmeans"]["nmi"] for r in runs]
            summary[layer][label] = {
                "n_clusters": mean_ci([r["n_clusters"] for r in runs]),
                "routing_nmi": mean_ci(routing, bounds=UNIT),
                "kmeans_nmi": mean_ci(clustered, bounds=UNIT),
                "linear_nmi": mean_ci([r["linear"]["nmi"] for r in runs], bounds=UNIT),
                "null_nmi": mean_ci([r["routing"]["null_nmi_mean"] for r in runs], bounds=UNIT),
                "routing_max_p_value": max(r["routing"]["p_value"] for r in runs),
                "verdict": floor_compare(routing, clustered, [r["routing"]["null_nmi_mean"] for r in runs],
                                         [r["kmeans"]["null_nmi_mean"] for r in runs], margin),
            }
    return summary
