"""Targeted ablations: remove one expert, or the same kind of thing from a dense model, and see which classes break.

An ablation replaces neuron activations (`blocks.{l}.mlp.hook_post`) through `run_with_hooks`. Intervention families:
- **experts** of an MoE: every neuron of expert e, only in the slots routed to e (`hook_expert_indices`);
- **token-subset controls** on a dense model, the same intervention: every neuron of the MLP, only on the tokens
  of one cell of a partition into as many cells as the MoE has experts: `moe_partition`, the same-seed MoE's top-1
  expert of each token in that layer (the MoE's own partition applied to the dense model's tokens);
  `kmeans_tokens`, k-means on the dense model's router-input site (`blocks.{l}.ln2.hook_normalized`);
  `hash_tokens`, a seeded hash of the token id;
- **neuron groups** of a dense MLP, on every token, as many groups as experts, of `d_mlp // n_groups` neurons:
  `random`; `kmeans`, balanced k-means on the neurons' unit-norm weight vectors (input and output weights
  concatenated); `selective`, for the n_groups most frequent classes of each label the neurons most selective for
  the class (largest standardized mean difference of activation on the class vs the rest, on the reference batch).
Every family offers n_groups candidates per layer (`selective` fewer where a label has fewer classes), in the
MoE's MoE layers. Mode `zero` sets the activations to 0 (an output bias stays); `mean` to their mean on the
reference batch over the same tokens (an expert's or a cell's tokens; a neuron group's: all tokens). Damage is
the change in next-token loss at the task's scored positions, averaged per class of each label at that position
(a causal ablation x class matrix), beside the change in accuracy and in the task's own metric.

Specificity: for each class c, the family's ablation that damages c most **on a selection batch**; on a separate
evaluation batch, its damage on c (d_c) and mean damage on all other tokens (d_other); selectivity index
(d_c+ - d_other+) / (d_c+ + d_other+ + floor), with x+ = max(x, 0): 1 when only c is hurt, 0 when all are hurt
alike (or nothing is hurt beyond the `floor`), negative when c is spared. Choosing and scoring on different
sequences keeps the maximum over candidates from inflating the score. For experts the causal matrix is also
compared with the observational routing matrix (the share of each class's tokens routed to each expert).

Are targeted ablations easier on MoEs? `COMPARISONS["primary"]`: experts vs the token-subset controls, the same
intervention on a dense model; experts vs neuron groups (`COMPARISONS["neuron groups"]`) compares removing the
whole FFN on some tokens with removing part of it on all tokens, and mostly measures how routing correlates with class.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from scipy.stats import spearmanr
from sklearn.cluster import KMeans

from toylab.analysis.clustering import kmeans
from toylab.analysis.specialization import EXPERTS, ROUTER_INPUT, analysable_labels, token_activations
from toylab.analysis.stats import MARGIN, UNIT, adjust_family, compare, mean_ci
from toylab.models import Transformer
from toylab.models.hooks import HookPoint
from toylab.models.transformer import MLP
from toylab.task import IGNORE, Batch, Task

POST = "blocks.{layer}.mlp.hook_post"
TOKEN_FAMILIES = ("moe_partition", "kmeans_tokens", "hash_tokens")
NEURON_FAMILIES = ("random", "kmeans", "selective")
FAMILIES = ("experts", *TOKEN_FAMILIES, *NEURON_FAMILIES)
MODES = ("zero", "mean")
Mode = Literal["zero", "mean"]
KINDS = ("moe", "hash", "dense")
"""Models a study ablates per seed: the MoE, a hash-routed MoE, and the dense model."""
COMPARISONS: dict[str, tuple[tuple[str, str], ...]] = {
    "primary": tuple(("moe/experts", f"dense/{family}") for family in TOKEN_FAMILIES),
    "hash": (("hash/experts", "dense/hash_tokens"), ("moe/experts", "hash/experts")),
    "neuron groups": tuple(("moe/experts", f"dense/{family}") for family in NEURON_FAMILIES),
}
"""Paired comparisons of selectivity, `kind/family` vs `kind/family`: the primary one (same intervention, MoE vs
dense), the hash-routed control, and the old design (experts vs neuron groups, a different intervention)."""
ARMS = tuple(dict.fromkeys(arm for pairs in COMPARISONS.values() for pair in pairs for arm in pair))
FLOOR = 0.01
"""Damage (nats) below which an ablation counts as doing little: the selectivity index's floor."""
MIN_COUNT = 20
"""Classes with fewer scored tokens (in the selection or the evaluation batch) are left out of specificity scores."""
CELL_NAMES = {"moe_partition": "MoE-partition cell", "kmeans_tokens": "k-means cell", "hash_tokens": "hash cell"}


