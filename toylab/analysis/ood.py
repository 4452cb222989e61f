"""Does routing hold off-distribution? The class → expert map of held-out inputs, applied to larger or deeper ones.

For a trained MoE, its in-distribution map sends each class of a label to the expert most of its tokens go to,
fitted on one half of the in-distribution sequences. On the other half (`agreement_id`, the ceiling) and on
shifted inputs (`Task.shifted_sample`, `agreement_ood`), the agreement is the share of tokens of the classes both
distributions have that go to their class's mapped expert; its null shuffles the experts among the shifted tokens
(`agreement_null`). Beside it, the routing's NMI with the label on the shifted tokens against k-means refitted on
their router inputs, with as many clusters as experts, and the shuffled null. The map itself and each class's
agreement off-distribution are kept for the expert map's OOD tab (`toylab.analysis.expert_map.ood_view`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from toylab.analysis.clustering import contingency, kmeans, nmi, permutation_nmi
from toylab.analysis.specialization import EXPERTS, ROUTER_INPUT, analysable_labels, floor_compare, token_activations, top_expert
from toylab.analysis.stats import MARGIN, UNIT, adjust_family, compare, mean_ci, permutation_p_value
from toylab.models import Transformer
from toylab.task import IGNORE, Batch, Task


def class_experts(experts: np.ndarray, label: np.ndarray, n_classes: int, n_experts: int) -> np.ndarray:
    """Each class's most frequent expert (top-1, `[n]`), -1 for a class with no token."""
    table = contingency(label, experts, n_classes, n_experts + 1)
    return np.where(table.sum(1) > 0, table.argmax(1), -1)


def agrees(experts: np.ndarray, label: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """Per token: 1 if it goes to its class's expert in `mapping`, 0 if not, -1 if its class is unmapped or undefined
    (a negative class id)."""
    expected = np.where(label >= 0, mapping[np.maximum(label, 0)], -1)
    return np.where(expected >= 0, (experts == expected).astype(np.int64), -1)


def agreement(experts: np.ndarray, label: np.ndarray, mapping: np.ndarray) -> float:
    """The share of tokens of mapped classes that go to their class's expert in `mapping`."""
    marks = agrees(experts, label, mapping)
    return float(marks[marks >= 0].mean()) if (marks >= 0).any() else float("nan")


def class_agreement(experts: np.ndarray, label: np.ndarray, mapping: np.ndarray) -> list[float | None]:
    """`agreement` within each class of `mapping` (None for a class that is unmapped or has no token)."""
    marks = agrees(experts, label, mapping)
    return [float(marks[label == c].mean()) if mapping[c] >= 0 and (label == c).any() else None for c in range(len(mapping))]


def agreement_null(experts: np.ndarray, label: np.ndarray, mapping: np.ndarray, n_permutations: int, seed: int) -> np.ndarray:
    """`agreement` with the experts shuffled among the tokens (`n_permutations` draws)."""
    rng = np.random.default_rng(seed)
    return np.array([agreement(rng.permutation(experts), label, mapping) for _ in range(n_permutations)])


def shared_classes(task: Task, shifted: Task, name: str) -> np.ndarray:
    """For each class id of `shifted`'s label `name`, the id of the class of that name in `task` (-1: none)."""
    classes = {c: i for i, c in enumerate(task.labels[name].classes)}
    return np.array([classes.get(c, -1) for c in shifted.labels[name].classes])


def routed(model: Transformer, task: Task, batch: Batch) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], np.ndarray]:
    """Top-1 experts and router inputs per MoE layer at the analysed tokens, and each token's sequence index."""
    layers = model.moe_layers()
    found = token_activations(model, task, batch, [name.format(layer=layer) for layer in layers for name in (EXPERTS, ROUTER_INPUT)])
    keep = task.positions(batch)
    sequences = np.broadcast_to(np.arange(len(batch))[:, None], keep.shape)[keep]
    return ({layer: top_expert(found[EXPERTS.format(layer=layer)], model.cfg.n_experts) for layer in layers},
            {layer: found[ROUTER_INPUT.format(layer=layer)] for layer in layers}, sequences)


