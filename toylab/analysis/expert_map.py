"""The expert map's data: where a few held-out sequences are routed, token by token, beside their k-means clusters.

For every seed's MoE model and every MoE layer it records each token's chosen experts (-1 for an empty slot)
and router probabilities, and its cluster under k-means with as many clusters as experts, fitted on the router
input (`blocks.{l}.ln2.hook_normalized`) of the whole held-out batch as in `specialization`. Cluster ids
are renamed to the experts they overlap most (Hungarian matching), so one colour means one group in both
views. The sequences' tokens and ground-truth labels (and, for tasks with a `grid`, the grid geometry) are
stored once. `toylab.report.ExpertMap` draws the file in `report.html`.

A study that routes shifted inputs (`Task.shifted`, see `toylab.analysis.ood`) adds an optional `ood` part, drawn
in its own tab: the same for a few shifted sequences routed by the same models, and per layer and label the
in-distribution class → expert map, each shown token's agreement with it, and the study's agreement numbers.
Maps without it (older runs) draw as before.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from toylab import io
from toylab.analysis.clustering import contingency, kmeans
from toylab.analysis.ood import agrees, shared_classes
from toylab.analysis.specialization import EXPERTS, ROUTER_INPUT, token_activations, top_expert
from toylab.analysis.stats import verdict_label
from toylab.formatting import fmt, fmt_ci
from toylab.models import Transformer
from toylab.task import IGNORE, Batch, Task

ROUTER_LOGITS = "blocks.{layer}.mlp.hook_router_logits"
N_SHOWN = 16
"""Sequences shown in the map by default."""


def matched_clusters(clusters: np.ndarray, experts: np.ndarray, n: int) -> np.ndarray:
    """Cluster ids `[0, n)` renamed to the expert each overlaps most, one to one (Hungarian matching on the contingency
    table); `experts` may hold n for "no expert" (`top_expert`), which a cluster can then be matched to."""
    rows, columns = linear_sum_assignment(-contingency(clusters, experts, n, int(max(n, experts.max() + 1))))
    rename = np.empty(n, dtype=np.int64)
    rename[rows] = columns
    return rename[clusters]


def _per_sequence(values: np.ndarray, lengths: np.ndarray) -> list[Any]:
    """Flat per-token values `[tokens, ...]` of the first sequences, split into one list per sequence."""
    return [part.tolist() for part in np.split(values[: lengths.sum()], np.cumsum(lengths)[:-1])]


@torch.no_grad()
def routing_view(moe: Transformer, task: Task, batch: Batch, n_shown: int, seed: int) -> dict[str, dict[str, list[Any]]]:
    """One model's map: `{layer: {"experts": [seq][pos][k], "probs": [seq][pos][expert], "kmeans": [seq][pos]}}` for
    the first `n_shown` sequences of `batch` (real positions only); k-means is fitted on all of `batch` with `seed`."""
    layers = moe.moe_layers()
    names = [site.format(layer=layer) for layer in layers for site in (ROUTER_INPUT, EXPERTS, ROUTER_LOGITS)]
    acts = token_activations(moe, task, batch, names)
    lengths = task.positions(batch)[:n_shown].sum(1)
    view = {}
    for layer in layers:
        experts, logits = acts[EXPERTS.format(layer=layer)], acts[ROUTER_LOGITS.format(layer=layer)]
        fixed = moe.blocks[layer].mlp.W_router is None  # hash or label router: its "logits" are the one-hot choice
        probs = logits if fixed else torch.from_numpy(logits).softmax(-1).numpy()
        clusters = kmeans(acts[ROUTER_INPUT.format(layer=layer)], moe.cfg.n_experts, seed)
        view[str(layer)] = {
            "experts": _per_sequence(experts, lengths),
            "probs": _per_sequence(np.round(probs.astype(np.float64), 3), lengths),
            "kmeans": _per_sequence(matched_clusters(clusters, top_expert(experts, moe.cfg.n_experts), moe.cfg.n_experts), lengths),
        }
    return view


def sample_view(task: Task, batch: Batch, n_shown: int) -> dict[str, Any]:
    """The shown sequences: tokens and label class ids per real position (IGNORE where undefined; a list of
    class ids for multi-hot labels), the label classes, and the task's grid geometry if it has one."""
    shown = batch[:n_shown]
    keep = task.positions(shown)
    index = np.cumsum(keep, axis=1) - 1  # a full position's index among the real ones
    sequences = []
    for s in range(len(shown)):
        labels = {}
        for name, label in task.labels.items():
            values = shown.labels[name][s][keep[s]]
            labels[name] = ([IGNORE if (v == IGNORE).any() else np.flatnonzero(v == 1).tolist() for v in values]
                            if label.multi_hot else values.tolist())
        tokens = [task.vocab[t] for t in shown.inputs[s][keep[s]]]
        sequences.append({"tokens": tokens, "labels": labels})
    grids = task.grid(shown.inputs)
    for s, grid in enumerate(grids or []):
        grid["path"] = [[int(index[s, p]), r, c] for p, r, c in grid["path"] if keep[s, p]]
    return {"task": task.name, "labels": {name: list(label.classes) for name, label in task.labels.items()},
            "sequences": sequences, "grids": grids}


