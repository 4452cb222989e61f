"""Mixture-of-experts feed-forward layer with top-k softmax routing and sorted dispatch.

    p = softmax(x W_r)                      router probabilities         [batch, pos, n_experts]
    w, e = topk(p, k)                       chosen experts and weights   [batch, pos, k]
    h_j = act(x W_in[e_j] + b_in[e_j])      expert neurons per slot      [batch, pos, k, d_expert]
    y = sum_j w_j (h_j W_out[e_j] + b_out[e_j])

Dispatch sorts the (token, slot) pairs by expert (argsort, bincount) and runs each expert as one
matmul on its contiguous slice, as megablocks does: no mask over all tokens, no capacity padding.
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
    """Slots (token, choice) sorted by expert, so each expert runs one matmul on a contiguous slice."""

    def __init__(self, experts: torch.Tensor, n_experts: int) -> None:
        flat = experts.flatten()
        self.order = flat.argsort(stable=True)
        self.inverse = torch.empty_like(self.order)
        self.inverse[self.order] = torch.arange(len(flat), device=flat.device)
        self.counts = torch.bincount(flat, minlength=n_experts).tolist()

    def affine(self, slots: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """`slots @ W[e] + b[e]` for every slot with its own expert e: `[n_slots, f_in]` -> `[n_slots, f_out]`."""
        groups = slots[self.order].split(self.counts)
        return torch.cat([torch.addmm(b[e], group, W[e]) for e, group in enumerate(groups)])[self.inverse]


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
        pre = self.hook_pre(dispatch.affine(slots, self.W_in, self.b_in).view(*batch_shape, self.k, -1))
        post = self.hook_post(self.act(pre))
        out = dispatch.affine(post.reshape(-1, post.shape[-1]), self.W_out, self.b_out)
        out = self.hook_expert_out(out.view(*batch_shape, self.k, d_model))
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
