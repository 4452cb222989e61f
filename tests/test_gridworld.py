"""Gridworld mazes: labels against an independent BFS over mazes read back from the token strings."""

from __future__ import annotations

import re
from collections import deque

import networkx as nx
import numpy as np
import pytest
import torch

from toylab.tasks.gridworld import CELL, EOS, MOVES, PATH, TOKEN_TYPES, Gridworld, is_shortest_path
from toylab import ToylabError, get_task
from toylab.task import IGNORE, Batch

STEP = {(-1, 0): 0, (1, 0): 1, (0, -1): 2, (0, 1): 3}  # (d_row, d_col) -> index in MOVES


def parse(name: str) -> tuple[tuple[int, int], ...]:
    """The cells named by a token string: one for a cell token, two for an edge token, none otherwise."""
    return tuple((int(r), int(c)) for r, c in re.findall(r"\((\d+),(\d+)\)", name))


def bfs(adjacency: dict, source: tuple[int, int]) -> dict:
    dist, queue = {source: 0}, deque([source])
    while queue:
        here = queue.popleft()
        for there in adjacency[here]:
            if there not in dist:
                dist[there] = dist[here] + 1
                queue.append(there)
    return dist


def all_shortest_paths(adjacency: dict, start: tuple[int, int], goal: tuple[int, int]) -> list[list]:
    """Every shortest path, by walking down the BFS layers from the start."""
    to_goal = bfs(adjacency, goal)

    def extend(path: list) -> list[list]:
        here = path[-1]
        if here == goal:
            return [path]
        return [p for there in adjacency[here] if to_goal[there] == to_goal[here] - 1 for p in extend([*path, there])]

    return extend([start])


def read(task: Gridworld, sequence: np.ndarray) -> dict:
    """Layout and maze of one sequence, read from the token strings."""
    names = [task.vocab[t] for t in sequence]
    edges = [i for i, name in enumerate(names) if len(parse(name)) == 2]
    marker = names.index("<path>")
    eos = names.index("<eos>")
    adjacency: dict = {}
    for i in edges:
        a, b = parse(names[i])
        adjacency.setdefault(a, set()).add(b)
        adjacency.setdefault(b, set()).add(a)
    return {
        "names": names, "edges": edges, "marker": marker, "eos": eos, "adjacency": adjacency,
        "start": parse(names[1])[0], "goal": parse(names[2])[0],
        "path": [parse(n)[0] for n in names[marker + 1 : eos]],
    }


def check_sequence(task: Gridworld, batch: Batch, row: int) -> None:
    """Every label of one sequence against an independent computation."""
    m, size, p = task.canvas, task.config.size, task.config.pause
    seq = read(task, batch.inputs[row])
    adjacency, start, goal, path, marker = seq["adjacency"], seq["start"], seq["goal"], seq["path"], seq["marker"]
    labels = {name: value[row] for name, value in batch.labels.items()}

    # the maze: a connected size x size window of the canvas; the path is a shortest path
    cells = sorted(adjacency)
    top, left = min(r for r, _ in cells), min(c for _, c in cells)
    assert cells == [(top + r, left + c) for r in range(size) for c in range(size)]
    assert top + size <= m and left + size <= m
    to_goal, from_start = bfs(adjacency, goal), bfs(adjacency, start)
    assert len(to_goal) == size * size
    assert start != goal and path[0] == start and path[-1] == goal
    assert len(path) - 1 == to_goal[start]
    assert all(b in adjacency[a] for a, b in zip(path, path[1:]))
    assert seq["edges"] == list(range(3, 3 + len(seq["edges"])))
    assert marker == 3 + len(seq["edges"]) + p and seq["names"][3 + len(seq["edges"]) : marker] == ["<pause>"] * p

    positions = len(batch.inputs[row])
    types = ["bos", "start", "goal"] + ["edge"] * len(seq["edges"]) + ["pause"] * p + ["path"]
    types += ["step"] * len(path) + ["eos"]
    assert [TOKEN_TYPES[t] for t in labels["token_type"][: len(types)]] == types
    assert (labels["token_type"][len(types) :] == IGNORE).all()
    assert all(name == "<pad>" for name in seq["names"][len(types) :])
    expected_mask = np.zeros(positions, dtype=bool)
    expected_mask[marker : marker + len(path) + 1] = True
    assert (batch.loss_mask[row] == expected_mask).all()
    assert (batch.targets[row][:-1] == batch.inputs[row][1:]).all()

    for pos in range(positions):
        in_segment = 3 + len(seq["edges"]) <= pos < marker + 1 + len(path)
        goal_known = 2 <= pos < len(types)
        assert labels["goal"][pos] == (goal[0] * m + goal[1] if goal_known else IGNORE)
        if not in_segment:
            for name in ("cell", "open_moves", "distance", "steps_remaining", "cell_kind"):
                assert labels[name][pos] == IGNORE, (name, pos)
            assert (labels["next_moves"][pos] == IGNORE).all()
        else:
            here = path[max(pos - marker - 1, 0)]
            open_moves = {STEP[(b[0] - here[0], b[1] - here[1])] for b in adjacency[here]}
            best = {STEP[(b[0] - here[0], b[1] - here[1])] for b in adjacency[here] if to_goal[b] == to_goal[here] - 1}
            assert labels["cell"][pos] == here[0] * m + here[1]
            assert labels["open_moves"][pos] == sum(1 << d for d in open_moves)
            assert labels["distance"][pos] == to_goal[here]
            assert labels["steps_remaining"][pos] == marker + len(path) - pos
            assert labels["cell_kind"][pos] == min(len(open_moves), 3) - 1
            assert labels["next_moves"][pos].tolist() == [int(d in best) for d in range(len(MOVES))]
        if pos in seq["edges"]:
            a, b = parse(seq["names"][pos])
            total = to_goal[start]
            on = from_start[a] + 1 + to_goal[b] == total or from_start[b] + 1 + to_goal[a] == total
            assert labels["on_path"][pos] == int(on)
            assert on == any({a, b} == {x, y} for q in all_shortest_paths(adjacency, start, goal) for x, y in zip(q, q[1:]))
        else:
            assert labels["on_path"][pos] == IGNORE


