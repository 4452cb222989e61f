"""A token-level recurrent language model (LSTM or GRU) with the transformer's embedding, residual stream and unembedding.

    x_0 = W_E[tokens]                                          hook_embed = blocks.0.hook_resid_pre
    u = LN(x_l);  a_t = W_ih u_t + b_ih                        blocks.{l}.ln.hook_normalized (a_t: all positions at once)
    LSTM, per position t (torch.nn.LSTM's equations and gate order):
        i, f, g, o = σ, σ, tanh, σ of (a_t + W_hh h_{t-1} + b_hh) blocks.{l}.hook_input_gate, hook_forget_gate,
                                                                 hook_candidate, hook_output_gate
        c_t = f ⊙ c_{t-1} + i ⊙ g                              blocks.{l}.hook_cell
        h_t = o ⊙ tanh(c_t)                                    blocks.{l}.hook_hidden
    GRU, per position t (torch.nn.GRU's equations and gate order):
        r, z = σ(a_t^{r,z} + W_hh^{r,z} h_{t-1} + b_hh^{r,z})  blocks.{l}.hook_reset_gate, hook_update_gate
        n = tanh(a_t^n + r ⊙ (W_hh^n h_{t-1} + b_hh^n))        blocks.{l}.hook_candidate
        h_t = (1 - z) ⊙ n + z ⊙ h_{t-1}                        blocks.{l}.hook_hidden
    x_{l+1} = x_l + h                                          blocks.{l}.hook_resid_post
    logits = LN_final(x_L) W_U

Each layer adds its hidden states to a residual stream (pre-norm, as the transformer's blocks do) rather than
feeding them straight to the next layer: the analyses that read the residual stream (`blocks.0.hook_resid_pre`,
`blocks.{l}.hook_resid_post`: probes, CKA/RSA) then run on either model unchanged, and gradients reach every
layer through the stream's identity path.
The hidden size is d_model, so no projection is needed between the cell and the stream; h_0 = c_0 = 0.

Hooks see whole sequences `[batch, pos, d_model]` once a layer's time loop is done. `hook_hidden` is the layer's
output: an edit there changes what the layer passes on (the stream, the layers above, the logits), not the state
its own recurrence carries to the next position. The gates and the cell are read-outs: reading them is exact, and a
hook that returns a replacement for one of them is refused (the recurrence has already used them).

No recurrent MoE: the lab's MoE replaces a feed-forward layer, and an LSTM or GRU block has none (its nonlinearity
is the gated recurrence), so experts would be a new architecture rather than a slot to fill.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from torch import nn

from toylab.config import check_memory
from toylab.errors import ToylabError
from toylab.models.hooks import HookedModule, HookPoint
from toylab.models.transformer import LayerNorm

Cell = Literal["lstm", "gru"]
CELLS: tuple[Cell, ...] = get_args(Cell)
GATES: dict[str, int] = {"lstm": 4, "gru": 3}
"""Rows of W_ih and W_hh per hidden unit: LSTM i, f, g, o; GRU r, z, n."""


@dataclass(frozen=True)
class RecurrentConfig:
    vocab_size: int
    max_len: int
    """The task's sequence length (the recurrence itself runs any length; kept so every model is built alike)."""
    arch: Cell = "lstm"
    """The recurrent cell: lstm or gru (`build_model` reads this key to build a recurrent model, not a transformer)."""
    d_model: int = 64
    """Width of the residual stream and of the cell's hidden (and LSTM cell) state."""
    n_layers: int = 2

    def __post_init__(self) -> None:
        for key in ("vocab_size", "max_len", "d_model", "n_layers"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1 (got {getattr(self, key)})")
        if self.arch not in CELLS:
            raise ValueError(f"unknown arch '{self.arch}'; valid: {', '.join(CELLS)}")
        check_memory(16 * self.params, f"a model of about {self.params:,} parameters (weights, gradients, Adam state)",
                     "make it smaller (d_model, n_layers)")

    @property
    def params(self) -> int:
        """About how many parameters the model has (embedding, unembedding, the cells' weights and biases)."""
        d = self.d_model
        return 2 * self.vocab_size * d + self.n_layers * GATES[self.arch] * (2 * d * d + 2 * d)


def read_out(point: HookPoint, steps: list[tuple[torch.Tensor, ...]], index: int,
             layout: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Record item `index` of every step `[batch, ...]` at `point` as `[batch, pos, ...]` (rearranged by `layout`), when
    a hook reads it."""
    if not point.active:
        return
    value = torch.stack([step[index] for step in steps], 1)
    value = value if layout is None else layout(value)
    if point(value) is not value:
        raise ToylabError(f"{point.name} is a read-out, recorded after the time loop used it: a hook may read it, "
                          f"not replace it (edit the layer's output, hook_hidden)")


class RecurrentBlock(nn.Module):
    """x -> x + cell(LN(x)): one recurrent layer unrolled over positions, adding its hidden states to the stream."""

    def __init__(self, d_model: int, arch: Cell) -> None:
        super().__init__()
        self.d_model = d_model
        self.ln = LayerNorm(d_model)
        self.W_ih = nn.Linear(d_model, GATES[arch] * d_model)
        self.W_hh = nn.Linear(d_model, GATES[arch] * d_model)
        self.hook_resid_pre, self.hook_resid_post = HookPoint(), HookPoint()  # [batch, pos, d_model]
        self.hook_hidden = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        return self.hook_resid_post(x + self.hook_hidden(self.unroll(self.W_ih(self.ln(x)))))

    def unroll(self, inputs: torch.Tensor) -> torch.Tensor:
        """Hidden states `[batch, pos, d_model]` from the input projections `[batch, pos, gates * d_model]`."""
        raise NotImplementedError


class LSTMBlock(RecurrentBlock):
    def __init__(self, d_model: int) -> None:
        super().__init__(d_model, "lstm")
        self.hook_input_gate, self.hook_forget_gate = HookPoint(), HookPoint()  # [batch, pos, d_model]
        self.hook_candidate, self.hook_output_gate, self.hook_cell = HookPoint(), HookPoint(), HookPoint()

    def unroll(self, inputs: torch.Tensor) -> torch.Tensor:
        h = c = inputs.new_zeros(inputs.shape[0], self.d_model)
        steps = []
        for a in inputs.unbind(1):
            i, f, g, o = (a + self.W_hh(h)).chunk(4, -1)
            i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
            c = f * c + i * g
            h = o * c.tanh()
            steps.append((i, f, g, o, c, h))
        for index, point in enumerate((self.hook_input_gate, self.hook_forget_gate, self.hook_candidate,
                                       self.hook_output_gate, self.hook_cell)):
            read_out(point, steps, index)
        return torch.stack([step[-1] for step in steps], 1)


class GRUBlock(RecurrentBlock):
    def __init__(self, d_model: int) -> None:
        super().__init__(d_model, "gru")
        self.hook_reset_gate, self.hook_update_gate, self.hook_candidate = HookPoint(), HookPoint(), HookPoint()

    def unroll(self, inputs: torch.Tensor) -> torch.Tensor:
        h = inputs.new_zeros(inputs.shape[0], self.d_model)
        steps = []
        for a in inputs.unbind(1):
            a_r, a_z, a_n = a.chunk(3, -1)
            h_r, h_z, h_n = self.W_hh(h).chunk(3, -1)
            r, z = (a_r + h_r).sigmoid(), (a_z + h_z).sigmoid()
            n = (a_n + r * h_n).tanh()
            h = (1 - z) * n + z * h
            steps.append((r, z, n, h))
        for index, point in enumerate((self.hook_reset_gate, self.hook_update_gate, self.hook_candidate)):
            read_out(point, steps, index)
        return torch.stack([step[-1] for step in steps], 1)


BLOCKS: dict[str, type[RecurrentBlock]] = {"lstm": LSTMBlock, "gru": GRUBlock}


class Unrouted(HookedModule):
    """A model the training and the analyses treat as a dense transformer without label routing: no route input, no
    auxiliary loss, no MoE layers (the recurrent models and the DRC)."""

    def route_input(self, labels: Mapping[str, np.ndarray]) -> None:
        """`forward`'s `route` from a batch's labels: none, as for a transformer without label routing."""
        return None

    def aux_loss(self) -> torch.Tensor:
        """No auxiliary losses (0), as for a dense transformer."""
        return torch.zeros(())

    def moe_layers(self) -> list[int]:
        return []


class Recurrent(Unrouted):
    """Recurrent language model over token ids `[batch, pos]` returning logits `[batch, pos, vocab]`, like `Transformer`."""

    def __init__(self, cfg: RecurrentConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.W_E = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(BLOCKS[cfg.arch](cfg.d_model) for _ in range(cfg.n_layers))
        self.ln_final = LayerNorm(cfg.d_model)
        self.W_U = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.W_E.weight, std=0.02)
        self.setup_hooks()

    def forward(self, tokens: torch.Tensor, route: torch.Tensor | None = None) -> torch.Tensor:
        """Logits; `route` is the transformer's label-routing input, which a recurrent model never reads (None)."""
        if route is not None:
            raise ToylabError("a recurrent model routes nothing: route must be None")
        x = self.hook_embed(self.W_E(tokens))
        for block in self.blocks:
            x = block(x)
        return self.W_U(self.ln_final(x))
