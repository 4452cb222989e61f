"""Function vs state: what do the experts pull out of the residual stream, and what do they leave there?

For every label and every layer, a linear probe (`probes.probe`, split by sequence) reads three sites:
- `router_input`: what the FFN reads, `blocks.{l}.ln2.hook_normalized`;
- `ffn_out`: what it writes back, `blocks.{l}.hook_mlp_out` (for an MoE, `hook_expert_out` weighted by
  `hook_expert_weights` and summed over the chosen experts; for a dense model, the MLP output);
- `resid_post`: the residual stream after the layer, `blocks.{l}.hook_resid_post`.
A site's **share** of a label is how far its held-out accuracy goes from the stronger control of
the same probe (majority baseline or shuffled labels) to perfect: `(acc - control) / (1 - control)`,
0 at the control and 1 when the label is read perfectly.

The claim under test: the FFN output carries `function` labels (what the model computes) better than
`state` labels (readable off the input), relative to the residual stream. Per seed and layer the
**contrast** is mean over function labels of `share(ffn_out) - share(resid_post)` minus the same mean
over state labels. Above 0 alone does not support the claim: where the residual carries state labels
at the ceiling, a site that carries every label equally scores above 0 too. So each contrast is set
against its **planted reference**, the contrast of a synthetic site that carries every label with the
same share (`planted_site`, one per label), probed and divided by the same residual; `excess` = contrast - reference.
The primary result compares the MoE's excess with the dense model's, paired by seed (`primary` of
`summarize_function_state`); `adjust_function_state` corrects it and the secondary verdicts in their `FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from toylab.analysis.probes import ProbeResult, multi_hot_classes, probe
from toylab.analysis.specialization import token_activations
from toylab.analysis.stats import MARGIN, UNIT, compare, correct_families, mean_ci
from toylab.models import Transformer
from toylab.task import IGNORE, Batch, Task

SITES = {
    "router_input": "blocks.{layer}.ln2.hook_normalized",
    "ffn_out": "blocks.{layer}.hook_mlp_out",
    "resid_post": "blocks.{layer}.hook_resid_post",
}
PLANTED = "planted"
"""The synthetic site of equal shares, probed beside the model's sites."""
PLANTED_SHARE = 0.5
"""The share of every label at the planted site (the reference contrast does not depend on it)."""
FAMILIES = {
    "primary": "MoE vs dense, excess contrast over the planted reference, every FFN layer",
    "vs_planted": "each model's contrast vs its planted reference, every (model, layer)",
}
"""The families of tests of `summarize_function_state`, each corrected for multiplicity on its own. The primary family
holds every layer (none is picked as the best), and the sites are fixed in advance (`ffn_out` vs `resid_post`)."""


def share(result: ProbeResult) -> float:
    """`(accuracy - control) / (1 - control)` with control = max(majority baseline, shuffled); NaN if the control is perfect."""
    control = max(result.baseline, result.shuffled)
    return (result.accuracy - control) / (1 - control) if control < 1 else float("nan")


def site_probes(
    acts: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray], groups: np.ndarray, seed: int = 0, min_rows: int = 40
) -> list[dict[str, Any]]:
    """Probe every label (`[n]` ints, IGNORE where undefined) from every site's activations (`[n, d]`).

    Rows where a label is undefined are left out; labels with fewer than `min_rows` defined rows or
    a single class are skipped. `groups` (sequence ids) keep a sequence on one side of the split.
    One row per (site, label): the probe's scores and the site's `share`.
    """
    rows = []
    for name, values in labels.items():
        defined = values != IGNORE
        if defined.sum() < min_rows or len(np.unique(values[defined])) < 2:
            continue
        for site, x in acts.items():
            result = probe(x[defined], values[defined], groups=groups[defined], seed=seed)
            rows.append({"site": site, "label": name, **result.as_dict(), "share": share(result)})
    return rows


def planted_site(values: np.ndarray, share: float, seed: int) -> np.ndarray:
    """A synthetic site `[n, n_classes]` that carries the label `values` (`[n]` ints, IGNORE where undefined) with `share`.

    Per token, with probability `share` the token's class is written (one-hot), otherwise the majority class. A written
    non-majority class is then always right and the majority class is the best guess elsewhere, so the best probe's
    accuracy is majority + share (1 - majority): a share of `share` whatever the label's classes. Undefined rows write
    nothing. Each label gets a site of its own: written into one site, labels that depend on each other (depth and
    bracket type) would each be read off the others' columns too, and their shares would no longer be equal.
    """
    defined = values != IGNORE
    classes, counts = np.unique(values[defined], return_counts=True)
    written = np.where(np.random.default_rng(seed).random(len(values)) < share, values, classes[counts.argmax()])
    return ((written[:, None] == classes[None, :]) & defined[:, None]).astype(np.float64)


