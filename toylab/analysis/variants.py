"""Families of tests over MoE design variants (`routing-variants`): which variants' routing recovers labels beyond
k-means with as many clusters (`paths.summarize_matched`), and whose best neuron reads a label better than the dense
MLP's (k = 1 sparse probing)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from toylab.analysis.stats import claim_state, claim_states, correct_families

PRIMARY = "primary"
FAMILIES = {
    PRIMARY: "routing vs k-means NMI with as many clusters, the task's function labels at the last MoE layer, every variant",
    "nmi": "routing vs k-means NMI with as many clusters, every other (variant, label, layer)",
    "f1_vs_dense": "k = 1 probe F1 of the best expert's best neuron vs the dense MLP's, every (variant, label)",
}
"""The families of tests over variants, each corrected for multiplicity on its own (`stats.adjust_family`). The
primary family holds every variant: naming a variant that beats k-means is a choice among the candidates, and the
correction over all of them (× the function labels) is part of the test. The layer (the last) is fixed in advance."""


def adjust_variant_families(variants: Mapping[str, Mapping[str, Any]], labels: Collection[str]) -> dict[str, dict[str, Any]]:
    """Correct the verdicts of every variant within the `FAMILIES` (in place; each keeps its `raw_verdict`), and
    return per family its role (primary or secondary, and its question), number of tests and verdict counts before and after.

    `variants` maps a variant to `{"specialization": summarize_matched output, "probe_f1": {label: {"vs_dense": compare
    result, ...}}}`; `labels` are the primary question's labels (the task's function labels, `specialization.primary_labels`).
    """
    members: dict[str, list[tuple[dict[str, Any], str]]] = {name: [] for name in FAMILIES}
    for v in variants.values():
        last = max(v["specialization"], key=int, default=None)
        for layer, scores in v["specialization"].items():
            for label, s in scores.items():
                members[PRIMARY if layer == last and label in labels else "nmi"].append((s, "verdict"))
        members["f1_vs_dense"] += [(p, "vs_dense") for p in v["probe_f1"].values() if "vs_dense" in p]
    return correct_families(members, FAMILIES, PRIMARY)


def primary_verdicts(specialization: Mapping[str, Mapping[str, Any]], labels: Collection[str]) -> dict[str, dict[str, Any]]:
    """`{label: verdict}` of one variant's primary tests: routing vs k-means at its last MoE layer, for `labels`."""
    last = max(specialization, key=int, default=None)
    return {label: s["verdict"] for label, s in specialization.get(last, {}).items() if label in labels}


def variant_claim(specialization: Mapping[str, Mapping[str, Any]], labels: Collection[str]) -> str:
    """The state of the claim "this variant's routing recovers the function labels beyond k-means with as many
    clusters" (`stats.claim_states` over the labels): supported by *more*, contradicted by *equivalent* or *less*,
    not shown where inconclusive; "not shown" without a tested label."""
    verdicts = primary_verdicts(specialization, labels)
    if not verdicts:
        return "not shown"
    return claim_states([claim_state(c["verdict"], ("more",)) for c in verdicts.values()], list(verdicts))
