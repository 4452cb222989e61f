"""Planning in gridworld mazes: read the maze, the start and the goal, then walk a shortest path."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from toylab.registry import register_task
from toylab.task import IGNORE, Batch, Label, Task

if TYPE_CHECKING:  # imported where used, so listing tasks stays fast
    import networkx as nx
    import torch

PAD, BOS, PAUSE, PATH, EOS = range(5)
SPECIALS = ("<pad>", "<bos>", "<pause>", "<path>", "<eos>")
CELL = len(SPECIALS)
"""Token id of canvas cell 0; cell `r * canvas + c` is token `CELL + r * canvas + c`, then come the edges."""
MOVES = ("up", "down", "left", "right")
OPPOSITE = np.array([1, 0, 3, 2])
TOKEN_TYPES = ("bos", "start", "goal", "edge", "pause", "path", "step", "eos")
CELL_KINDS = ("dead_end", "corridor", "junction")
GENERATORS = ("dfs", "percolation")
MAX_PAUSE = 1000

Cell = tuple[int, int]


@dataclass(frozen=True)
class GridworldConfig:
    size: int = 4
    """Side of the square maze, in cells."""
    canvas: int | None = None
    """Side of the grid the vocabulary covers (>= size; default size). Mazes sit at random offsets
    on it, so a model trained on small mazes knows every cell token of a larger maze."""
    generators: tuple[Literal["dfs", "percolation"], ...] = GENERATORS
    """Maze generators; each maze uses one of them, uniformly at random."""
    p_open: float = 0.3
    """Percolation: probability that an edge outside the random spanning tree is open."""
    pause: int = 0
    """Pause tokens ("thinking time") between the maze and the path."""

    def __post_init__(self) -> None:
        if not 2 <= self.size <= 10:
            raise ValueError(f"size must be in [2, 10] (got {self.size})")
        if self.canvas is not None and not self.size <= self.canvas <= 10:
            raise ValueError(f"canvas must be in [size={self.size}, 10] (got {self.canvas})")
        if not self.generators or not set(self.generators) <= set(GENERATORS):
            raise ValueError(f"generators must be a non-empty subset of {', '.join(GENERATORS)} (got {self.generators})")
        if not 0.0 <= self.p_open <= 1.0:
            raise ValueError(f"p_open must be in [0, 1] (got {self.p_open})")
        if not 0 <= self.pause <= MAX_PAUSE:
            raise ValueError(f"pause must be in [0, {MAX_PAUSE}] (got {self.pause})")


def neighbors(size: int) -> np.ndarray:
    """`[size * size, 4]` neighbour cell of every cell in each move direction; -1 off the grid."""
    r, c = np.divmod(np.arange(size * size), size)
    out = np.stack([(r - 1) * size + c, (r + 1) * size + c, r * size + c - 1, r * size + c + 1], 1)
    off = np.stack([r == 0, r == size - 1, c == 0, c == size - 1], 1)
    return np.where(off, -1, out)


def grid_edges(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every grid edge as `(cell, direction)` from its upper/left cell: horizontal edges first, row-major."""
    r, c = np.divmod(np.arange(size * size), size)
    right, down = c < size - 1, r < size - 1
    cells = np.concatenate([np.flatnonzero(right), np.flatnonzero(down)])
    return cells, np.concatenate([np.full(right.sum(), 3), np.full(down.sum(), 1)])