def planted_probes(labels: Mapping[str, np.ndarray], groups: np.ndarray, seed: int = 0) -> list[dict[str, Any]]:
    """`site_probes` rows (site `PLANTED`) of a site of equal shares: every label probed from its own `planted_site`
    with share `PLANTED_SHARE`."""
    return [row for name, values in labels.items()
            for row in site_probes({PLANTED: planted_site(values, PLANTED_SHARE, seed)}, {name: values}, groups, seed)]


def function_state(
    model: Transformer, task: Task, batch: Batch, seed: int = 0, names: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """`site_probes` at every FFN layer of `model` (every MoE layer of an MoE) for the labels `names` (default: all),
    and the planted site of equal shares (the same rows at every layer).

    Multi-hot labels are probed as one class per set. One row per (layer, site, label).
    """
    keep = task.positions(batch)
    groups = np.broadcast_to(np.arange(len(batch))[:, None], keep.shape)[keep]
    labels = {name: batch.labels[name] for name in names or task.labels}
    labels = {name: (multi_hot_classes(values) if values.ndim == 3 else values)[keep] for name, values in labels.items()}
    planted = planted_probes(labels, groups, seed)
    rows = []
    for layer in model.moe_layers() or range(model.cfg.n_layers):
        names = {site: hook.format(layer=layer) for site, hook in SITES.items()}
        found = token_activations(model, task, batch, list(names.values()))
        acts = {site: found[name] for site, name in names.items()}
        rows += [{"layer": layer, **row} for row in site_probes(acts, labels, groups, seed) + planted]
    return rows


def contrasts(rows: Sequence[dict[str, Any]], kinds: Mapping[str, str]) -> pd.DataFrame:
    """Per (model, seed, layer): mean `share(ffn_out) - share(resid_post)` over function labels (`function`), over
    state labels (`state`), their difference (`contrast`), the same difference for the planted site (`planted`) and
    `excess` = contrast - planted. `rows` carry `model` and `seed` keys and the planted site's rows."""
    frame = pd.DataFrame(rows)
    shares = frame.pivot_table(index=["model", "seed", "layer", "label"], columns="site", values="share").reset_index()
    shares["kind"] = shares["label"].map(kinds)
    shares["contrast"], shares["planted"] = shares["ffn_out"] - shares["resid_post"], shares[PLANTED] - shares["resid_post"]
    means = shares.groupby(["model", "seed", "layer", "kind"])[["contrast", "planted"]].mean().unstack("kind")
    means = means.reindex(columns=pd.MultiIndex.from_product([["contrast", "planted"], ["function", "state"]]))
    out = pd.DataFrame({
        "function": means["contrast", "function"], "state": means["contrast", "state"],
        "contrast": means["contrast", "function"] - means["contrast", "state"],
        "planted": means["planted", "function"] - means["planted", "state"],
    })
    return out.assign(excess=out["contrast"] - out["planted"]).reset_index()


def summarize_function_state(
    rows: Sequence[dict[str, Any]], kinds: Mapping[str, str], margin: float = MARGIN, models: tuple[str, str] = ("moe", "dense"),
) -> dict[str, Any]:
    """Across seeds: every (model, layer, label, site)'s scores (mean [95% CI]); per (model, layer) the contrast, its
    planted reference and the verdict contrast vs reference (`compare`, paired by seed, margin `margin` in share);
    and the primary result, per layer the first of `models` against the second on the excess over the reference."""
    keys = ["model", "layer", "label", "site"]
    frame = pd.DataFrame(rows)
    sites = [
        {**dict(zip(keys, group)), "kind": kinds[group[2]],
         **{score: mean_ci(part[score], bounds=UNIT if score != "share" else (-1.0, 1.0)) for score in ("accuracy", "baseline", "shuffled", "share")}}
        for group, part in frame.groupby(keys, sort=False)
    ]
    per_seed = contrasts(rows, kinds)
    verdicts = [
        {"model": model, "layer": layer, "function": mean_ci(part["function"]), "state": mean_ci(part["state"]),
         "contrast": mean_ci(part["contrast"]), "planted": mean_ci(part["planted"]),
         "vs_planted": compare(part["contrast"], part["planted"], margin)}
        for (model, layer), part in per_seed.groupby(["model", "layer"], sort=False)
    ]
    paired = per_seed.pivot_table(index=["seed", "layer"], columns="model", values="excess").reset_index()
    primary = [
        {"layer": int(layer), "excess": {model: mean_ci(part[model]) for model in models},
         "verdict": compare(part[models[0]], part[models[1]], margin)}
        for layer, part in paired.groupby("layer") if set(models) <= set(part)
    ]
    return {"sites": sites, "contrasts": verdicts, "primary": primary}


def adjust_function_state(summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Correct the verdicts of `summarize_function_state` within the `FAMILIES` (in place; each keeps its `raw_verdict`),
    and return per family its role (primary or secondary, and its question), number of tests and verdict counts before and after."""
    members = {"primary": [(row, "verdict") for row in summary["primary"]],
               "vs_planted": [(row, "vs_planted") for row in summary["contrasts"]]}
    return correct_families(members, FAMILIES)
