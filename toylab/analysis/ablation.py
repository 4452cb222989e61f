"""Targeted ablations: remove one expert, or one group of MLP neurons, and see which classes of a label break.

An ablation replaces neuron activations (`blocks.{l}.mlp.hook_post`) through `run_with_hooks`:
- **experts**: every neuron of expert e, only in the slots routed to e (`hook_expert_indices`);
- **neuron groups** of a dense MLP, all tokens, as many groups as the MoE has experts, of equal size
  `d_mlp // n_groups`, grouped three ways: `random`; `kmeans`, balanced k-means on the neurons' unit-norm
  weight vectors (input and output weights concatenated); `selective`, for each class of each label the
  neurons most selective for it (largest standardized mean difference of activation on the class vs the
  rest, measured on a separate reference batch), the strongest competitor.
Mode `zero` sets the neurons to 0; `mean` to their mean on the reference batch (an expert's mean over the
tokens routed to it). Damage is the change in next-token loss at the task's scored positions, averaged per
class of each label at that position (a causal ablation x class matrix), beside the change in accuracy and
in the task's own metric.

Specificity: for each class c, the ablation of a family that damages c most (d_c) and its mean damage on all
other tokens (d_other); selectivity index (d_c+ - d_other+) / (d_c+ + d_other+ + floor), with x+ = max(x, 0):
1 when only c is hurt, 0 when all are hurt alike (or nothing is hurt beyond the `floor`), negative when
c is spared. For experts the causal matrix is also compared with the observational routing matrix (the
share of each class's tokens routed to each expert).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from scipy.stats import spearmanr
from sklearn.cluster import KMeans

from toylab.analysis.specialization import EXPERTS, analysable_labels
from toylab.analysis.stats import MARGIN, compare, mean_ci
from toylab.models import Transformer
from toylab.models.hooks import HookPoint
from toylab.models.transformer import MLP
from toylab.task import IGNORE, Batch, Task

POST = "blocks.{layer}.mlp.hook_post"
FAMILIES = ("experts", "random", "kmeans", "selective")
MODES = ("zero", "mean")
Mode = Literal["zero", "mean"]
FLOOR = 0.01
"""Damage (nats) below which an ablation counts as doing little: the selectivity index's floor."""
MIN_COUNT = 20
"""Classes with fewer scored tokens are left out of specificity scores."""


@dataclass(frozen=True)
class Ablation:
    """One ablation: an expert (`neurons` None) or a group of dense MLP neurons in `layer`."""

    family: str
    layer: int
    unit: int
    """The expert, the group, or (selective) the class the neurons were chosen for."""
    neurons: tuple[int, ...] | None = None
    label: str | None = None
    """Selective groups: the label whose class `unit` they were chosen for."""

    @property
    def name(self) -> str:
        what = f"expert {self.unit}" if self.neurons is None else f"{self.family} group {self.unit}"
        if self.label is not None:
            what = f"neurons selective for {self.label}={self.unit}"
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


def neuron_groups(model: Transformer, n_groups: int, seed: int) -> list[Ablation]:
    """`random` and `kmeans` partitions of each dense MLP layer into `n_groups` groups of `d_mlp // n_groups` neurons."""
    size = model.cfg.d_mlp // n_groups
    out = []
    for layer in dense_layers(model):
        mlp = model.blocks[layer].mlp
        order = np.random.default_rng([seed, layer]).permutation(model.cfg.d_mlp)[: n_groups * size].reshape(n_groups, size)
        vectors = torch.cat([mlp.W_in.weight, mlp.W_out.weight.T], dim=1).detach().double()
        vectors = (vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)).numpy()
        for family, groups in (("random", np.sort(order, axis=1)), ("kmeans", balanced_kmeans(vectors, n_groups, size, seed))):
            out += [Ablation(family, layer, g, tuple(int(i) for i in group)) for g, group in enumerate(groups)]
    return out


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


