"""The tests of the `planning` study in families: its primary question, the secondary comparisons, each family
corrected for multiplicity on its own (`stats.correct_families`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from toylab.analysis.stats import correct_families

PRIMARY = "plan beyond the next move"
"""The family that answers the study's question: do the trained models plan beyond the next move?"""
FAMILIES = {
    PRIMARY: "move +k at path cells given the next move (trained networks) vs the stronger, in each seed, of the next "
             "move alone and the same probe on the untrained network; every (model, k, layer)",
    "probes vs controls": "probe accuracy vs the stronger of the majority class and the shuffled-label probe, trained "
                          "networks; every (model, target, position, layer)",
    "probes vs random init": "trained vs untrained network, the same probe; every (model, target, position, layer)",
    "given the next move vs the next move alone": "move +k given the next move vs the next move alone, trained networks; "
                                                  "every (model, k, layer)",
    "given the next move vs random init": "move +k given the next move, trained vs untrained network; every (model, k, layer)",
    "untrained probes vs controls": "as *probes vs controls*, on the untrained networks",
    "untrained, given the next move vs the next move alone": "as *given the next move vs the next move alone*, on the "
                                                             "untrained networks",
    "thinking time": "dense models with other numbers of pause tokens vs the main dense model; every (pauses, metric)",
    "DRC thinking time": "the DRC's solve rate with k extra ticks at `<path>` vs none; every k",
    "DRC earlier ticks: probes vs controls": "as *probes vs controls*, on the DRC's hidden states at the ticks before a "
                                             "position's last; every (target, position, layer, tick)",
    "DRC earlier ticks: given the next move vs the next move alone": "as *given the next move vs the next move alone*, "
                                                                     "on the same states; every (k, layer, tick)",
    "experts vs k-means": "top-1 routing vs k-means on the router input, NMI; every (label, layer)",
    "experts vs k-means, given the token": "the same, NMI given the token; every (label, layer) the token does not determine",
    "experts vs null, given the token": "routing's NMI given the token vs its within-token null; the same (label, layer)s",
}
"""The families of tests of `planning`, the primary first, each corrected for multiplicity on its own."""


def adjust_families(results: Mapping[str, Any], trained: str) -> dict[str, dict[str, Any]]:
    """Correct every verdict of the planning study's `results` within its family of `FAMILIES` (in place; each keeps its
    `raw_verdict`) and return per family its role (primary or secondary, and what it compares), number of tests and
    verdict counts before and after, the primary first.

    Reads the keys `plan` (the primary comparisons), `probe_summary` and `conditional_summary` (split by whether their
    `weights` are `trained`), `vs_random_init`, `conditional_vs_random_init`, `thinking_time`, `drc_thinking_time`,
    `tick_probe_summary`, `tick_conditional_summary` and `specialization`.
    Where a report picks the best layer or position, the pick is one of the family's candidates, all corrected together.
    """
    members: dict[str, list[tuple[dict[str, Any], str]]] = {name: [] for name in FAMILIES}
    members[PRIMARY] = [(r, "verdict") for r in results["plan"]]
    for r in results["probe_summary"]:
        members["probes vs controls" if r["weights"] == trained else "untrained probes vs controls"].append((r, "verdict"))
    for r in results["conditional_summary"]:
        members["given the next move vs the next move alone" if r["weights"] == trained
                else "untrained, given the next move vs the next move alone"].append((r, "verdict"))
    members["probes vs random init"] = [(r, "verdict") for r in results["vs_random_init"]]
    members["given the next move vs random init"] = [(r, "verdict") for r in results["conditional_vs_random_init"]]
    members["thinking time"] = [(metrics, metric) for metrics in results["thinking_time"].values() for metric in metrics]
    members["DRC thinking time"] = [(results["drc_thinking_time"], k) for k in results["drc_thinking_time"]]
    members["DRC earlier ticks: probes vs controls"] = [(r, "verdict") for r in results["tick_probe_summary"]]
    members["DRC earlier ticks: given the next move vs the next move alone"] = [
        (r, "verdict") for r in results["tick_conditional_summary"]]
    for labels in results["specialization"].values():
        for s in labels.values():
            members["experts vs k-means"].append((s, "verdict"))
            if s["label_entropy_given_token"] > 1e-9:  # else NMI given the token is undefined (0 / 0)
                members["experts vs k-means, given the token"].append((s, "conditional_verdict"))
                members["experts vs null, given the token"].append((s, "conditional_vs_null"))
    return correct_families(members, FAMILIES, PRIMARY)