def ood_view(moe: Transformer, task: Task, shifted: Task, shifted_batch: Batch, ood: Mapping[str, Mapping[str, Mapping[str, Any]]],
             n_shown: int, seed: int) -> dict[str, dict[str, Any]]:
    """One model's map of shifted inputs: `routing_view` of `shifted_batch`, each layer with `"map": {label: ...}` for
    the labels of `ood` (this model's `ood_routing`): `class_experts` (its in-distribution map by class id of
    `shifted`: the expert, -1 for a class not in the map, n_experts for "no expert"), `class_agreement` (each class's
    share of shifted tokens sent to its mapped expert, None where not mapped) and `agrees` (per shown token: 1, 0, or
    -1 where its class is not in the map)."""
    view = routing_view(moe, shifted, shifted_batch, n_shown, seed)
    shown = shifted_batch[:n_shown]
    keep = shifted.positions(shown)
    for layer, labels in ood.items():
        routed = top_expert(np.concatenate([np.asarray(e, dtype=np.int64) for e in view[layer]["experts"]]), moe.cfg.n_experts)
        view[layer]["map"] = {}
        for name, scores in labels.items():
            translate = shared_classes(task, shifted, name)
            mapping = np.where(translate >= 0, np.asarray(scores["class_experts"])[np.maximum(translate, 0)], -1)
            view[layer]["map"][name] = {
                "class_experts": mapping.tolist(),
                "class_agreement": [scores["class_agreement"][c] if c >= 0 else None for c in translate.tolist()],
                "agrees": _per_sequence(agrees(routed, shown.labels[name][keep], mapping), keep.sum(1)),
            }
    return view


def ood_map(shifted: Task, shifted_batch: Batch, change: str, views: Mapping[str, dict[str, Any]], summary: Mapping[str, Any],
            n_shown: int = N_SHOWN) -> dict[str, Any]:
    """The map's `ood` part: the first `n_shown` shifted sequences (`sample_view`), what the shift `change`s, `views`
    (`{seed: ood_view(...)}`) and per (layer, label) the agreement the study reports across seeds (`summary`:
    `summarize_ood(...)["labels"]`) as text: in and off distribution with their intervals, the null, whether the map holds."""
    agreement = {layer: {name: {"in": fmt_ci(s["agreement_id"]), "off": fmt_ci(s["agreement_ood"]), "null": fmt(s["agreement_null"]["mean"]),
                                "holds": verdict_label(s["holds"])} for name, s in labels.items()} for layer, labels in summary.items()}
    return {**sample_view(shifted, shifted_batch, n_shown), "change": change, "seeds": dict(views), "agreement": agreement}


def write_expert_map(path: Path, task: Task, batch: Batch, views: Mapping[str, dict[str, Any]], n_experts: int,
                     top_k: int, n_shown: int = N_SHOWN, ood: Mapping[str, Any] | None = None) -> None:
    """Save the map (compact JSON, atomically): the shown sequences, `views` (`{seed: routing_view(...)}`) and, for
    shifted inputs, the `ood` part (`ood_map`)."""
    layers = list(next(iter(views.values()))) if views else []
    data = {**sample_view(task, batch, n_shown), "n_experts": n_experts, "top_k": top_k, "layers": layers,
            "seeds": dict(views), **({"ood": dict(ood)} if ood else {})}
    io.write_text(Path(path), json.dumps(data, separators=(",", ":")))
