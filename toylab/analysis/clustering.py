"""Agreement between two labelings of the same tokens, and the clustering baseline.

`nmi` and `ari` follow scikit-learn's definitions (arithmetic-mean NMI; ARI from pair counts),
computed from contingency tables so that a permutation null of a thousand shuffles is one
vectorized pass. `kmeans` is scikit-learn's k-means, the residual-stream clustering baseline.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans


def _compact(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Relabel to 0..n_classes-1 (only classes that occur)."""
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse.ravel(), int(inverse.max()) + 1 if inverse.size else 0


def contingency(a: np.ndarray, b: np.ndarray, n_a: int | None = None, n_b: int | None = None) -> np.ndarray:
    """Counts table `[n_a, n_b]`: how many tokens have a == i and b == j (inputs are ints >= 0)."""
    n_a = int(a.max()) + 1 if n_a is None else n_a
    n_b = int(b.max()) + 1 if n_b is None else n_b
    return np.bincount(a * n_b + b, minlength=n_a * n_b).reshape(n_a, n_b)


def _entropy(counts: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Entropy (nats) of count vectors `[..., k]` with totals `n`."""
    p = counts / n[..., None]
    return -np.where(counts > 0, p * np.log(np.where(counts > 0, p, 1.0)), 0.0).sum(-1)


def nmi_from_tables(tables: np.ndarray) -> np.ndarray:
    """Normalized mutual information (arithmetic mean of entropies) of tables `[..., n_a, n_b]`."""
    tables = tables.astype(np.float64)
    n = tables.sum((-2, -1))
    rows, cols = tables.sum(-1), tables.sum(-2)
    p = tables / n[..., None, None]
    outer = rows[..., :, None] * cols[..., None, :] / n[..., None, None] ** 2
    ratio = np.where(tables > 0, p / np.where(outer > 0, outer, 1.0), 1.0)
    mi = np.clip((p * np.log(ratio)).sum((-2, -1)), 0.0, None)
    h_a, h_b = _entropy(rows, n), _entropy(cols, n)
    normalizer = (h_a + h_b) / 2
    nmi = np.where(mi > 0, mi / np.where(normalizer > 0, normalizer, 1.0), 0.0)
    single = ((rows > 0).sum(-1) == 1) & ((cols > 0).sum(-1) == 1)
    return np.where(single, 1.0, nmi)


def ari_from_table(table: np.ndarray) -> float:
    """Adjusted Rand index of a contingency table, from pair counts as in scikit-learn."""
    table = table.astype(np.float64)
    n = table.sum()
    sum_squares = (table**2).sum()
    rows, cols = table.sum(1), table.sum(0)
    tp = sum_squares - n
    fp = (table * cols[None, :]).sum() - sum_squares
    fn = (table * rows[:, None]).sum() - sum_squares
    tn = n**2 - fp - fn - sum_squares
    if fn == 0 and fp == 0:
        return 1.0
    return float(2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)))


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalized mutual information between two labelings (equals sklearn's `normalized_mutual_info_score`)."""
    (a, _), (b, _) = _compact(np.asarray(a)), _compact(np.asarray(b))
    return float(nmi_from_tables(contingency(a, b)))


def ari(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index (equals sklearn's `adjusted_rand_score`)."""
    (a, _), (b, _) = _compact(np.asarray(a)), _compact(np.asarray(b))
    return ari_from_table(contingency(a, b))


def permutation_nmi(
    assignment: np.ndarray, labels: np.ndarray, n_permutations: int, seed: int, chunk: int = 64
) -> np.ndarray:
    """NMI of `labels` with `n_permutations` shuffles of `assignment` (same cluster sizes): the null."""
    (a, n_a), (b, n_b) = _compact(np.asarray(assignment)), _compact(np.asarray(labels))
    rng = np.random.default_rng(seed)
    null = []
    for start in range(0, n_permutations, chunk):
        size = min(chunk, n_permutations - start)
        shuffled = rng.permuted(np.broadcast_to(a, (size, len(a))), axis=1)
        offsets = np.arange(size)[:, None] * (n_a * n_b)
        tables = np.bincount((offsets + shuffled * n_b + b).ravel(), minlength=size * n_a * n_b)
        null.append(nmi_from_tables(tables.reshape(size, n_a, n_b)))
    return np.concatenate(null)


def kmeans(activations: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """Cluster ids from scikit-learn k-means (k-means++ init, 4 restarts)."""
    model = KMeans(n_clusters=n_clusters, n_init=4, random_state=seed)
    return model.fit_predict(np.asarray(activations, dtype=np.float64))
