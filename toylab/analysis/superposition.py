"""Geometry of features in toy models of superposition (Elhage et al. 2022; Chaudhari et al. 2025).

Every function takes weights `W [..., m, n]` (column W_i is feature i's direction in the m hidden
dimensions) with any leading dimensions (instances, experts), and returns per-feature
`[..., n]` or per-matrix `[...]` tensors.

    ||W_i||                                       feature_norms
    sum_{j != i} (W^_i . W_j)^2                   interference          (W^_i = W_i / ||W_i||)
    D_i = ||W_i||^2 / sum_j (W^_i . W_j)^2        feature_dimensionality
    m / ||W||_F^2                                 dimensions_per_feature

D_i is the share of a hidden dimension feature i gets: 1 for a feature with a dimension of its
own, 1/2 for an antipodal pair, 2/5 for a pentagon in a plane; 0 for a feature not learned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

GEOMETRIC_FRACTIONS: dict[str, float] = {
    "1": 1.0,  # a dimension of its own
    "3/4": 3 / 4,  # tetrahedron in 3 dimensions
    "2/3": 2 / 3,  # triangle in a plane
    "1/2": 1 / 2,  # antipodal pair (digon)
    "2/5": 2 / 5,  # pentagon in a plane
    "3/8": 3 / 8,  # square antiprism in 3 dimensions
}
"""Feature dimensionalities of the uniform polytopes the paper finds (tetrahedron, triangle, digon, pentagon, ...)."""

REPRESENTED = 0.5
"""A feature is represented when ||W_i|| exceeds this (the paper's threshold for a learned feature)."""

_EPS = 1e-8


def _weights(W: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.as_tensor(W).detach().double()


def feature_norms(W: torch.Tensor | np.ndarray) -> torch.Tensor:
    """||W_i|| `[..., n]`."""
    return _weights(W).norm(dim=-2)


def features_represented(W: torch.Tensor | np.ndarray, threshold: float = REPRESENTED) -> torch.Tensor:
    """Number of features with ||W_i|| > threshold `[...]`."""
    return (feature_norms(W) > threshold).sum(-1)


def gram(W: torch.Tensor | np.ndarray) -> torch.Tensor:
    """W^T W `[..., n, n]`, the matrix the paper shows as a heatmap."""
    W = _weights(W)
    return torch.einsum("... h f, ... h g -> ... f g", W, W)


def _projections(W: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared norms `[..., n]` and squared projections (W^_i . W_j)^2 `[..., n(i), n(j)]`."""
    G = gram(W)
    sq_norms = G.diagonal(dim1=-2, dim2=-1)
    return sq_norms, G**2 / sq_norms.clamp_min(_EPS).unsqueeze(-1)


def interference(W: torch.Tensor | np.ndarray) -> torch.Tensor:
    """sum_{j != i} (W^_i . W_j)^2 `[..., n]`: how much of the other features lies along feature i."""
    sq_norms, proj = _projections(W)
    return proj.sum(-1) - torch.where(sq_norms > _EPS, sq_norms, 0.0)


def feature_dimensionality(W: torch.Tensor | np.ndarray) -> torch.Tensor:
    """D_i = ||W_i||^2 / sum_j (W^_i . W_j)^2 `[..., n]` (0 for a zero column)."""
    sq_norms, proj = _projections(W)
    return torch.where(sq_norms > _EPS, sq_norms / proj.sum(-1).clamp_min(_EPS), 0.0)


def dimensions_per_feature(W: torch.Tensor | np.ndarray) -> torch.Tensor:
    """m / ||W||_F^2 `[...]`: hidden dimensions per (norm-weighted) learned feature."""
    W = _weights(W)
    return W.shape[-2] / W.pow(2).sum((-2, -1))


def _nearest(D: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Index of the geometric fraction within `tolerance` of each D, or len(GEOMETRIC_FRACTIONS) for none."""
    values = torch.tensor(list(GEOMETRIC_FRACTIONS.values()), dtype=torch.float64)
    distance = (D.unsqueeze(-1) - values).abs()
    nearest = distance.argmin(-1)
    return torch.where(distance.min(-1).values <= tolerance, nearest, len(values))


def nearest_fraction(D: torch.Tensor | np.ndarray, tolerance: float = 0.03) -> list[str]:
    """Name of the geometric fraction within `tolerance` of each dimensionality (flattened), e.g. "1/2", else "other"."""
    names = [*GEOMETRIC_FRACTIONS, "other"]
    return [names[i] for i in _nearest(torch.as_tensor(D, dtype=torch.float64).reshape(-1), tolerance).tolist()]


def fraction_shares(
    W: torch.Tensor | np.ndarray, tolerance: float = 0.03, threshold: float = REPRESENTED
) -> torch.Tensor:
    """Share of the represented features at each geometric fraction, then "other" `[..., len(GEOMETRIC_FRACTIONS) + 1]`."""
    represented = feature_norms(W) > threshold
    bins = F.one_hot(_nearest(feature_dimensionality(W), tolerance), len(GEOMETRIC_FRACTIONS) + 1)
    counts = (bins * represented.unsqueeze(-1)).sum(-2).double()
    return counts / counts.sum(-1, keepdim=True).clamp_min(1)


def most_important_represented(
    W: torch.Tensor | np.ndarray, importance: torch.Tensor | np.ndarray, threshold: float = REPRESENTED
) -> torch.Tensor:
    """Whether the represented features are exactly the most important ones `[...]` (importance `[..., n]`)."""
    represented = feature_norms(W) > threshold
    order = torch.as_tensor(importance).argsort(dim=-1, descending=True, stable=True)
    ranked = represented.gather(-1, order.expand_as(represented))
    return (ranked[..., 1:] <= ranked[..., :-1]).all(-1)


def expert_usage(expert_indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Share of routing slots each expert receives `[inst, E]`, from `hook_expert_indices [batch, inst, k]`."""
    counts = F.one_hot(torch.as_tensor(expert_indices), n_experts).sum((0, -2)).double()
    return counts / counts.sum(-1, keepdim=True)


def global_dimensionality(W: torch.Tensor | np.ndarray, usage: torch.Tensor) -> torch.Tensor:
    """Usage-weighted dimensionality sum_e u_e D_i^(e) `[..., n]` of expert weights `[..., E, m, n]`, usage `[..., E]`."""
    return torch.einsum("... e f, ... e -> ... f", feature_dimensionality(W), torch.as_tensor(usage, dtype=torch.float64))


def monosemanticity(
    W: torch.Tensor | np.ndarray, tolerance: float = 0.1, threshold: float = REPRESENTED
) -> torch.Tensor:
    """Per expert `[..., E]`: share of its represented features (||W_i|| > threshold) with |D_i - 1| < tolerance.

    NaN for an expert that represents no feature.
    """
    represented = feature_norms(W) > threshold
    mono = represented & ((feature_dimensionality(W) - 1).abs() < tolerance)
    return mono.sum(-1) / represented.sum(-1).double().where(represented.any(-1), torch.nan)


def represented_dimensionality(W: torch.Tensor | np.ndarray, threshold: float = REPRESENTED) -> torch.Tensor:
    """Mean D_i over the represented features of each matrix `[...]` (NaN when none is represented)."""
    represented = feature_norms(W) > threshold
    total = (feature_dimensionality(W) * represented).sum(-1)
    return total / represented.sum(-1).double().where(represented.any(-1), torch.nan)


def usage_weighted_mean(values: torch.Tensor, usage: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Mean of per-expert values `[..., E]` weighted by usage `[..., E]`, over the experts whose value is not NaN."""
    usage = torch.as_tensor(usage, dtype=torch.float64).where(~values.isnan(), 0.0)
    return (values.nan_to_num() * usage).sum(-1) / usage.sum(-1)


def plateau(values: Sequence[float], target: float, tolerance: float) -> tuple[int, int]:
    """`(start, length)` of the longest run of consecutive values within `tolerance` of `target` (length 0: none)."""
    near = np.abs(np.asarray(values, dtype=np.float64) - target) <= tolerance
    edges = np.diff(np.concatenate([[0], near.astype(int), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    if not len(starts):
        return 0, 0
    longest = int(np.argmax(ends - starts))
    return int(starts[longest]), int(ends[longest] - starts[longest])


def expert_group_purity(
    W: torch.Tensor | np.ndarray, feature_groups: np.ndarray | torch.Tensor, threshold: float = REPRESENTED
) -> torch.Tensor:
    """Per expert `[..., E]`: share of its represented features that lie in its most common feature group.

    1 when an expert represents features of one group only; NaN when it represents none.
    """
    represented = (feature_norms(W) > threshold).double()  # [..., E, n]
    groups = F.one_hot(torch.as_tensor(feature_groups)).double()  # [n, G]
    per_group = torch.einsum("... e f, f g -> ... e g", represented, groups)
    total = per_group.sum(-1)
    return per_group.max(-1).values / total.where(total > 0, torch.nan)


def own_block_share(
    W: torch.Tensor | np.ndarray, blocks: torch.Tensor | np.ndarray, threshold: float = REPRESENTED
) -> torch.Tensor:
    """Per expert `[..., E]` of weights `[..., E, m, n]`: share of its represented features whose block
    (`blocks [..., n]`, an expert index per feature, e.g. a K-hot gate's) is that expert; NaN when it
    represents none. A random assignment of n/E features per expert gives about 1/E."""
    represented = feature_norms(W) > threshold  # [..., E, n]
    blocks = torch.as_tensor(blocks)
    own = blocks.unsqueeze(-2) == torch.arange(represented.shape[-2]).unsqueeze(-1)  # [..., E, n]
    total = represented.sum(-1).double()
    return (represented & own).sum(-1) / total.where(total > 0, torch.nan)


def features_per_dimension(W: torch.Tensor | np.ndarray, usage: torch.Tensor | np.ndarray, top_k: int) -> torch.Tensor:
    """Chaudhari et al.'s usage-weighted features per dimension `[...]`: sum_e u_e ||W_e||_F^2 / m, divided by k
    as in their code (weights `[..., E, m, n]`, usage `[..., E]` summing to 1). The dense value is ||W||_F^2 / m."""
    return usage_weighted_mean(1 / dimensions_per_feature(W), usage) / top_k


def rank_trend(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Spearman rank correlation of y with x and its two-sided p-value (finite pairs only)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3 or np.ptp(x[keep]) == 0 or np.ptp(y[keep]) == 0:
        return {"rho": math.nan, "p_value": math.nan, "n": int(keep.sum())}
    result = stats.spearmanr(x[keep], y[keep])
    return {"rho": float(result.statistic), "p_value": float(result.pvalue), "n": int(keep.sum())}
