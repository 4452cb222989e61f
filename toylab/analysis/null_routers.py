"""Null routers that can do what a router can: linear maps of the router input, with the learned router's expert usage.

A load-balanced router puts fixed shares of tokens on its experts; comparing it with unconstrained k-means (free
cluster sizes) or a shuffled assignment (no input at all) mixes what the router learned with what its usage allows.
Both nulls here assign tokens to as many groups as the router used, with exactly its counts:
- `random_linear_routers`: scores x W with W random Gaussian, several seeded draws;
- `balanced_kmeans`: scores -||x - c_e||^2 from k-means centroids c_e (the largest count to the largest cluster).

`usage_matched_assignment` is exact: it maximizes the total score of the tokens' groups subject to the counts (a
transportation problem). By linear programming duality its solution is argmax_e(score_e + b_e) for some bias b, so
each null is itself a linear router with a bias: a random router, or the nearest-centroid router, that a load
balancer has tuned to the learned router's usage.
"""

from __future__ import annotations

import numpy as np

from toylab.analysis.clustering import fit_kmeans


def _bias_matching(scores: np.ndarray, counts: np.ndarray, rounds: int) -> np.ndarray:
    """Biases b `[k]` such that argmax(scores + b) has about `counts` tokens per column: each round sets each
    column's bias, the others fixed, so that exactly its count of tokens prefer it (coordinate descent on the dual)."""
    n, k = scores.shape
    bias = np.zeros(k)
    for _ in range(rounds):
        for e in range(k):
            others = np.delete(scores + bias, e, axis=1).max(1)
            margin = scores[:, e] - others  # a token prefers e when margin + b_e > 0
            c = int(counts[e])  # b_e halfway between the c-th and the (c+1)-th largest margin (ascending: n - c, n - c - 1)
            ranks = np.partition(margin, [max(n - c - 1, 0), min(n - c, n - 1)])
            upper = ranks[n - c] if c > 0 else ranks[n - 1] + 1.0
            lower = ranks[n - c - 1] if c < n else ranks[0] - 1.0
            bias[e] = -(upper + lower) / 2
        if (np.bincount((scores + bias).argmax(1), minlength=k) == counts).all():
            break
    return bias


def usage_matched_assignment(scores: np.ndarray, counts: np.ndarray, rounds: int = 20) -> np.ndarray:
    """The column `[n]` of each row of `scores` `[n, k]` that maximizes the total score with exactly `counts[e]` rows
    in column e (`counts` sums to n): an optimal transportation plan, and argmax(scores + b) for some bias b.

    Starts from the argmax with matched biases (`_bias_matching`, usually within a few tokens of the counts; such an
    argmax is optimal for its own counts), then moves one token at a time along the cheapest chain of moves from a
    column with too many tokens to one with too few (successive shortest paths on the k columns, Bellman-Ford),
    which keeps the assignment optimal for its counts until they are the ones asked for.
    """
    scores, counts = np.asarray(scores, dtype=np.float64), np.asarray(counts, dtype=np.int64)
    n, k = scores.shape
    if counts.shape != (k,) or counts.sum() != n or (counts < 0).any():
        raise ValueError(f"counts {counts.tolist()} must be {k} non-negative numbers summing to {n}")
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    assignment = (scores + _bias_matching(scores, counts, rounds)).argmax(1)
    while ((have := np.bincount(assignment, minlength=k)) != counts).any():
        loss, token = np.full((k, k), np.inf), np.zeros((k, k), dtype=np.int64)  # cheapest move of one token e -> f
        for e in np.flatnonzero(have):
            members = np.flatnonzero(assignment == e)
            cost = scores[members, e, None] - scores[members]
            best = cost.argmin(0)
            loss[e], token[e] = cost[best, np.arange(k)], members[best]
        distance, previous = np.where(have > counts, 0.0, np.inf), np.full(k, -1)
        for _ in range(k - 1):
            through = distance[:, None] + loss
            via = through.argmin(0)
            better = through[via, np.arange(k)] < distance - 1e-12
            distance, previous = np.where(better, through[via, np.arange(k)], distance), np.where(better, via, previous)
        column = int(np.argmin(np.where(have < counts, distance, np.inf)))
        while previous[column] >= 0:
            assignment[token[previous[column], column]] = column
            column = int(previous[column])
    return assignment


def random_linear_routers(activations: np.ndarray, counts: np.ndarray, n_draws: int, seed: int) -> np.ndarray:
    """`[n_draws, n]` assignments of random linear routers on `activations` `[n, d]` (scores x W, W `[d, k]` standard
    Gaussian, one per draw), each with exactly `counts` `[k]` tokens per expert (`usage_matched_assignment`)."""
    x = np.asarray(activations, dtype=np.float64)
    weights = np.random.default_rng(seed).normal(size=(n_draws, x.shape[1], len(counts)))
    return np.stack([usage_matched_assignment(x @ w, counts) for w in weights])


def balanced_kmeans(activations: np.ndarray, counts: np.ndarray, seed: int) -> np.ndarray:
    """Size-balanced k-means `[n]`: k-means (`fit_kmeans`, k = len(counts)) gives the centroids, and tokens go to the
    nearest centroids under exactly `counts` tokens each, the largest count to the cluster k-means made largest."""
    x = np.asarray(activations, dtype=np.float64)
    model = fit_kmeans(x, len(counts), seed)
    order = np.argsort(-np.bincount(model.labels_, minlength=len(counts)), kind="stable")
    sizes = np.empty(len(counts), dtype=np.int64)
    sizes[order] = np.sort(counts)[::-1]
    distance = ((x[:, None, :] - model.cluster_centers_[None]) ** 2).sum(-1)
    return usage_matched_assignment(-distance, sizes)
