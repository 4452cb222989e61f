"""The expert map's data: where a few held-out sequences are routed, token by token, beside their k-means clusters.

For every seed's MoE model and every MoE layer it records each token's chosen experts (-1 for an empty slot)
and router probabilities, and its cluster under k-means with as many clusters as experts, fitted on the router
input (`blocks.{l}.ln2.hook_normalized`) of the whole held-out batch as in `specialization`. Cluster ids
are renamed to the experts they overlap most (Hungarian matching), so one colour means one group in both
views. The sequences' tokens and ground-truth labels (and, for tasks with a `grid`, the grid geometry) are
stored once. `toylab.report.ExpertMap` draws the file in `report.html`.
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
from toylab.analysis.specialization import EXPERTS, ROUTER_INPUT, token_activations, top_expert
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


def write_expert_map(path: Path, task: Task, batch: Batch, views: Mapping[str, dict[str, Any]], n_experts: int,
                     top_k: int, n_shown: int = N_SHOWN) -> None:
    """Save the map (compact JSON, atomically): the shown sequences and `views` (`{seed: routing_view(...)}`)."""
    layers = list(next(iter(views.values()))) if views else []
    data = {**sample_view(task, batch, n_shown), "n_experts": n_experts, "top_k": top_k, "layers": layers,
            "seeds": dict(views)}
    io.write_text(Path(path), json.dumps(data, separators=(",", ":")))
