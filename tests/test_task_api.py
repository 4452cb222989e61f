"""Generic checks every registered task must pass: determinism, shapes, label ranges, metadata."""

import numpy as np
import pytest

from toylab.registry import get_task, list_tasks
from toylab.task import IGNORE, Label


@pytest.fixture(params=list_tasks())
def task(request):
    return get_task(request.param)


def test_sampling_is_deterministic(task):
    a, b = task.sample(64, seed=7), task.sample(64, seed=7)
    np.testing.assert_array_equal(a.inputs, b.inputs)
    np.testing.assert_array_equal(a.targets, b.targets)
    for name in a.labels:
        np.testing.assert_array_equal(a.labels[name], b.labels[name])
    assert not np.array_equal(a.inputs, task.sample(64, seed=8).inputs)


def test_shapes_and_label_ranges(task):
    batch = task.sample(128, seed=0)
    n, pos = batch.inputs.shape[:2]
    assert (n, pos) == (128, task.seq_len)
    assert batch.loss_mask.shape == (n, pos) and batch.loss_mask.dtype == bool
    assert batch.loss_mask.any()
    assert task.positions(batch).shape == (n, pos)
    assert set(batch.labels) == set(task.labels)
    for name, label in task.labels.items():
        values = batch.labels[name]
        if label.multi_hot:
            assert values.shape == (n, pos, label.n_classes)
            assert np.isin(values, [IGNORE, 0, 1]).all()
        else:
            assert values.shape == (n, pos)
            defined = values[values != IGNORE]
            assert defined.size > 0, f"label {name} is never defined"
            assert defined.min() >= 0 and defined.max() < label.n_classes, name
    if np.issubdtype(batch.inputs.dtype, np.integer):
        assert 0 <= batch.inputs.min() and batch.inputs.max() < len(task.vocab)


def test_label_metadata(task):
    assert task.describe()
    for name, label in task.labels.items():
        assert isinstance(label, Label) and label.name == name
        assert label.kind in ("state", "function")
        assert label.n_classes >= 1 and label.description


def test_unknown_option_is_rejected(task):
    from toylab.errors import ToylabError

    with pytest.raises(ToylabError, match="valid:"):
        get_task(task.name, {"no_such_option": 1})


def test_third_party_tasks_register_through_entry_points(monkeypatch):
    from dataclasses import dataclass

    from toylab.tasks.brackets import Brackets
    from toylab import registry

    @dataclass(frozen=True)
    class EntryPoint:
        name: str

        def load(self):
            return type("Plugin", (Brackets,), {"__doc__": "A plugin task."})

    monkeypatch.setattr(registry, "entry_points", lambda group: [EntryPoint("plugin")] if group == "toylab.tasks" else [])
    monkeypatch.setattr(registry.TASKS, "_classes", dict(registry.TASKS._classes))
    monkeypatch.setattr(registry.TASKS, "_discovered", False)
    assert "plugin" in registry.list_tasks() and "brackets" in registry.list_tasks()
    assert registry.get_task("plugin").sample(2, seed=0).inputs.shape[0] == 2
