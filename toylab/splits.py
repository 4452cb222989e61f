"""Held-out sequences: a split of each task's sequence space by a hash of the sequence, so evaluation never meets training.

Training and evaluation draw from one distribution with different seeds, and a small space (a few
thousand distinct `modes` sequences) makes most evaluation sequences training sequences too. Here a
sequence belongs to the held-out part when the hash of its inputs falls in the first `HELDOUT_FRACTION`
of the hash range: training samples only the rest (`split="train"`), validation and evaluation only the
held-out part (`split="heldout"`), by rejection. The hash does not look at what a sequence means, so each
part is the task's distribution restricted to a pseudo-random subset of its sequences; the split is the
same in every seed, run and study, and no set of training sequences has to be kept to check it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from toylab.errors import ToylabError
from toylab.task import Batch, Counterfactuals

if TYPE_CHECKING:
    from toylab.task import Task

Split = Literal["train", "heldout"]
SPLITS: tuple[Split, ...] = ("train", "heldout")
HELDOUT_FRACTION = 0.25
"""Share of the sequence space (by hash) that training never samples."""
HELDOUT_BOUND = np.uint64(HELDOUT_FRACTION * 2**64)
"""Hashes below this lie in the held-out part."""
MAX_ROUNDS = 64


def sequence_hashes(inputs: np.ndarray) -> np.ndarray:
    """A 64-bit BLAKE2b hash of each sequence's inputs `[batch, ...]` -> `[batch]` uint64 (equal rows, equal hashes)."""
    rows = np.ascontiguousarray(inputs).reshape(len(inputs), -1)
    digests = b"".join(hashlib.blake2b(row.tobytes(), digest_size=8).digest() for row in rows)
    return np.frombuffer(digests, dtype="<u8").copy()


def in_heldout(inputs: np.ndarray) -> np.ndarray:
    """Bool `[batch]`: which sequences lie in the held-out part of the sequence space."""
    return sequence_hashes(inputs) < HELDOUT_BOUND


def sample_split(task: Task, n: int, seed: int, split: Split, exclude: Sequence[Batch] = ()) -> Batch:
    """`n` sequences of `task` from one part of its sequence space, deterministic in `(n, seed, split, exclude)`.

    Rejection sampling: each round asks `task.sample` for enough sequences (with a seed derived from
    `seed`, the split and the round) to fill the rest with high probability and keeps those of the part
    that occur in no batch of `exclude` (so, e.g., a selection batch and an evaluation batch are disjoint).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; valid: {', '.join(SPLITS)}")
    task.check_sample(n, seed)
    keep = HELDOUT_FRACTION if split == "heldout" else 1 - HELDOUT_FRACTION
    excluded = np.concatenate([sequence_hashes(b.inputs) for b in exclude]) if exclude else np.zeros(0, dtype=np.uint64)
    parts, have = [], 0
    for round_ in range(MAX_ROUNDS):
        if parts and have >= n:  # (at least one round, so that n = 0 gives an empty batch of the task's shapes)
            break
        ask = math.ceil((n - have) / keep * 1.1) + 16
        drawn = task.sample(ask, int(np.random.SeedSequence([seed, SPLITS.index(split), round_]).generate_state(1)[0]))
        hashes = sequence_hashes(drawn.inputs)
        mask = ((hashes < HELDOUT_BOUND) == (split == "heldout")) & ~np.isin(hashes, excluded)
        parts.append(drawn[np.flatnonzero(mask)])
        have += int(mask.sum())
    if have < n:  # a task whose sequences almost all hash to one part: its space is tiny
        raise ToylabError(f"task '{task.name}' gave only {have} of {n} {split} sequences in {MAX_ROUNDS} rounds: its sequence "
                          f"space is too small to hold out {HELDOUT_FRACTION:.0%} of it" + (" beside the excluded batches" if exclude else ""))
    return Batch.concat(parts)[:n]


def heldout_counterfactuals(task: Task, n: int, seed: int, variable: str) -> Counterfactuals:
    """`n` of `task.interchange`'s pairs whose base and source both lie in the held-out part (rejection sampling,
    deterministic in `(n, seed, variable)`), so no input of an intervention occurs in training."""
    task.check_sample(n, seed)
    keep = HELDOUT_FRACTION**2
    parts, have = [], 0
    for round_ in range(MAX_ROUNDS):
        if parts and have >= n:
            break
        ask = math.ceil((n - have) / keep * 1.2) + 16
        drawn = task.interchange(ask, int(np.random.SeedSequence([seed, len(SPLITS), round_]).generate_state(1)[0]), variable)
        mask = in_heldout(drawn.base.inputs) & in_heldout(drawn.source.inputs)
        parts.append(drawn[np.flatnonzero(mask)])
        have += int(mask.sum())
    if have < n:
        raise ToylabError(f"task '{task.name}' gave only {have} of {n} held-out interchange pairs for '{variable}' in "
                          f"{MAX_ROUNDS} rounds: its sequence space is too small")
    return Counterfactuals.concat(parts)[:n]


def overlap(a: Batch, b: Batch) -> int:
    """How many sequences of `b` also occur in `a` (by their inputs)."""
    return int(np.isin(sequence_hashes(b.inputs), sequence_hashes(a.inputs)).sum())
