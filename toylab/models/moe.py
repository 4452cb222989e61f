"""Mixture-of-experts feed-forward layer: a router, routed experts with sorted dispatch, an optional shared expert.

    r = router(x)                           scores, experts e and weights w   [batch, pos, slots]  (routing.py)
    h_j = act(x W_in[e_j] + b_in[e_j])      expert neurons per slot            [batch, pos, slots, d_expert]
    y = sum_j w_j (h_j W_out[e_j] + b_out[e_j])  +  MLP_shared(x)

Slots are the top-k experts of a token, best first; an empty slot (expert-choice routing, a dropped token)
has expert -1 and weight 0, and its expert hooks are 0. Dispatch sorts the (token, slot) pairs by expert
(argsort, bincount) and runs each expert as one matmul on its contiguous slice, as megablocks does: no mask
over all tokens, no capacity padding; empty slots sort last and are skipped.

The shared expert (DeepSeekMoE, Dai et al. 2024) is a dense MLP of `shared_experts * d_expert` neurons applied
to every token (`mlp.shared.hook_pre/hook_post`). Fine-grained experts (many small experts, DeepSeekMoE;
towards Monet's granularity, Park et al. 2024) are n_experts up to 64 with top_k growing and d_expert
shrinking, so that (top_k + shared_experts) * d_expert stays the dense MLP's width.

Auxiliary losses come from the router (load balance, z-loss) and, with `orthogonality_weight`, the mean
squared cosine between experts' weights (W_in and W_out of each expert flattened) or router directions
(columns of W_r), after the orthogonality regularizers proposed for more separable experts.

Planted specialization (a dial of known strength, for calibrating analyses): given a planted expert per token
(the class of a label mod n_experts), `router_supervision` λ adds λ · CE(router logits, planted expert) to the
auxiliary losses, and a `Planted.mixed` mask routes those tokens to their planted expert with weight 1 (the
label router), the rest by the router.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from toylab.models.hooks import HookPoint
from toylab.models.routing import TOKEN_CHOICE, Routing, capacity, drop_overflow, load_balance_loss, make_router, orthogonality_penalty

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


class SortedDispatch:
    """The (token, slot) pairs of a batch sorted by expert, as megablocks does: gather the rows once, run every
    expert as one grouped matmul on its contiguous slice, keep that order through the whole expert, and scatter
    the weighted outputs back onto their tokens at the end (no mask over all tokens, no capacity padding).

    `torch.nn.functional.grouped_mm` takes the slices' end offsets on the device, so dispatch never waits
    on a host sync; where it is missing (older torch) or needs other dtypes (CUDA wants bf16), each expert
    runs one matmul on its slice instead.
    """

    def __init__(self, experts: torch.Tensor, n_experts: int, empty_slots: bool = False) -> None:
        """`experts` `[..., slots]`; with `empty_slots`, -1 marks a slot with no expert (its rows are zero)."""
        flat, self.shape = experts.flatten(), experts.shape
        filled = flat >= 0 if empty_slots else None
        key = torch.where(filled, flat, n_experts) if filled is not None else flat  # empty slots sort last
        self.order = key.argsort(stable=True)
        self.token = self.order // experts.shape[-1]
        """The token of each sorted row."""
        self.experts = key[self.order].clamp(max=n_experts - 1)
        self.filled = None if filled is None else filled[self.order, None]
        self.counts = torch.bincount(key, minlength=n_experts + 1)[:n_experts]
        self.offsets = self.counts.cumsum(0).to(torch.int32)

    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each sorted row's token: `[n_tokens, f]` -> `[rows, f]`."""
        return tokens.index_select(0, self.token)

    def affine(self, rows: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """`row @ W[e] + b[e]` with each row's expert e, 0 for an empty slot: `[rows, f_in]` -> `[rows, f_out]`."""
        if self.filled is not None:  # grouped_mm leaves rows past the last offset (empty slots) undefined, and their gradient too
            rows = torch.where(self.filled, rows, 0.0)
        if grouped_mm_supported(rows, W):
            out = F.grouped_mm(rows, W, offs=self.offsets)
        else:
            *groups, empty = rows.split([*self.counts.tolist(), len(rows) - int(self.counts.sum())])
            out = torch.cat([group @ W[e] for e, group in enumerate(groups)] + [empty.new_zeros(len(empty), W.shape[-1])])
        out = out + b.index_select(0, self.experts)
        return out if self.filled is None else torch.where(self.filled, out, 0.0)

    def combine(self, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each token's weighted sum over its slots: `[rows, f]`, `weights` `[..., slots]` -> `[n_tokens, f]`."""
        weighted = rows * weights.flatten().index_select(0, self.order)[:, None]
        n_tokens = self.shape.numel() // self.shape[-1]
        return rows.new_zeros(n_tokens, rows.shape[-1]).index_add(0, self.token, weighted)

    @cached_property
    def inverse(self) -> torch.Tensor:
        """Each slot's row in the sorted order (computed only once a hook asks for the slot layout)."""
        return torch.empty_like(self.order).scatter_(0, self.order, torch.arange(len(self.order), device=self.order.device))

    def to_slots(self, rows: torch.Tensor) -> torch.Tensor:
        """Sorted rows back in the slot layout `[..., slots, f]`."""
        return rows.index_select(0, self.inverse).view(*self.shape, -1)

    def from_slots(self, values: torch.Tensor) -> torch.Tensor:
        """Values in the slot layout `[..., slots, f]` as sorted rows `[rows, f]`."""
        return values.reshape(-1, values.shape[-1]).index_select(0, self.order)


def grouped_mm_supported(x: torch.Tensor, W: torch.Tensor) -> bool:
    """Whether this torch has `grouped_mm` for these operands: CPU (any float) or CUDA bf16, with rows of
    16-byte multiples, which its kernels require (d_model and d_expert multiples of 4 in float32)."""
    aligned = all(t.is_contiguous() and t.shape[-1] * t.element_size() % 16 == 0 for t in (x, W))
    return hasattr(F, "grouped_mm") and aligned and (x.device.type == "cpu" or x.dtype == torch.bfloat16)


@dataclass
class Planted:
    """Specialization a dial plants on a label: per token `[batch, pos]` its planted expert (-1 where the label is
    undefined) and, for mixed routing, whether the label routes it (None: the router routes every token)."""

    experts: torch.Tensor
    mixed: torch.Tensor | None = None


class MLP(nn.Module):
    def __init__(self, d_model: int, d_mlp: int, activation: str = "gelu") -> None:
        super().__init__()
        self.W_in, self.W_out, self.act = nn.Linear(d_model, d_mlp), nn.Linear(d_mlp, d_model), ACTIVATIONS[activation]
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()  # [batch, pos, d_mlp]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.W_out(self.hook_post(self.act(self.hook_pre(self.W_in(x)))))


class MoE(nn.Module):
    """Routed experts (plus an optional shared expert); hooks give every routing quantity in a `[batch, pos, ...]` layout."""

    def __init__(
        self,
        d_model: int,
        d_expert: int,
        n_experts: int,
        k: int = 1,
        activation: str = "gelu",
        load_balance_weight: float = 0.01,
        z_loss_weight: float = 0.001,
        router: str = "learned",
        capacity_factor: float | None = None,
        centroid_decay: float | None = None,
        shared_experts: int = 0,
        orthogonality_weight: float = 0.0,
        orthogonality: str = "experts",
        router_supervision: float = 0.0,
    ) -> None:
        super().__init__()
        if not 1 <= k <= n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={n_experts}] (got {k})")
        self.n_experts, self.k, self.act = n_experts, k, ACTIVATIONS[activation]
        self.router = make_router(router, d_model, n_experts, k, load_balance_weight, z_loss_weight, capacity_factor, centroid_decay)
        self.capacity_factor = capacity_factor if router in TOKEN_CHOICE else None
        self.empty_slots = router == "expert_choice" or self.capacity_factor is not None
        """Whether routing may leave slots empty (-1): expert choice, or a capacity that drops tokens."""
        self.orthogonality_weight, self.orthogonality = orthogonality_weight, orthogonality
        self.router_supervision = router_supervision
        self.W_in = nn.Parameter(torch.randn(n_experts, d_model, d_expert) / math.sqrt(d_model))
        self.b_in = nn.Parameter(torch.zeros(n_experts, d_expert))
        self.W_out = nn.Parameter(torch.randn(n_experts, d_expert, d_model) / math.sqrt(d_expert))
        self.b_out = nn.Parameter(torch.zeros(n_experts, d_model))
        self.shared = MLP(d_model, shared_experts * d_expert, activation) if shared_experts else None
        self.hook_router_logits = HookPoint()  # [batch, pos, n_experts]
        self.hook_expert_indices = HookPoint()  # [batch, pos, slots], best first, -1 for an empty slot
        self.hook_expert_weights = HookPoint()  # [batch, pos, slots], 0 for an empty slot
        self.hook_pre = HookPoint()  # [batch, pos, slots, d_expert]
        self.hook_post = HookPoint()  # [batch, pos, slots, d_expert]
        self.hook_expert_out = HookPoint()  # [batch, pos, slots, d_model], before weighting
        self.aux_losses: dict[str, torch.Tensor] = {}

    @property
    def slots(self) -> int:
        """Width of the expert hooks: top_k, or n_experts for expert-choice routing."""
        return self.router.slots

    @property
    def W_router(self) -> nn.Parameter | None:
        """The router's weight matrix `[d_model, n_experts]`, if it has one."""
        return getattr(self.router, "W_router", None)

    def route(self, x: torch.Tensor, fixed: torch.Tensor | None = None, planted: Planted | None = None) -> Routing:
        """Scores, experts and weights (through the hooks), after dropping a capacity's overflow; sets `aux_losses`.

        A fixed router takes its experts `[batch, pos]` from `fixed`; `planted` mixes in a label's experts and
        supervises the router with them (see the module docstring).
        """
        routing = self.router(x, fixed, self.W_in, self.b_in)
        experts, weights = routing.experts, routing.weights
        self.aux_losses = dict(routing.aux)
        if planted is not None:
            experts, weights = self.plant(routing, planted)
        if self.capacity_factor is not None:
            flat = experts.reshape(-1, self.k)
            limit = capacity(self.capacity_factor, self.k, len(flat), self.n_experts)
            experts, weights = (t.view_as(routing.experts) for t in drop_overflow(flat, weights.reshape(-1, self.k), self.n_experts, limit))
        if self.orthogonality_weight:
            self.aux_losses["orthogonality"] = self.orthogonality_weight * orthogonality_penalty(self.orthogonal_vectors())
        return Routing(self.hook_router_logits(routing.logits), self.hook_expert_indices(experts),
                       self.hook_expert_weights(weights), self.aux_losses)

    def plant(self, routing: Routing, planted: Planted) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts and weights after mixing in the planted ones (`planted.mixed` tokens with a defined label go to
        their planted expert, weight 1); adds the supervision loss λ · CE(logits, planted expert) over defined tokens."""
        defined = planted.experts >= 0
        if self.router_supervision and defined.any():
            self.aux_losses["router_supervision"] = self.router_supervision * F.cross_entropy(
                routing.logits[defined], planted.experts[defined])
        if planted.mixed is None:
            return routing.experts, routing.weights
        take = (planted.mixed & defined).unsqueeze(-1)
        return (torch.where(take, planted.experts.unsqueeze(-1), routing.experts),
                torch.where(take, torch.ones_like(routing.weights), routing.weights))

    def orthogonal_vectors(self) -> torch.Tensor:
        """What the orthogonality penalty keeps apart, one row per expert: its W_in and W_out flattened, or its router direction."""
        if self.orthogonality == "router":
            return self.W_router.T
        return torch.cat([self.W_in.flatten(1), self.W_out.flatten(1)], dim=1)

    def load_balance_loss(self, probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Switch Transformer loss n_experts * sum_e f_e P_e; equals 1 when routing is uniform."""
        return load_balance_loss(probs, experts, self.n_experts)

    def forward(self, x: torch.Tensor, fixed: torch.Tensor | None = None, planted: Planted | None = None) -> torch.Tensor:
        routing = self.route(x, fixed, planted)
        if self.training:
            self.router.update(x.detach(), routing)
        dispatch = SortedDispatch(routing.experts, self.n_experts, self.empty_slots)
        pre = dispatch.affine(dispatch.gather(x.reshape(-1, x.shape[-1])), self.W_in, self.b_in)
        pre = self.expert_hook(self.hook_pre, pre, dispatch)
        post = self.expert_hook(self.hook_post, self.act(pre), dispatch)
        out = self.expert_hook(self.hook_expert_out, dispatch.affine(post, self.W_out, self.b_out), dispatch)
        y = dispatch.combine(out, routing.weights).view_as(x)
        return y + self.shared(x) if self.shared is not None else y

    @staticmethod
    def expert_hook(hook: HookPoint, rows: torch.Tensor, dispatch: SortedDispatch) -> torch.Tensor:
        """Run `hook` on sorted `rows` in the slot layout `[batch, pos, slots, f]` (only when a hook reads or edits it)."""
        return dispatch.from_slots(hook(dispatch.to_slots(rows))) if hook.active else rows


def reference_forward(moe: MoE, x: torch.Tensor, fixed: torch.Tensor | None = None) -> torch.Tensor:
    """The oracle for `MoE.forward`: loop over experts, each masking all tokens for the ones that chose it.

    Slow by design; tests check the sorted dispatch against it, and benchmarks time both. It routes without
    updating a k-means router's centroids.
    """
    routing = moe.route(x, fixed)
    experts, weights = routing.experts, routing.weights
    out = moe.shared(x) if moe.shared is not None else torch.zeros_like(x)
    for e in range(moe.n_experts):
        for slot in range(experts.shape[-1]):
            mask = experts[..., slot] == e
            h = moe.act(x[mask] @ moe.W_in[e] + moe.b_in[e])
            out[mask] += weights[..., slot][mask, None] * (h @ moe.W_out[e] + moe.b_out[e])
    return out
