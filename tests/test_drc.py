"""The DRC: its grid input (checked against the vocabulary's names), hooks, thinking time against one sequence at a
time, save/load through a training run, and that it learns mazes."""

import re

import numpy as np
import pytest
import torch

from toylab.errors import ToylabError
from toylab.models import DRC, DRCConfig
from toylab.models.drc import READ_OUTS
from toylab.registry import get_task
from toylab.training import TrainConfig, build_model, evaluate, load_trained, train

PATH = 3
"""gridworld's `<path>` token."""


@pytest.fixture(scope="module")
def task():
    return get_task("gridworld", size=2, canvas=3, pause=1)


def small(task, seed: int = 0, **options) -> DRC:
    torch.manual_seed(seed)
    return build_model(task, {"arch": "drc", "channels": 4, "d_obs": 4, **options}).eval()


def test_token_cells_name_the_cells_of_each_token_string(task):
    """The map read independently from the vocabulary's strings: `(r,c)` names its cell, `(r,c)-(r',c')` both."""
    cells = task.token_cells()
    assert cells.shape == (len(task.vocab), 3, 3) and cells.dtype == bool
    for token, name in enumerate(task.vocab):
        named = {(int(r), int(c)) for r, c in re.findall(r"\((\d),(\d)\)", name)}
        assert {tuple(map(int, rc)) for rc in zip(*np.nonzero(cells[token]))} == named, name
    assert get_task("brackets").token_cells() is None


def test_shapes_hooks_and_layouts(task):
    model = small(task, ticks=3)
    tokens = torch.from_numpy(task.sample(3, 0).inputs)
    logits, cache = model.run_with_cache(tokens)
    t, cells = tokens.shape[1], 9
    assert logits.shape == (3, t, len(task.vocab))
    assert sorted(cache) == sorted(model.hook_names())
    assert {f"blocks.{d}.hook_{name}" for d in range(2) for name in (*READ_OUTS, "hidden_ticks")} | {
        "hook_observation", "hook_encoded"} == set(model.hook_names())
    assert cache["hook_observation"].shape == (3, t, cells * 2 * 4)
    assert cache["blocks.1.hook_hidden_ticks"].shape == (3, t, 3, cells * 4)
    for d in range(2):
        hidden = cache[f"blocks.{d}.hook_hidden"]
        assert hidden.shape == (3, t, cells * 4)
        torch.testing.assert_close(hidden, cache[f"blocks.{d}.hook_hidden_ticks"][:, :, -1])
        torch.testing.assert_close(hidden, cache[f"blocks.{d}.hook_output_gate"] * cache[f"blocks.{d}.hook_cell"].tanh())
    torch.testing.assert_close(model(tokens), logits)  # recording the read-outs changes nothing
    # cell-major layout: a token naming no cell (<bos>) writes the same vector G[<bos>] to every cell at position 0
    now = cache["hook_observation"][:, 0].view(3, cells, 8)[..., 4:]
    torch.testing.assert_close(now, model.G[tokens[:, :1]].expand(3, cells, 4))


def test_the_encoding_is_editable_and_the_read_outs_refuse_edits(task):
    model = small(task)
    tokens = torch.from_numpy(task.sample(2, 0).inputs)
    clean = model(tokens)
    zeroed = model.run_with_hooks(tokens, fwd_hooks=[("hook_encoded", lambda x, hook: torch.zeros_like(x))])
    assert not torch.allclose(clean, zeroed)
    with pytest.raises(ToylabError, match="read-out"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_hidden", lambda x, hook: torch.zeros_like(x))])


def test_extra_ticks_equal_one_sequence_at_a_time_and_zero_changes_nothing(task):
    """The masked, batched thinking time against the reference: each sequence run alone (no masking) with its own
    extra ticks at `<path>`; zero extra ticks is the plain forward; extra ticks change nothing before `<path>`."""
    model = small(task)
    tokens = torch.from_numpy(task.sample(4, 1).inputs)
    extra = (tokens == PATH) * torch.tensor([[0], [1], [3], [2]])
    batched = model(tokens, extra_ticks=extra)
    for i in range(4):
        torch.testing.assert_close(batched[i:i + 1], model(tokens[i:i + 1], extra_ticks=extra[i:i + 1]), atol=1e-5, rtol=1e-5)
    plain = model(tokens)
    torch.testing.assert_close(model(tokens, extra_ticks=torch.zeros_like(tokens)), plain)
    marker = int((tokens[2] == PATH).nonzero())
    torch.testing.assert_close(batched[2, :marker], plain[2, :marker])
    assert not torch.allclose(batched[2, marker:], plain[2, marker:])
    with pytest.raises(ToylabError, match="extra_ticks"):
        model(tokens, extra_ticks=-extra)


def test_bad_configs_and_tasks_without_a_grid_are_refused(task):
    with pytest.raises(ToylabError, match="has none"):
        build_model(get_task("brackets"), {"arch": "drc"})
    with pytest.raises(ToylabError, match="not a model option"):
        build_model(task, {"arch": "drc", "rows": 3})
    with pytest.raises(ToylabError, match="token_cells"):
        DRC(DRCConfig(vocab_size=5, max_len=4, rows=2, cols=2), np.zeros((5, 3, 3), dtype=bool))
    with pytest.raises(ToylabError, match="max_len"):
        small(task)(torch.zeros(1, task.seq_len + 1, dtype=torch.long))


def test_training_is_deterministic_and_a_run_loads_back(task, tmp_path):
    options = {"arch": "drc", "channels": 4, "d_obs": 4, "depth": 1}
    cfg = TrainConfig(steps=3, batch_size=8, n_train=64, n_val=16, eval_every=3, warmup_steps=0)
    runs = [train(task, options, cfg, tmp_path / name, progress=False) for name in ("a", "b")]
    tokens = torch.from_numpy(task.sample(4, 9).inputs)
    loaded = load_trained(tmp_path / "a").model
    assert isinstance(loaded, DRC)
    torch.testing.assert_close(loaded(tokens), runs[0].model(tokens))
    torch.testing.assert_close(runs[1].model(tokens), runs[0].model(tokens))
    assert torch.equal(loaded.token_cells, torch.from_numpy(task.token_cells()).float().flatten(1))


def learns(task, steps: int, tmp_path) -> tuple[DRC, DRC]:
    """A small DRC after `steps` of training, and the same DRC at its initialization."""
    options = {"arch": "drc", "channels": 16, "d_obs": 8}
    cfg = TrainConfig(steps=steps, batch_size=32, lr=1e-2, n_train=steps * 32, n_val=32, eval_every=steps, warmup_steps=10)
    trained = train(task, options, cfg, tmp_path / "run", progress=False).model
    torch.manual_seed(0)
    return trained, build_model(task, options).eval()


def test_a_drc_learns_to_move_in_small_mazes(tmp_path):
    """Fast: after 30 steps on 2×2 mazes, teacher-forced moves are right far more often than at initialization."""
    task = get_task("gridworld", size=2)
    batch = task.sample_split(100, 5, "heldout")
    trained, untrained = (evaluate(model, task, batch)["move_accuracy"] for model in learns(task, 30, tmp_path))
    assert trained >= untrained + 0.2, (trained, untrained)


@pytest.mark.slow
def test_a_drc_learns_3x3_mazes(tmp_path):
    task = get_task("gridworld", size=3)
    batch = task.sample_split(200, 5, "heldout")
    trained, untrained = (task.solve_rate(model, batch)["solve_rate"] for model in learns(task, 600, tmp_path))
    assert trained >= untrained + 0.5, (trained, untrained)
