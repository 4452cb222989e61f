"""Agreement between two labelings of the same tokens, and the clustering baseline.

`nmi`, `ami` and `ari` follow scikit-learn's definitions (arithmetic-mean NMI and AMI; ARI from pair counts),
computed from contingency tables, so that a permutation null draws the tables of its shuffles
directly (`shuffled_tables`) instead of shuffling every token. `kmeans` is scikit-learn's k-means,
the residual-stream clustering baseline.
"""

from __future__ import annotations

import numpy as np
from scipy.special import gammaln
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


def weighted_tables(a: np.ndarray, b: np.ndarray, weights: np.ndarray, n_a: int, n_b: int) -> np.ndarray:
    """Tables `[n_weights, n_a, n_b]` of `contingency` with each token counted with its weight in each row of `weights`
    (`[n_weights, n_tokens]`, e.g. `stats.sequence_resamples`)."""
    onehot = np.zeros((len(a), n_a * n_b))
    onehot[np.arange(len(a)), a * n_b + b] = 1.0
    return (weights @ onehot).reshape(-1, n_a, n_b)


def _entropy(counts: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Entropy (nats) of count vectors `[..., k]` with totals `n`."""
    p = counts / n[..., None]
    return -np.where(counts > 0, p * np.log(np.where(counts > 0, p, 1.0)), 0.0).sum(-1)


def _information(tables: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mutual information and the two marginal entropies (nats) of count tables `[..., n_a, n_b]` (0 for empty ones)."""
    tables = tables.astype(np.float64)
    n = tables.sum((-2, -1))
    n = np.where(n > 0, n, 1.0)
    rows, cols = tables.sum(-1), tables.sum(-2)
    p = tables / n[..., None, None]
    outer = rows[..., :, None] * cols[..., None, :] / n[..., None, None] ** 2
    ratio = np.where(tables > 0, p / np.where(outer > 0, outer, 1.0), 1.0)
    mi = np.clip((p * np.log(ratio)).sum((-2, -1)), 0.0, None)
    return mi, _entropy(rows, n), _entropy(cols, n)


def mutual_info_from_tables(tables: np.ndarray) -> np.ndarray:
    """Mutual information (nats) of count tables `[..., n_a, n_b]` (equals sklearn's `mutual_info_score`)."""
    return _information(tables)[0]


def nmi_from_tables(tables: np.ndarray) -> np.ndarray:
    """Normalized mutual information (arithmetic mean of entropies) of tables `[..., n_a, n_b]`."""
    mi, h_a, h_b = _information(tables)
    normalizer = (h_a + h_b) / 2
    nmi = np.where(mi > 0, mi / np.where(normalizer > 0, normalizer, 1.0), 0.0)
    rows, cols = tables.sum(-1), tables.sum(-2)
    single = ((rows > 0).sum(-1) == 1) & ((cols > 0).sum(-1) == 1)
    return np.where(single, 1.0, nmi)


def conditional_nmi_from_tables(tables: np.ndarray) -> np.ndarray:
    """NMI given a condition, from tables `[..., n_given, n_a, n_b]` (one table per value of the condition).

    I(A; B | C) / ((H(A | C) + H(B | C)) / 2), each term the average over the condition's values weighted by
    their frequency: 0 when, within every value of C, A and B are independent (or one of them constant).
    """
    mi, h_a, h_b = _information(tables)
    counts = tables.sum((-2, -1)).astype(np.float64)
    weights = counts / counts.sum(-1, keepdims=True)
    cmi, normalizer = (weights * mi).sum(-1), (weights * (h_a + h_b) / 2).sum(-1)
    return np.where(cmi > 0, cmi / np.where(normalizer > 0, normalizer, 1.0), 0.0)


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


def expected_mutual_info(rows: np.ndarray, cols: np.ndarray) -> float:
    """E[I(A; B)] in nats over random labelings with cluster sizes `rows` and class counts `cols` (the hypergeometric
    model of Vinh et al. 2010, as scikit-learn's `expected_mutual_information`), summed over every possible cell count
    n_ij of every cell at once: sum_ij sum_nij (n_ij / n) log(n n_ij / (a_i b_j)) P(n_ij)."""
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    n = int(rows.sum())
    a, b = np.broadcast_arrays(rows[:, None], cols[None, :])
    a, b = a.ravel(), b.ravel()
    low, high = np.maximum(1, a + b - n), np.minimum(a, b)
    lengths = np.maximum(high - low + 1, 0)
    cell = np.repeat(np.arange(len(a)), lengths)
    count = low[cell] + np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    a, b = a[cell].astype(np.float64), b[cell].astype(np.float64)
    log_p = (gammaln(a + 1) + gammaln(b + 1) + gammaln(n - a + 1) + gammaln(n - b + 1) - gammaln(n + 1) - gammaln(count + 1)
             - gammaln(a - count + 1) - gammaln(b - count + 1) - gammaln(n - a - b + count + 1))
    return float((count / n * np.log(n * count / (a * b)) * np.exp(log_p)).sum())


def ami_from_table(table: np.ndarray) -> float:
    """Adjusted mutual information (arithmetic mean of entropies) of a contingency table: (I - E[I]) / (mean H - E[I]),
    0 in expectation for unrelated labelings whatever their numbers and sizes of clusters, 1 for identical ones."""
    table = np.asarray(table)
    rows, cols = table.sum(1), table.sum(0)
    rows, cols = rows[rows > 0], cols[cols > 0]
    if len(rows) <= 1 or len(cols) <= 1:  # scikit-learn's limits: both unsplit is a perfect match, one unsplit none
        return 1.0 if len(rows) == len(cols) else 0.0
    mi, h_a, h_b = _information(table)
    expected = expected_mutual_info(rows, cols)
    tiny = np.finfo(np.float64).eps
    numerator, denominator = mi - expected, (h_a + h_b) / 2 - expected
    numerator = min(numerator, -tiny) if numerator < 0 else max(numerator, tiny)  # signs kept as scikit-learn does
    denominator = min(denominator, -tiny) if denominator < 0 else max(denominator, tiny)
    return float(numerator / denominator)


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalized mutual information between two labelings (equals sklearn's `normalized_mutual_info_score`)."""
    (a, _), (b, _) = _compact(np.asarray(a)), _compact(np.asarray(b))
    return float(nmi_from_tables(contingency(a, b)))


def ami(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted mutual information (equals sklearn's `adjusted_mutual_info_score`)."""
    (a, _), (b, _) = _compact(np.asarray(a)), _compact(np.asarray(b))
    return ami_from_table(contingency(a, b))


def ari(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index (equals sklearn's `adjusted_rand_score`)."""
    (a, _), (b, _) = _compact(np.asarray(a)), _compact(np.asarray(b))
    return ari_from_table(contingency(a, b))


def conditional_tables(a: np.ndarray, b: np.ndarray, given: np.ndarray) -> np.ndarray:
    """Counts `[n_given, n_a, n_b]` of (given, a, b) over tokens (any int labels; classes that occur)."""
    (a, n_a), (b, n_b), (g, n_g) = (_compact(np.asarray(x)) for x in (a, b, given))
    return np.bincount((g * n_a + a) * n_b + b, minlength=n_g * n_a * n_b).reshape(n_g, n_a, n_b)


def conditional_nmi(a: np.ndarray, b: np.ndarray, given: np.ndarray) -> float:
    """NMI of two labelings within each value of `given` (e.g. token identity); see `conditional_nmi_from_tables`."""
    return float(conditional_nmi_from_tables(conditional_tables(a, b, given)))


def conditional_entropy(a: np.ndarray, given: np.ndarray) -> float:
    """H(a | given) in bits: 0 when `a` is a function of `given`."""
    (a, _), (g, _) = _compact(np.asarray(a)), _compact(np.asarray(given))
    table = contingency(g, a)
    counts = table.sum(1).astype(np.float64)
    return float((counts / counts.sum() * _entropy(table, counts)).sum() / np.log(2))


def shuffled_tables(rows: np.ndarray, cols: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Contingency tables `[size, n_a, n_b]` of `size` random shuffles of an assignment with cluster sizes `rows`
    against labels with class counts `cols`, drawn directly: a shuffle's table has exactly the law of filling it
    row by row, each row a multivariate hypergeometric draw from the classes left, one univariate hypergeometric
    per cell (vectorized over the shuffles). O(size * n_a * n_b) instead of shuffling every token."""
    tables = np.zeros((size, len(rows), len(cols)), dtype=np.int64)
    left = np.tile(np.asarray(cols, dtype=np.int64), (size, 1))  # class counts not yet given to a row
    for i, row in enumerate(rows):
        need = np.full(size, row, dtype=np.int64)
        after = left.sum(1)
        for j in range(len(cols) - 1):
            after -= left[:, j]
            tables[:, i, j] = rng.hypergeometric(left[:, j], after, need)
            need -= tables[:, i, j]
        tables[:, i, -1] = need
        left -= tables[:, i]
    return tables


def permutation_conditional_nmi(
    assignment: np.ndarray, labels: np.ndarray, given: np.ndarray, n_permutations: int, seed: int
) -> np.ndarray:
    """Conditional NMI of `labels` with `n_permutations` shuffles of `assignment` within each value of `given`:
    the null of an assignment that keeps its relation to `given` (its frequencies within each value) and nothing else."""
    (a, n_a), (b, n_b), (g, n_g) = (_compact(np.asarray(x)) for x in (assignment, labels, given))
    rng = np.random.default_rng(seed)
    counts = contingency(g * n_a + a, b, n_g * n_a, n_b).reshape(n_g, n_a, n_b)
    tables = np.zeros((n_permutations, n_g, n_a, n_b), dtype=np.int64)
    for value, within in enumerate(counts):  # a shuffle within one value of `given` keeps both margins there
        tables[:, value] = shuffled_tables(within.sum(1), within.sum(0), n_permutations, rng)
    return conditional_nmi_from_tables(tables)


def permutation_nmi(assignment: np.ndarray, labels: np.ndarray, n_permutations: int, seed: int) -> np.ndarray:
    """NMI of `labels` with `n_permutations` shuffles of `assignment` (same cluster sizes): the null."""
    (a, n_a), (b, n_b) = _compact(np.asarray(assignment)), _compact(np.asarray(labels))
    table = contingency(a, b, n_a, n_b)
    return nmi_from_tables(shuffled_tables(table.sum(1), table.sum(0), n_permutations, np.random.default_rng(seed)))


def fit_kmeans(activations: np.ndarray, n_clusters: int, seed: int) -> KMeans:
    """scikit-learn k-means (k-means++ init, 4 restarts) fitted to `activations` `[n, d]`."""
    return KMeans(n_clusters=n_clusters, n_init=4, random_state=seed).fit(np.asarray(activations, dtype=np.float64))


def kmeans(activations: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """Cluster ids from `fit_kmeans`."""
    return fit_kmeans(activations, n_clusters, seed).labels_
