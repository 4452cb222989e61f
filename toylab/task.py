"""The task interface: seeded batches of sequences with targets, a loss mask and ground-truth labels.

A task is one small class in one file under `tasks/` (or in a third-party package, registered
through the `toylab.tasks` entry-point group). It declares its options as a `Config` dataclass,
its labels as `Label` metadata, and samples `Batch`es deterministically from a seed.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from toylab.config import build, check_memory
from toylab.errors import NotATokenTask, ToylabError

if TYPE_CHECKING:  # torch is imported where it is used, so listing tasks stays fast
    import torch

IGNORE = -1
"""Label value at positions where a label is undefined (padding, or e.g. match distance of an open bracket)."""
MAX_SEED = 2**32 - 1
"""Seeds are in [0, MAX_SEED], the range every seeded library here (numpy, torch, Lightning) accepts."""


@dataclass(frozen=True)
class Label:
    """Metadata of one per-token ground-truth label.

    `kind` is "state" when the label can be read off the input tokens (token identity,
    position), "function" when it is what the model must compute. Categorical labels name
    their classes; ordinal labels (depth, distance) are integers whose classes are "0".."n-1".
    Multi-hot labels (a set of classes, e.g. tied optimal moves) are arrays `[batch, pos, n_classes]`.
    """

    name: str
    kind: Literal["state", "function"]
    description: str
    classes: tuple[str, ...]
    ordinal: bool = False
    multi_hot: bool = False

    @property
    def n_classes(self) -> int:
        return len(self.classes)


@dataclass
class Batch:
    """A batch of sequences. Arrays are numpy; `inputs` are int tokens `[batch, pos]` or real vectors `[batch, pos, d]`.

    `targets` are next tokens `[batch, pos]` (or real vectors), scored where `loss_mask` is true.
    `labels` maps each label name to `[batch, pos]` ints (IGNORE where undefined) or
    `[batch, pos, n_classes]` 0/1 for multi-hot labels.
    """

    inputs: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    labels: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: Any) -> Batch:
        return Batch(
            self.inputs[index],
            self.targets[index],
            self.loss_mask[index],
            {name: value[index] for name, value in self.labels.items()},
        )

    @staticmethod
    def concat(batches: Sequence[Batch]) -> Batch:
        """The sequences of `batches` (of one task) one after another."""
        return Batch(
            np.concatenate([b.inputs for b in batches]),
            np.concatenate([b.targets for b in batches]),
            np.concatenate([b.loss_mask for b in batches]),
            {name: np.concatenate([b.labels[name] for b in batches]) for name in batches[0].labels},
        )

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(inputs, targets, loss_mask)` as torch tensors."""
        import torch

        return (
            torch.from_numpy(np.ascontiguousarray(self.inputs)),
            torch.from_numpy(np.ascontiguousarray(self.targets)),
            torch.from_numpy(np.ascontiguousarray(self.loss_mask)),
        )


@dataclass
class Counterfactuals:
    """Interchange pairs for one causal variable V of a task's planted causal model: per pair a `base` and a
    `source` sequence (aligned position by position), and what the causal model outputs for the base with V set to
    its value in the source: next tokens `targets` `[pair, pos]`, scored at `mask`. An intervention on a model that
    moves V's representation from the source into the base run succeeds where the model then predicts `targets`."""

    variable: str
    base: Batch
    source: Batch
    targets: np.ndarray
    mask: np.ndarray
    positions: np.ndarray | None = None
    """Bool `[pair, pos]`: where V enters the input, so where an intervention moves it (None: every position, for a
    variable that the sequence carries everywhere)."""

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: Any) -> Counterfactuals:
        return Counterfactuals(self.variable, self.base[index], self.source[index], self.targets[index], self.mask[index],
                               None if self.positions is None else self.positions[index])

    @property
    def informative(self) -> np.ndarray:
        """Bool `[pair, pos]`: scored positions where setting V changes the causal model's output (doing nothing fails there)."""
        return self.mask & (self.targets != self.base.targets)

    @staticmethod
    def concat(parts: Sequence[Counterfactuals]) -> Counterfactuals:
        positions = None if parts[0].positions is None else np.concatenate([p.positions for p in parts])
        return Counterfactuals(parts[0].variable, Batch.concat([p.base for p in parts]), Batch.concat([p.source for p in parts]),
                               np.concatenate([p.targets for p in parts]), np.concatenate([p.mask for p in parts]), positions)


