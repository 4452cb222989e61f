"""Held-out sets that are held out: every registered task's evaluation sequences never occur in its training data."""

import numpy as np
import pytest

from toylab import get_task
from toylab.errors import ToylabError
from toylab.registry import TASKS
from toylab.splits import HELDOUT_FRACTION, in_heldout, overlap, sample_split, sequence_hashes
from toylab.determinism import data_seed
from toylab.training import TaskDataModule, TrainConfig, build_model


def test_independent_seeds_alone_leak_training_sequences_into_evaluation():
    """Today's design without the split: a small space (modes) puts most evaluation sequences in training."""
    task = get_task("modes")
    train, evaluation = task.sample(20000, data_seed(0, "train")), task.sample(500, 20261121)
    assert overlap(train, evaluation) > 100


@pytest.mark.parametrize("name", TASKS.names())
def test_heldout_sequences_never_occur_in_training(name: str):
    task = get_task(name)
    train = task.sample_split(6000, data_seed(0, "train"), "train")
    heldout = task.sample_split(1500, 20261121, "heldout")
    assert len(train) == 6000 and len(heldout) == 1500
    assert overlap(train, heldout) == 0
    assert in_heldout(heldout.inputs).all() and not in_heldout(train.inputs).any()
    # the same (n, seed, split), the same sequences; another seed, other ones
    again = task.sample_split(1500, 20261121, "heldout")
    assert np.array_equal(again.inputs, heldout.inputs) and all(np.array_equal(again.labels[k], v) for k, v in heldout.labels.items())
    assert not np.array_equal(task.sample_split(1500, 7, "heldout").inputs, heldout.inputs)


def test_the_split_keeps_the_task_distribution():
    """The hash ignores meaning: each part has the task's label marginals (modes: the rule, uniform over 4)."""
    task = get_task("modes")
    for split in ("train", "heldout"):
        rules = task.sample_split(8000, 3, split).labels["mode"][:, 0]
        shares = np.bincount(rules, minlength=4) / len(rules)
        assert np.abs(shares - 0.25).max() < 0.03
    raw = get_task("brackets").sample(20000, 5)
    assert abs(in_heldout(raw.inputs).mean() - HELDOUT_FRACTION) < 0.02


def test_batches_drawn_with_exclude_are_disjoint():
    task = get_task("modes")  # 4,096 held-out sequences: independent batches of 1,000 would share many
    first = task.sample_split(1000, 1, "heldout")
    assert overlap(first, task.sample_split(1000, 2, "heldout")) > 50
    second = task.sample_split(1000, 2, "heldout", exclude=[first])
    third = task.sample_split(1000, 3, "heldout", exclude=[first, second])
    assert overlap(first, second) == overlap(first, third) == overlap(second, third) == 0


def test_equal_sequences_hash_equal_and_others_differ():
    rows = np.array([[1, 2, 3], [1, 2, 3], [3, 2, 1]])
    hashes = sequence_hashes(rows)
    assert hashes[0] == hashes[1] != hashes[2]


def test_training_validates_on_heldout_sequences():
    task = get_task("modes")
    cfg = TrainConfig(n_train=4000, n_val=500, seed=2)
    data = TaskDataModule(task, cfg, build_model(task, {"d_model": 16, "n_heads": 2}))
    assert data.val_overlap == 0 and in_heldout(data.val_batch.inputs).all()
    assert not in_heldout(data.train_data.tensors[0].numpy()).any()


def test_a_space_too_small_to_hold_out_is_one_line(monkeypatch: pytest.MonkeyPatch):
    task = get_task("modes")
    one = task.sample(1, 0)
    monkeypatch.setattr(task, "sample", lambda n, seed: one[np.zeros(n, dtype=int)])  # a task of one sequence
    empty = "train" if in_heldout(one.inputs)[0] else "heldout"
    with pytest.raises(ToylabError, match="too small to hold out"):
        sample_split(task, 10, 0, empty)