@pytest.mark.parametrize(
    "options, n",
    [({}, 1500), ({"size": 4, "canvas": 5, "pause": 2, "p_open": 0.5}, 1000), ({"size": 2, "generators": ["dfs"]}, 200)],
)
def test_labels_match_independent_bfs(options: dict, n: int) -> None:
    task = get_task("gridworld", **options)
    batch = task.sample(n, seed=3)
    assert batch.inputs.shape == (n, task.seq_len)
    assert set(batch.labels) == set(task.labels)
    for name, label in task.labels.items():
        values = batch.labels[name]
        assert values.shape == ((n, task.seq_len, label.n_classes) if label.multi_hot else (n, task.seq_len))
        assert values.min() >= IGNORE and values.max() < label.n_classes
    for row in range(n):
        check_sequence(task, batch, row)


def edge_counts(task: Gridworld, n: int, seed: int) -> np.ndarray:
    return (task.sample(n, seed).labels["token_type"] == TOKEN_TYPES.index("edge")).sum(1)


def test_dfs_mazes_are_trees_and_percolation_mazes_have_loops() -> None:
    for size in (2, 3, 5):
        cells = size * size
        assert (edge_counts(get_task("gridworld", size=size, generators=["dfs"]), 300, 0) == cells - 1).all()
        assert (edge_counts(get_task("gridworld", size=size, generators=["percolation"], p_open=0.0), 300, 0) == cells - 1).all()
        loops = edge_counts(get_task("gridworld", size=size, generators=["percolation"], p_open=0.5), 300, 0) > cells - 1
        assert 0.2 < loops.mean() <= 1.0
    mixed = edge_counts(get_task("gridworld", size=4), 1000, 1)
    assert 0.3 < (mixed == 15).mean() < 0.8  # both generators are used


