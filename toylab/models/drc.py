"""DRC(D, N): D stacked convolutional LSTMs ticked N times per position over the task's grid (Guez et al., 2019, "An
investigation of model-free planning"), as a language model over token ids.

The input is read as a grid of K = rows × cols cells through the task's map M `[vocab, rows, cols]` of the cells each
token names (`Task.token_cells`, kept as a buffer). At position t, per cell k (vectorized over positions):

    obs_t[k] = Σ_{s≤t} M[x_s, k] (E[x_s, k] + P[s])  ⊕  M[x_t, k] E'[x_t, k] + G[x_t]   hook_observation
    i_t = ReLU(Conv_enc(obs_t))                                                          hook_encoded

what was read so far (a learned vector per (token, cell), plus one per position, so that the start and the goal
differ) beside what is read now (the current token's cells, and its embedding broadcast over the grid, so that tokens
naming no cell are seen too). Then per position t, ticks n = 1 .. N, layers d = 0 .. D-1, with the state (h_d, c_d)
carried over ticks and positions (zero at the start):

    gates = Conv_d^i(i_t) + Conv_d^h([h_{d-1}^n, h_d^{n-1}]) + W_d^p [mean(h_d^{n-1}); max(h_d^{n-1})]
            (h_{-1}^n := h_{D-1}^{n-1}, the top-down skip; the last term is pool-and-inject, broadcast over the grid)
    i, f, g, o = σ, σ, tanh, σ of gates          blocks.{d}.hook_input_gate, hook_forget_gate, hook_candidate, hook_output_gate
    c_d^n = f ⊙ c_d^{n-1} + i ⊙ g                blocks.{d}.hook_cell
    h_d^n = o ⊙ tanh(c_d^n)                      blocks.{d}.hook_hidden (the last tick), hook_hidden_ticks (each of the N)

and from z_t = [h_{D-1}^N; i_t] (the encoder skip):

    logits_t[v] = W_out [mean(z_t); max(z_t)] + mean_{k: M[v, k]} (w · z_t[k] + b)

a pooled head for every token plus, for a token that names cells, the mean over its cells of a per-cell score.

Thinking time: `forward(tokens, extra_ticks=e)` with counts e `[batch, pos]` ticks position t e_t more times, before
its N regular ticks; in a batch, a sequence with fewer extra ticks at t than another keeps its state through the
difference (masked updates, no loop over sequences). e = 0 is the plain forward.

Hooks give `[batch, pos, rows * cols * channels]` (cell-major: cell k's channels at k·channels ..), the per-tick view
`[batch, pos, N, rows * cols * channels]` (the N regular ticks of each position, not the extra ones). `hook_observation`
and `hook_encoded` are computed for all positions before the recurrence: a hook may edit them. The blocks' hooks are
read-outs, recorded after the recurrence used them: a hook may read them, not replace them (as in `recurrent`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from toylab.config import check_memory
from toylab.errors import ToylabError
from toylab.models.hooks import HookPoint
from toylab.models.recurrent import Unrouted, read_out

READ_OUTS = ("input_gate", "forget_gate", "candidate", "output_gate", "cell", "hidden")
"""The per-layer read-outs at the last tick of each position, in the order `ConvLSTM.step` returns them."""


@dataclass(frozen=True)
class DRCConfig:
    vocab_size: int
    max_len: int
    """Positions with a learned position vector P (longer inputs are refused)."""
    rows: int
    cols: int
    """The task's grid (`Task.token_cells`), set by `build_model`, not an option."""
    arch: Literal["drc"] = "drc"
    channels: int = 16
    """Channels of i_t and of every ConvLSTM's hidden and cell state."""
    d_obs: int = 16
    """Channels of each half of the observation (read so far; read now)."""
    depth: int = 2
    """D: stacked ConvLSTM layers."""
    ticks: int = 2
    """N: ticks of the stack per position."""

    def __post_init__(self) -> None:
        for key in ("vocab_size", "max_len", "rows", "cols", "channels", "d_obs", "depth", "ticks"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1 (got {getattr(self, key)})")
        if self.arch != "drc":
            raise ValueError(f"arch must be 'drc' (got '{self.arch}')")
        check_memory(16 * self.params, f"a model of about {self.params:,} parameters (weights, gradients, Adam state)",
                     "make it smaller (channels, d_obs, depth)")

    @property
    def cells(self) -> int:
        return self.rows * self.cols

    @property
    def params(self) -> int:
        """How many parameters the model has (the observation tables, the convolutions, the heads)."""
        v, k, c, d = self.vocab_size, self.cells, self.channels, self.d_obs
        observation = 2 * v * k * d + self.max_len * d + v * d
        encoder = 9 * 2 * d * c + c
        layer = 9 * c * 4 * c + 4 * c + 9 * 2 * c * 4 * c + 2 * c * 4 * c
        heads = 4 * c * v + v + 2 * c + 1
        return observation + encoder + self.depth * layer + heads


def cell_major(x: torch.Tensor) -> torch.Tensor:
    """`[..., channels, rows, cols]` -> `[..., rows * cols * channels]`, the hooks' layout."""
    return x.movedim(-3, -1).flatten(-3)


def pooled(x: torch.Tensor) -> torch.Tensor:
    """`[..., channels, rows, cols]` -> `[..., 2 * channels]`: the mean and the max over the grid."""
    return torch.cat([x.mean((-2, -1)), x.amax((-2, -1))], -1)


class ConvLSTM(nn.Module):
    """One ConvLSTM layer of the stack (3×3 convolutions, pool-and-inject); its input term Conv^i(i_t) is computed for
    all positions at once (`inputs`), the rest tick by tick (`step`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(channels, 4 * channels, 3, padding=1)
        self.conv_h = nn.Conv2d(2 * channels, 4 * channels, 3, padding=1, bias=False)
        self.W_pool = nn.Linear(2 * channels, 4 * channels, bias=False)
        with torch.no_grad():
            self.conv_in.bias[channels:2 * channels] += 1.0  # forget gates start open
        for name in READ_OUTS:
            setattr(self, f"hook_{name}", HookPoint())  # [batch, pos, cells * channels]
        self.hook_hidden_ticks = HookPoint()  # [batch, pos, ticks, cells * channels]

    def step(self, a: torch.Tensor, below: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One tick `(i, f, g, o, c, h)`, each `[batch, channels, rows, cols]`, from Conv^i(i_t) `a`, the hidden state
        of the layer below at this tick, and this layer's last `h`, `c`."""
        gates = a + self.conv_h(torch.cat([below, h], 1)) + self.W_pool(pooled(h))[:, :, None, None]
        i, f, g, o = gates.chunk(4, 1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        c = f * c + i * g
        return i, f, g, o, c, o * c.tanh()


class DRC(Unrouted):
    """DRC(D, N) over token ids `[batch, pos]` returning logits `[batch, pos, vocab]`, like `Transformer`."""

    def __init__(self, cfg: DRCConfig, token_cells: np.ndarray) -> None:
        super().__init__()
        if token_cells.shape != (cfg.vocab_size, cfg.rows, cfg.cols):
            raise ToylabError(f"token_cells must be [vocab, rows, cols] = {(cfg.vocab_size, cfg.rows, cfg.cols)} "
                              f"(got {token_cells.shape})")
        self.cfg = cfg
        v, k, c, d = cfg.vocab_size, cfg.cells, cfg.channels, cfg.d_obs
        self.register_buffer("token_cells", torch.as_tensor(token_cells, dtype=torch.float32).reshape(v, k))
        self.E_seen = nn.Parameter(0.1 * torch.randn(v, k, d))
        self.E_now = nn.Parameter(0.1 * torch.randn(v, k, d))
        self.P = nn.Parameter(torch.zeros(cfg.max_len, d))  # zero: positions never trained add nothing
        self.G = nn.Parameter(0.1 * torch.randn(v, d))
        self.encoder = nn.Conv2d(2 * d, c, 3, padding=1)
        self.blocks = nn.ModuleList(ConvLSTM(c) for _ in range(cfg.depth))
        self.W_out = nn.Linear(4 * c, v)
        self.W_cell = nn.Conv2d(2 * c, 1, 1)
        self.hook_observation = HookPoint()  # [batch, pos, cells * 2 d_obs]
        self.hook_encoded = HookPoint()  # [batch, pos, cells * channels]
        self.setup_hooks()

    def forward(self, tokens: torch.Tensor, route: torch.Tensor | None = None,
                extra_ticks: torch.Tensor | None = None) -> torch.Tensor:
        """Logits; `route` is the transformer's label-routing input, never read here (None); `extra_ticks` `[batch, pos]`
        non-negative counts of ticks before each position's N regular ones (None: none)."""
        if route is not None:
            raise ToylabError("a DRC routes nothing: route must be None")
        cfg = self.cfg
        (b, t), shape = tokens.shape, (cfg.rows, cfg.cols)
        if t > cfg.max_len:
            raise ToylabError(f"{t} positions exceed the DRC's max_len={cfg.max_len}")
        if extra_ticks is not None and (extra_ticks.shape != tokens.shape or bool((extra_ticks < 0).any())):
            raise ToylabError(f"extra_ticks must be non-negative counts shaped like tokens {tuple(tokens.shape)}")
        cells = self.token_cells[tokens][..., None]  # [batch, pos, cells, 1]
        seen = (cells * (self.E_seen[tokens] + self.P[:t, None])).cumsum(1)
        now = cells * self.E_now[tokens] + self.G[tokens][:, :, None]
        obs = self.hook_observation(torch.cat([seen, now], -1).flatten(2))
        grid = obs.view(b * t, *shape, 2 * cfg.d_obs).movedim(-1, 1)
        encoded = self.hook_encoded(cell_major(self.encoder(grid).relu()).view(b, t, -1))
        i_t = encoded.view(b, t, *shape, cfg.channels).movedim(-1, 2)  # [batch, pos, channels, rows, cols]
        z = torch.cat([self.core(i_t, extra_ticks), i_t], 2)
        scores = self.W_cell(z.flatten(0, 1)).view(b, t, cfg.cells)
        named = self.token_cells / self.token_cells.sum(1, keepdim=True).clamp(min=1)
        return self.W_out(pooled(z)) + scores @ named.T

    def core(self, i_t: torch.Tensor, extra_ticks: torch.Tensor | None) -> torch.Tensor:
        """The recurrence: the last layer's hidden state after each position's last tick `[batch, pos, channels, rows,
        cols]`; records the blocks' read-outs."""
        b, t, c = i_t.shape[:3]
        inputs = [layer.conv_in(i_t.flatten(0, 1)).view(b, t, 4 * c, *i_t.shape[3:]).unbind(1) for layer in self.blocks]
        h = [i_t.new_zeros(b, *i_t.shape[2:]) for _ in self.blocks]
        cell = [i_t.new_zeros(b, *i_t.shape[2:]) for _ in self.blocks]
        steps: list[list[tuple[torch.Tensor | None, ...]]] = [[] for _ in self.blocks]
        for pos in range(t):
            extra = None if extra_ticks is None else extra_ticks[:, pos]
            most = 0 if extra is None else int(extra.max())
            regular: list[list[torch.Tensor]] = [[] for _ in self.blocks]
            for n in range(most + self.cfg.ticks):
                active = (n >= most - extra)[:, None, None, None] if n < most else None  # extra ticks first
                last = []
                for d, layer in enumerate(self.blocks):
                    out = layer.step(inputs[d][pos], h[d - 1], h[d], cell[d])  # d = 0 reads h[-1]: the top-down skip
                    if active is None:
                        cell[d], h[d] = out[-2:]
                        regular[d].append(h[d])
                    else:
                        cell[d], h[d] = torch.where(active, out[-2], cell[d]), torch.where(active, out[-1], h[d])
                    last.append(out)
            for d, layer in enumerate(self.blocks):
                steps[d].append((*last[d], torch.stack(regular[d], 1) if layer.hook_hidden_ticks.active else None))
        for d, layer in enumerate(self.blocks):
            for index, name in enumerate((*READ_OUTS, "hidden_ticks")):
                read_out(getattr(layer, f"hook_{name}"), steps[d], index, cell_major)
        return torch.stack([step[READ_OUTS.index("hidden")] for step in steps[-1]], 1)