def selective_groups(model: Transformer, task: Task, reference: Batch, size: int, min_count: int = MIN_COUNT) -> list[Ablation]:
    """For each label, class (with at least `min_count` tokens) and dense layer: the `size` neurons whose mean
    activation on the class exceeds that on the other tokens most, in units of the neuron's standard deviation."""
    posts, _ = _post_activations(model, task, reference)
    keep = task.positions(reference)
    out = []
    for name in analysable_labels(task):
        label = reference.labels[name][keep]
        defined = label != IGNORE
        counts = np.bincount(label[defined], minlength=task.labels[name].n_classes)
        for layer in dense_layers(model):
            acts = posts[layer][torch.from_numpy(defined)].double()
            onehot = F.one_hot(torch.from_numpy(label[defined]), len(counts)).double()  # [n, classes]
            n = onehot.sum(0)[:, None]
            sums = onehot.T @ acts
            inside = sums / n.clamp_min(1)
            outside = (acts.sum(0) - sums) / (len(acts) - n).clamp_min(1)
            score = (inside - outside) / acts.std(0).clamp_min(1e-6)  # [classes, neurons]
            top = score.argsort(dim=1, descending=True)[:, :size]
            out += [Ablation("selective", layer, int(c), tuple(sorted(int(i) for i in top[c])), name)
                    for c in np.flatnonzero(counts >= min_count)]
    return out


@torch.no_grad()
def neuron_means(model: Transformer, task: Task, reference: Batch) -> dict[int, torch.Tensor]:
    """Mean activation of every neuron on the reference batch's real tokens: dense `[d_mlp]`; MoE `[n_experts, d_expert]`,
    each expert's mean over the slots routed to it (0 for an expert that gets none)."""
    posts, experts = _post_activations(model, task, reference)
    means = {}
    for layer, post in posts.items():
        if layer in experts:
            slots = experts[layer].reshape(-1)
            onehot = F.one_hot(slots.clamp_min(0), model.cfg.n_experts).to(post.dtype) * (slots >= 0)[:, None]  # [slots, experts]; empty: 0
            means[layer] = (onehot.T @ post.reshape(-1, post.shape[-1])) / onehot.sum(0)[:, None].clamp_min(1)
        else:
            means[layer] = post.mean(0)
    return means


HookFn = Callable[[torch.Tensor, HookPoint], torch.Tensor | None]