@dataclass(frozen=True)
class Ablation:
    """One ablation in `layer`: an expert, a token cell (whole dense MLP), or a group of dense MLP neurons (`neurons`)."""

    family: str
    layer: int
    unit: int
    """The expert, the cell, the group, or (selective) the class the neurons were chosen for."""
    neurons: tuple[int, ...] | None = None
    label: str | None = None
    """Selective groups: the label whose class `unit` they were chosen for."""

    @property
    def name(self) -> str:
        if self.label is not None:
            what = f"neurons selective for {self.label}={self.unit}"
        elif self.family in CELL_NAMES:
            what = f"dense MLP on {CELL_NAMES[self.family]} {self.unit}"
        else:
            what = f"expert {self.unit}" if self.neurons is None else f"{self.family} group {self.unit}"
        return f"layer {self.layer} {what}"

    def as_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "neurons"}, "name": self.name}


def expert_ablations(model: Transformer) -> list[Ablation]:
    return [Ablation("experts", layer, e) for layer in model.moe_layers() for e in range(model.cfg.n_experts)]


def dense_layers(model: Transformer) -> list[int]:
    return [layer for layer, block in enumerate(model.blocks) if isinstance(block.mlp, MLP)]


def balanced_kmeans(vectors: np.ndarray, n_groups: int, size: int, seed: int) -> np.ndarray:
    """Groups `[n_groups, size]` of row indices: k-means centroids, then each centroid takes `size` rows by an
    optimal assignment (Hungarian, `size` copies of each centroid) minimizing the squared distances."""
    centroids = KMeans(n_clusters=n_groups, n_init=4, random_state=seed).fit(vectors).cluster_centers_
    cost = ((vectors[:, None, :] - centroids[None]) ** 2).sum(-1)  # [rows, groups]
    rows, slots = linear_sum_assignment(np.repeat(cost, size, axis=1))
    groups = np.empty(n_groups * size, dtype=np.int64)
    groups[slots] = rows
    return np.sort(groups.reshape(n_groups, size), axis=1)


def neuron_groups(model: Transformer, n_groups: int, seed: int, layers: Sequence[int]) -> list[Ablation]:
    """`random` and `kmeans` partitions of the dense MLP of each of `layers` into `n_groups` groups of `d_mlp // n_groups` neurons."""
    size = model.cfg.d_mlp // n_groups
    out = []
    for layer in layers:
        mlp = model.blocks[layer].mlp
        order = np.random.default_rng([seed, layer]).permutation(model.cfg.d_mlp)[: n_groups * size].reshape(n_groups, size)
        vectors = torch.cat([mlp.W_in.weight, mlp.W_out.weight.T], dim=1).detach().double()
        vectors = (vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)).numpy()
        for family, groups in (("random", np.sort(order, axis=1)), ("kmeans", balanced_kmeans(vectors, n_groups, size, seed))):
            out += [Ablation(family, layer, g, tuple(int(i) for i in group)) for g, group in enumerate(groups)]
    return out


def token_ablations(layers: Sequence[int], n_cells: int, families: Sequence[str] = TOKEN_FAMILIES) -> list[Ablation]:
    """One ablation per cell of each token partition (`families`) in each of `layers`."""
    return [Ablation(family, layer, cell) for family in families for layer in layers for cell in range(n_cells)]


def hash_cells(tokens: np.ndarray, vocab_size: int, n_cells: int, seed: int) -> np.ndarray:
    """Each token id's cell: a seeded, balanced random map of the vocabulary onto `n_cells` cells (as a hash router's)."""
    return (np.random.default_rng([seed, vocab_size]).permutation(vocab_size) % n_cells)[tokens]


Cells = dict[tuple[str, int], torch.Tensor]
"""Per (token family, layer), each token's cell `[batch, pos]` in one batch (-1: in no cell)."""


