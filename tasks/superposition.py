"""Sparse features with importances: the data of toy models of superposition (Elhage et al. 2022)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from toylab.errors import ToylabError
from toylab.registry import register_task
from toylab.task import IGNORE, Batch, Label, Task

if TYPE_CHECKING:  # imported where used, so listing tasks stays fast
    import torch

MAX_FEATURES = 10_000


@dataclass(frozen=True)
class SuperpositionConfig:
    n_features: int = 20
    sparsity: float = 0.9
    """S: probability that a feature is zero (within the sample's group when n_groups > 1)."""
    importance_decay: float = 0.7
    """Importance I_i = importance_decay ** i; 1 gives uniform importance."""
    n_groups: int = 1
    """Contiguous feature groups; a sample draws its active features from one group, chosen uniformly."""
    n_correlated_pairs: int = 0
    """Pairs (0, 1), (2, 3), ... whose features are active together or not at all."""
    n_anticorrelated_pairs: int = 0
    """The next pairs, whose features are never active together (each still active with probability 1 - S)."""

    def __post_init__(self) -> None:
        if not 1 <= self.n_features <= MAX_FEATURES:
            raise ValueError(f"n_features must be in [1, {MAX_FEATURES}] (got {self.n_features})")
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1) (got {self.sparsity})")
        if not 0 < self.importance_decay <= 1:
            raise ValueError(f"importance_decay must be in (0, 1] (got {self.importance_decay})")
        if not 1 <= self.n_groups <= self.n_features:
            raise ValueError(f"n_groups must be in [1, n_features={self.n_features}] (got {self.n_groups})")
        pairs = self.n_correlated_pairs + self.n_anticorrelated_pairs
        if min(self.n_correlated_pairs, self.n_anticorrelated_pairs) < 0 or 2 * pairs > self.n_features:
            raise ValueError(f"need pairs >= 0 and 2 * (correlated + anticorrelated pairs) <= n_features (got {pairs})")
        if pairs and self.n_groups > 1:
            raise ValueError("use either n_groups > 1 or correlated/anticorrelated pairs, not both")
        if self.n_anticorrelated_pairs and self.sparsity < 0.5:
            raise ValueError(f"anticorrelated pairs need sparsity >= 0.5 (got {self.sparsity})")


