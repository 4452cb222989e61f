"""Causal abstraction: where does a model represent each variable of the task's planted causal model?

For a variable V (`Task.causal_variables`) the task gives held-out interchange pairs and the causal model's
counterfactual output (`Task.counterfactuals`). At every site of a model (`SITES`, per layer: for a transformer the
residual stream after attention, the FFN's output and the residual stream after the block; for a recurrent model the
layer's hidden states and the residual stream after it) distributed alignment search
(`interchange.das_analysis`) fits a rank-r subspace on one third of the pairs; a second third chooses the site with
the best interchange-intervention accuracy (IIA), and the last third scores every site, so the best site's score
is not the maximum of noisy scores it was chosen by. Controls at every site: a random subspace of the same rank
and the full swap of the site; at the chosen site, DAS on the same architecture untrained (random init). For an MoE, per
layer, the same search on one expert's tokens of the FFN output against the whole FFN output: is the variable in an expert?
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dataclasses

import numpy as np
import torch

from toylab.analysis.interchange import Pairs, das_analysis
from toylab.analysis.interventions import run_args
from toylab.analysis.specialization import EXPERTS
from toylab.analysis.stats import UNIT, compare, correct_families, mean_ci
from toylab.models import Recurrent, Transformer
from toylab.task import Counterfactuals

SITES = ("hook_resid_mid", "hook_mlp_out", "hook_resid_post")
"""The sites of each transformer layer, in the order the forward pass writes them."""
RECURRENT_SITES = ("hook_hidden", "hook_resid_post")
"""The sites of each recurrent layer: its output (the hidden states it adds to the stream) and the stream after it."""
TRANSFORMERS = ("dense", "moe")
"""The architectures the primary question compares; any other (a recurrent model) is compared with dense apart."""
PARTS = ("fit", "select", "score")
"""The three disjoint thirds of the interchange pairs: DAS fits on one, chooses the site on one, scores on one."""
ARMS = ("das", "random", "full", "none")
FAMILIES = {
    "primary": "DAS IIA at each architecture's chosen site, MoE vs dense, per variable",
    "found": "DAS IIA at the chosen site vs a random subspace of the same rank there, and vs DAS on the untrained "
             "architecture, per architecture and variable",
    "sites": "DAS IIA, MoE vs dense, at every site",
    "experts": "MoE: DAS IIA on one expert's tokens (the expert chosen on held-out pairs) vs on the whole FFN output, per MoE layer",
    "recurrent": "Each recurrent architecture: DAS IIA at its chosen site vs dense's, vs a random subspace of the same rank "
                 "and vs DAS on the untrained architecture, per variable",
}


def site_names(model: Transformer | Recurrent) -> list[str]:
    """Every site of the model, layer by layer in forward order."""
    sites = RECURRENT_SITES if isinstance(model, Recurrent) else SITES
    return [f"blocks.{layer}.{site}" for layer in range(model.cfg.n_layers) for site in sites]


def as_pairs(pairs: Counterfactuals, model: Transformer) -> Pairs:
    """A task's interchange pairs as the model's forward arguments (with `route` for a label router)."""
    tensor = lambda array: torch.from_numpy(np.ascontiguousarray(array))  # noqa: E731
    return Pairs(run_args(model, pairs.base), run_args(model, pairs.source), tensor(pairs.targets), tensor(pairs.mask),
                 tensor(pairs.base.targets))


def thirds(pairs: Counterfactuals) -> dict[str, Counterfactuals]:
    """The pairs cut into the three disjoint `PARTS`."""
    edges = np.linspace(0, len(pairs), len(PARTS) + 1).astype(int)
    return {part: pairs[edges[i]: edges[i + 1]] for i, part in enumerate(PARTS)}


def abstraction_scores(model: Transformer, untrained: Transformer, pairs: Counterfactuals, rank: int, steps: int,
                       seed: int) -> dict[str, Any]:
    """One model's IIA per site (DAS fit on the `fit` third, scored on `select` and `score`), the site chosen on
    `select`, and DAS on the `untrained` twin at that site. Interventions act at every position: where a variable
    enters the input (`Counterfactuals.positions`, e.g. the mode token) is not where it lives after the first
    attention layer has copied it on, and a learned subspace can leave the other positions' variables alone."""
    parts = {part: as_pairs(p, model) for part, p in thirds(pairs).items()}
    sites = {site: das_analysis(model, site, parts["fit"], {"select": parts["select"], "score": parts["score"]}, rank, steps, seed)
             for site in site_names(model)}
    chosen = best(sites)
    control = das_analysis(untrained, chosen, parts["fit"], {"score": parts["score"]}, rank, steps, seed)
    return {"sites": {site: found["score"] for site, found in sites.items()}, "chosen": chosen,
            "untrained": control["score"]["das"], "experts": expert_scores(model, parts, rank, steps, seed)}


def best(found: Mapping[str, dict[str, Any]]) -> str:
    """The key whose DAS IIA on the `select` third is highest."""
    return max(found, key=lambda key: np.nan_to_num(found[key]["select"]["das"]["iia"], nan=-1.0))