def token_cells(dense: Transformer, moe: Transformer | None, task: Task, batches: Mapping[str, Batch], n_cells: int, seed: int,
                layers: Sequence[int]) -> dict[str, Cells]:
    """The token partitions of every batch (by name), at the task's real positions: k-means on the dense model's
    router-input site (fitted on all batches' tokens together, so a cell is the same cluster in every batch), the
    seeded hash of the token id, and (with `moe`) the MoE's top-1 expert of each token in the same layer."""
    keeps = {name: task.positions(batch) for name, batch in batches.items()}
    sites = {layer: ROUTER_INPUT.format(layer=layer) for layer in layers}
    acts = {name: token_activations(dense, task, batch, list(sites.values())) for name, batch in batches.items()}
    routed = {name: token_activations(moe, task, batch, [EXPERTS.format(layer=layer) for layer in layers])
              for name, batch in batches.items()} if moe is not None else {}
    cells: dict[str, Cells] = {name: {} for name in batches}

    def scatter(name: str, values: np.ndarray) -> torch.Tensor:
        ids = np.full(keeps[name].shape, -1, dtype=np.int64)
        ids[keeps[name]] = values
        return torch.from_numpy(ids)

    for layer, site in sites.items():
        joint = kmeans(np.concatenate([acts[name][site] for name in batches]), n_cells, seed)
        splits = np.split(joint, np.cumsum([keeps[name].sum() for name in batches])[:-1])
        for (name, batch), clusters in zip(batches.items(), splits):
            cells[name][("kmeans_tokens", layer)] = scatter(name, clusters)
            cells[name][("hash_tokens", layer)] = scatter(name, hash_cells(batch.inputs[keeps[name]], dense.cfg.vocab_size, n_cells, seed))
            if moe is not None:
                cells[name][("moe_partition", layer)] = scatter(name, routed[name][EXPERTS.format(layer=layer)][:, 0])  # top-1; -1: none
    return cells


@torch.no_grad()
def _post_activations(model: Transformer, task: Task, batch: Batch) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per FFN layer, neuron activations at the real positions `[n, (k,) d]` and (MoE) the experts `[n, k]`."""
    tokens = torch.from_numpy(batch.inputs)
    layers = range(model.cfg.n_layers)
    moe = model.moe_layers()
    names = [POST.format(layer=l) for l in layers] + [EXPERTS.format(layer=l) for l in moe]
    _, cache = model.run_with_cache(tokens, model.route_input(batch.labels), names=names)
    keep = torch.from_numpy(task.positions(batch))
    return ({l: cache[POST.format(layer=l)][keep] for l in layers}, {l: cache[EXPERTS.format(layer=l)][keep] for l in moe})


def selective_groups(model: Transformer, task: Task, reference: Batch, size: int, n_groups: int, layers: Sequence[int],
                     min_count: int = MIN_COUNT) -> list[Ablation]:
    """For each label, each of its `n_groups` most frequent classes (with at least `min_count` tokens) and each of
    `layers`: the `size` neurons whose mean activation on the class exceeds that on the other tokens most, in units
    of the neuron's standard deviation."""
    posts, _ = _post_activations(model, task, reference)
    keep = task.positions(reference)
    out = []
    for name in analysable_labels(task):
        label = reference.labels[name][keep]
        defined = label != IGNORE
        counts = np.bincount(label[defined], minlength=task.labels[name].n_classes)
        frequent = np.argsort(-counts, kind="stable")[:n_groups]
        chosen = np.sort(frequent[counts[frequent] >= min_count])
        for layer in layers:
            acts = posts[layer][torch.from_numpy(defined)].double()
            onehot = F.one_hot(torch.from_numpy(label[defined]), len(counts)).double()  # [n, classes]
            n = onehot.sum(0)[:, None]
            sums = onehot.T @ acts
            inside = sums / n.clamp_min(1)
            outside = (acts.sum(0) - sums) / (len(acts) - n).clamp_min(1)
            score = (inside - outside) / acts.std(0).clamp_min(1e-6)  # [classes, neurons]
            top = score.argsort(dim=1, descending=True)[:, :size]
            out += [Ablation("selective", layer, int(c), tuple(sorted(int(i) for i in top[c])), name) for c in chosen]
    return out


