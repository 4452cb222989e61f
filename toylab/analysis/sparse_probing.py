"""k-sparse probing (Gurnee et al. 2023): how well do the best k neurons of a layer read a binary feature?

For every class c of a label, the binary task "this token has class c" is probed from activations:
neurons are ranked on the training split by a cheap score (`mean_difference`: the difference of
the class means over their pooled standard deviation; or `mutual_info`, the mutual information
between the neuron, in equal-frequency bins, and the target, as a robustness check), a logistic probe is fit on the top k, and its F1 is
measured on held-out sequences. Two controls run the same procedure: `shuffled` (the targets
permuted across tokens) and `random_basis` (the activations in a random orthonormal basis of the
same layer: is a neuron basis better than any basis?).

Dense MLPs are probed on every token (`blocks.{l}.mlp.hook_post`, `[batch, pos, d_mlp]`); each
expert of an MoE layer only on the tokens routed to it (`hook_post` `[batch, pos, k, d_expert]`
with `hook_expert_indices` `[batch, pos, k]`), as Herbst et al. (2026) do, and an (expert, class)
pair with too few positives or negatives on either side of the split is skipped and recorded.
The logistic fits are batched Newton steps (scikit-learn's objective, checked against it in the tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from toylab.analysis.clustering import mutual_info_from_tables
from toylab.analysis.probes import split
from toylab.analysis.specialization import token_activations
from toylab.analysis.stats import MARGIN, UNIT, compare, mean_ci
from toylab.errors import ToylabError
from toylab.models import Transformer
from toylab.models.moe import MoE
from toylab.task import IGNORE, Batch, Label, Task

KS = (1, 2, 4, 8, 16)
RANKINGS = ("mean_difference", "mutual_info")
VARIANTS = ("neurons", "shuffled", "random_basis")
"""What is probed: the neurons; the neurons with permuted targets; a random orthonormal basis of the same layer."""
LIFT = (-1.0, 1.0)
"""Bounds of an F1 minus its control."""
NEURONS = "blocks.{layer}.mlp.hook_post"
EXPERTS = "blocks.{layer}.mlp.hook_expert_indices"


def fit_binary_logistic(
    x: torch.Tensor, y: torch.Tensor, C: float = 1.0, balanced: bool = True, max_iter: int = 100, tol: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Many binary logistic regressions at once, by Newton's method with backtracking: `x [B, n, k]`, `y [B, n]` 0/1.

    Minimizes scikit-learn's objective `|w|^2 / 2 + C * sum_i s_i * logloss_i` (intercept not
    penalized), with `s_i = n / (2 n_class(i))` when `balanced` (its `class_weight="balanced"`),
    else 1. A problem stops when its gradient's largest entry is below `tol * n`. Returns weights
    `[B, k]` and intercepts `[B]`.
    """
    x, y = x.double(), y.double()
    batch, n, k = x.shape
    design = torch.cat([x, torch.ones(batch, n, 1, dtype=x.dtype)], -1)
    s = torch.ones_like(y)
    if balanced:
        positives = y.sum(1, keepdim=True).clamp(1, n - 1)
        s = torch.where(y > 0, n / (2 * positives), n / (2 * (n - positives)))
    s = C * s
    penalty = torch.ones(k + 1, dtype=x.dtype)
    penalty[-1] = 0

    def objective(theta: torch.Tensor) -> torch.Tensor:
        z = torch.bmm(design, theta.unsqueeze(-1)).squeeze(-1)
        return (s * (torch.nn.functional.softplus(z) - y * z)).sum(1) + 0.5 * (penalty * theta**2).sum(1)

    theta = torch.zeros(batch, k + 1, dtype=x.dtype)
    loss = objective(theta)
    for _ in range(max_iter):
        p = torch.sigmoid(torch.bmm(design, theta.unsqueeze(-1)).squeeze(-1))
        gradient = torch.bmm(design.transpose(1, 2), (s * (p - y)).unsqueeze(-1)).squeeze(-1) + penalty * theta
        active = gradient.abs().amax(1) > tol * n
        if not active.any():
            break
        hessian = torch.bmm(design.transpose(1, 2), design * (s * p * (1 - p)).unsqueeze(-1)) + torch.diag(penalty + 1e-10)
        step = torch.linalg.solve(hessian, gradient.unsqueeze(-1)).squeeze(-1) * active.unsqueeze(-1)
        size = torch.ones(batch, dtype=x.dtype)
        for _ in range(30):  # backtracking per problem (Armijo, with room for rounding)
            candidate = theta - size.unsqueeze(-1) * step
            new_loss = objective(candidate)
            accepted = new_loss <= loss - 1e-4 * size * (gradient * step).sum(1) + 1e-12 * loss.abs()
            if accepted.all():
                break
            size = torch.where(accepted, size, size / 2)
        theta, loss = candidate, new_loss
    return theta[:, :k], theta[:, k]