@register_task("superposition")
class SparseFeatures(Task):
    """Sparse non-negative features to reconstruct through a bottleneck (toy models of superposition).

    Each of n features is 0 with probability S (the sparsity) and otherwise uniform on [0, 1];
    feature i has importance I_i = decay^i in the loss. Planted structure: with G groups a sample
    picks one group uniformly and only that group's features can be active; correlated pairs are
    active together, anticorrelated pairs never. A sample is one position: inputs and targets are
    the same float vectors `[batch, 1, n]`.

    Every label is a "state": `active` and `n_active` are read off the input directly, and so is
    `group`, the block that holds the nonzero features (groups are disjoint), undefined only for an
    all-zero input. Nothing is a "function": the model's job is to reproduce its input.

    Sampling is one vectorized torch routine with an instance dimension (`generate`), so the
    per-step training data of a whole sweep of sparsities and the seeded `sample` batches come
    from the same code. One uniform u per feature gives both the activity (u < 1 - S) and the value
    (1 - u / (1 - S), uniform given activity); an anticorrelated pair reads its first feature's u:
    the first is active when u < 1 - S, the second when 1 - S <= u < 2(1 - S).
    """

    Config = SuperpositionConfig
    primary_metric = "weighted_mse"
    competence = None
    config: SuperpositionConfig

    @property
    def seq_len(self) -> int:
        return 1

    @property
    def n_features(self) -> int:
        return self.config.n_features

    @property
    def importance(self) -> np.ndarray:
        """I_i = decay^i, `[n_features]` float32."""
        return (self.config.importance_decay ** np.arange(self.n_features)).astype(np.float32)

    @property
    def feature_groups(self) -> np.ndarray:
        """Group of each feature `[n_features]`: G contiguous, near-equal blocks."""
        return np.arange(self.n_features) * self.config.n_groups // self.n_features

    @property
    def labels(self) -> dict[str, Label]:
        n = self.n_features
        return {
            "active": Label(
                "active", "state", "which features are nonzero", tuple(f"f{i}" for i in range(n)), multi_hot=True
            ),
            "group": Label(
                "group", "state", "the group the sample's active features come from (IGNORE when none is active)",
                tuple(str(g) for g in range(self.config.n_groups)),
            ),
            "n_active": Label(
                "n_active", "state", "number of nonzero features", tuple(str(i) for i in range(n + 1)), ordinal=True
            ),
        }

    def generate(
        self, n: int, generator: torch.Generator, sparsity: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`n` samples for each of `len(sparsity)` instances (default: one, at the configured sparsity).

        Returns `x` float `[n, inst, n_features]`, `active` bool of the same shape, and `group`
        `[n, inst]` (IGNORE where no feature is active). Arrays are views of instance-major memory,
        the layout the instance-batched models compute in.
        """
        import torch

        cfg, features = self.config, self.n_features
        if sparsity is None:
            sparsity = torch.tensor([cfg.sparsity])
        sparsity = torch.as_tensor(sparsity, dtype=torch.float32).reshape(-1)
        low = 0.5 if cfg.n_anticorrelated_pairs else 0.0
        if not bool(((sparsity >= low) & (sparsity < 1)).all()):
            raise ToylabError(f"sparsity must be in [{low}, 1) for this task (got {sparsity.tolist()})")
        density = (1 - sparsity).view(-1, 1, 1)
        u = torch.rand(len(sparsity), n, features, generator=generator)
        n_corr, n_anti = 2 * cfg.n_correlated_pairs, 2 * cfg.n_anticorrelated_pairs
        v, active = u, u < density
        if n_corr + n_anti:  # a paired feature reads its pair's first uniform
            source = torch.arange(features)
            source[: n_corr + n_anti] -= source[: n_corr + n_anti] % 2
            shifted = torch.zeros(features)
            shifted[n_corr + 1 : n_corr + n_anti : 2] = 1.0  # second feature of an anticorrelated pair
            v = u[..., source] - shifted * density
            active = (v >= 0) & (v < density)
        values = 1 - v / density  # in (0, 1] where active, so active features are never exactly 0
        values[..., 1:n_corr:2] = 1 - u[..., 1:n_corr:2]  # correlated partners keep their own value
        if cfg.n_groups > 1:
            group = torch.randint(cfg.n_groups, (len(sparsity), n), generator=generator)
            active &= torch.from_numpy(self.feature_groups) == group.unsqueeze(-1)
        else:
            group = torch.zeros(len(sparsity), n, dtype=torch.long)
        x = torch.where(active, values, 0.0)
        group = torch.where(active.any(-1), group, IGNORE)
        return x.transpose(0, 1), active.transpose(0, 1), group.transpose(0, 1)

    def sample(self, n: int, seed: int) -> Batch:
        import torch

        self.check_sample(n, seed)
        x, active, group = self.generate(n, torch.Generator().manual_seed(seed))
        inputs = x.numpy().copy()
        labels = {
            "active": active.numpy().astype(np.int64),
            "group": group.numpy().copy(),
            "n_active": active.sum(-1).numpy(),
        }
        return Batch(inputs, inputs.copy(), np.ones((n, 1), dtype=bool), labels)

    def decode(self, inputs: np.ndarray) -> list[str]:
        """The nonzero features of each position, e.g. `f2=0.41 f7=0.93`, or `0`."""
        return [" ".join(f"f{i}={v:.2f}" for i, v in enumerate(row) if v) or "0" for row in inputs]

    def metrics(self, outputs: torch.Tensor, batch: Batch) -> dict[str, float]:
        """Reconstruction error of model outputs shaped like the inputs `[batch, 1, n_features]`.

        `weighted_mse` is the training loss, mean over samples and features of I_i (x_i - x'_i)^2
        (lower is better); `mse` drops the importances.
        """
        import torch

        inputs, _, _ = batch.tensors()
        if tuple(outputs.shape) != tuple(inputs.shape):
            raise ToylabError(
                f"superposition metrics need outputs shaped like the inputs {tuple(inputs.shape)}; "
                f"got {tuple(outputs.shape)}"
            )
        error = (outputs.detach().float().cpu() - inputs) ** 2
        return {
            "weighted_mse": (error * torch.from_numpy(self.importance)).mean().item(),
            "mse": error.mean().item(),
        }
