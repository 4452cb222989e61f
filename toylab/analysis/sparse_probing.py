"""k-sparse probing (Gurnee et al. 2023): how well do the best k neurons of a unit read a binary feature?

For every class c of a label, the binary task "this token has class c" is probed from a unit's
activations (a dense MLP on every token, or one expert on the tokens routed to it, as Herbst et al.
(2026) do). The tokens are split by sequence three ways (`SPLITS`): on `train`, neurons are ranked by a
cheap score (`mean_difference`: the difference of the class means over their pooled standard deviation;
or `mutual_info`, the mutual information between the neuron, in equal-frequency bins, and the target, as
a robustness check) and a logistic probe is fit on the top k; its F1 is measured on `select` and on
`report`. Each unit first draws the same number of candidate neurons (`n_candidates`, at random), so a
wider unit does not win by size. Two controls run the same procedure: `shuffled` on every unit (the
targets permuted across the unit's tokens) and `random_basis` on the model's own units (`OWN`: the candidates
in a random orthonormal basis: is a neuron basis better than any basis?).

A unit's **lift** is its F1 minus its own shuffled F1, computed before any maximum. Per class, the unit
with the highest lift on `select` is chosen and its lift and F1 are scored on `report`, so the maximum
over E units is not scored on the data it was chosen on; the mean lift over units is reported beside it.
The same selection runs on E **pseudo-experts** of the dense model (its neurons on subsets of the same
tokens): a random partition of matched sizes, the MoE's own partition, and k-means on the dense model's
router-input site; comparing experts with them is the test of "expert neurons are less polysemantic".
The old design's quantity (the largest F1 over units, chosen on the split it is scored on) is kept as
`max_f1`, to show the selection bias. The logistic fits are batched Newton steps in float32 (scikit-learn's
objective to a gradient of `TOL` per row, checked against it in the tests), every probe of every unit, class and k
of every layer together (`probe_units`, `sparse_probes`, `probe_scores`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from toylab.analysis.clustering import kmeans, mutual_info_from_tables
from toylab.analysis.specialization import ROUTER_INPUT, token_activations
from toylab.analysis.stats import MARGIN, UNIT, compare, correct_families, mean_ci
from toylab.errors import ToylabError
from toylab.models import Transformer
from toylab.models.moe import MoE
from toylab.task import IGNORE, Batch, Label, Task

KS = (1, 2, 4, 8, 16)
RANKINGS = ("mean_difference", "mutual_info")
VARIANTS = ("neurons", "shuffled", "random_basis")
"""What is probed: the neurons; the neurons with permuted targets; a random orthonormal basis of the same candidates."""
SPLITS = ("train", "select", "report")
"""Token splits by sequence: fit the probe; choose the unit; score it."""
FRACTIONS = (0.25, 0.25)
"""Default shares of the sequences in `select` and `report` (the rest trains)."""
OWN = ("dense", "experts")
"""A model's own units: the only sources also probed in a random basis (pseudo-experts are the dense model's neurons,
whose basis the dense MLP's own row already tests)."""
PSEUDO = ("partition", "random", "kmeans")
"""Pseudo-experts of the dense model: the MoE's own token partition, a random partition of the same sizes, k-means on the router input."""
MEASURES = ("f1", "lift", "mean_lift", "max_f1")
"""Per class and k: the chosen unit's report F1 and lift, the mean lift over units, the largest report F1 over units (old design)."""
BOUNDS = {"f1": UNIT, "max_f1": UNIT, "lift": (-1.0, 1.0), "mean_lift": (-1.0, 1.0)}
LIFT = BOUNDS["lift"]
"""Bounds of an F1 minus its control."""
NEURONS = "blocks.{layer}.mlp.hook_post"
EXPERTS = "blocks.{layer}.mlp.hook_expert_indices"
BATCH_BYTES = 2**25
"""About the most working memory (bytes) of one batch of probe fits (`probe_scores`)."""
PADDING = 0.5
"""A batch of probes pads their training rows to the longest; a probe joins only with at least this share of them."""

TOL = 1e-6
"""A logistic fit stops when its gradient's largest entry is at most this times its row count: coefficients within
about 1e-4 of the optimum (1.1e-4 on the tests' planted problems), far above float32's rounding of the gradient
(about 1e-7 / sqrt(n) of it)."""

