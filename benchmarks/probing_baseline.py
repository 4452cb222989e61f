"""k-sparse probing as it was before issue 28 §3 (commit a2e4356), the baseline of `analysis`'s probing ratio.

One batched Newton fit (float64, design times theta) per unit and k, of that unit's classes and variants; the
helpers that did not change are the library's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from toylab.analysis.sparse_probing import (
    KS, RANKINGS, SPLITS, VARIANTS, Units, binary_targets, f1_scores, random_rotation, rank_neurons, unit_rows,
)
from toylab.task import Label


def fit_binary_logistic(x: torch.Tensor, y: torch.Tensor, C: float = 1.0, max_iter: int = 100, tol: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """The old batched fit (balanced class weights): Newton with backtracking on `x [B, n, k]`, every problem until all converge."""
    x, y = x.double(), y.double()
    batch, n, k = x.shape
    design = torch.cat([x, torch.ones(batch, n, 1, dtype=x.dtype)], -1)
    positives = y.sum(1, keepdim=True).clamp(1, n - 1)
    s = C * torch.where(y > 0, n / (2 * positives), n / (2 * (n - positives)))
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
        for _ in range(30):
            candidate = theta - size.unsqueeze(-1) * step
            new_loss = objective(candidate)
            accepted = new_loss <= loss - 1e-4 * size * (gradient * step).sum(1) + 1e-12 * loss.abs()
            if accepted.all():
                break
            size = torch.where(accepted, size, size / 2)
        theta, loss = candidate, new_loss
    return theta[:, :k], theta[:, k]


def sparse_probe(acts: np.ndarray, targets: np.ndarray, part: np.ndarray, ks: Sequence[int], rankings: Sequence[str], min_count: int,
                 seed: Any, n_candidates: int | None) -> dict[str, Any]:
    """The old one-unit probes: per k, one fit of the unit's problems."""
    acts, targets, part = np.asarray(acts, dtype=np.float64), np.asarray(targets, dtype=bool), np.asarray(part)
    rng = np.random.default_rng(seed)
    if n_candidates is not None and n_candidates < acts.shape[1]:
        acts = acts[:, np.sort(rng.choice(acts.shape[1], n_candidates, replace=False))]
    shuffled = targets[rng.permutation(len(targets))]
    side = (part[:, None] == np.arange(len(SPLITS))).astype(np.int64)
    kept = ((targets.T @ side).min(1) >= min_count) & (((~targets).T @ side).min(1) >= min_count)
    variants = dict(zip(VARIANTS, (rankings, rankings, rankings[:1])))
    f1 = {v: {r: np.full((targets.shape[1], 2, len(ks)), np.nan) for r in rs} for v, rs in variants.items()}
    if not kept.any():
        return {"kept": kept, "f1": f1}
    train, scored = part == 0, part > 0
    views = {"neurons": (acts, targets), "shuffled": (acts, shuffled),
             "random_basis": (acts @ random_rotation(acts.shape[1], rng.integers(2**32)), targets)}
    problems = []
    for variant, (x, t) in views.items():
        x = (x - x[train].mean(0)) / np.maximum(x[train].std(0), 1e-6)
        for ranking in f1[variant]:
            problems.append((variant, ranking, x, t[:, kept], rank_neurons(x[train], t[train][:, kept], ranking)))
    y = torch.from_numpy(np.concatenate([t.T for _, _, _, t, _ in problems]))
    for j, k in enumerate(ks):
        chosen = torch.from_numpy(np.concatenate([x[:, order[:, :k]].transpose(1, 0, 2) for _, _, x, _, order in problems]))
        w, b = fit_binary_logistic(chosen[:, train], y[:, train])
        predicted = torch.bmm(chosen[:, scored].double(), w.unsqueeze(-1)).squeeze(-1) + b.unsqueeze(-1) > 0
        for s, where in enumerate((part[scored] == 1, part[scored] == 2)):
            mask = torch.from_numpy(where)
            scores = f1_scores(predicted[:, mask], y[:, scored][:, mask]).numpy().reshape(len(problems), -1)
            for (variant, ranking, *_), score in zip(problems, scores):
                f1[variant][ranking][kept, s, j] = score
    return {"kept": kept, "f1": f1}


def probe_units(sources: Mapping[str, Units], values: Mapping[str, np.ndarray], labels: Mapping[str, Label], part: np.ndarray,
                ks: Sequence[int] = KS, rankings: Sequence[str] = RANKINGS, min_count: int = 10, max_classes: int | None = 8,
                n_candidates: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The old `probe_units`: one unit at a time."""
    rows = []
    for name, label in labels.items():
        targets, defined, classes = binary_targets(values[name], label, max_classes)
        for source, units in sources.items():
            results = []
            for u, (acts, tokens) in enumerate(units):
                used = defined[tokens]
                results.append(sparse_probe(acts[used], targets[tokens[used]], part[tokens[used]], ks, rankings, min_count, (seed, u), n_candidates))
            rows += unit_rows(name, label, classes, source, results)
    return rows