def ood_routing(model: Transformer, task: Task, batch: Batch, shifted: Task, shifted_batch: Batch, n_permutations: int,
                seed: int, labels: Sequence[str] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """`{layer: {label: scores}}` of one MoE (see the module docstring), over `labels` (default: every analysable one);
    beside the scores, `class_experts` (the map, by class id of `task`: -1 unmapped, n_experts "no expert") and
    `class_agreement` (per class of `task`, off-distribution)."""
    experts, _, sequences = routed(model, task, batch)
    shifted_experts, shifted_inputs, _ = routed(model, shifted, shifted_batch)
    fit, held = sequences < len(batch) // 2, sequences >= len(batch) // 2
    keep, shifted_keep = task.positions(batch), shifted.positions(shifted_batch)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for layer in experts:
        results[str(layer)] = {}
        for name in labels or analysable_labels(task):
            label, translate = batch.labels[name][keep], shared_classes(task, shifted, name)
            other = shifted_batch.labels[name][shifted_keep]
            other = np.where(other == IGNORE, -1, translate[np.maximum(other, 0)])
            both = other >= 0
            defined = label != IGNORE
            mapping = class_experts(experts[layer][fit & defined], label[fit & defined], task.labels[name].n_classes, model.cfg.n_experts)
            assignment, truth = shifted_experts[layer][both], other[both]
            null = agreement_null(assignment, truth, mapping, n_permutations, seed)
            observed = agreement(assignment, truth, mapping)
            results[str(layer)][name] = {
                "agreement_id": agreement(experts[layer][held & defined], label[held & defined], mapping),
                "agreement_ood": observed,
                "agreement_null": float(null.mean()),
                "agreement_p_value": permutation_p_value(observed, null),
                "nmi_ood": nmi(assignment, truth),
                "kmeans_nmi_ood": nmi(kmeans(shifted_inputs[layer][both], model.cfg.n_experts, seed), truth),
                "null_nmi_ood": float(permutation_nmi(assignment, truth, n_permutations, seed).mean()),
                "shifted_tokens": int(both.sum()),
                "class_experts": mapping.tolist(),
                "class_agreement": class_agreement(assignment, truth, mapping),
            }
    return results


SCORES = ("agreement_id", "agreement_ood", "agreement_null", "nmi_ood", "kmeans_nmi_ood", "null_nmi_ood")
FAMILY = "routing off-distribution: agreement with the in-distribution map vs in distribution and vs its null, NMI vs refitted k-means"


def summarize_ood(per_seed: Sequence[dict[str, dict[str, dict[str, Any]]]], margin: float = MARGIN) -> dict[str, Any]:
    """Across seeds, per (layer, label): mean and 95% CI of each score and three verdicts, paired by seed and corrected
    as one family: `holds` (agreement off- vs in distribution: *equivalent* within ±`margin` means the map holds,
    *less* that it breaks), `vs_null` (agreement off-distribution vs its shuffled null) and `vs_kmeans` (routing's NMI
    with the label off-distribution vs refitted k-means', both at floor against the shuffled null)."""
    labels: dict[str, dict[str, dict[str, Any]]] = {}
    tests = []
    for layer in per_seed[0]:
        labels[layer] = {}
        for name in per_seed[0][layer]:
            runs = {key: [seed[layer][name][key] for seed in per_seed] for key in SCORES}
            found = {key: mean_ci(values, bounds=UNIT) for key, values in runs.items()}
            found["holds"] = compare(runs["agreement_ood"], runs["agreement_id"], margin)
            found["vs_null"] = compare(runs["agreement_ood"], runs["agreement_null"], margin)
            found["vs_kmeans"] = floor_compare(runs["nmi_ood"], runs["kmeans_nmi_ood"], runs["null_nmi_ood"], runs["null_nmi_ood"], margin)
            tests += [(found, key) for key in ("holds", "vs_null", "vs_kmeans")]
            labels[layer][name] = found
    return {"labels": labels, "family": {"role": f"secondary: {FAMILY}", **adjust_family(tests)}, "margin": margin}