def _group_means(values: torch.Tensor, ids: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Mean of `values` `[n, d]` over the rows of each group id `[n]` (`[n_groups, d]`; rows with id < 0 in no group; 0 for an empty group)."""
    onehot = F.one_hot(ids.clamp_min(0), n_groups).to(values.dtype) * (ids >= 0)[:, None]  # [n, groups]
    return (onehot.T @ values) / onehot.sum(0)[:, None].clamp_min(1)


Means = dict[int | tuple[str, int], torch.Tensor]
"""Replacement activations for mean ablation: by layer, a dense MLP's neurons `[d_mlp]` or an MoE's experts
`[n_experts, d_expert]`; by (token family, layer), each cell's mean `[n_cells, d_mlp]`."""


@torch.no_grad()
def neuron_means(model: Transformer, task: Task, reference: Batch) -> Means:
    """Mean activation of every neuron on the reference batch's real tokens: dense `[d_mlp]`; MoE `[n_experts, d_expert]`,
    each expert's mean over the slots routed to it (0 for an expert that gets none)."""
    posts, experts = _post_activations(model, task, reference)
    return {layer: _group_means(post.reshape(-1, post.shape[-1]), experts[layer].reshape(-1), model.cfg.n_experts)
            if layer in experts else post.mean(0) for layer, post in posts.items()}


@torch.no_grad()
def cell_means(model: Transformer, task: Task, reference: Batch, cells: Cells, n_cells: int) -> Means:
    """Mean activation of the dense MLP's neurons over the reference tokens of each cell `[n_cells, d_mlp]`, per (family, layer)."""
    posts, _ = _post_activations(model, task, reference)
    keep = torch.from_numpy(task.positions(reference))
    return {(family, layer): _group_means(posts[layer], ids[keep], n_cells) for (family, layer), ids in cells.items()}


HookFn = Callable[[torch.Tensor, HookPoint], torch.Tensor | None]


def ablation_hooks(ablation: Ablation, mode: Mode, means: Means, cells: Cells | None = None) -> list[tuple[str, HookFn]]:
    """`run_with_hooks` hooks that zero- or mean-ablate `ablation` (a token cell's ids come from `cells`, of the batch run)."""
    post = POST.format(layer=ablation.layer)
    if ablation.neurons is not None:
        index, mean = torch.tensor(ablation.neurons), means[ablation.layer]

        def ablate_neurons(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            x = x.clone()
            x[..., index] = 0.0 if mode == "zero" else mean[index]
            return x

        return [(post, ablate_neurons)]
    if ablation.family in TOKEN_FAMILIES:
        key = (ablation.family, ablation.layer)
        if cells is None or key not in cells:
            raise ValueError(f"{ablation.name} needs the batch's cells of {key}")
        hit, mean = (cells[key] == ablation.unit)[..., None], means[key][ablation.unit]  # [batch, pos, 1], [d_mlp]

        def ablate_cell(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            return torch.where(hit, torch.zeros_like(x) if mode == "zero" else mean.expand_as(x), x)

        return [(post, ablate_cell)]
    routed: dict[str, torch.Tensor] = {}

    def read_experts(indices: torch.Tensor, hook: HookPoint) -> None:
        routed["hit"] = (indices == ablation.unit)[..., None]  # [batch, pos, k, 1]

    def ablate_expert(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        replacement = torch.zeros_like(x) if mode == "zero" else means[ablation.layer][ablation.unit].expand_as(x)
        return torch.where(routed["hit"], replacement, x)

    return [(EXPERTS.format(layer=ablation.layer), read_experts), (post, ablate_expert)]


@torch.no_grad()
def scored_run(model: Transformer, task: Task, batch: Batch, hooks: Sequence[tuple[str, HookFn]] = ()) -> dict[str, Any]:
    """Per scored token (the task's loss mask) the loss and whether the top prediction is right, and the task's metric."""
    tokens, targets, mask = batch.tensors()
    logits = model.run_with_hooks(tokens, model.route_input(batch.labels), fwd_hooks=hooks)
    loss = F.cross_entropy(logits[mask], targets[mask], reduction="none").numpy()
    correct = (logits[mask].argmax(-1) == targets[mask]).numpy().astype(np.float64)
    return {"loss": loss, "correct": correct, "metric": task.metrics(logits, batch)[task.primary_metric]}


def class_means(values: np.ndarray, label: np.ndarray, n_classes: int) -> np.ndarray:
    """Mean of `values` `[..., n]` over the tokens of each class `[..., n_classes]` (NaN for an absent class)."""
    onehot = np.eye(n_classes)[label]  # [n, n_classes]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (values @ onehot) / onehot.sum(0)


def ablation_effects(model: Transformer, task: Task, batch: Batch, ablations: Sequence[Ablation], mode: Mode,
                     means: Means, cells: Cells | None = None) -> dict[str, Any]:
    """Damage of every ablation on `batch` (with its token `cells`): change of the mean loss and of the task's metric,
    and per analysable label the token counts per class and the ablation x class matrices of the mean change in loss
    and in accuracy."""
    clean = scored_run(model, task, batch)
    runs = [scored_run(model, task, batch, ablation_hooks(a, mode, means, cells)) for a in ablations]
    loss = np.stack([r["loss"] for r in runs]) - clean["loss"]  # [ablations, scored tokens]
    accuracy = np.stack([r["correct"] for r in runs]) - clean["correct"]
    mask = batch.loss_mask
    labels = {}
    for name in analysable_labels(task):
        label = batch.labels[name][mask]
        defined = label != IGNORE
        n_classes = task.labels[name].n_classes
        labels[name] = {
            "counts": np.bincount(label[defined], minlength=n_classes),
            "loss": class_means(loss[:, defined], label[defined], n_classes),
            "accuracy": class_means(accuracy[:, defined], label[defined], n_classes),
        }
    return {"clean": {"loss": float(clean["loss"].mean()), "metric": clean["metric"]},
            "loss": loss.mean(1), "metric": np.array([r["metric"] - clean["metric"] for r in runs]), "labels": labels}


def class_selectivity(selection: Mapping[str, np.ndarray], evaluation: Mapping[str, np.ndarray], candidates: np.ndarray,
                      min_count: int = MIN_COUNT, floor: float = FLOOR) -> list[dict[str, float | int]]:
    """For each class with at least `min_count` tokens in both batches (if two or more have): among the `candidates`
    (rows of the ablation x class damage matrices `loss`, with class `counts`, of each batch), the one that damages
    the class most on `selection`; on `evaluation`, its damage `d_c`, its mean damage on the other classes' tokens
    `d_other` (weighted by their counts), and the selectivity index (module docstring)."""
    counts = evaluation["counts"]
    eligible = np.flatnonzero((counts >= min_count) & (selection["counts"] >= min_count))
    if len(eligible) < 2 or len(candidates) == 0:
        return []
    weights = counts[eligible].astype(np.float64)
    chooser = np.nan_to_num(selection["loss"][np.ix_(candidates, eligible)])
    block = np.nan_to_num(evaluation["loss"][np.ix_(candidates, eligible)])  # [candidates, eligible classes]
    total = block @ weights
    rows = []
    for j, c in enumerate(eligible):
        best = int(chooser[:, j].argmax())
        d_c = float(block[best, j])
        d_other = float((total[best] - d_c * weights[j]) / (weights.sum() - weights[j]))
        hit, rest = max(d_c, 0.0), max(d_other, 0.0)
        index = (hit - rest) / (hit + rest + floor) if hit + rest + floor > 0 else 0.0
        rows.append({"class": int(c), "ablation": int(candidates[best]), "damage": d_c, "other": d_other, "index": index})
    return rows


def routing_agreement(damage: np.ndarray, shares: np.ndarray, counts: np.ndarray, min_count: int = MIN_COUNT) -> dict[str, float]:
    """Does where a class's tokens go predict what breaks? For one layer's experts: Spearman correlation of the
    causal matrix `damage` `[experts, classes]` with the routing shares `[experts, classes]` (each column the share
    of the class's tokens routed to each expert) over classes with `min_count` tokens, and the share of those
    classes whose most damaging expert is the one that receives most of their tokens (chance: 1 / experts)."""
    eligible = counts >= min_count
    d, s = np.nan_to_num(damage[:, eligible]), shares[:, eligible]
    if eligible.sum() == 0:
        return {"spearman": float("nan"), "agreement": float("nan")}
    constant = np.ptp(d) == 0 or np.ptp(s) == 0
    return {"spearman": float("nan") if constant else float(spearmanr(d.ravel(), s.ravel()).statistic),
            "agreement": float((d.argmax(0) == s.argmax(0)).mean())}


@torch.no_grad()
def routing_shares(model: Transformer, batch: Batch, name: str, n_classes: int) -> dict[int, np.ndarray]:
    """`{layer: [experts, classes]}`: the share of each class's scored tokens (label `name`) routed to each expert (all k slots)."""
    tokens, _, mask = batch.tensors()
    layers = model.moe_layers()
    _, cache = model.run_with_cache(tokens, model.route_input(batch.labels), names=[EXPERTS.format(layer=l) for l in layers])
    label = batch.labels[name][batch.loss_mask]
    defined = label != IGNORE
    out = {}
    for layer in layers:
        experts = cache[EXPERTS.format(layer=layer)][mask].numpy()[defined]  # [n, k]
        classes = np.repeat(label[defined], experts.shape[1])
        filled = experts.ravel() >= 0  # empty slots (-1) are routed nowhere
        table = np.bincount(experts.ravel()[filled] * n_classes + classes[filled], minlength=model.cfg.n_experts * n_classes)
        table = table.reshape(model.cfg.n_experts, n_classes).astype(np.float64)
        out[layer] = table / np.maximum(table.sum(0, keepdims=True), 1)
    return out


def ablation_analysis(model: Transformer, task: Task, batch: Batch, selection: Batch, reference: Batch, n_groups: int, seed: int,
                      min_count: int = MIN_COUNT, floor: float = FLOOR, moe: Transformer | None = None) -> dict[str, Any]:
    """One model's ablations, JSON-ready: an MoE's experts; or, in a dense model, its token-subset controls and its
    random, k-means and selective neuron groups (`n_groups` candidates per family and layer; with `moe`, the same-seed
    MoE, in its MoE layers and with the `moe_partition` cells). Zero- and mean-ablated on `selection`, where each
    class's best ablation of a family is chosen, and on `batch`, where it is scored (means, selective neurons from
    `reference`). Per mode: the clean loss and metric, each ablation's change of loss and metric on `batch`, and per
    label the per-class selectivity of each family; for experts also the causal matrices `[layer][expert][class]` and
    their agreement with the routing shares."""
    batches = {"evaluation": batch, "selection": selection}
    cells: dict[str, Cells] = {}
    if model.moe_layers():
        ablations = expert_ablations(model)
        means = neuron_means(model, task, reference)
    else:
        layers = [layer for layer in dense_layers(model) if moe is None or layer in moe.moe_layers()]
        families = TOKEN_FAMILIES if moe is not None else TOKEN_FAMILIES[1:]
        size = model.cfg.d_mlp // n_groups
        ablations = (token_ablations(layers, n_groups, families) + neuron_groups(model, n_groups, seed, layers)
                     + selective_groups(model, task, reference, size, n_groups, layers, min_count))
        cells = token_cells(model, moe, task, {**batches, "reference": reference}, n_groups, seed, layers)
        means = {**neuron_means(model, task, reference), **cell_means(model, task, reference, cells["reference"], n_groups)}
    families = np.array([a.family for a in ablations])
    owners = np.array([a.label or "" for a in ablations])
    out: dict[str, Any] = {"ablations": [a.as_dict() for a in ablations], "modes": {}}
    for mode in MODES:
        effects = {name: ablation_effects(model, task, b, ablations, mode, means, cells.get(name)) for name, b in batches.items()}
        scored = effects["evaluation"]
        found: dict[str, Any] = {"clean": scored["clean"], "loss": scored["loss"].tolist(), "metric": scored["metric"].tolist(), "labels": {}}
        for name, per_class in scored["labels"].items():
            entry: dict[str, Any] = {"counts": per_class["counts"].tolist(), "selectivity": {}}
            for family in dict.fromkeys(families):
                candidates = np.flatnonzero((families == family) & ((owners == name) if family == "selective" else True))
                entry["selectivity"][family] = class_selectivity(effects["selection"]["labels"][name], per_class, candidates, min_count, floor)
            if model.moe_layers():
                shares = routing_shares(model, batch, name, len(per_class["counts"]))
                rows = {layer: np.flatnonzero([a.layer == layer for a in ablations]) for layer in shares}
                entry["causal"] = {str(layer): per_class["loss"][r].tolist() for layer, r in rows.items()}
                entry["accuracy"] = {str(layer): per_class["accuracy"][r].tolist() for layer, r in rows.items()}
                entry["routing"] = {str(layer): {**routing_agreement(per_class["loss"][r], shares[layer], per_class["counts"], min_count),
                                                 "shares": shares[layer].tolist()} for layer, r in rows.items()}
            found["labels"][name] = entry
        out["modes"][mode] = found
    return out


def mean_selectivity(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Average over classes of the index, the damage on the class and on the others (NaN without classes)."""
    if not rows:
        return {"index": float("nan"), "damage": float("nan"), "other": float("nan")}
    return {key: float(np.mean([r[key] for r in rows])) for key in ("index", "damage", "other")}


def summarize_ablations(runs: Mapping[str, Sequence[dict[str, Any] | None]], margin: float = MARGIN) -> dict[str, Any]:
    """Across seeds, from `ablation_analysis` results by model kind (`KINDS`; lists aligned by seed, None for a failed
    run), per mode and label: each arm's (`kind/family`, `ARMS`) mean selectivity index, damage on the class and on the
    others (mean and 95% CI over seeds), the verdicts of every pair in `COMPARISONS` on the index (paired by seed,
    margin `margin`; a seed counts where both arms were scored), and per MoE kind the agreement of causal and routing
    matrices per layer."""
    first = next((run for found in runs.values() for run in found if run is not None), None)
    if first is None:
        return {}
    n_seeds = max(len(found) for found in runs.values())
    summary: dict[str, Any] = {}
    for mode in MODES:
        summary[mode] = {}
        for name in first["modes"][mode]["labels"]:
            per_arm = {}
            for arm in ARMS:
                kind, family = arm.split("/")
                found = list(runs.get(kind, ())) + [None] * (n_seeds - len(runs.get(kind, ())))
                per_arm[arm] = [mean_selectivity(run["modes"][mode]["labels"][name]["selectivity"].get(family, []))
                                if run is not None else mean_selectivity([]) for run in found]
            if all(np.isnan(v["index"]) for values in per_arm.values() for v in values):
                continue  # fewer than two classes with enough scored tokens
            index = {arm: [v["index"] for v in values] for arm, values in per_arm.items()}
            summary[mode][name] = {
                "arms": {arm: {key: mean_ci([v[key] for v in values], bounds=(-1.0, 1.0) if key == "index" else None)
                               for key in ("index", "damage", "other")} for arm, values in per_arm.items()},
                "verdicts": {f"{a} vs {b}": compare(index[a], index[b], margin) for pairs in COMPARISONS.values() for a, b in pairs},
                "routing": {kind: routing_summary([run for run in runs.get(kind, ()) if run is not None], mode, name)
                            for kind in KINDS if kind != "dense"},
            }
    return summary


def routing_summary(runs: Sequence[dict[str, Any]], mode: str, name: str) -> dict[str, dict[str, dict[str, float]]]:
    """Per MoE layer, the Spearman correlation of causal and routing matrices and their agreement (mean, 95% CI over runs)."""
    if not runs:
        return {}
    layers = runs[0]["modes"][mode]["labels"][name]["routing"]
    return {layer: {key: mean_ci([run["modes"][mode]["labels"][name]["routing"][layer][key] for run in runs], bounds=bounds)
                    for key, bounds in (("spearman", (-1.0, 1.0)), ("agreement", UNIT))} for layer in layers}


def diagonal_damage(causal: np.ndarray, n_experts: int) -> dict[str, float]:
    """For a label router (class c -> expert c mod n_experts): the mean damage of ablating a class's own expert on
    that class (`own`), and on the classes routed elsewhere (`others`) from a causal matrix `[experts, classes]`."""
    causal = np.asarray(causal, dtype=np.float64)
    own = np.zeros_like(causal, dtype=bool)
    own[np.arange(causal.shape[1]) % n_experts, np.arange(causal.shape[1])] = True
    return {"own": float(np.nanmean(causal[own])), "others": float(np.nanmean(causal[~own])),
            "largest_other": float(np.nanmax(np.abs(causal[~own])))}


PRIMARY = COMPARISONS["primary"][0]
"""The primary comparison: the experts vs the dense MLP removed on the MoE's own partition of the same tokens."""


SECONDARY = {"primary": "the same intervention, other cells", "hash": "hash-routed control", "neuron groups": "old design"}
"""What the secondary families of each role of `COMPARISONS` are."""


def adjust_verdicts(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Correct the verdicts of `summarize_ablations` for multiplicity (in place; each keeps its `raw_verdict`): a family
    is one comparison of `COMPARISONS` over every (ablation mode, label), corrected on its own (`stats.adjust`). Returns
    per family its role, number of tests and verdict counts before and after; the first is the primary family."""
    families = {}
    for role, pairs in COMPARISONS.items():
        for pair in pairs:
            name = " vs ".join(pair)
            tests = [(s["verdicts"], name) for labels in summary.values() for s in labels.values() if name in s["verdicts"]]
            if tests:
                families[name] = {"role": "primary" if pair == PRIMARY else f"secondary: {SECONDARY[role]}", **adjust_family(tests)}
    return families
