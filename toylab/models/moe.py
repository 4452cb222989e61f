"""Mixture-of-experts feed-forward layer with top-k softmax routing and sorted dispatch.

    p = softmax(x W_r)                      router probabilities         [batch, pos, n_experts]
    w, e = topk(p, k)                       chosen experts and weights   [batch, pos, k]
    h_j = act(x W_in[e_j] + b_in[e_j])      expert neurons per slot      [batch, pos, k, d_expert]
    y = sum_j w_j (h_j W_out[e_j] + b_out[e_j])

Dispatch groups the (token, slot) pairs by expert (argsort, bincount, cumsum) and runs all
experts as one batched matmul over `[n_experts, capacity, d]` blocks; no mask over all tokens.
Auxiliary losses: the Switch load-balancing loss and the router z-loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from toylab.models.hooks import HookPoint

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


class SortedDispatch:
    """Slots (token, choice) sorted by expert into contiguous blocks `[n_experts, capacity, ...]`."""

    def __init__(self, experts: torch.Tensor, n_experts: int) -> None:
        flat = experts.flatten()
        self.order = flat.argsort(stable=True)
        expert_of_sorted = flat[self.order]
        self.counts = torch.bincount(flat, minlength=n_experts)
        starts = self.counts.cumsum(0) - self.counts
        rank = torch.arange(len(flat), device=flat.device) - starts[expert_of_sorted]
        self.index = (expert_of_sorted, rank)
        self.capacity = int(self.counts.max())
        self.n_experts = n_experts

    def to_experts(self, slots: torch.Tensor) -> torch.Tensor:
        """`[n_slots, f]` in slot order -> `[n_experts, capacity, f]` (zero-padded)."""
        grouped = slots.new_zeros(self.n_experts, self.capacity, slots.shape[-1])
        return grouped.index_put(self.index, slots[self.order])

    def to_slots(self, grouped: torch.Tensor) -> torch.Tensor:
        """`[n_experts, capacity, f]` -> `[n_slots, f]` in slot order."""
        slots = grouped.new_empty(len(self.order), grouped.shape[-1])
        return slots.index_put((self.order,), grouped[self.index])


class MoE(nn.Module):
    """Top-k routed experts; hooks give every routing quantity in a `[batch, pos, ...]` layout."""

    def __init__(
        self,
        d_model: int,
        d_expert: int,
        n_experts: int,
        k: int = 1,
        activation: str = "gelu",
        load_balance_weight: float = 0.01,
        z_loss_weight: float = 0.001,
    ) -> None:
        super().__init__()
        if not 1 <= k <= n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={n_experts}] (got {k})")
        self.n_experts, self.k, self.act = n_experts, k, ACTIVATIONS[activation]
        self.load_balance_weight, self.z_loss_weight = load_balance_weight, z_loss_weight
        self.W_router = nn.Parameter(torch.randn(d_model, n_experts) * 0.02)
        self.W_in = nn.Parameter(torch.randn(n_experts, d_model, d_expert) / math.sqrt(d_model))
        self.b_in = nn.Parameter(torch.zeros(n_experts, d_expert))
        self.W_out = nn.Parameter(torch.randn(n_experts, d_expert, d_model) / math.sqrt(d_expert))
        self.b_out = nn.Parameter(torch.zeros(n_experts, d_model))
        self.hook_router_logits = HookPoint()  # [batch, pos, n_experts]
        self.hook_expert_indices = HookPoint()  # [batch, pos, k], best first
        self.hook_expert_weights = HookPoint()  # [batch, pos, k]
        self.hook_pre = HookPoint()  # [batch, pos, k, d_expert]
        self.hook_post = HookPoint()  # [batch, pos, k, d_expert]
        self.hook_expert_out = HookPoint()  # [batch, pos, k, d_model], before weighting
        self.aux_losses: dict[str, torch.Tensor] = {}

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits, chosen experts and their weights (renormalized over the k chosen when k > 1)."""
        logits = self.hook_router_logits(x @ self.W_router)
        probs = logits.softmax(-1)
        weights, experts = probs.topk(self.k, dim=-1)
        if self.k > 1:
            weights = weights / weights.sum(-1, keepdim=True)
        self.aux_losses = {
            "load_balance": self.load_balance_weight * self.load_balance_loss(probs, experts),
            "router_z": self.z_loss_weight * torch.logsumexp(logits, -1).pow(2).mean(),
        }
        return logits, self.hook_expert_indices(experts), self.hook_expert_weights(weights)

    def load_balance_loss(self, probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Switch Transformer loss n_experts * sum_e f_e P_e; equals 1 when routing is uniform."""
        fraction = torch.bincount(experts.flatten(), minlength=self.n_experts) / experts.numel()
        return self.n_experts * (fraction * probs.flatten(0, -2).mean(0)).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, experts, weights = self.route(x)
        batch_shape, d_model = x.shape[:-1], x.shape[-1]
        dispatch = SortedDispatch(experts, self.n_experts)
        slots = x.unsqueeze(-2).expand(*batch_shape, self.k, d_model).reshape(-1, d_model)

        def per_expert(grouped: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            out = torch.bmm(grouped, W) + b.unsqueeze(1)
            return dispatch.to_slots(out).view(*batch_shape, self.k, -1)

        pre = self.hook_pre(per_expert(dispatch.to_experts(slots), self.W_in, self.b_in))
        post = self.hook_post(self.act(pre))
        grouped_post = dispatch.to_experts(post.reshape(-1, post.shape[-1]))
        out = self.hook_expert_out(per_expert(grouped_post, self.W_out, self.b_out))
        return torch.einsum("...k,...kd->...d", weights, out)


def reference_forward(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The oracle for `MoE.forward`: loop over experts, each masking all tokens for the ones that chose it.

    Slow by design; tests check the sorted dispatch against it, and benchmarks time both.
    """
    _, experts, weights = moe.route(x)
    out = torch.zeros_like(x)
    for e in range(moe.n_experts):
        for slot in range(moe.k):
            mask = experts[..., slot] == e
            h = moe.act(x[mask] @ moe.W_in[e] + moe.b_in[e])
            out[mask] += weights[..., slot][mask, None] * (h @ moe.W_out[e] + moe.b_out[e])
    return out