def ablation_hooks(ablation: Ablation, mode: Mode, means: dict[int, torch.Tensor]) -> list[tuple[str, HookFn]]:
    """`run_with_hooks` hooks that zero- or mean-ablate `ablation`'s neurons."""
    post, mean = POST.format(layer=ablation.layer), means[ablation.layer]
    if ablation.neurons is not None:
        index = torch.tensor(ablation.neurons)

        def ablate_neurons(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            x = x.clone()
            x[..., index] = 0.0 if mode == "zero" else mean[index]
            return x

        return [(post, ablate_neurons)]
    routed: dict[str, torch.Tensor] = {}

    def read_experts(indices: torch.Tensor, hook: HookPoint) -> None:
        routed["hit"] = (indices == ablation.unit)[..., None]  # [batch, pos, k, 1]

    def ablate_expert(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        replacement = torch.zeros_like(x) if mode == "zero" else mean[ablation.unit].expand_as(x)
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
                     means: dict[int, torch.Tensor]) -> dict[str, Any]:
    """Damage of every ablation: change of the mean loss and of the task's metric, and per analysable label the
    token counts per class and the ablation x class matrices of the mean change in loss and in accuracy."""
    clean = scored_run(model, task, batch)
    runs = [scored_run(model, task, batch, ablation_hooks(a, mode, means)) for a in ablations]
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


def class_selectivity(damage: np.ndarray, counts: np.ndarray, candidates: np.ndarray, min_count: int = MIN_COUNT,
                      floor: float = FLOOR) -> list[dict[str, float | int]]:
    """For each class with at least `min_count` tokens (if two or more have): among the `candidates` (rows of the
    ablation x class `damage` matrix), the one that damages the class most; its damage `d_c`, its mean damage on
    the other classes' tokens `d_other` (weighted by their counts), and the selectivity index (module docstring)."""
    eligible = np.flatnonzero(counts >= min_count)
    if len(eligible) < 2 or len(candidates) == 0:
        return []
    weights = counts[eligible].astype(np.float64)
    block = np.nan_to_num(damage[np.ix_(candidates, eligible)])  # [candidates, eligible classes]
    total = block @ weights
    rows = []
    for j, c in enumerate(eligible):
        best = int(block[:, j].argmax())
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


def ablation_analysis(model: Transformer, task: Task, batch: Batch, reference: Batch, n_groups: int, seed: int,
                      min_count: int = MIN_COUNT, floor: float = FLOOR) -> dict[str, Any]:
    """One model's ablations, JSON-ready: an MoE's experts, or a dense model's random, k-means and selective
    neuron groups (`n_groups` of `d_mlp // n_groups` neurons per layer), zero- and mean-ablated on `batch`
    (means and selective neurons from `reference`). Per mode: the clean loss and metric, each ablation's
    change of loss and metric, and per label the per-class selectivity of each family; for experts also the
    causal matrices `[layer][expert][class]` and their agreement with the routing shares."""
    moe = bool(model.moe_layers())
    if moe:
        ablations = expert_ablations(model)
    else:
        ablations = neuron_groups(model, n_groups, seed) + selective_groups(model, task, reference, model.cfg.d_mlp // n_groups, min_count)
    means = neuron_means(model, task, reference)
    families = np.array([a.family for a in ablations])
    owners = np.array([a.label or "" for a in ablations])
    out: dict[str, Any] = {"ablations": [a.as_dict() for a in ablations], "modes": {}}
    for mode in MODES:
        effects = ablation_effects(model, task, batch, ablations, mode, means)
        found: dict[str, Any] = {"clean": effects["clean"], "loss": effects["loss"].tolist(), "metric": effects["metric"].tolist(),
                                 "labels": {}}
        for name, per_class in effects["labels"].items():
            entry: dict[str, Any] = {"counts": per_class["counts"].tolist(), "selectivity": {}}
            for family in dict.fromkeys(families):
                candidates = np.flatnonzero((families == family) & ((owners == name) if family == "selective" else True))
                entry["selectivity"][family] = class_selectivity(per_class["loss"], per_class["counts"], candidates, min_count, floor)
            if moe:
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


def summarize_ablations(moe_runs: Sequence[dict[str, Any] | None], dense_runs: Sequence[dict[str, Any] | None],
                        margin: float = MARGIN) -> dict[str, Any]:
    """Across seeds (lists aligned by seed; None for a failed run), per mode and label: each family's mean
    selectivity index, damage on the class and on the others (mean and 95% CI over seeds), the verdicts of
    experts vs each dense family on the index (paired by seed, margin `margin`), and the experts' agreement
    of causal and routing matrices per layer."""
    pairs = [(m, d) for m, d in zip(moe_runs, dense_runs) if m is not None and d is not None]
    if not pairs:
        return {}
    summary: dict[str, Any] = {}
    for mode in MODES:
        summary[mode] = {}
        for name, entry in pairs[0][0]["modes"][mode]["labels"].items():
            per_family = {
                family: [mean_selectivity(run["modes"][mode]["labels"][name]["selectivity"][family]) for run in runs]
                for family, runs in (("experts", [m for m, _ in pairs]),
                                     *((f, [d for _, d in pairs]) for f in FAMILIES[1:]))
            }
            if all(np.isnan(v[0]["index"]) for v in per_family.values()):
                continue  # fewer than two classes with enough scored tokens
            scores = {family: {key: mean_ci([v[key] for v in values], bounds=(-1.0, 1.0) if key == "index" else None)
                               for key in ("index", "damage", "other")} for family, values in per_family.items()}
            index = {family: [v["index"] for v in values] for family, values in per_family.items()}
            summary[mode][name] = {
                "families": scores,
                "verdicts": {family: compare(index["experts"], index[family], margin) for family in FAMILIES[1:]},
                "routing": {layer: {key: mean_ci([m["modes"][mode]["labels"][name]["routing"][layer][key] for m, _ in pairs],
                                                 bounds=(-1.0, 1.0))
                                    for key in ("spearman", "agreement")}
                            for layer in entry["routing"]},
            }
    return summary


def diagonal_damage(causal: np.ndarray, n_experts: int) -> dict[str, float]:
    """For a label router (class c -> expert c mod n_experts): the mean damage of ablating a class's own expert on
    that class (`own`), and on the classes routed elsewhere (`others`) from a causal matrix `[experts, classes]`."""
    causal = np.asarray(causal, dtype=np.float64)
    own = np.zeros_like(causal, dtype=bool)
    own[np.arange(causal.shape[1]) % n_experts, np.arange(causal.shape[1])] = True
    return {"own": float(np.nanmean(causal[own])), "others": float(np.nanmean(causal[~own])),
            "largest_other": float(np.nanmax(np.abs(causal[~own])))}