Units = list[tuple[np.ndarray, np.ndarray]]
"""Probed units: `(activations [n_u, d] or [n_u, k, d] slots already selected, token index [n_u])` each."""


def sample_weights(y: torch.Tensor, mask: torch.Tensor | None, C: float = 1.0, balanced: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's weight in the loss `[B, n]` (0 off `mask`) and each problem's row count `[B]`: `C` times
    scikit-learn's `class_weight="balanced"` (`n / (2 n_class)`) when `balanced`, else `C`."""
    y = y.double()
    rows = torch.ones_like(y) if mask is None else mask.double()
    count = rows.sum(1)
    s = rows
    if balanced:
        positives = torch.minimum((y * rows).sum(1), count - 1).clamp_min(1).unsqueeze(1)
        s = rows * torch.where(y > 0, count.unsqueeze(1) / (2 * positives), count.unsqueeze(1) / (2 * (count.unsqueeze(1) - positives)))
    return C * s, count


def fit_logistic(
    design: torch.Tensor, y: torch.Tensor, s: torch.Tensor, count: torch.Tensor,
    init: torch.Tensor | None = None, max_iter: int = 100, tol: float = TOL,
) -> torch.Tensor:
    """Binary logistic regressions by Newton's method in float32 on `design [B, 1 + k, n]` (intercept row first),
    `y [B, n]` 0/1, row weights `s` and counts (`sample_weights`); returns `theta [B, 1 + k]`, intercept first.
    `init [B, 1 + k']`, k' <= k: where to start (zeros elsewhere).

    Minimizes scikit-learn's objective `|w|^2 / 2 + sum_i s_i * logloss_i` (intercept not penalized) until the
    gradient's largest entry is at most `tol` times the row count (`newton`).
    """
    batch, width, _ = design.shape
    penalty = torch.ones(width)
    penalty[0] = 0
    theta = torch.zeros(batch, width)
    if init is not None:
        theta[:, : init.shape[1]] = init
    return newton(design, y.float(), s.float(), penalty, count.float(), theta, tol, max_iter)


def newton(
    design: torch.Tensor, y: torch.Tensor, s: torch.Tensor, penalty: torch.Tensor,
    count: torch.Tensor, theta: torch.Tensor, tol: float, max_iter: int, halvings: int = 30,
) -> torch.Tensor:
    """Newton steps on `B` logistic problems (`fit_logistic`) from `theta [B, 1 + k]`; returns `theta`.

    A problem stops when its gradient's largest entry is at most `tol * count`; stopped problems leave the batch once
    they are half of it. Each step backtracks on the squared gradient norm (Newton's direction lowers it, and the
    gradient at the accepted point is the next step's, so no objective is evaluated); a problem whose step is
    refused `halvings` times stops where it is (rounding's floor). Hessians are solved in float64.
    """
    out, live, stopped = theta.clone(), torch.arange(len(theta)), torch.zeros(len(theta), dtype=torch.bool)
    weighted = torch.empty_like(design)  # design * s p (1 - p) at each step, in one buffer: fresh memory is slow
    ridge, sy = torch.diag(penalty.double() + 1e-10), s * y

    def gradient_at(theta: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = torch.sigmoid(z)
        sp = s * p
        return p, sp, torch.baddbmm((penalty * theta).unsqueeze(1), (sp - sy).unsqueeze(1), design.transpose(1, 2)).squeeze(1)

    z = torch.bmm(theta.unsqueeze(1), design).squeeze(1)  # row vectors times [1 + k, n]: faster than design' theta
    p, sp, gradient = gradient_at(theta, z)
    merit, limit = (gradient**2).sum(1), tol * count
    for _ in range(max_iter + 1):
        done = (gradient.abs().amax(1) <= limit) & ~stopped
        if done.any():
            out[live[done]] = theta[done]
            stopped |= done
            if stopped.all():
                return out
            if 2 * stopped.sum() >= len(live):  # copying the live problems costs about a step: only once half have stopped
                keep = ~stopped
                live, design, sy, s, limit, theta, z, p, sp, gradient, merit, stopped = (
                    t[keep] for t in (live, design, sy, s, limit, theta, z, p, sp, gradient, merit, stopped))
        weights = torch.mul(design, torch.addcmul(sp, sp, p, value=-1).unsqueeze(1), out=weighted[: len(live)])  # s p (1 - p)
        hessian = torch.bmm(weights, design.transpose(1, 2)).double() + ridge
        factor, failed = torch.linalg.cholesky_ex(hessian)
        step = (torch.cholesky_solve(gradient.double().unsqueeze(-1), factor) if not failed.any()
                else torch.linalg.solve(hessian, gradient.double().unsqueeze(-1))).squeeze(-1).float() * ~stopped.unsqueeze(1)
        moved = torch.bmm(step.unsqueeze(1), design).squeeze(1)
        size, candidate, candidate_z = torch.ones(len(live)), theta - step, z - moved
        for _ in range(halvings):
            new_p, new_sp, new_gradient = gradient_at(candidate, candidate_z)
            new_merit = (new_gradient**2).sum(1)
            accepted = (new_merit <= (1 - 1e-4 * size) * merit) | (new_merit <= (limit / 2) ** 2) | stopped  # or converged anyway
            if accepted.all():
                break
            size = torch.where(accepted, size, size / 2)
            candidate, candidate_z = theta - size.unsqueeze(-1) * step, torch.addcmul(z, size.unsqueeze(-1), moved, value=-1)
        if accepted.all():
            theta, z, p, sp, gradient, merit = candidate, candidate_z, new_p, new_sp, new_gradient, new_merit
            continue
        out[live[~accepted]] = theta[~accepted]  # no step found: rounding's floor
        stopped |= ~accepted
        keep = accepted.unsqueeze(1)
        theta, z = torch.where(keep, candidate, theta), torch.where(keep, candidate_z, z)
        p, sp = torch.where(keep, new_p, p), torch.where(keep, new_sp, sp)
        gradient, merit = torch.where(keep, new_gradient, gradient), torch.where(accepted, new_merit, merit)
    out[live[~stopped]] = theta[~stopped]
    return out


def f1_scores(predicted: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """F1 of the positive class along the last axis of bool `[..., n]` arrays (0 where there is no positive)."""
    return f1_from_counts((predicted & truth).sum(-1), predicted.sum(-1), truth.sum(-1))


def f1_from_counts(true_positives: torch.Tensor, predicted: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """F1 of the positive class from counts of true positives, predicted positives and positives (0 where there are none)."""
    return 2 * true_positives.double() / (predicted + positives).double().clamp_min(1)


def binned_mutual_info(x: np.ndarray, targets: np.ndarray, bins: int = 16) -> np.ndarray:
    """Mutual information (nats) `[C, d]` between each neuron of `x [n, d]`, cut into `bins` equal-frequency
    bins (`neuron_bins`), and each binary target column of `targets [n, C]`: one vectorized pass."""
    n, d = x.shape
    cell = (neuron_bins(x, bins) + bins * np.arange(d)).ravel()  # each (row, neuron)'s (neuron, bin) cell
    counts = np.bincount(cell, minlength=d * bins).reshape(d, bins)
    positive = np.stack([np.bincount(cell, np.repeat(column, d), d * bins).reshape(d, bins)
                         for column in np.asarray(targets, dtype=np.float64).T])  # [C, d, bins]
    return mutual_info_from_tables(np.stack([counts - positive, positive], -1))


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


def sequence_splits(sequence: np.ndarray, seed: int, fractions: tuple[float, float] = FRACTIONS) -> np.ndarray:
    """Each token's split `[n]` (0 train, 1 select, 2 report, as `SPLITS`): `fractions` of the sequences go to
    select and to report, whole sequences to one split."""
    if min(fractions) <= 0 or sum(fractions) >= 1:
        raise ToylabError(f"select and report fractions must be positive and sum to less than 1 (got {fractions})")
    unique, index = np.unique(sequence, return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(unique))
    n_select, n_report = (max(1, round(f * len(unique))) for f in fractions)
    which = np.zeros(len(unique), dtype=np.int64)
    which[order[:n_report]] = 2
    which[order[n_report:n_report + n_select]] = 1
    return which[index]


def sparse_probe(
    acts: np.ndarray,
    targets: np.ndarray,
    part: np.ndarray,
    ks: Sequence[int] = KS,
    rankings: Sequence[str] = RANKINGS,
    min_count: int = 10,
    seed: int | Sequence[int] = 0,
    C: float = 1.0,
    n_candidates: int | None = None,
) -> dict[str, Any]:
    """k-sparse probes of every target column of one unit, with the controls (`sparse_probes` of one unit).

    `acts [n, d]`, `targets [n, C]` bool, `part [n]` the split of each row (`sequence_splits`). With
    `n_candidates` < d, a random subset of that many neurons (drawn from `seed`) is probed. A column with
    fewer than `min_count` positives or negatives in any split is skipped. Returns `{"kept": [C] bool,
    "f1": {variant: {ranking: [C, 2, len(ks)]}}}`: F1 on select and on report (NaN where skipped); the
    random basis uses the first ranking. k larger than the candidates is clipped.
    """
    return sparse_probes([(acts, targets, part, seed, True)], ks, rankings, min_count, C, n_candidates)[0]


def sparse_probes(
    units: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, int | Sequence[int], bool]],
    ks: Sequence[int] = KS,
    rankings: Sequence[str] = RANKINGS,
    min_count: int = 10,
    C: float = 1.0,
    n_candidates: int | None = None,
) -> list[dict[str, Any]]:
    """`sparse_probe` of many units `(acts, targets, part, seed, basis)`, every probe of every unit fitted in one batched set
    (`probe_scores`); a unit whose `basis` is False skips the random-basis control."""
    results, blocks = [], []
    for acts, targets, part, seed, basis in units:
        targets, part = np.asarray(targets, dtype=bool), np.asarray(part)
        rng = np.random.default_rng(seed)
        d = acts.shape[1]
        candidates = np.sort(rng.choice(d, n_candidates, replace=False)) if n_candidates is not None and n_candidates < d else np.arange(d)
        permutation = rng.permutation(len(targets))
        side = (part[:, None] == np.arange(len(SPLITS))).astype(np.int64)  # [n, 3]
        kept = ((targets.T @ side).min(1) >= min_count) & (((~targets).T @ side).min(1) >= min_count)
        variants = dict(zip(VARIANTS if basis else VARIANTS[:2], (rankings, rankings, rankings[:1])))
        f1 = {v: {r: np.full((targets.shape[1], 2, len(ks)), np.nan) for r in rs} for v, rs in variants.items()}
        results.append({"kept": kept, "f1": f1})
        if not kept.any():
            continue
        rows = np.argsort(part, kind="stable")  # training rows first
        n_train = int((part == 0).sum())
        neurons = np.asarray(acts)[np.ix_(rows, candidates)].astype(np.float64, copy=False)  # a copy: standardized in place
        bases = {"neurons": neurons}
        if basis:
            bases["random_basis"] = neurons @ random_rotation(len(candidates), rng.integers(2**32))
        for x in bases.values():  # standardized on the training rows
            x -= x[:n_train].mean(0)
            x /= np.maximum(x[:n_train].std(0), 1e-6)
        features = {name: np.ascontiguousarray(x.T, dtype=np.float32) for name, x in bases.items()}  # [d, n], as probe_scores gathers them
        truth = targets[rows][:, kept]
        views = {"neurons": ("neurons", truth), "shuffled": ("neurons", targets[permutation[rows]][:, kept]), "random_basis": ("random_basis", truth)}
        for variant in f1:
            base, t = views[variant]
            for ranking in f1[variant]:
                order = rank_neurons(bases[base][:n_train], t[:n_train], ranking)
                blocks.append((features[base], t, part[rows], order, f1[variant][ranking], kept))
    for (*_, out, kept), scores in zip(blocks, probe_scores([block[:4] for block in blocks], ks, C)):
        out[kept] = scores
    return results


def probe_scores(
    blocks: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], ks: Sequence[int] = KS, C: float = 1.0
) -> list[np.ndarray]:
    """F1 on select and on report `[C, 2, len(ks)]` of the k-sparse probes of each block `(x [d, n], targets [n, C] bool,
    part [n] sorted, order [C, d])`: for every column c and k, a balanced logistic probe (`fit_logistic`) on the
    training rows of neurons `order[c, :k]` (k clipped to d), scored on the select and report rows.

    Every probe of every block is fitted in batches of blocks with similar training rows (`PADDING`), each within about
    `BATCH_BYTES` (a larger block on its own); in a batch, each k starts from the previous k's fit, whose neurons come first.
    """
    top = max(ks)
    width = [min(top, len(x)) for x, *_ in blocks]
    n_train = [int((part == 0).sum()) for _, _, part, _ in blocks]
    queue = sorted(range(len(blocks)), key=lambda b: (-width[b], -n_train[b]))
    scores: list[np.ndarray] = [np.empty(0)] * len(blocks)
    while queue:
        first = queue[0]
        n_rows = max(blocks[first][0].shape[1], 1)
        batch, problems = [], 0
        row_bytes = 4 * (2 * width[first] + 17)  # float32 design and weighted design ([1 + k, n]), ~15 [n] vectors
        for b in queue:
            fits = problems + blocks[b][3].shape[0]
            if batch and (width[b] != width[first] or n_train[b] < PADDING * n_train[first]
                          or fits * max(n_rows, blocks[b][0].shape[1]) * row_bytes > BATCH_BYTES):
                break
            batch.append(b)
            problems, n_rows = fits, max(n_rows, blocks[b][0].shape[1])
        queue = queue[len(batch):]
        width_, rows = 1 + width[first], n_train[first]  # intercept row, then features; the most training rows
        held_out = max(blocks[b][0].shape[1] - n_train[b] for b in batch)
        train, held = torch.empty(problems, width_, rows), torch.empty(problems, width_, held_out)  # features [k, n]
        train[:, 0], held[:, 0] = 1, 1
        y, mask = torch.zeros(problems, rows, dtype=torch.bool), torch.zeros(problems, rows, dtype=torch.bool)
        scored = torch.zeros(problems, 4, held_out)  # select rows, report rows, and their positives
        at = np.cumsum([0] + [blocks[b][3].shape[0] for b in batch])
        for b, start, end in zip(batch, at[:-1], at[1:]):
            features, targets, block_part, order = blocks[b]
            n, t = features.shape[1], n_train[b]
            for columns, design in ((features[:, :t], train), (features[:, t:], held)):  # each class's neurons, [C, k, columns]
                np.take(columns, order[:, : width_ - 1], 0, design.numpy()[start:end, 1:, : columns.shape[1]], "clip")
                design[start:end, 1:, columns.shape[1] :] = 0
            y[start:end, :t], mask[start:end, :t] = torch.from_numpy(targets[:t].T), True
            split, truth = torch.from_numpy(block_part[t:]), torch.from_numpy(targets[t:].T)
            sides = torch.stack([split == 1, split == 2])  # [2, n - t]
            scored[start:end, :2, : n - t], scored[start:end, 2:, : n - t] = sides, truth.unsqueeze(1) & sides
        weights, positives = sample_weights(y, mask, C), scored[:, 2:].sum(-1)
        found, theta = np.empty((problems, 2, len(ks))), None
        for j, k in enumerate(ks):
            k = min(k, width_ - 1)
            if theta is None or theta.shape[1] != 1 + k:
                theta = fit_logistic(train[:, : 1 + k], y, *weights, init=theta)
                predicted = (torch.bmm(theta.unsqueeze(1), held[:, : 1 + k]) > 0).float()  # [B, 1, held_out]
                counts = torch.bmm(scored, predicted.transpose(1, 2)).squeeze(-1)  # predicted positives on select and report, then true positives
                f1 = f1_from_counts(counts[:, 2:], counts[:, :2], positives)
            found[:, :, j] = f1.numpy()
        for b, start, end in zip(batch, at[:-1], at[1:]):
            scores[b] = found[start:end]
    return scores


def select_unit(results: Sequence[dict[str, Any]], column: int, variant: str, ranking: str) -> dict[str, list]:
    """One class's scores over units (`sparse_probe` results, at least one keeping `column`), per k.

    Each unit's lift is its F1 minus its own shuffled F1 (same ranking). The unit with the highest lift on
    select is chosen, per k; returns its report `f1` and `lift`, the `mean_lift` over units on report, the
    largest report F1 over units (`max_f1`, the old selection-biased quantity) and the chosen `unit` index.
    For `shuffled`, the unit chosen for the neurons is scored with its shuffled F1 (lifts NaN).
    """
    usable = [u for u, result in enumerate(results) if result["kept"][column]]

    def stack(v: str) -> np.ndarray:  # [units, 2, ks]
        return np.stack([results[u]["f1"][v][ranking][column] for u in usable])

    probed, control = stack(variant), stack("shuffled")
    lift = stack("neurons" if variant == "shuffled" else variant) - control
    best = lift[:, 0].argmax(0)  # [ks], on select
    at = np.arange(lift.shape[2])
    own_lift = np.full(len(at), np.nan) if variant == "shuffled" else lift[best, 1, at]
    mean_lift = np.full(len(at), np.nan) if variant == "shuffled" else lift[:, 1].mean(0)
    return {"f1": probed[best, 1, at].tolist(), "lift": own_lift.tolist(), "mean_lift": mean_lift.tolist(),
            "max_f1": probed[:, 1].max(0).tolist(), "unit": [usable[b] for b in best]}


def probe_units(
    layers: Sequence[Mapping[str, Units]],
    values: Mapping[str, np.ndarray],
    labels: Mapping[str, Label],
    part: np.ndarray,
    ks: Sequence[int] = KS,
    rankings: Sequence[str] = RANKINGS,
    min_count: int = 10,
    max_classes: int | None = 8,
    n_candidates: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """k-sparse probing of every class of every label in every source of units of every layer, with selection (`select_unit`).

    `layers[l]` maps a source's name ("dense", "experts", a `PSEUDO` name) to its units; `values[name]` are a label's
    values at the `n` tokens (`binary_targets`), `part [n]` their splits. Unit u of a source draws its candidates from
    `(seed, u)`, the same for every source and layer. One row per (layer, label, class, source, variant, ranking):
    `layer`, `units` (the source), `select_unit`'s lists over `ks`, `n_units` and `skipped` (units with too few
    positives or negatives). A class no unit of a source can probe is left out of that source. Only the `OWN`
    sources are probed in a random basis.

    Every probe of every layer is fitted in one set (`sparse_probes`), and labels defined on the same tokens are probed
    together, their classes side by side as the columns of one set of targets, so each unit's activations are
    prepared (candidates drawn, rotated, standardized, ranked) once for all of them.
    """
    targets = {name: binary_targets(values[name], label, max_classes) for name, label in labels.items()}
    together: dict[bytes, list[str]] = {}
    for name, (_, defined, _) in targets.items():
        together.setdefault(np.packbits(defined).tobytes(), []).append(name)
    inputs, spans = [], {}  # sparse_probes inputs; (layer, label, source) -> (first input, its columns)
    for names in together.values():
        defined, joined = targets[names[0]][1], np.concatenate([targets[name][0] for name in names], 1)
        ends = np.cumsum([targets[name][0].shape[1] for name in names])
        for layer, sources in enumerate(layers):
            for source, units in sources.items():
                spans.update({(layer, name, source): (len(inputs), slice(end - targets[name][0].shape[1], end))
                              for name, end in zip(names, ends)})
                for u, (acts, tokens) in enumerate(units):
                    used = defined[tokens]
                    inputs.append((acts[used], joined[tokens[used]], part[tokens[used]], (seed, u), source in OWN))
    found = sparse_probes(inputs, ks, rankings, min_count, n_candidates=n_candidates)
    rows = []
    for layer, sources in enumerate(layers):
        for name in labels:
            for source, units in sources.items():
                first, columns = spans[layer, name, source]
                rows += [{"layer": layer, **row} for row in unit_rows(name, labels[name], targets[name][2], source, [
                    {"kept": r["kept"][columns], "f1": {v: {rank: f1[columns] for rank, f1 in by.items()} for v, by in r["f1"].items()}}
                    for r in found[first : first + len(units)]])]
    return rows


def unit_rows(name: str, label: Label, classes: Sequence[int], source: str, results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of one label's probes over one source's units (`results`, one per unit): per class kept by some unit,
    variant and ranking, the unit chosen on the selection split and its scores (`select_unit`), and the units that
    skipped the class."""
    rows = []
    for i, cls in enumerate(classes):
        if not any(result["kept"][i] for result in results):
            continue
        skipped = [u for u, result in enumerate(results) if not result["kept"][i]]
        for variant, by_ranking in results[0]["f1"].items():
            for ranking in by_ranking:
                rows.append({"label": name, "class": label.classes[cls], "units": source, "variant": variant, "ranking": ranking,
                             **select_unit(results, i, variant, ranking), "n_units": len(results), "skipped": skipped})
    return rows


def partition_units(post: np.ndarray, assignment: np.ndarray, n_units: int) -> Units:
    """Units of a partition of the tokens: unit e holds the tokens with e in `assignment [n, k]` (a token at most once).

    `post [n, k, d]` (an MoE's expert activations: each token's slot of unit e) or `[n, d]` (a dense MLP:
    the same neurons, so unit e is a pseudo-expert made of the dense neurons on those tokens).
    """
    units = []
    for e in range(n_units):
        hit = assignment == e
        tokens = hit.any(1).nonzero()[0]
        units.append((post[hit] if post.ndim == 3 else post[tokens], tokens))
    return units


def pseudo_assignments(routing: np.ndarray, router_input: np.ndarray, n_experts: int, seed: int) -> dict[str, np.ndarray]:
    """Token partitions `[n, k]` of the `PSEUDO` pseudo-experts, matched to an MoE's `routing [n, k]`.

    `partition`: the routing itself. `random`: the routing of a random permutation of the tokens (the same
    unit sizes, nothing to do with the tokens). `kmeans`: k-means with `n_experts` clusters on `router_input
    [n, d]` (the dense model's router-input site); each token joins its k nearest centroids, as a top-k router would.
    """
    clusters = kmeans(router_input, n_experts, seed)
    centroids = np.stack([router_input[clusters == c].mean(0) for c in range(n_experts)])
    distance = ((router_input[:, None, :] - centroids[None]) ** 2).sum(-1)  # [n, E]
    nearest = np.argsort(distance, axis=1, kind="stable")[:, : routing.shape[1]]
    return {"partition": routing, "random": routing[np.random.default_rng(seed).permutation(len(routing))], "kmeans": nearest}


def layer_sources(
    post: np.ndarray, routing: np.ndarray | None, n_experts: int = 1,
    dense_post: np.ndarray | None = None, router_input: np.ndarray | None = None, seed: int = 0,
) -> dict[str, Units]:
    """A layer's sources of units: `dense` (the MLP `post [n, d]` on every token) when `routing` is None; else
    `experts` (`post [n, k, d]` by `routing [n, k]`) and, given the dense model's `dense_post [n, d]` and
    `router_input [n, d_model]` on the same tokens, its `PSEUDO` pseudo-experts (`pseudo_assignments`)."""
    if routing is None:
        return {"dense": [(post, np.arange(len(post)))]}
    sources = {"experts": partition_units(post, routing, n_experts)}
    if dense_post is not None and router_input is not None:
        for name, assignment in pseudo_assignments(routing, router_input, n_experts, seed).items():
            sources[name] = partition_units(dense_post, assignment, n_experts)
    return sources


def ffn_activations(
    model: Transformer, task: Task, batch: Batch, sites: Sequence[str] = ()
) -> tuple[list[tuple[np.ndarray, np.ndarray | None]], dict[str, np.ndarray]]:
    """Every layer's FFN activations at the task's real positions, dense `(post [n, d_mlp], None)` or MoE
    `(post [n, k, d_expert], expert indices [n, k])`, and the activations at hook points `sites`: one forward pass."""
    moe = [isinstance(block.mlp, MoE) for block in model.blocks]
    names = [NEURONS.format(layer=layer) for layer in range(len(moe))]
    names += [EXPERTS.format(layer=layer) for layer in range(len(moe)) if moe[layer]] + list(sites)
    acts = token_activations(model, task, batch, names)
    layers = [(acts[NEURONS.format(layer=layer)], acts[EXPERTS.format(layer=layer)] if moe[layer] else None) for layer in range(len(moe))]
    return layers, {site: acts[site] for site in sites}


def sparse_probing(
    model: Transformer,
    task: Task,
    batch: Batch,
    ks: Sequence[int] = KS,
    rankings: Sequence[str] = RANKINGS,
    min_count: int = 10,
    max_classes: int | None = 8,
    fractions: tuple[float, float] = FRACTIONS,
    n_candidates: int | None = None,
    seed: int = 0,
    dense: Transformer | None = None,
) -> list[dict[str, Any]]:
    """k-sparse probing of every FFN layer of `model` for every class of every label of `task` (`probe_units` rows).

    A dense model gives source `dense`; an MoE gives `experts` and, with `dense` (a dense model of the same
    architecture, run on the same batch), the `PSEUDO` pseudo-experts made of its neurons. The splits are by sequence.
    Each model runs once over the batch (`ffn_activations`), every layer's activations collected together.
    """
    keep = task.positions(batch)
    sequence = np.broadcast_to(np.arange(len(batch))[:, None], keep.shape)[keep]
    part = sequence_splits(sequence, seed, fractions)
    values = {name: batch.labels[name][keep] for name in task.labels}
    layers, _ = ffn_activations(model, task, batch)
    if dense is not None and any(routing is not None for _, routing in layers):
        sites = [ROUTER_INPUT.format(layer=layer) for layer in range(len(layers))]
        dense_layers, router_inputs = ffn_activations(dense, task, batch, sites)
        if any(routing is not None for _, routing in dense_layers):
            raise ToylabError("pseudo-experts need a dense model; got an MoE")
    sources = []
    for layer, (post, routing) in enumerate(layers):
        dense_post = router_input = None
        n_experts = model.blocks[layer].mlp.n_experts if routing is not None else 1
        if routing is not None and dense is not None:
            dense_post, router_input = dense_layers[layer][0], router_inputs[ROUTER_INPUT.format(layer=layer)]
        sources.append(layer_sources(post, routing, n_experts, dense_post, router_input, seed))
    return probe_units(sources, values, task.labels, part, ks, rankings, min_count, max_classes, n_candidates, seed)


def skipped_pairs(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per model: (expert, class) pairs skipped for too few positives or negatives, and pairs in all, summed over seeds and layers."""
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        if row["variant"] == "neurons" and row["ranking"] == RANKINGS[0] and row["units"] == "experts":
            count = counts.setdefault(row["model"], {"pairs": 0, "of": 0})
            count["pairs"] += len(row["skipped"])
            count["of"] += row["n_units"]
    return counts


def class_scores(rows: Sequence[dict[str, Any]], ks: Sequence[int] = KS) -> pd.DataFrame:
    """`sparse_probing` rows (with `model` and `seed` keys) as one row per (model, seed, layer, label, class, units,
    variant, ranking, k), with the `MEASURES` as columns."""
    keys = ("model", "seed", "layer", "label", "class", "units", "variant", "ranking")
    frame = pd.DataFrame([{key: row[key] for key in (*keys, *MEASURES)} for row in rows])
    frame["k"] = [list(ks)] * len(frame)
    return frame.explode([*MEASURES, "k"]).astype({**dict.fromkeys(MEASURES, float), "k": int}).reset_index(drop=True)


def macro_scores(scores: pd.DataFrame) -> list[dict[str, Any]]:
    """Per (model, units, layer, label, variant, ranking, k): each of the `MEASURES` averaged over classes, mean and 95% CI over seeds."""
    keys = ["model", "units", "layer", "label", "variant", "ranking", "k"]
    per_seed = scores.groupby([*keys, "seed"], sort=False)[list(MEASURES)].mean().reset_index()
    return [{**dict(zip(keys, group)), **{m: mean_ci(part[m], bounds=BOUNDS[m]) for m in MEASURES}}
            for group, part in per_seed.groupby(keys, sort=False)]


def gaps(
    scores: pd.DataFrame, a: dict[str, Any], b: dict[str, Any], by: Sequence[str] = ("layer", "label"), value: str = "f1"
) -> pd.DataFrame:
    """Per seed and group: the class average of `value` in selection `a` minus selection `b`, over the classes both probe.

    `a` and `b` select rows by column values (e.g. `{"model": "moe-k1-e4", "units": "experts"}`);
    returns columns `[*by, "seed", "a", "b", "gap"]`.
    """
    def pick(selection: dict[str, Any]) -> pd.Series:
        mask = np.logical_and.reduce([scores[column] == v for column, v in selection.items()])
        return scores[mask].set_index(list(dict.fromkeys([*by, "seed", "layer", "label", "class"])))[value]

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


def adjust_comparisons(
    comparisons: dict[str, list[dict[str, Any]]], trends: dict[str, list[dict[str, Any]]], primary: str, headline: str
) -> dict[str, dict[str, Any]]:
    """Correct the verdicts of the study's comparisons (`gap`) and trends (`slope`) for multiplicity (in place; each
    keeps its `raw_verdict`) and return per family its role, number of tests and verdict counts before and after.

    The primary family is the `headline` model's rows of comparison `primary`; every other comparison key, and every
    trend key, is a family of its own over its models and groups, corrected on its own (`stats.adjust`).
    """
    members: dict[str, list[tuple[dict[str, Any], str]]] = {"primary": []}
    for key, rows in comparisons.items():
        for row in rows:
            members.setdefault("primary" if key == primary and row["model"] == headline else key, []).append((row, "gap"))
    for key, rows in trends.items():
        members.setdefault(f"trend: {key}", []).extend((row, "slope") for row in rows)
    questions = {name: f"the comparison `{name}` over models and groups" for name in members}
    questions["primary"] = f"`{headline}`'s experts vs pseudo-experts on its own partition (`{primary}`)"
    return correct_families(members, questions)