def f1_scores(predicted: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """F1 of the positive class along the last axis of bool `[..., n]` arrays (0 where there is no positive)."""
    tp = (predicted & truth).sum(-1).double()
    return 2 * tp / (predicted.sum(-1) + truth.sum(-1)).double().clamp_min(1)


def binned_mutual_info(x: np.ndarray, targets: np.ndarray, bins: int = 16) -> np.ndarray:
    """Mutual information (nats) `[C, d]` between each neuron of `x [n, d]`, cut into `bins` equal-frequency
    bins (`neuron_bins`), and each binary target column of `targets [n, C]`: one vectorized pass."""
    onehot = (neuron_bins(x, bins)[..., None] == np.arange(bins)).astype(np.float64)  # [n, d, bins]
    positive = np.einsum("nc,ndb->cdb", np.asarray(targets, dtype=np.float64), onehot)
    return mutual_info_from_tables(np.stack([onehot.sum(0) - positive, positive], -1))


def neuron_bins(x: np.ndarray, bins: int = 16) -> np.ndarray:
    """Each neuron's values as bin indices `[n, d]` in 0..bins-1, cut at its own quantiles (ties share a bin)."""
    edges = np.quantile(x, np.linspace(0, 1, bins + 1)[1:-1], axis=0)  # [bins - 1, d]
    return (x[:, None, :] > edges[None]).sum(1)


def rank_neurons(x: np.ndarray, targets: np.ndarray, ranking: str = "mean_difference") -> np.ndarray:
    """Neurons of `x [n, d]` best first for each binary target column of `targets [n, C]`: `[C, d]`.

    `mean_difference`: |mean(x | 1) - mean(x | 0)| / sqrt((var(x | 1) + var(x | 0)) / 2).
    `mutual_info`: `binned_mutual_info` (16 equal-frequency bins per neuron).
    """
    if ranking == "mean_difference":
        x, t = torch.from_numpy(np.asarray(x, dtype=np.float64)), torch.from_numpy(targets.T.astype(np.float64))  # [n, d], [C, n]
        n1, n0 = t.sum(1, keepdim=True), (1 - t).sum(1, keepdim=True)
        mean1, mean0 = t @ x / n1, (1 - t) @ x / n0
        var1, var0 = t @ x**2 / n1 - mean1**2, (1 - t) @ x**2 / n0 - mean0**2
        score = ((mean1 - mean0).abs() / ((var1 + var0) / 2).clamp_min(1e-12).sqrt()).numpy()
    elif ranking == "mutual_info":
        score = binned_mutual_info(x, targets)
    else:
        raise ToylabError(f"unknown ranking '{ranking}'; valid: {', '.join(RANKINGS)}")
    return np.argsort(-score, axis=1, kind="stable")


def random_rotation(d: int, seed: int) -> np.ndarray:
    """A random orthonormal `[d, d]` matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def sparse_probe(
    acts: np.ndarray,
    targets: np.ndarray,
    test: np.ndarray,
    ks: Sequence[int] = KS,
    rankings: Sequence[str] = RANKINGS,
    min_count: int = 10,
    seed: int = 0,
    C: float = 1.0,
) -> dict[str, Any]:
    """k-sparse probes of every target column, with the controls.

    `acts [n, d]`, `targets [n, C]` bool, `test [n]` bool (the held-out rows, whole sequences).
    A column with fewer than `min_count` positives or negatives in either split is skipped.
    Returns `{"kept": [C] bool, "f1": {variant: {ranking: [C, len(ks)]}}}` (NaN where skipped);
    the controls use the first ranking. k larger than d is clipped to d.
    """
    acts, targets, test = np.asarray(acts, dtype=np.float64), np.asarray(targets, dtype=bool), np.asarray(test, dtype=bool)
    shuffled = targets[np.random.default_rng(seed).permutation(len(targets))]
    side = np.stack([test, ~test], 1).astype(np.int64)  # [n, 2]
    kept = ((targets.T @ side).min(1) >= min_count) & (((~targets).T @ side).min(1) >= min_count)
    f1 = {v: {r: np.full((targets.shape[1], len(ks)), np.nan) for r in (rankings if v == "neurons" else rankings[:1])} for v in VARIANTS}
    if not kept.any():
        return {"kept": kept, "f1": f1}
    train = ~test
    views = {"neurons": (acts, targets), "shuffled": (acts, shuffled), "random_basis": (acts @ random_rotation(acts.shape[1], seed), targets)}
    problems = []  # (variant, ranking, standardized activations, targets, neuron order)
    for variant, (x, t) in views.items():
        x = (x - x[train].mean(0)) / np.maximum(x[train].std(0), 1e-6)
        for ranking in f1[variant]:
            problems.append((variant, ranking, x, t[:, kept], rank_neurons(x[train], t[train][:, kept], ranking)))
    y = torch.from_numpy(np.concatenate([t.T for _, _, _, t, _ in problems]))  # [problems * classes, n]
    for j, k in enumerate(ks):  # every problem of one k in one batched fit
        chosen = torch.from_numpy(np.concatenate([x[:, order[:, :k]].transpose(1, 0, 2) for _, _, x, _, order in problems]))
        w, b = fit_binary_logistic(chosen[:, train], y[:, train], C)
        predicted = torch.bmm(chosen[:, test].double(), w.unsqueeze(-1)).squeeze(-1) + b.unsqueeze(-1) > 0
        scores = f1_scores(predicted, y[:, test]).numpy().reshape(len(problems), -1)
        for (variant, ranking, *_), score in zip(problems, scores):
            f1[variant][ranking][kept, j] = score
    return {"kept": kept, "f1": f1}


def binary_targets(values: np.ndarray, label: Label, max_classes: int | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One-vs-rest targets of a label at `n` tokens: `(targets [n, C] bool, defined [n] bool, classes)`.

    `values` is `[n]` (IGNORE where undefined) or `[n, n_classes]` for multi-hot labels (a token has
    every class of its set). With `max_classes`, only the most frequent classes are kept (ties: lowest first).
    """
    if label.multi_hot:
        defined = (values != IGNORE).all(-1)
        onehot = values == 1
    else:
        defined = values != IGNORE
        onehot = np.maximum(values, 0)[:, None] == np.arange(label.n_classes)
    frequency = (onehot & defined[:, None]).sum(0)
    classes = [c for c in np.argsort(-frequency, kind="stable") if frequency[c] > 0][:max_classes]
    classes = sorted(int(c) for c in classes)
    return onehot[:, classes] & defined[:, None], defined, classes


def layer_units(model: Transformer, task: Task, batch: Batch, layer: int) -> list[tuple[int | None, np.ndarray, np.ndarray]]:
    """`(expert, neuron activations [n_e, d], token index [n_e])` per probed unit of a layer's FFN.

    Token indices count the task's real positions in row-major order. A dense MLP is one unit
    (expert None, every token); each expert of an MoE layer is a unit over the tokens routed to it.
    """
    if not isinstance(model.blocks[layer].mlp, MoE):
        post = token_activations(model, task, batch, [NEURONS.format(layer=layer)])[NEURONS.format(layer=layer)]
        return [(None, post, np.arange(len(post)))]
    names = [NEURONS.format(layer=layer), EXPERTS.format(layer=layer)]
    acts = token_activations(model, task, batch, names)
    post, experts = acts[names[0]], acts[names[1]]  # [n, k, d_expert], [n, k]; a token uses an expert at most once
    return [(e, post[experts == e], (experts == e).nonzero()[0]) for e in range(model.blocks[layer].mlp.n_experts)]


def sparse_probing(
    model: Transformer,
    task: Task,
    batch: Batch,
    ks: Sequence[int] = KS,
    rankings: Sequence[str] = RANKINGS,
    min_count: int = 10,
    max_classes: int | None = 8,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """k-sparse probing of every FFN layer's neurons for every class of every label of `task`.

    One row per (layer, label, class, variant, ranking): `f1` over `ks` of the best unit (the MLP,
    or the expert with the highest F1 at the first k), `expert` (that expert, None for dense),
    `expert_f1` (every expert's F1 at each k, None where skipped) and `skipped` (experts with too few
    positives or negatives). Classes no unit can probe are left out. The split is by sequence.
    """
    keep = task.positions(batch)
    sequence = np.broadcast_to(np.arange(len(batch))[:, None], keep.shape)[keep]
    test = np.zeros(len(sequence), dtype=bool)
    test[split(len(sequence), test_fraction, seed, sequence)[1]] = True
    rows = []
    for layer in range(model.cfg.n_layers):
        units = layer_units(model, task, batch, layer)
        for name, label in task.labels.items():
            targets, defined, classes = binary_targets(batch.labels[name][keep], label, max_classes)
            per_unit = []
            for _, acts, tokens in units:
                used = defined[tokens]
                per_unit.append(sparse_probe(acts[used], targets[tokens[used]], test[tokens[used]], ks, rankings, min_count, seed))
            for i, cls in enumerate(classes):
                usable = [u for u, result in enumerate(per_unit) if result["kept"][i]]
                if not usable:
                    continue
                for variant, by_ranking in per_unit[0]["f1"].items():
                    for ranking in by_ranking:
                        scores = np.stack([result["f1"][variant][ranking][i] for result in per_unit])  # [units, ks]
                        best = max(usable, key=lambda u: scores[u, 0])
                        rows.append({
                            "layer": layer, "label": name, "class": label.classes[cls], "variant": variant, "ranking": ranking,
                            "f1": scores[best].tolist(), "expert": units[best][0],
                            "expert_f1": [s.tolist() if u in usable else None for u, s in enumerate(scores)] if len(units) > 1 else None,
                            "skipped": [units[u][0] for u in range(len(units)) if u not in usable],
                        })
    return rows


def skipped_pairs(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per model: (expert, class) pairs skipped for too few positives or negatives, and pairs in all, summed over seeds and layers."""
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        if row["variant"] == "neurons" and row["ranking"] == RANKINGS[0] and row["expert_f1"] is not None:
            count = counts.setdefault(row["model"], {"pairs": 0, "of": 0})
            count["pairs"] += len(row["skipped"])
            count["of"] += len(row["expert_f1"])
    return counts


def class_scores(rows: Sequence[dict[str, Any]], ks: Sequence[int] = KS) -> pd.DataFrame:
    """`sparse_probing` rows (with `model` and `seed` keys) as one row per (model, seed, layer, label, class, variant, ranking, k)."""
    frame = pd.DataFrame([{key: row[key] for key in ("model", "seed", "layer", "label", "class", "variant", "ranking", "f1")}
                          for row in rows])
    frame["k"] = [list(ks)] * len(frame)
    return frame.explode(["f1", "k"]).astype({"f1": float, "k": int}).reset_index(drop=True)


def with_lift(scores: pd.DataFrame) -> pd.DataFrame:
    """`class_scores` plus rows of variant `lift`: each class's F1 (first ranking) minus its shuffled control."""
    keys = ["model", "seed", "layer", "label", "class", "k"]
    control = scores[scores["variant"] == "shuffled"].set_index(keys)["f1"]
    neurons = scores[(scores["variant"] == "neurons") & (scores["ranking"] == RANKINGS[0])].set_index(keys)
    lift = neurons.assign(f1=neurons["f1"] - control.reindex(neurons.index), variant="lift").reset_index()
    return pd.concat([scores, lift[scores.columns]], ignore_index=True)


def macro_f1(scores: pd.DataFrame) -> list[dict[str, Any]]:
    """Per (model, layer, label, variant, ranking, k): F1 averaged over classes, mean and 95% CI over seeds."""
    keys = ["model", "layer", "label", "variant", "ranking", "k"]
    per_seed = scores.groupby([*keys, "seed"], sort=False)["f1"].mean().reset_index()
    return [{**dict(zip(keys, group)), "f1": mean_ci(part["f1"], bounds=LIFT if group[3] == "lift" else UNIT)}
            for group, part in per_seed.groupby(keys, sort=False)]


def gaps(scores: pd.DataFrame, a: dict[str, Any], b: dict[str, Any], by: Sequence[str] = ("layer", "label")) -> pd.DataFrame:
    """Per seed and group: macro F1 of selection `a` minus selection `b` over the classes both probe.

    `a` and `b` select rows by column values (e.g. `{"model": "moe-k1-e4", "variant": "neurons"}`);
    returns columns `[*by, "seed", "a", "b", "gap"]`.
    """
    def pick(selection: dict[str, Any]) -> pd.DataFrame:
        mask = np.logical_and.reduce([scores[column] == value for column, value in selection.items()])
        return scores[mask].set_index(list(dict.fromkeys([*by, "seed", "layer", "label", "class"])))["f1"]

    both = pd.concat({"a": pick(a), "b": pick(b)}, axis=1).dropna()
    per_seed = both.groupby([*by, "seed"], sort=False).mean().reset_index()
    return per_seed.assign(gap=per_seed["a"] - per_seed["b"])


def compare_gaps(
    per_seed: pd.DataFrame, by: Sequence[str] = ("layer", "label"), margin: float = MARGIN, bounds: tuple[float, float] = UNIT
) -> list[dict[str, Any]]:
    """Per group of `gaps` output: mean [95% CI] of `a`, `b` (within `bounds`), and the verdict on `a - b` paired over seeds."""
    return [
        {**dict(zip(by, group if isinstance(group, tuple) else (group,))), "a": mean_ci(part["a"], bounds=bounds), "b": mean_ci(part["b"], bounds=bounds),
         "gap": verdict(part["gap"], margin)}
        for group, part in per_seed.groupby(list(by), sort=False)
    ]


def gap_trend(
    per_model: dict[str, pd.DataFrame], sparsity: dict[str, float], by: Sequence[str] = ("layer", "label"), margin: float = MARGIN
) -> list[dict[str, Any]]:
    """Does a gap widen with sparser routing? Per seed and group, the least-squares slope of the gap
    (`gaps` output per model) on the models' routing sparsity; mean [95% CI] over seeds and verdict vs 0."""
    frame = pd.concat([g.assign(sparsity=sparsity[model]) for model, g in per_model.items()])
    slopes = (frame.groupby([*by, "seed"], sort=False)
              .apply(lambda g: np.polyfit(g["sparsity"], g["gap"], 1)[0] if g["sparsity"].nunique() > 1 else np.nan,
                     include_groups=False)
              .rename("slope").reset_index())
    return [{**dict(zip(by, group if isinstance(group, tuple) else (group,))), "slope": verdict(part["slope"], margin)}
            for group, part in slopes.groupby(list(by), sort=False)]


def verdict(differences: Sequence[float], margin: float = MARGIN) -> dict[str, Any]:
    """`compare` of per-seed differences with 0: more, less, equivalent (inside +-margin) or inconclusive."""
    differences = np.asarray(differences, dtype=np.float64)
    return compare(differences, np.zeros_like(differences), margin)