def expert_scores(model: Transformer, parts: Mapping[str, Pairs], rank: int, steps: int, seed: int) -> dict[str, Any]:
    """Per MoE layer: is the variable "in an expert"? DAS on the FFN output restricted to the tokens the base routes
    to one expert (top-1), for each expert; the expert chosen on `select`, its IIA on `score` beside the whole FFN
    output's. Empty for a dense model."""
    found = {}
    for layer in model.moe_layers():
        site = f"blocks.{layer}.hook_mlp_out"

        def routed(pairs: Pairs, expert: int) -> Pairs:
            with torch.no_grad():
                _, cache = model.run_with_cache(*pairs.base, names=EXPERTS.format(layer=layer))
            return dataclasses.replace(pairs, positions=cache[EXPERTS.format(layer=layer)][..., 0] == expert)

        experts = {str(e): das_analysis(model, site, routed(parts["fit"], e), {part: routed(parts[part], e) for part in ("select", "score")},
                                        rank, steps, seed) for e in range(model.cfg.n_experts)}
        chosen = best(experts)
        found[str(layer)] = {"expert": chosen, "iia": experts[chosen]["score"]["das"]}
    return found


def summarize_abstraction(runs: Mapping[str, Sequence[dict[str, Any] | None]], margin: float) -> dict[str, Any]:
    """Over seeds, per architecture (`runs[kind]`, one entry per seed, None for a failed run): the IIA of every arm
    at every site (mean, 95% CI), the chosen sites, the chosen site's IIA, and the verdicts (paired by seed): MoE vs
    dense at the chosen sites and at every site, each other (recurrent) architecture vs dense at the chosen sites
    (`vs_dense`), and per architecture DAS vs the random subspace and vs the untrained twin at its chosen site."""
    seeds = [i for i in range(min(len(r) for r in runs.values())) if all(r[i] for r in runs.values())]
    kinds = list(runs)
    sites = {kind: list(runs[kind][seeds[0]]["sites"]) if seeds else [] for kind in kinds}
    chosen = {kind: [runs[kind][i]["chosen"] for i in seeds] for kind in kinds}
    at_chosen = {kind: {arm: [runs[kind][i]["sites"][runs[kind][i]["chosen"]][arm]["iia"] for i in seeds] for arm in ARMS}
                 for kind in kinds}
    untrained = {kind: [runs[kind][i]["untrained"]["iia"] for i in seeds] for kind in kinds}
    summary: dict[str, Any] = {
        "seeds": seeds,
        "sites": {kind: {site: {arm: mean_ci([runs[kind][i]["sites"][site][arm]["iia"] for i in seeds], bounds=UNIT) for arm in ARMS}
                         for site in sites[kind]} for kind in kinds},
        "chosen": chosen,
        "chosen_iia": {kind: {**{arm: mean_ci(v, bounds=UNIT) for arm, v in at_chosen[kind].items()},
                              "untrained": mean_ci(untrained[kind], bounds=UNIT)} for kind in kinds},
        "found": {kind: {"vs_random": compare(at_chosen[kind]["das"], at_chosen[kind]["random"], margin),
                         "vs_untrained": compare(at_chosen[kind]["das"], untrained[kind], margin)} for kind in kinds},
    }
    if "moe" in kinds:
        moe = [runs["moe"][i] for i in seeds]
        summary["experts"] = {layer: {
            "expert_iia": mean_ci([r["experts"][layer]["iia"]["iia"] for r in moe], bounds=UNIT),
            "ffn_iia": mean_ci([r["sites"][f"blocks.{layer}.hook_mlp_out"]["das"]["iia"] for r in moe], bounds=UNIT),
            "experts_chosen": [r["experts"][layer]["expert"] for r in moe],
            "vs_ffn": compare([r["experts"][layer]["iia"]["iia"] for r in moe], [r["sites"][f"blocks.{layer}.hook_mlp_out"]["das"]["iia"] for r in moe], margin),
        } for layer in (moe[0].get("experts", {}) if moe else {})}
    if {"moe", "dense"} <= set(kinds):
        summary["moe_vs_dense"] = compare(at_chosen["moe"]["das"], at_chosen["dense"]["das"], margin)
        summary["by_site"] = {site: compare([runs["moe"][i]["sites"][site]["das"]["iia"] for i in seeds],
                                            [runs["dense"][i]["sites"][site]["das"]["iia"] for i in seeds], margin) for site in sites["moe"]}
    if "dense" in kinds:
        summary["vs_dense"] = {kind: compare(at_chosen[kind]["das"], at_chosen["dense"]["das"], margin)
                               for kind in kinds if kind not in TRANSFORMERS}
    return summary


def adjust_abstraction(summaries: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Correct the verdicts of every variable's `summarize_abstraction` within the `FAMILIES` (in place)."""
    members: dict[str, list[tuple[dict[str, Any], str]]] = {name: [] for name in FAMILIES}
    for s in summaries.values():
        if "moe_vs_dense" in s:
            members["primary"].append((s, "moe_vs_dense"))
            members["sites"] += [(s["by_site"], site) for site in s["by_site"]]
        for kind in s["found"]:
            members["found" if kind in TRANSFORMERS else "recurrent"] += [(s["found"][kind], key) for key in ("vs_random", "vs_untrained")]
        members["recurrent"] += [(s["vs_dense"], kind) for kind in s.get("vs_dense", {})]
        members["experts"] += [(e, "vs_ffn") for e in s.get("experts", {}).values()]
    return correct_families(members, FAMILIES)