def test_percolation_with_every_edge_open_is_the_full_grid() -> None:
    task = get_task("gridworld", size=4, generators=["percolation"], p_open=1.0)
    batch = task.sample(50, 0)
    assert (edge_counts(task, 50, 0) == 24).all()
    start, goal = batch.labels["cell"], batch.labels["goal"]
    marker = batch.inputs == PATH
    here, target = start[marker], goal[marker]
    manhattan = np.abs(here // 4 - target // 4) + np.abs(here % 4 - target % 4)
    assert (batch.labels["distance"][marker] == manhattan).all()


def test_sampling_is_deterministic_and_varied() -> None:
    task = get_task("gridworld", size=4, canvas=6)
    a, b, c = task.sample(500, 7), task.sample(500, 7), task.sample(500, 8)
    assert (a.inputs == b.inputs).all() and all((a.labels[k] == b.labels[k]).all() for k in a.labels)
    assert (a.inputs != c.inputs).any(axis=1).mean() > 0.95
    mazes = {frozenset(t for t in row if t >= CELL + 36) for row in a.inputs}
    assert len(mazes) > 450
    cells = set(a.labels["cell"][a.labels["cell"] != IGNORE].tolist())
    assert cells == set(range(36))  # random offsets reach every canvas cell


def test_ties_are_broken_at_random_and_edges_come_in_random_order() -> None:
    task = get_task("gridworld", size=4, generators=["percolation"], p_open=0.8)
    batch = task.sample(2000, 4)
    moves, step = batch.labels["next_moves"], batch.labels["token_type"] == TOKEN_TYPES.index("step")
    rows, cols = np.nonzero(step & (moves.sum(-1) == 2))
    chosen = batch.labels["cell"][rows, cols + 1] - batch.labels["cell"][rows, cols]
    first = np.array([-4, 4, -1, 1])[moves[rows, cols].argmax(-1)]
    assert len(rows) > 500 and 0.45 < (chosen == first).mean() < 0.55

    edges = [row[types == TOKEN_TYPES.index("edge")] for row, types in zip(batch.inputs, batch.labels["token_type"])]
    assert np.mean([(np.diff(e) > 0).all() for e in edges]) < 0.01
    assert len(np.unique([e[0] for e in edges])) == 24


def shortest_and_broken_paths(seed: int) -> list[tuple[nx.Graph, tuple, tuple, list, list[list]]]:
    """Mazes with all their shortest paths (own enumeration) and walks that must be rejected."""
    task = get_task("gridworld", size=4, p_open=0.6)
    batch = task.sample(300, seed)
    out = []
    for row in range(len(batch)):
        seq = read(task, batch.inputs[row])
        adjacency, start, goal = seq["adjacency"], seq["start"], seq["goal"]
        maze = nx.Graph([(a, b) for a in adjacency for b in adjacency[a]])
        good = all_shortest_paths(adjacency, start, goal)
        path, to_goal, from_start = good[0], bfs(adjacency, goal), bfs(adjacency, start)
        first = lambda a, b: all_shortest_paths(adjacency, a, b)[0]  # noqa: E731
        bad = [[], path[:-1], path[1:], [*path, path[-2]], [(9, 9), *path]]
        bad += [[start, b, start, *path[1:]] for b in adjacency[start]]  # valid walks, two steps too long
        bad += [[start, *first(b, goal)] for b in adjacency[start] if to_goal[b] > to_goal[start]]  # two steps too long
        bad += [[start, *first(b, goal)] for b in nx.grid_2d_graph(4, 4)[start] if b not in adjacency[start]]  # a wall
        bad += [first(a, goal) for a in adjacency if a != start and to_goal[a] == len(path) - 1]  # wrong start
        bad += [first(start, b) for b in adjacency if b != goal and from_start[b] == len(path) - 1]  # wrong end
        out.append((maze, start, goal, good, bad))
    return out


def test_is_shortest_path_accepts_every_shortest_path_and_rejects_others() -> None:
    ties = 0
    for maze, start, goal, good, bad in shortest_and_broken_paths(seed=0):
        ties += len(good) > 1
        for path in good:
            assert is_shortest_path(maze, start, goal, path)
            assert is_shortest_path(maze, start, goal, tuple(path))
        for path in bad:
            assert not is_shortest_path(maze, start, goal, path), path
        assert not is_shortest_path(maze, start, (9, 9), good[0])
    assert ties > 30  # tied shortest paths were exercised


class Replay(torch.nn.Module):
    """A stand-in model that predicts the stored next tokens of the sequence with the same prompt.

    Rows in `wrong_start` answer a wrong cell instead of the start.
    """

    def __init__(self, batch: Batch, vocab_size: int, wrong_start: np.ndarray = np.array([], dtype=int)) -> None:
        super().__init__()
        self.prompts = [tuple(row[: list(row).index(PATH) + 1]) for row in batch.inputs]
        self.targets = torch.from_numpy(batch.targets.copy())
        for row in wrong_start:
            self.targets[row, len(self.prompts[row]) - 1] = CELL + (batch.inputs[row, 1] - CELL + 1) % 9
        self.vocab_size = vocab_size

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        rows = [self.prompts.index(tuple(row[: list(row).index(PATH) + 1].tolist())) for row in tokens]
        return torch.nn.functional.one_hot(self.targets[rows, :length], self.vocab_size).float()


def test_solve_rate_with_replayed_answers() -> None:
    task = get_task("gridworld", size=3)
    batch = task.sample(60, 5)
    assert len(set(Replay(batch, len(task.vocab)).prompts)) == len(batch)
    replay = Replay(batch, len(task.vocab))
    assert task.solve_rate(replay, batch) == {"solve_rate": 1.0, "reach_rate": 1.0}
    assert task.solve(replay, batch) == [read(task, row)["path"] for row in batch.inputs]

    wrong = np.arange(0, len(batch), 3)
    result = task.solve_rate(Replay(batch, len(task.vocab), wrong), batch)
    assert result == pytest.approx({"solve_rate": 1 - len(wrong) / len(batch), "reach_rate": 1 - len(wrong) / len(batch)})


def test_decoding_stops_at_a_token_that_is_not_a_cell_or_at_the_end() -> None:
    task = get_task("gridworld", size=3)
    batch = task.sample(20, 0)
    edge = len(task.vocab) - 1

    def wander(tokens: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.full(tokens.shape, CELL), len(task.vocab)).float()

    def edge_then_stop(tokens: torch.Tensor) -> torch.Tensor:
        answer = torch.where(tokens == edge, EOS, edge)
        return torch.nn.functional.one_hot(answer, len(task.vocab)).float()

    for model in (wander, edge_then_stop):
        assert task.solve(model, batch) == [None] * len(batch)
        assert task.solve_rate(model, batch) == {"solve_rate": 0.0, "reach_rate": 0.0}


def test_teacher_forced_metrics_score_ties_and_errors() -> None:
    task = get_task("gridworld", size=4, p_open=0.6)
    batch = task.sample(400, 2)
    _, targets, _ = batch.tensors()
    logits = torch.nn.functional.one_hot(targets, len(task.vocab)).float()
    assert task.metrics(logits, batch) == {"move_accuracy": 1.0, "stop_accuracy": 1.0, "maze_accuracy": 1.0}

    # predict another optimal move where there is a tie: still right
    moves, cell = batch.labels["next_moves"], batch.labels["cell"]
    is_step = (batch.labels["token_type"] == TOKEN_TYPES.index("step")) & (batch.labels["distance"] > 0)
    tied = np.argwhere(is_step & (moves.sum(-1) == 2))
    assert len(tied) > 20
    offsets = np.array([-4, 4, -1, 1])
    for row, pos in tied:
        other = [CELL + cell[row, pos] + offsets[d] for d in range(4) if moves[row, pos, d]]
        other = next(t for t in other if t != targets[row, pos])
        logits[row, pos] = 0
        logits[row, pos, other] = 1
    assert task.metrics(logits, batch) == {"move_accuracy": 1.0, "stop_accuracy": 1.0, "maze_accuracy": 1.0}

    # a step back to the previous cell is wrong, and so is its maze
    rows = np.unique(np.argwhere(is_step)[:, 0])[:100]
    for row in rows:
        pos = np.flatnonzero(is_step[row])[-1]
        logits[row, pos] = 0
        logits[row, pos, batch.inputs[row, pos - 1] if batch.inputs[row, pos - 1] >= CELL else 0] = 1
    scores = task.metrics(logits, batch)
    assert scores["maze_accuracy"] == pytest.approx(1 - len(rows) / len(batch))
    assert scores["move_accuracy"] == pytest.approx(1 - len(rows) / is_step.sum())
    assert scores["stop_accuracy"] == 1.0


@pytest.mark.parametrize(
    "options",
    [{"size": 1}, {"size": 4, "canvas": 3}, {"generators": ["bfs"]}, {"generators": []}, {"p_open": 1.5}, {"pause": -1}],
)
def test_invalid_options_raise(options: dict) -> None:
    with pytest.raises(ToylabError):
        get_task("gridworld", **options)


@pytest.mark.slow
def test_a_small_transformer_learns_to_solve_mazes(tmp_path) -> None:
    from toylab.training import TrainConfig, train

    task = get_task("gridworld", size=3)
    trained = train(task, {"ffn": "dense", "d_model": 64}, TrainConfig(steps=1500, eval_every=1500), tmp_path, progress=False)
    assert task.solve_rate(trained.model, task.sample(500, 99))["solve_rate"] > 0.9