class Task(ABC):
    """A synthetic task with planted, known ground truth.

    Subclasses set `name`, a `Config` dataclass of options, `labels`, and implement `sample`.
    Token tasks also set `vocab`; `metrics` scores a model's logits with the task's own metric.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    primary_metric: ClassVar[str] = "token_accuracy"
    competence: ClassVar[float | None] = 0.9
    """The `primary_metric` a model must reach on held-out validation before a study analyses it (a model that has not
    learned the task says nothing about how it solves it); None: no threshold (e.g. a loss)."""
    target: ClassVar[float | None] = None
    """The `primary_metric` at which training has learned the task and may stop (`TrainConfig.target = "task"`);
    None: train every step."""
    causal_variables: ClassVar[tuple[str, ...]] = ()
    """Variables of the task's planted causal model that `interchange` can set from another input."""

    def __init__(self, config: Any = None, **options: Any) -> None:
        if config is None or isinstance(config, Mapping):
            config = build(self.Config, config, **options)
        elif not isinstance(config, self.Config):
            raise ToylabError(f"task '{self.name}' options must be a table of {self.Config.__name__} keys, not {config!r}")
        self.config = config

    @property
    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    @property
    @abstractmethod
    def labels(self) -> dict[str, Label]:
        """Label name -> metadata."""

    @property
    @abstractmethod
    def seq_len(self) -> int:
        """Number of positions in every sampled sequence (padded)."""

    @property
    def vocab(self) -> tuple[str, ...]:
        """Token strings, indexed by token id (token tasks only)."""
        from toylab.registry import TASKS

        tokens = [name for name in TASKS.names() if TASKS.get(name).vocab is not Task.vocab]
        raise NotATokenTask(f"task '{self.name}' has real-valued inputs, not tokens; token tasks: {', '.join(tokens)}")

    @abstractmethod
    def sample(self, n: int, seed: int) -> Batch:
        """Sample `n` sequences; the same `(n, seed)` gives the same batch (call `check_sample(n, seed)` first)."""

    def sample_split(self, n: int, seed: int, split: Literal["train", "heldout"], exclude: Sequence[Batch] = ()) -> Batch:
        """`n` sequences from the training or the held-out part of the task's sequence space (`toylab.splits`):
        models train on "train" only, so "heldout" sequences (validation, evaluation) never occur in training.
        Sequences of the batches in `exclude` are left out too."""
        from toylab.splits import sample_split

        return sample_split(self, n, seed, split, exclude)

    def check_sample(self, n: int, seed: int, working_copies: int = 4) -> None:
        """Refuse (one-line ToylabError) a negative `n`, a seed out of range, or a batch too large for memory.

        The estimate counts 8 bytes per input, target, mask and label value of every position, times
        `working_copies` for what sampling holds on the way.
        """
        if n < 0:
            raise ToylabError(f"the number of sequences must be >= 0 (got {n})")
        if not 0 <= seed <= MAX_SEED:
            raise ToylabError(f"seed must be in [0, {MAX_SEED}] (got {seed})")
        values = 3 + sum(label.n_classes if label.multi_hot else 1 for label in self.labels.values())
        check_memory(n * self.seq_len * values * 8 * working_copies, f"sampling {n:,} sequences of {self.seq_len:,} positions",
                     "ask for fewer sequences or shorter ones")

    def positions(self, batch: Batch) -> np.ndarray:
        """Bool `[batch, pos]`: the real (non-padding) positions, where activations are analysed."""
        return np.ones(batch.inputs.shape[:2], dtype=bool)

    def grid(self, inputs: np.ndarray) -> list[dict[str, Any]] | None:
        """Optional geometry for drawing sequences `[batch, pos]` as walks on a grid (the expert map draws mazes
        with it): per sequence its `size` (cells per side), open `edges` as `[r1, c1, r2, c2]`, `start` and `goal`
        as `[r, c]`, and `path` as `[position, r, c]` for the positions that walk it. None for tasks without a grid."""
        return None

    def token_cells(self) -> np.ndarray | None:
        """Optional grid geometry for models that read the input as a grid (`arch=drc`): bool `[vocab, rows, cols]`, the
        cells each token names (none for a token that names no cell). None for tasks without a grid."""
        return None

    def decode(self, inputs: np.ndarray) -> list[str]:
        """Readable strings for one sequence's inputs."""
        return [self.vocab[t] for t in inputs]

    def metrics(self, logits: torch.Tensor, batch: Batch) -> dict[str, float]:
        """The task's metrics for model logits `[batch, pos, vocab]`; default: next-token accuracy."""
        _, targets, mask = batch.tensors()
        correct = (logits.argmax(-1) == targets) & mask
        return {"token_accuracy": (correct.sum() / mask.sum()).item()}

    def interchange(self, n: int, seed: int, variable: str) -> Counterfactuals:
        """`n` interchange pairs for `variable` (one of `causal_variables`), deterministic in `(n, seed)`; tasks with a
        causal model implement it (`counterfactuals` keeps the held-out pairs)."""
        raise ToylabError(f"task '{self.name}' defines no causal variables to intervene on")

    def counterfactuals(self, n: int, seed: int, variable: str) -> Counterfactuals:
        """`n` interchange pairs whose base and source both lie in the held-out part of the sequence space (`toylab.splits`)."""
        from toylab.splits import heldout_counterfactuals

        if variable not in self.causal_variables:
            valid = ", ".join(self.causal_variables) or "none"
            raise ToylabError(f"unknown causal variable '{variable}' of task '{self.name}'; valid: {valid}")
        return heldout_counterfactuals(self, n, seed, variable)

    def shifted(self) -> Task | None:
        """This task on larger or deeper inputs than it samples (its size knob turned up), with the same vocabulary and
        labels, for out-of-distribution evaluation; None for a task without a size knob."""
        return None

    def shifted_sample(self, n: int, seed: int) -> Batch:
        """`n` sequences of `shifted()` that this task could never sample (default: all of `shifted()`'s, for a knob
        such as a length that every shifted sequence exceeds)."""
        shifted = self.shifted()
        if shifted is None:
            raise ToylabError(f"task '{self.name}' has no size knob to sample larger or deeper inputs with")
        return shifted.sample(n, seed)

    def describe(self) -> str:
        """One paragraph for `toylab tasks show`."""
        return (self.__doc__ or self.name).strip().split("\n\n")[0]
