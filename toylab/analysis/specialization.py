"""Do experts recover planted labels, or only what clustering the residual stream would find?

For each ground-truth label and each MoE layer, the top-1 expert assignment is compared with
the label (NMI, ARI, expert x class table) against controls and on two scales:
- k-means with as many clusters as experts on the router's input (`blocks.{l}.ln2.hook_normalized`),
- the same k-means on the same site of a dense model trained alike,
- a permutation null: the expert assignment shuffled across tokens (same expert frequencies),
- token identity: the NMI given the token (`conditional_nmi`), with a null that shuffles experts only
  among tokens of one kind, asks what the assignment says about the label beyond which token it is,
- the linear ceiling: how much of the label a linear probe reads off the router input at all,
- with `null_draws`, null routers with the routing's expert usage (`toylab.analysis.null_routers`): size-balanced
  k-means and random linear routers on the router input, so that a load-balanced router is compared with
  groupings of the same sizes that a linear router could make.

Scores are NMI with AMI beside it (AMI is 0 in expectation for any unrelated grouping of any sizes). By default a
label's verdicts use an equivalence margin on its own scale, a share of its linear ceiling (`label_margin`), and an
"equivalent" between two scores that both sit at the shuffled null is no evidence of anything: it reads
inconclusive, flagged `both_at_floor` (`floor_compare`).

A token's assignment is its best expert (slot 0 of `hook_expert_indices`); a token with no expert (all
slots empty, index -1: expert-choice routing, or a token dropped at capacity) forms one more cluster of
its own, "no expert", with id n_experts (`top_expert`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from toylab.analysis.clustering import (
    ami_from_table,
    ari_from_table,
    conditional_entropy,
    conditional_nmi,
    contingency,
    kmeans,
    nmi,
    nmi_from_tables,
    permutation_conditional_nmi,
    permutation_nmi,
    weighted_tables,
)
from toylab.analysis.null_routers import balanced_kmeans, random_linear_routers
from toylab.analysis.probes import logistic_predictions
from toylab.analysis.stats import MARGIN, UNIT, at_floor, compare, correct_families, mean_ci, permutation_p_value, sequence_resamples
from toylab.errors import ToylabError
from toylab.models import Transformer
from toylab.task import IGNORE, Batch, Task

ROUTER_INPUT = "blocks.{layer}.ln2.hook_normalized"
EXPERTS = "blocks.{layer}.mlp.hook_expert_indices"
ASSIGNMENTS = ("routing", "kmeans_moe", "kmeans_dense")
"""The labelings compared with each label: top-1 experts, k-means on the MoE's router input, k-means on the dense model's same site."""
NULL_ROUTERS = {"kmeans_balanced": "size-balanced k-means", "random_linear": "random linear routers"}
"""The null routers of `specialization` with `null_draws` (groupings of the routing's usage on the router input), by name."""
BOUNDS = {"nmi": UNIT, "ami": (-math.inf, 1.0), "cnmi": UNIT, "ari": (-1.0, 1.0)}
NULL_METRICS = ("nmi", "ami")
"""The scores of the null routers (no permutation null or conditional score: their sizes are the routing's)."""
MARGIN_FRACTION = 0.1
"""The default equivalence margin of a label's verdicts, as a share of its linear ceiling's NMI (`label_margin`)."""
MARGIN_FLOOR = 0.01
"""The smallest default margin in NMI, for labels a linear probe barely reads."""
ACTIVATION_BYTES = 2**31
"""The most memory (bytes) the activations one `token_activations` call collects may take; more is refused."""


def top_expert(indices: np.ndarray, n_experts: int) -> np.ndarray:
    """Each token's best expert from `hook_expert_indices` `[n, slots]`; n_experts ("no expert") where it has none."""
    best = indices[:, 0]
    return np.where(best < 0, n_experts, best)


def analysable_labels(task: Task) -> list[str]:
    """Labels with one class per token (multi-hot labels need other measures)."""
    return [name for name, label in task.labels.items() if not label.multi_hot]


@torch.no_grad()
def token_activations(model: Transformer, task: Task, batch: Batch, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Activations at hook points, flattened over the task's real positions: `[n_tokens, ...]`, all in one forward pass.

    A label-routed model is fed its label from `batch.labels`, as in training. The whole batch runs at once (a router
    may route each token by the others: expert choice, capacity), so its activations must fit in `ACTIVATION_BYTES`,
    estimated from the first sequence's: a larger batch is refused in one line.
    """
    tokens = torch.from_numpy(batch.inputs)
    _, first = model.run_with_cache(tokens[:1], model.route_input({k: v[:1] for k, v in batch.labels.items()}), names=list(names))
    needed = len(batch) * sum(t.element_size() * t.numel() for t in first.values())
    if needed > ACTIVATION_BYTES:
        raise ToylabError(f"the activations of {len(batch):,} sequences at {len(names)} hook point(s) would take about "
                          f"{needed / 2**30:.1f} GiB, above the bound of {ACTIVATION_BYTES / 2**30:g} GiB; analyse fewer sequences")
    _, cache = model.run_with_cache(tokens, model.route_input(batch.labels), names=list(names))
    keep = torch.from_numpy(task.positions(batch))
    return {name: cache[name][keep].numpy() for name in names}


def alignment(assignment: np.ndarray, label: np.ndarray, n_classes: int, n_permutations: int, seed: int) -> dict[str, Any]:
    """NMI, AMI and ARI of a cluster assignment with a label, its permutation null, and the contingency table."""
    table = contingency(assignment, label, int(assignment.max()) + 1, n_classes)
    observed = float(nmi_from_tables(table))
    null = permutation_nmi(assignment, label, n_permutations, seed)
    return {
        "nmi": observed,
        "ami": ami_from_table(table),
        "ari": ari_from_table(table),
        "null_nmi_mean": float(null.mean()),
        "null_nmi_q95": float(np.quantile(null, 0.95)),
        "p_value": permutation_p_value(observed, null),
        "contingency": table.tolist(),
    }


def conditional_alignment(assignment: np.ndarray, label: np.ndarray, given: np.ndarray, n_permutations: int, seed: int) -> dict[str, float]:
    """NMI of an assignment with a label given `given` (token identity), and its null: the assignment shuffled
    among tokens with the same value of `given` (so what it says about `given` is kept, nothing else)."""
    observed = conditional_nmi(assignment, label, given)
    null = permutation_conditional_nmi(assignment, label, given, n_permutations, seed)
    return {"cnmi": observed, "null_cnmi_mean": float(null.mean()), "cnmi_p_value": permutation_p_value(observed, null)}


def null_router_alignment(draws: np.ndarray, label: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Mean NMI and AMI with a label over a null router's draws `[n_draws, n]`, and each draw's NMI."""
    tables = [contingency(draw, label, int(draw.max()) + 1, n_classes) for draw in draws]
    nmis = [float(nmi_from_tables(table)) for table in tables]
    return {"nmi": float(np.mean(nmis)), "ami": float(np.mean([ami_from_table(table) for table in tables])), "nmi_draws": nmis}


def linear_ceiling(router_input: np.ndarray, label: np.ndarray, sequences: np.ndarray, seed: int) -> dict[str, float]:
    """How much of a label is linearly available at the router input: a multinomial logistic probe's held-out
    accuracy (split by sequence), the majority-class accuracy, and the NMI of its predictions with the label."""
    predicted, true = logistic_predictions(router_input, label, groups=sequences, seed=seed)
    return {
        "accuracy": float((predicted == true).mean()),
        "baseline": float(np.bincount(true).max() / len(true)),
        "nmi": nmi(predicted, true),
    }


def label_scores(
    assignments: dict[str, np.ndarray], router_input: np.ndarray, label: np.ndarray, n_classes: int,
    tokens: np.ndarray, sequences: np.ndarray, n_permutations: int, seed: int,
    null_routers: dict[str, np.ndarray] | None = None,
) -> dict[str, dict[str, Any]]:
    """Every score of one label (defined tokens only): per assignment its alignment and NMI given the token
    (with the conditional null for routing), per null router (`{kind: draws [n_draws, n]}`) its mean NMI and AMI,
    the linear ceiling of the router input, and H(label | token) in bits (0 when the token determines the label,
    so that no assignment says anything about it given the token). Routing's NMI minus k-means' is also scored on
    `stats.sequence_resamples` of the evaluation sequences (`nmi_minus_kmeans_resampled`), for the verdict's interval."""
    scores: dict[str, dict[str, Any]] = {}
    for kind, assignment in assignments.items():
        found = alignment(assignment, label, n_classes, n_permutations, seed)
        if kind == "routing":
            found.update(conditional_alignment(assignment, label, tokens, n_permutations, seed))
        else:
            found["cnmi"] = conditional_nmi(assignment, label, tokens)
        scores[kind] = found
    if {"routing", "kmeans_moe"} <= set(assignments):  # the primary difference on resamples of the evaluation sequences
        resamples, n_experts = sequence_resamples(sequences), max(int(assignments[k].max()) for k in ("routing", "kmeans_moe")) + 1
        routing, kmeans_moe = (nmi_from_tables(weighted_tables(assignments[k], label, resamples, n_experts, n_classes))
                               for k in ("routing", "kmeans_moe"))
        scores["routing"]["nmi_minus_kmeans_resampled"] = (routing - kmeans_moe).tolist()
    for kind, draws in (null_routers or {}).items():
        scores[kind] = null_router_alignment(draws, label, n_classes)
    scores["linear"] = linear_ceiling(router_input, label, sequences, seed)
    scores["label"] = {"entropy_given_token": conditional_entropy(label, tokens)}
    return scores


def specialization(
    moe: Transformer, dense: Transformer | None, task: Task, batch: Batch, n_permutations: int, seed: int, null_draws: int = 0,
    labels: Sequence[str] | None = None, layers: Sequence[int] | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """`{layer: {label: {assignment, null router or "linear": scores}}}` for one seed's pair of models (see
    `label_scores`), over `labels` (default: every `analysable_labels`) and the MoE layers `layers` (default: all).
    Without a `dense` model there is no dense control (`kmeans_dense`). With `null_draws` > 0 the `NULL_ROUTERS`
    are scored too, fitted to every analysed token with the routing's expert usage over them: one size-balanced
    k-means and `null_draws` random linear routers."""
    keep = task.positions(batch)
    tokens = batch.inputs[keep]
    sequences = np.broadcast_to(np.arange(len(batch))[:, None], keep.shape)[keep]
    layers = moe.moe_layers() if layers is None else list(layers)
    inputs = [ROUTER_INPUT.format(layer=layer) for layer in layers]
    moe_acts = token_activations(moe, task, batch, inputs + [EXPERTS.format(layer=layer) for layer in layers])
    dense_acts = token_activations(dense, task, batch, inputs) if dense is not None else None
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for layer, site in zip(layers, inputs):
        routing = top_expert(moe_acts[EXPERTS.format(layer=layer)], moe.cfg.n_experts)
        assignments = {"routing": routing, "kmeans_moe": kmeans(moe_acts[site], moe.cfg.n_experts, seed)}
        if dense_acts is not None:
            assignments["kmeans_dense"] = kmeans(dense_acts[site], moe.cfg.n_experts, seed)
        usage = np.bincount(routing, minlength=moe.cfg.n_experts)
        nulls = {"kmeans_balanced": balanced_kmeans(moe_acts[site], usage, seed)[None],
                 "random_linear": random_linear_routers(moe_acts[site], usage, null_draws, seed)} if null_draws else {}
        results[str(layer)] = {}
        for name in labels or analysable_labels(task):
            label = batch.labels[name][keep]
            defined = label != IGNORE
            results[str(layer)][name] = label_scores(
                {kind: a[defined] for kind, a in assignments.items()}, moe_acts[site][defined], label[defined],
                task.labels[name].n_classes, tokens[defined], sequences[defined], n_permutations, seed,
                {kind: draws[:, defined] for kind, draws in nulls.items()},
            )
    return results


def routing_given_token(moe: Transformer, task: Task, batch: Batch) -> dict[str, float]:
    """`{layer: H(top-1 expert | token) in bits}`: 0 when routing is a function of the token (a hash router)."""
    keep = task.positions(batch)
    names = {str(layer): EXPERTS.format(layer=layer) for layer in moe.moe_layers()}
    experts = token_activations(moe, task, batch, list(names.values()))
    return {layer: conditional_entropy(top_expert(experts[name], moe.cfg.n_experts), batch.inputs[keep]) for layer, name in names.items()}


def label_margin(ceiling: float, margin: float | None = None) -> dict[str, Any]:
    """The equivalence margin δ (NMI) of one label's verdicts: `margin` when given ("absolute"), else ("relative")
    `MARGIN_FRACTION` of the label's linear ceiling `ceiling` (its probe's NMI, mean over seeds), rounded to 3
    decimals and at least `MARGIN_FLOOR`: a difference that small is small beside what the router could read."""
    if margin is not None:
        return {"delta": margin, "rule": "absolute"}
    return {"delta": max(MARGIN_FLOOR, round(MARGIN_FRACTION * ceiling, 3)), "rule": "relative", "ceiling": ceiling,
            "fraction": MARGIN_FRACTION, "floor": MARGIN_FLOOR}


def floor_compare(
    a: Sequence[float], b: Sequence[float], null_a: Sequence[float], null_b: Sequence[float], margin: float, evaluation: np.ndarray | None = None,
) -> dict[str, Any]:
    """`compare(a, b, margin)` of two NMIs per seed, flagged `both_at_floor` when neither mean exceeds the mean of
    its shuffled null (`null_a`, `null_b`, per seed) by more than `margin`. Two scores at the null agree without
    saying anything about the label, so such an "equivalent" reads "inconclusive" (`at_floor`)."""
    excess = max(float(np.mean(a)) - float(np.mean(null_a)), float(np.mean(b)) - float(np.mean(null_b)))
    return at_floor(compare(a, b, margin, evaluation=evaluation), excess <= margin)


def resampled(routing: Sequence[dict[str, Any]]) -> np.ndarray | None:
    """Per seed, routing's NMI minus k-means' on the resamples of the evaluation sequences (None where not scored)."""
    found = [r.get("nmi_minus_kmeans_resampled") for r in routing]
    return np.array(found) if all(f is not None for f in found) else None


def summarize(per_seed: Sequence[dict[str, dict[str, dict[str, Any]]] | None], margin: float | None = MARGIN) -> dict[str, dict[str, dict[str, Any]]]:
    """Across seeds: mean and 95% CI of every score (in range), the nulls, the largest p-values, and the verdicts.

    `verdict` compares NMI(routing) with NMI(k-means on the router input) (`floor_compare`; its interval includes the
    evaluation batch's noise, from the resampled differences of `label_scores`); `conditional_verdict`
    the same given the token; `conditional_vs_null` routing's NMI given the token with its conditional null; with
    null routers, `vs_kmeans_balanced` and `vs_random_linear` routing's NMI with theirs (both at floor against routing's
    shuffled null, which has their cluster sizes). Every verdict of a label uses its `margin` (`label_margin`:
    `margin`, or with None a share of the label's linear ceiling).
    """
    per_seed = [s for s in per_seed if s is not None]
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for layer in per_seed[0]:
        summary[layer] = {}
        for label in per_seed[0][layer]:
            runs = [s[layer][label] for s in per_seed]
            kinds = [kind for kind in ASSIGNMENTS if kind in runs[0]]  # no dense control for a pretrained model alone
            nulls = [kind for kind in NULL_ROUTERS if kind in runs[0]]
            scores = {kind: [r[kind] for r in runs] for kind in (*kinds, *nulls, "linear")}
            nmis = {kind: [r["nmi"] for r in scores[kind]] for kind in (*kinds, *nulls)}
            routing, kmeans_moe = scores["routing"], scores["kmeans_moe"]
            linear = {metric: mean_ci([r[metric] for r in scores["linear"]], bounds=UNIT) for metric in ("accuracy", "baseline", "nmi")}
            delta = label_margin(linear["nmi"]["mean"], margin)
            null = [r["null_nmi_mean"] for r in routing]
            summary[layer][label] = {
                **{
                    f"{kind}_{metric}": mean_ci([r[metric] for r in scores[kind]], bounds=BOUNDS[metric])
                    for kind in (*kinds, *nulls)
                    for metric in (BOUNDS if kind in ASSIGNMENTS else NULL_METRICS)
                },
                **{f"linear_{metric}": stat for metric, stat in linear.items()},
                "margin": delta,
                "null_nmi": mean_ci(null, bounds=UNIT),
                "null_cnmi": mean_ci([r["null_cnmi_mean"] for r in routing], bounds=UNIT),
                "routing_min_nmi": min(r["nmi"] for r in routing),
                "label_entropy_given_token": max(r["label"]["entropy_given_token"] for r in runs),
                "routing_max_p_value": max(r["p_value"] for r in routing),
                "kmeans_max_p_value": max(r["p_value"] for r in kmeans_moe),
                "routing_max_cnmi_p_value": max(r["cnmi_p_value"] for r in routing),
                "verdict": floor_compare(nmis["routing"], nmis["kmeans_moe"], null, [r["null_nmi_mean"] for r in kmeans_moe], delta["delta"],
                                         resampled(routing)),
                "conditional_verdict": compare([r["cnmi"] for r in routing], [r["cnmi"] for r in kmeans_moe], delta["delta"]),
                "conditional_vs_null": compare([r["cnmi"] for r in routing], [r["null_cnmi_mean"] for r in routing], delta["delta"]),
                **{f"vs_{kind}": floor_compare(nmis["routing"], nmis[kind], null, null, delta["delta"]) for kind in nulls},
            }
    return summary


PRIMARY = "primary"
FAMILIES = {
    PRIMARY: "routing vs k-means NMI, the task's function labels at the last MoE layer",
    "nmi": "routing vs k-means NMI, every other (label, layer)",
    "cnmi": "routing vs k-means NMI given the token, every (label, layer) the token does not determine",
    "cnmi_vs_null": "routing's NMI given the token vs its within-token null, every (label, layer) as above",
    "kmeans_balanced": "routing vs size-balanced k-means NMI (k-means centroids, the routing's expert usage), every (label, layer)",
    "random_linear": "routing vs random linear routers on the router input with the routing's expert usage, NMI, every (label, layer)",
    "paths": "routing paths vs the best single layer, vs k-means with as many clusters, vs the null, every label",
}
"""The families of tests of `expert-specialization`, each corrected for multiplicity on its own (`adjust`)."""


def primary_labels(task: Task, declared: Sequence[str] = ()) -> list[str]:
    """The labels of the primary question: `declared` ones (named before the run; one-line ToylabError for a label
    the analysis does not score), else those the model must compute (`kind == "function"`), else every label."""
    labels = analysable_labels(task)
    unknown = [name for name in declared if name not in labels]
    if unknown:
        raise ToylabError(f"primary label '{unknown[0]}' is not an analysable label of task '{task.name}'; valid: {', '.join(labels)}")
    return list(declared) or [name for name in labels if task.labels[name].kind == "function"] or labels


def adjust_families(summary: dict[str, dict[str, dict[str, Any]]], paths: dict[str, dict[str, Any]], task: Task,
                    declared: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Correct the verdicts of `summarize` and `summarize_paths` within the `FAMILIES` (in place; each keeps its
    `raw_verdict`; an "equivalent" at the floor stays inconclusive, `stats.adjust`), and return per family
    its role (primary or secondary, and its question), number of tests and verdict counts before and after.

    The primary family answers the study's question: routing vs k-means on the router input for the function
    labels at the last MoE layer (or the `declared` primary labels). Everything else is secondary, in families of one
    kind of comparison.
    """
    members = family_members(summary, set(primary_labels(task, declared)))
    for s in paths.values():
        members["paths"] += [(s, key) for key in ("path_vs_layer", "path_vs_kmeans", "path_vs_null")]
    return correct_families(members, FAMILIES, PRIMARY)


def family_members(summary: dict[str, dict[str, dict[str, Any]]], primary: set[str]) -> dict[str, list[tuple[dict[str, Any], str]]]:
    """The tests of `summarize`'s verdicts in each of the `FAMILIES` (`(holder, key)` pairs): the `primary` labels at the
    last layer in the primary family, every other (label, layer) in the secondary ones."""
    last = max(summary, key=int) if summary else None
    members: dict[str, list[tuple[dict[str, Any], str]]] = {name: [] for name in FAMILIES}
    for layer, labels in summary.items():
        for label, s in labels.items():
            members[PRIMARY if layer == last and label in primary else "nmi"].append((s, "verdict"))
            if s["label_entropy_given_token"] > 1e-9:
                members["cnmi"].append((s, "conditional_verdict"))
                members["cnmi_vs_null"].append((s, "conditional_vs_null"))
            for kind in NULL_ROUTERS:
                if f"vs_{kind}" in s:
                    members[kind].append((s, f"vs_{kind}"))
    return members