def bfs_distances(open_: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Breadth-first distances `[n, cells]` from `source` `[n]` in mazes `open_` `[n, cells, 4]`; -1 if unreachable."""
    n, cells, _ = open_.shape
    nbr = np.maximum(neighbors(int(round(cells**0.5))), 0)
    dist = np.full((n, cells), -1)
    frontier = np.zeros((n, cells), dtype=bool)
    frontier[np.arange(n), source] = True
    dist[frontier] = 0
    for step in range(1, cells):
        frontier = (open_ & frontier[:, nbr]).any(-1) & (dist < 0)
        if not frontier.any():
            break
        dist[frontier] = step
    return dist


def _pick(allowed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random allowed column per row of a boolean `[n, k]` array (arbitrary where none is)."""
    return np.where(allowed, rng.random(allowed.shape), -1.0).argmax(1)


def dfs_mazes(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Randomized depth-first backtracking, all mazes at once: spanning trees with long corridors.

    Each maze pushes its `size**2 - 1` unvisited cells once and pops all `size**2` cells once,
    so exactly `2 size**2 - 1` steps leave every stack empty.
    """
    cells, nbr, rows = size * size, neighbors(size), np.arange(n)
    open_ = np.zeros((n, cells, 4), dtype=bool)
    visited = np.zeros((n, cells), dtype=bool)
    stack = np.zeros((n, cells), dtype=np.int64)
    depth = np.ones(n, dtype=np.int64)
    stack[:, 0] = rng.integers(cells, size=n)
    visited[rows, stack[:, 0]] = True
    for _ in range(2 * cells - 1):
        top = stack[rows, depth - 1]
        nb = nbr[top]
        fresh = (nb >= 0) & ~visited[rows[:, None], np.maximum(nb, 0)]
        move = _pick(fresh, rng)
        push = fresh.any(1)
        r, d = rows[push], move[push]
        new = nb[r, d]
        open_[r, top[push], d] = open_[r, new, OPPOSITE[d]] = True
        visited[r, new] = True
        stack[r, depth[push]] = new
        depth += np.where(push, 1, -1)
    return open_


def percolation_mazes(n: int, size: int, p_open: float, rng: np.random.Generator) -> np.ndarray:
    """A uniform spanning tree (Aldous-Broder random walk) plus every other edge open with probability `p_open`.

    Connected by construction; for `p_open > 0` it has loops, hence tied shortest paths.
    """
    cells, nbr, rows = size * size, neighbors(size), np.arange(n)
    open_ = np.zeros((n, cells, 4), dtype=bool)
    visited = np.zeros((n, cells), dtype=bool)
    current = rng.integers(cells, size=n)
    visited[rows, current] = True
    while not visited.all():
        move = _pick(nbr[current] >= 0, rng)
        new = nbr[current, move]
        first = ~visited[rows, new]
        r, d = rows[first], move[first]
        open_[r, current[first], d] = open_[r, new[first], OPPOSITE[d]] = True
        visited[rows, new] = True
        current = new
    cell, direction = grid_edges(size)
    extra = rng.random((n, len(cell))) < p_open
    open_[:, cell, direction] |= extra
    open_[:, nbr[cell, direction], OPPOSITE[direction]] |= extra
    return open_


def is_shortest_path(maze: nx.Graph, start: Any, goal: Any, path: Sequence[Any]) -> bool:
    """Whether `path` (a node sequence) walks `maze` from `start` to `goal` along edges in as few steps as possible."""
    import networkx as nx

    if not path or path[0] != start or path[-1] != goal or start not in maze or goal not in maze:
        return False
    if not all(maze.has_edge(a, b) for a, b in zip(path, path[1:])):
        return False
    return len(path) - 1 == nx.shortest_path_length(maze, start, goal)


@register_task("gridworld")
class Gridworld(Task):
    """Maze planning: given the start, the goal and the open edges of a maze, output a shortest path cell by cell.

    Sequence: `<bos> S G e_1 .. e_k <pause>*p <path> S c_1 .. c_L <eos> <pad>..` with one token per
    open edge (random order) and one per cell; `c_L = G` and `L` is the BFS distance, with ties
    broken at random. The prompt ends at `<path>`; the loss covers the answer `S c_1 .. c_L <eos>`.
    Labels hold after reading each token; on pauses, `<path>` and path cells the agent is at the
    current cell (the start before the path). Edge labels are properties of the whole maze.
    """

    Config = GridworldConfig
    primary_metric = "maze_accuracy"
    competence = 0.9
    target = 0.95
    config: GridworldConfig

    @property
    def canvas(self) -> int:
        return self.config.canvas or self.config.size

    @property
    def vocab(self) -> tuple[str, ...]:
        m = self.canvas
        cells = [f"({r},{c})" for r in range(m) for c in range(m)]
        edges = [f"({r},{c})-({r},{c + 1})" for r in range(m) for c in range(m - 1)]
        edges += [f"({r},{c})-({r + 1},{c})" for r in range(m - 1) for c in range(m)]
        return (*SPECIALS, *cells, *edges)

    @property
    def seq_len(self) -> int:
        """Room for every edge open and the longest possible path at once: 6 markers + pauses + edges + cells - 1."""
        n = self.config.size
        return 6 + self.config.pause + 2 * n * (n - 1) + n * n - 1

    @property
    def labels(self) -> dict[str, Label]:
        m, p = self.canvas, self.config.pause
        cells = tuple(self.vocab[CELL : CELL + m * m])
        ordinal = lambda count: tuple(str(i) for i in range(count))  # noqa: E731
        open_moves = tuple("".join(name[0] for d, name in enumerate(MOVES) if bits >> d & 1) or "none" for bits in range(16))
        return {
            "token_type": Label("token_type", "state", "role of the token in the sequence", TOKEN_TYPES),
            "cell": Label("cell", "state", "cell the agent is in", cells),
            "goal": Label("goal", "state", "goal cell, once stated", cells),
            "open_moves": Label("open_moves", "state", "open moves out of the current cell (u, d, l, r)", open_moves),
            "distance": Label("distance", "function", "BFS distance from the current cell to the goal", ordinal(m * m), ordinal=True),
            "next_moves": Label(
                "next_moves", "function", "moves out of the current cell that start a shortest path", MOVES, multi_hot=True
            ),
            "steps_remaining": Label(
                "steps_remaining", "function", "tokens until the goal is written (distance plus pauses left)",
                ordinal(m * m + p + 1), ordinal=True,
            ),
            "cell_kind": Label("cell_kind", "function", "dead end, corridor or junction (1, 2, 3+ open moves)", CELL_KINDS),
            "on_path": Label("on_path", "function", "for an edge token: whether the edge lies on a shortest path", ("off", "on")),
        }

    def generate(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """`n` mazes as open moves `[n, size**2, 4]`, each from a generator drawn uniformly."""
        size, names = self.config.size, self.config.generators
        which = rng.integers(len(names), size=n)
        open_ = np.zeros((n, size * size, 4), dtype=bool)
        for i, name in enumerate(names):
            count = int((which == i).sum())
            if name == "dfs":
                open_[which == i] = dfs_mazes(count, size, rng)
            else:
                open_[which == i] = percolation_mazes(count, size, self.config.p_open, rng)
        return open_

    def shifted(self) -> Gridworld | None:
        """Mazes one cell wider on the same canvas (so with the same tokens); None when the canvas leaves no room."""
        return Gridworld(replace(self.config, size=self.config.size + 1)) if self.config.size < self.canvas else None

    def sample(self, n: int, seed: int) -> Batch:
        self.check_sample(n, seed)
        rng = np.random.default_rng(seed)
        size, m, p = self.config.size, self.canvas, self.config.pause
        cells, rows = size * size, np.arange(n)
        nbr = np.maximum(neighbors(size), 0)
        open_ = self.generate(n, rng)
        start = rng.integers(cells, size=n)
        goal = (start + rng.integers(1, cells, size=n)) % cells
        offset = rng.integers(m - size + 1, size=(n, 2))

        to_goal, from_start = bfs_distances(open_, goal), bfs_distances(open_, start)
        optimal = open_ & (to_goal[:, nbr] == to_goal[:, :, None] - 1)
        length = to_goal[rows, start]
        path = np.empty((n, cells), dtype=np.int64)
        path[:, 0] = start
        for i in range(1, cells):
            here = path[:, i - 1]
            path[:, i] = np.where(to_goal[rows, here] > 0, nbr[here, _pick(optimal[rows, here], rng)], here)

        # edges in random order per maze, open ones first
        edge_cell, edge_dir = grid_edges(size)
        edge_open = open_[:, edge_cell, edge_dir]
        order = np.where(edge_open, rng.random(edge_open.shape), 2.0).argsort(1)
        u, v = edge_cell[order], nbr[edge_cell, edge_dir][order]
        ur, uc = np.divmod(u, size)
        ur, uc = ur + offset[:, :1], uc + offset[:, 1:]
        right = edge_dir[order] == 3
        edge_token = CELL + m * m + np.where(right, ur * (m - 1) + uc, m * (m - 1) + ur * m + uc)
        total = length[:, None]
        on_path = (from_start[rows[:, None], u] + 1 + to_goal[rows[:, None], v] == total) | (
            from_start[rows[:, None], v] + 1 + to_goal[rows[:, None], u] == total
        )

        # layout: bos S G edges pauses <path> S c_1..c_L eos pad
        pos = np.arange(self.seq_len)[None, :]
        n_edges = edge_open.sum(1, keepdims=True)
        marker = 3 + n_edges + p
        is_edge = (pos >= 3) & (pos < 3 + n_edges)
        is_pause = (pos >= 3 + n_edges) & (pos < marker)
        goal_at = marker + 1 + total
        is_step = (pos > marker) & (pos <= goal_at)
        is_eos = pos == goal_at + 1
        segment = is_pause | (pos == marker) | is_step
        step = np.clip(pos - marker - 1, 0, cells - 1)
        here = path[rows[:, None], step]
        edge_index = np.clip(pos - 3, 0, order.shape[1] - 1)

        def canvas_cell(local: np.ndarray) -> np.ndarray:
            r, c = np.divmod(local, size)
            return (r + offset[:, :1]) * m + c + offset[:, 1:]

        tokens = np.full((n, self.seq_len), PAD, dtype=np.int64)
        tokens[:, 0] = BOS
        tokens[:, 1:3] = CELL + canvas_cell(np.stack([start, goal], 1))
        tokens = np.where(is_edge, edge_token[rows[:, None], edge_index], tokens)
        tokens = np.where(is_pause, PAUSE, tokens)
        tokens = np.where(pos == marker, PATH, tokens)
        tokens = np.where(is_step, CELL + canvas_cell(here), tokens)
        tokens = np.where(is_eos, EOS, tokens)

        kind = np.select(
            [pos == 0, pos == 1, pos == 2, is_edge, is_pause, pos == marker, is_step, is_eos],
            np.arange(len(TOKEN_TYPES)),
            IGNORE,
        )
        here_open = open_[rows[:, None], here]
        labels = {
            "token_type": kind,
            "cell": np.where(segment, canvas_cell(here), IGNORE),
            "goal": np.where((pos >= 2) & (kind != IGNORE), canvas_cell(goal[:, None]), IGNORE),
            "open_moves": np.where(segment, (here_open << np.arange(4)).sum(-1), IGNORE),
            "distance": np.where(segment, to_goal[rows[:, None], here], IGNORE),
            "next_moves": np.where(segment[..., None], optimal[rows[:, None], here], IGNORE),
            "steps_remaining": np.where(segment, goal_at - pos, IGNORE),
            "cell_kind": np.where(segment, np.minimum(here_open.sum(-1), 3) - 1, IGNORE),
            "on_path": np.where(is_edge, on_path[rows[:, None], edge_index], IGNORE),
        }
        targets = np.concatenate([tokens[:, 1:], np.full((n, 1), PAD)], axis=1)
        loss_mask = (pos >= marker) & (pos <= goal_at)
        return Batch(tokens, targets, loss_mask, labels)

    def positions(self, batch: Batch) -> np.ndarray:
        return batch.inputs != PAD

    def cell_of(self, token: int) -> Cell:
        """`(row, col)` on the canvas of a cell token."""
        return divmod(token - CELL, self.canvas)

    def edge_of(self, token: int) -> tuple[Cell, Cell]:
        """The two cells of an edge token."""
        m = self.canvas
        index = token - CELL - m * m
        if index < m * (m - 1):
            r, c = divmod(index, m - 1)
            return (r, c), (r, c + 1)
        r, c = divmod(index - m * (m - 1), m)
        return (r, c), (r + 1, c)

    def token_cells(self) -> np.ndarray:
        """A cell token names its cell on the canvas, an edge token its two cells, the markers none (`Task.token_cells`)."""
        m = self.canvas
        out = np.zeros((len(self.vocab), m, m), dtype=bool)
        for token in range(CELL, CELL + m * m):
            out[(token, *self.cell_of(token))] = True
        for token in range(CELL + m * m, len(self.vocab)):
            for cell in self.edge_of(token):
                out[(token, *cell)] = True
        return out

    def mazes(self, inputs: np.ndarray) -> list[tuple[nx.Graph, Cell, Cell]]:
        """`(maze, start, goal)` of each sequence, read back from its tokens."""
        edge_min, edge_max = CELL + self.canvas**2, len(self.vocab)
        import networkx as nx

        out = []
        for sequence in inputs:
            maze = nx.Graph()
            maze.add_edges_from(self.edge_of(t) for t in sequence if edge_min <= t < edge_max)
            out.append((maze, self.cell_of(sequence[1]), self.cell_of(sequence[2])))
        return out

    def grid(self, inputs: np.ndarray) -> list[dict[str, Any]]:
        """Each maze on its canvas: open edges, start, goal, and the path cells by position (see `Task.grid`)."""
        edge_min = CELL + self.canvas**2
        out = []
        for sequence in inputs:
            marker = int(np.flatnonzero(sequence == PATH)[0])
            edges = [[int(x) for cell in self.edge_of(t) for x in cell] for t in sequence if edge_min <= t < len(self.vocab)]
            path = [[p, *map(int, self.cell_of(t))] for p, t in enumerate(sequence) if p > marker and CELL <= t < edge_min]
            out.append({"size": self.canvas, "edges": edges, "path": path,
                        "start": list(map(int, self.cell_of(sequence[1]))), "goal": list(map(int, self.cell_of(sequence[2])))})
        return out

    def metrics(self, logits: torch.Tensor, batch: Batch) -> dict[str, float]:
        """Teacher-forced scores along the given path.

        `move_accuracy`: path cells (before the goal) whose top token is a neighbour one move closer
        to the goal (any of the tied optimal moves); `stop_accuracy`: `<eos>` predicted at the goal;
        `maze_accuracy`: mazes with the start, every move and the stop right.
        """
        import torch

        m = self.canvas
        _, targets, mask = batch.tensors()
        cell = torch.from_numpy(batch.labels["cell"])
        moves = torch.from_numpy(batch.labels["next_moves"]) == 1
        at_goal = torch.from_numpy(batch.labels["distance"]) == 0
        marker = torch.from_numpy(batch.inputs) == PATH
        predicted = logits.argmax(-1)
        candidates = CELL + cell.unsqueeze(-1) + torch.tensor([-m, m, -1, 1])
        move_ok = (moves & (predicted.unsqueeze(-1) == candidates)).any(-1)
        correct = torch.where(marker, predicted == targets, torch.where(at_goal, predicted == EOS, move_ok))
        steps, stops = mask & ~at_goal & ~marker, mask & at_goal
        return {
            "move_accuracy": (move_ok & steps).sum().item() / steps.sum().item(),
            "stop_accuracy": (correct & stops).sum().item() / stops.sum().item(),
            "maze_accuracy": (correct | ~mask).all(1).float().mean().item(),
        }

    def solve(self, model: Callable[[torch.Tensor], torch.Tensor], batch: Batch) -> list[list[Cell] | None]:
        """Greedy decoding from each prompt (up to `<path>`), batched over the mazes still being decoded.

        Returns the cells output before `<eos>` (the start first), or None for a maze whose output stopped otherwise
        (a token that is not a cell, or the end of the sequence).
        """
        import torch

        with torch.no_grad():
            inputs = torch.from_numpy(batch.inputs)
            n, length = inputs.shape
            prompt_end = (inputs == PATH).int().argmax(1)
            position = prompt_end.clone()
            tokens = torch.where(torch.arange(length) <= position[:, None], inputs, PAD)
            live, ended = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
            while live.any():
                index = live.nonzero().squeeze(1)
                here = position[index]
                logits = model(tokens[index, : int(here.max()) + 1])
                token = logits[torch.arange(len(index)), here].argmax(-1)
                ended[index] = token == EOS
                go_on = (token >= CELL) & (token < CELL + self.canvas**2) & (here + 1 < length)
                tokens[index[go_on], here[go_on] + 1] = token[go_on]
                position[index[go_on]] += 1
                live[index[~go_on]] = False
            return [
                [self.cell_of(int(t)) for t in tokens[i, prompt_end[i] + 1 : position[i] + 1]] if ended[i] else None
                for i in range(n)
            ]

    def solve_rate(self, model: Callable[[torch.Tensor], torch.Tensor], batch: Batch) -> dict[str, float]:
        """Greedy decoding scored against BFS (`is_shortest_path`).

        `solve_rate`: mazes whose output is a shortest path to the goal followed by `<eos>`;
        `reach_rate`: mazes whose output walks open edges to the goal, of any length, then `<eos>`.
        """
        import networkx as nx

        solved = reached = 0
        paths = self.solve(model, batch)
        for (maze, start, goal), path in zip(self.mazes(batch.inputs), paths):
            if path:
                solved += is_shortest_path(maze, start, goal, path)
                reached += path[0] == start and path[-1] == goal and nx.is_path(maze, path)
        return {"solve_rate": solved / len(paths), "reach_rate": reached / len(paths)}
