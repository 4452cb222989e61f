"""The sparse-feature task and the superposition geometry metrics, checked against independent computations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from toylab.analysis.superposition import (
    GEOMETRIC_FRACTIONS,
    dimensions_per_feature,
    expert_group_purity,
    expert_usage,
    feature_dimensionality,
    feature_norms,
    features_represented,
    fraction_shares,
    global_dimensionality,
    interference,
    monosemanticity,
    most_important_represented,
    nearest_fraction,
    plateau,
    rank_trend,
    represented_dimensionality,
    usage_weighted_mean,
)
from toylab.errors import ToylabError
from toylab.registry import get_task
from toylab.task import IGNORE

N = 20000


def polygon(k: int, radius: float = 1.0) -> torch.Tensor:
    """k unit features evenly spaced on a circle in 2D: W `[2, k]`."""
    angles = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
    return radius * torch.stack([angles.cos(), angles.sin()])


def tolerance(p: float, n: int) -> float:
    """Five binomial standard errors."""
    return 5 * math.sqrt(p * (1 - p) / n) + 1e-9


# ---- geometry metrics on hand-built weights ----


def test_orthogonal_features_have_dimensionality_one() -> None:
    W = torch.zeros(5, 8, dtype=torch.float64)
    W[:, :5] = 1.3 * torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0]  # 5 orthogonal, 3 unlearned
    assert torch.allclose(feature_dimensionality(W), torch.tensor([1.0] * 5 + [0.0] * 3, dtype=torch.float64))
    assert torch.allclose(interference(W), torch.zeros(8, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(feature_norms(W)[:5], torch.full((5,), 1.3, dtype=torch.float64))
    assert features_represented(W).item() == 5
    assert dimensions_per_feature(W).item() == pytest.approx(5 / (5 * 1.3**2))


@pytest.mark.parametrize(("W", "expected"), [
    (torch.tensor([[1.0, -1.0]]), 1 / 2),  # antipodal pair on a line
    (polygon(3), 2 / 3),
    (polygon(5), 2 / 5),
    (polygon(5, radius=0.8), 2 / 5),  # scale-free
    (torch.tensor([[1, 1, -1, -1], [1, -1, 1, -1], [1, -1, -1, 1]], dtype=torch.float64) / math.sqrt(3), 3 / 4),
])
def test_polytopes_have_their_geometric_fraction(W: torch.Tensor, expected: float) -> None:
    D = feature_dimensionality(W)
    assert torch.allclose(D, torch.full_like(D, expected))
    assert set(nearest_fraction(D)) == {next(k for k, v in GEOMETRIC_FRACTIONS.items() if v == expected)}


def test_fraction_shares_and_importance_order() -> None:
    W = torch.zeros(2, 3, 8, dtype=torch.float64)  # [inst, m, n]
    W[0, :2, :5] = polygon(5)  # a pentagon, an antipodal pair, and a feature too weak to count
    W[0, 2, 5], W[0, 2, 6], W[0, 2, 7] = 1.0, -1.0, 0.2
    W[1, :, [0, 1, 3]] = torch.eye(3, dtype=torch.float64)  # three dedicated features, skipping feature 2
    names = [*GEOMETRIC_FRACTIONS, "other"]
    shares = dict(zip(names, fraction_shares(W)[0].tolist()))
    assert shares == {**dict.fromkeys(names, 0.0), "2/5": 5 / 7, "1/2": 2 / 7}
    assert fraction_shares(W)[1].tolist() == [1.0] + [0.0] * 6
    assert nearest_fraction(torch.tensor([0.99, 0.55, 0.2])) == ["1", "other", "other"]
    importance = 0.7 ** torch.arange(8.0)
    assert most_important_represented(W, importance).tolist() == [True, False]  # features 0-6; 0, 1, 3
    assert most_important_represented(W, importance.flip(0)).tolist() == [False, False]
    W[1, :, 2], W[0, 2, 7] = 0.0, 0.0
    W[1, 2, [2, 3]] = torch.tensor([1.0, 0.0], dtype=torch.float64)  # now features 0-2
    assert most_important_represented(W, importance).tolist() == [True, True]
    assert most_important_represented(W, importance.flip(0)).tolist() == [False, False]


def test_metrics_equal_a_naive_loop_over_instances_and_features() -> None:
    W = torch.randn(3, 2, 4, 6, dtype=torch.float64)  # [inst, expert, m, n]
    W[0, 1, :, 2] = 0.0
    D, I = feature_dimensionality(W), interference(W)
    for a, e, i in itertools.product(range(3), range(2), range(6)):
        w = W[a, e].numpy()
        norm = np.linalg.norm(w[:, i])
        if norm == 0:
            assert D[a, e, i] == 0
            continue
        proj = [(w[:, i] @ w[:, j] / norm) ** 2 for j in range(6)]
        assert I[a, e, i].item() == pytest.approx(sum(proj) - proj[i])
        assert D[a, e, i].item() == pytest.approx(norm**2 / sum(proj))
    assert torch.allclose(dimensions_per_feature(W), 4 / (W**2).sum((-2, -1)))


def test_expert_usage_counts_slots() -> None:
    indices = torch.randint(4, (500, 3, 2))
    usage = expert_usage(indices, 4)
    for i in range(3):
        assert np.allclose(usage[i].numpy(), np.bincount(indices[:, i].numpy().ravel(), minlength=4) / 1000)


def test_moe_metrics_on_hand_built_experts() -> None:
    W = torch.zeros(2, 5, 6, dtype=torch.float64)  # [E, m, n]
    W[0, :4, :4] = torch.eye(4)  # expert 0: four dedicated features, feature 5 unlearned,
    W[0, 4, 4] = 0.3  # and feature 4 orthogonal but too weak to count as represented
    W[1, :2, :] = torch.cat([polygon(5), torch.tensor([[0.0], [0.0]], dtype=torch.float64)], 1)  # pentagon
    W[1, 2, 5] = 1.0  # ... and one dedicated feature
    assert monosemanticity(W).tolist() == pytest.approx([1.0, 1 / 6])
    assert represented_dimensionality(W).tolist() == pytest.approx([1.0, (5 * 0.4 + 1) / 6])
    usage = torch.tensor([0.25, 0.75], dtype=torch.float64)
    expected = 0.25 * torch.tensor([1, 1, 1, 1, 1, 0]) + 0.75 * torch.tensor([0.4] * 5 + [1.0])
    assert torch.allclose(global_dimensionality(W, usage), expected.double())
    assert usage_weighted_mean(monosemanticity(W), usage).item() == pytest.approx(0.25 + 0.75 / 6)
    W[1] = 0.0  # an expert with nothing represented is NaN and drops out of the model's share
    assert math.isnan(monosemanticity(W)[1].item())
    assert usage_weighted_mean(monosemanticity(W), usage).item() == pytest.approx(1.0)


def test_expert_group_purity_and_rank_trend() -> None:
    groups = np.array([0, 0, 0, 1, 1, 1])
    W = torch.zeros(3, 4, 6, dtype=torch.float64)  # [E, m, n]
    W[0, :3, :3] = torch.eye(3, dtype=torch.float64)  # expert 0: group 0 only
    W[1, :3, [0, 3, 4]] = torch.eye(3, dtype=torch.float64)  # expert 1: one feature of group 0, two of group 1
    W[1, 3, 1] = 0.3  # too weak to count
    purity = expert_group_purity(W, groups)
    assert purity[:2].tolist() == pytest.approx([1.0, 2 / 3]) and math.isnan(purity[2].item())
    rising = rank_trend([1, 2, 3, 4, 5, 6], [0.1, 0.3, 0.2, 0.5, 0.7, 0.9])
    assert rising["rho"] == pytest.approx(stats.spearmanr([1, 2, 3, 4, 5, 6], [0.1, 0.3, 0.2, 0.5, 0.7, 0.9]).statistic)
    assert rising["rho"] > 0.8 and rising["p_value"] < 0.05
    assert math.isnan(rank_trend([1, 2, 3], [1.0, 1.0, 1.0])["rho"])


def test_plateau_is_the_longest_run_near_the_target() -> None:
    curve = [1.0, 0.8, 0.52, 0.49, 0.9, 0.51, 0.5, 0.47, 0.3, 0.5]
    assert plateau(curve, 0.5, 0.05) == (5, 3)
    assert plateau(curve, 0.5, 0.005) == (6, 1)
    assert plateau(curve, 0.2, 0.05) == (0, 0)


# ---- the task ----


def test_config_errors_are_one_line_toylab_errors() -> None:
    for options in [
        {"sparsity": 1.0}, {"n_groups": 0}, {"n_groups": 21}, {"importance_decay": 0},
        {"n_correlated_pairs": 11}, {"n_anticorrelated_pairs": 2, "sparsity": 0.3},
        {"n_groups": 2, "n_correlated_pairs": 1},
    ]:
        with pytest.raises(ToylabError, match="invalid SuperpositionConfig"):
            get_task("superposition", **options)


def test_batch_layout_labels_and_determinism() -> None:
    task = get_task("superposition", n_features=7, sparsity=0.6)
    batch = task.sample(300, seed=3)
    assert batch.inputs.shape == batch.targets.shape == (300, 1, 7) and batch.inputs.dtype == np.float32
    assert batch.loss_mask.shape == (300, 1) and batch.loss_mask.all()
    assert batch.labels["active"].shape == (300, 1, 7) and task.labels["active"].multi_hot
    assert np.array_equal(batch.labels["active"], batch.inputs != 0)
    assert np.array_equal(batch.labels["n_active"], (batch.inputs != 0).sum(-1))
    assert np.array_equal(task.sample(300, seed=3).inputs, batch.inputs)
    assert not np.array_equal(task.sample(300, seed=4).inputs, batch.inputs)
    assert np.allclose(task.importance, 0.7 ** np.arange(7))
    assert task.seq_len == 1 and task.positions(batch).all()
    with pytest.raises(NotImplementedError):
        task.vocab  # noqa: B018
    assert task.decode(np.array([[0, 0.5, 0, 0, 0, 0, 0.25]]))[0] == "f1=0.50 f6=0.25"


@pytest.mark.parametrize("sparsity", [0.0, 0.7, 0.97])
def test_sparsity_and_values(sparsity: float) -> None:
    x = get_task("superposition", sparsity=sparsity).sample(N, seed=0).inputs[:, 0]
    density = (x != 0).mean(0)
    assert np.abs(density - (1 - sparsity)).max() < tolerance(1 - sparsity, N)
    assert stats.kstest(x[x != 0], "uniform").pvalue > 1e-3  # values uniform on [0, 1]
    if sparsity:  # features are independent
        assert np.abs(np.corrcoef((x != 0).T) - np.eye(20)).max() < 0.05


def test_per_instance_sparsities() -> None:
    task = get_task("superposition")
    sparsity = torch.tensor([0.0, 0.5, 0.9, 0.99])
    x, active, group = task.generate(N, torch.Generator().manual_seed(0), sparsity)
    assert x.shape == active.shape == (N, 4, 20) and group.shape == (N, 4)
    density = (x != 0).double().mean((0, 2)).numpy()
    assert np.abs(density - (1 - sparsity.numpy())).max() < 0.01
    with pytest.raises(ToylabError, match=r"sparsity must be in \[0.0, 1\)"):
        task.generate(10, torch.Generator(), torch.tensor([0.5, 1.0]))


def test_groups_are_planted() -> None:
    n_groups, sparsity = 3, 0.6
    task = get_task("superposition", n_features=10, n_groups=n_groups, sparsity=sparsity)
    batch = task.sample(N, seed=1)
    x, group = batch.inputs[:, 0], batch.labels["group"][:, 0]
    blocks = task.feature_groups
    assert (np.diff(blocks) >= 0).all() and set(blocks) == set(range(n_groups))
    assert np.ptp(np.bincount(blocks)) <= 1  # contiguous, near-equal blocks
    sizes = np.bincount(blocks)
    # every nonzero feature lies in the labeled group; samples with none are IGNORE
    rows, cols = np.nonzero(x)
    assert np.array_equal(blocks[cols], group[rows])
    empty = ~(x != 0).any(1)
    assert (group[empty] == IGNORE).all() and (group[~empty] != IGNORE).all()
    assert abs(empty.mean() - np.mean(sparsity**sizes)) < tolerance(empty.mean(), N)
    # groups are chosen uniformly, and features within the group are active with probability 1 - S
    chosen = np.bincount(group[~empty], minlength=n_groups) / N
    expected = (1 - sparsity**sizes) / n_groups
    assert np.abs(chosen - expected).max() < tolerance(1 / n_groups, N)
    assert np.abs((x != 0).mean(0) - (1 - sparsity) / n_groups).max() < tolerance((1 - sparsity) / n_groups, N)


def test_correlated_and_anticorrelated_pairs() -> None:
    sparsity = 0.8
    task = get_task("superposition", n_features=9, n_correlated_pairs=2, n_anticorrelated_pairs=2, sparsity=sparsity)
    x = task.sample(N, seed=2).inputs[:, 0]
    on = x != 0
    assert np.abs(on.mean(0) - (1 - sparsity)).max() < tolerance(1 - sparsity, N)
    for a in (0, 2):  # correlated: together or not at all, with independent values
        assert np.array_equal(on[:, a], on[:, a + 1])
        both = on[:, a]
        assert abs(np.corrcoef(x[both, a], x[both, a + 1])[0, 1]) < 0.05
    for a in (4, 6):  # anticorrelated: never together
        assert not (on[:, a] & on[:, a + 1]).any()
        assert stats.kstest(x[on[:, a + 1], a + 1], "uniform").pvalue > 1e-3
    # everything else is independent
    joint = (on[:, 0] & on[:, 8]).mean()
    assert abs(joint - (1 - sparsity) ** 2) < tolerance((1 - sparsity) ** 2, N)


def test_metrics_are_importance_weighted_mse() -> None:
    task = get_task("superposition", n_features=5, sparsity=0.5, importance_decay=0.5)
    batch = task.sample(N, seed=0)
    zeros = torch.zeros(batch.inputs.shape)
    metrics = task.metrics(zeros, batch)
    x = batch.inputs[:, 0]
    assert metrics["weighted_mse"] == pytest.approx(((x**2) * 0.5 ** np.arange(5)).mean(), rel=1e-5)
    # E[x^2] = (1 - S) / 3 for each feature
    assert metrics["mse"] == pytest.approx(0.5 / 3, rel=0.03)
    assert task.metrics(torch.from_numpy(batch.inputs), batch) == {"weighted_mse": 0.0, "mse": 0.0}
    with pytest.raises(ToylabError, match="shaped like the inputs"):
        task.metrics(zeros[:, 0], batch)
