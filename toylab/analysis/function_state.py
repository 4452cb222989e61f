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
over state labels; above 0 supports the claim.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from toylab.analysis.probes import ProbeResult, multi_hot_classes, probe
from toylab.analysis.specialization import token_activations
from toylab.analysis.stats import MARGIN, UNIT, compare, mean_ci
from toylab.models import Transformer
from toylab.task import IGNORE, Batch, Task

SITES = {
    "router_input": "blocks.{layer}.ln2.hook_normalized",
    "ffn_out": "blocks.{layer}.hook_mlp_out",
    "resid_post": "blocks.{layer}.hook_resid_post",
}


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


def function_state(
    model: Transformer, task: Task, batch: Batch, seed: int = 0, names: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """`site_probes` at every FFN layer of `model` (every MoE layer of an MoE) for the labels `names` (default: all).

    Multi-hot labels are probed as one class per set. One row per (layer, site, label).
    """
    keep = task.positions(batch)
    groups = np.broadcast_to(np.arange(len(batch))[:, None], keep.shape)[keep]
    labels = {name: batch.labels[name] for name in names or task.labels}
    labels = {name: (multi_hot_classes(values) if values.ndim == 3 else values)[keep] for name, values in labels.items()}
    rows = []
    for layer in model.moe_layers() or range(model.cfg.n_layers):
        names = {site: hook.format(layer=layer) for site, hook in SITES.items()}
        found = token_activations(model, task, batch, list(names.values()))
        acts = {site: found[name] for site, name in names.items()}
        rows += [{"layer": layer, **row} for row in site_probes(acts, labels, groups, seed)]
    return rows


def contrasts(rows: Sequence[dict[str, Any]], kinds: Mapping[str, str]) -> pd.DataFrame:
    """Per (model, seed, layer): mean `share(ffn_out) - share(resid_post)` over function labels (`function`),
    over state labels (`state`), and their difference (`contrast`). `rows` carry `model` and `seed` keys."""
    frame = pd.DataFrame(rows)
    shares = frame.pivot_table(index=["model", "seed", "layer", "label"], columns="site", values="share").reset_index()
    shares["relative"] = shares["ffn_out"] - shares["resid_post"]
    shares["kind"] = shares["label"].map(kinds)
    per_kind = shares.pivot_table(index=["model", "seed", "layer"], columns="kind", values="relative").reset_index()
    for kind in ("function", "state"):
        if kind not in per_kind:
            per_kind[kind] = np.nan
    return per_kind.assign(contrast=per_kind["function"] - per_kind["state"])


def summarize_function_state(rows: Sequence[dict[str, Any]], kinds: Mapping[str, str], margin: float = MARGIN) -> dict[str, Any]:
    """Across seeds: every (model, layer, label, site)'s scores (mean [95% CI]); and per (model, layer) the
    function-vs-state contrast with its verdict against 0 (`compare`, equivalence margin `margin` in share)."""
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
         "contrast": compare(part["contrast"], np.zeros(len(part)), margin)}
        for (model, layer), part in per_seed.groupby(["model", "layer"], sort=False)
    ]
    return {"sites": sites, "contrasts": verdicts}
