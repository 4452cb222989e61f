"""Mixture-of-experts feed-forward layer with top-k softmax routing and sorted dispatch.

    p = softmax(x W_r)                      router probabilities         [batch, pos, n_experts]
    w, e = topk(p, k)                       chosen experts and weights   [batch, pos, k]
    h_j = act(x W_in[e_j] + b_in[e_j])      expert neurons per slot      [batch, pos, k, d_expert]
    y = sum_j w_j (h_j W_out[e_j] + b_out[e_j])

Dispatch sorts the (token, slot) pairs by expert (argsort, bincount) and runs each expert as one
matmul on its contiguous slice, as megablocks does: no mask over all tokens, no capacity padding.
Auxiliary losses: the Switch load-balancing loss and the router z-loss.

A fixed router (`router="hash"` or `"label"`, see `TransformerConfig`) has no weights: the model hands
each token's expert to `forward`, the router logits are its one-hot row, its weight is 1, and there
are no auxiliary losses.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from toylab.errors import ToylabError
from toylab.models.hooks import HookPoint

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


class SortedDispatch:
    """Slots (token, choice) sorted by expert, so all experts run as one grouped matmul on contiguous slices.

    `torch.nn.functional.grouped_mm` takes the slices' end offsets on the device, so routing never
    waits on a host sync; where it is missing (older torch) or needs other dtypes (CUDA wants bf16),
    each expert runs one matmul on its slice instead.
    """

    def __init__(self, experts: torch.Tensor, n_experts: int) -> None:
        flat = experts.flatten()
        self.order = flat.argsort(stable=True)
        self.inverse = torch.empty_like(self.order)
        self.inverse[self.order] = torch.arange(len(flat), device=flat.device)
        self.sorted_experts = flat[self.order]
        self.counts = torch.bincount(flat, minlength=n_experts)
        self.offsets = self.counts.cumsum(0).to(torch.int32)

    def affine(self, slots: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """`slots @ W[e] + b[e]` for every slot with its own expert e: `[n_slots, f_in]` -> `[n_slots, f_out]`."""
        grouped = slots[self.order]
        if grouped_mm_supported(grouped, W):
            out = contiguous_grad(F.grouped_mm(grouped, W, offs=self.offsets))
        else:
            out = torch.cat([group @ W[e] for e, group in enumerate(grouped.split(self.counts.tolist()))])
        return (out + b[self.sorted_experts])[self.inverse]


def grouped_mm_supported(x: torch.Tensor, W: torch.Tensor) -> bool:
    """Whether this torch has `grouped_mm` for these operands: CPU (any float) or CUDA bf16, with rows of
    16-byte multiples, which its kernels require (d_model and d_expert multiples of 4 in float32)."""
    aligned = all(t.is_contiguous() and t.shape[-1] * t.element_size() % 16 == 0 for t in (x, W))
    return hasattr(F, "grouped_mm") and aligned and (x.device.type == "cpu" or x.dtype == torch.bfloat16)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands a contiguous gradient on (grouped_mm's backward needs one)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def contiguous_grad(x: torch.Tensor) -> torch.Tensor:
    return _ContiguousGrad.apply(x)


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
        learned: bool = True,
    ) -> None:
        super().__init__()
        if not 1 <= k <= n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={n_experts}] (got {k})")
        if not learned and k != 1:
            raise ValueError(f"a fixed router chooses one expert per token: top_k must be 1 (got {k})")
        self.n_experts, self.k, self.act = n_experts, k, ACTIVATIONS[activation]
        self.load_balance_weight, self.z_loss_weight = load_balance_weight, z_loss_weight
        self.W_router = nn.Parameter(torch.randn(d_model, n_experts) * 0.02) if learned else None
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

    def route(self, x: torch.Tensor, fixed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits, chosen experts and their weights (renormalized over the k chosen when k > 1).

        A fixed router takes its experts `[batch, pos]` from `fixed` instead.
        """
        if self.W_router is None:
            if fixed is None or fixed.shape != x.shape[:-1]:
                raise ToylabError(f"a fixed router needs one expert per token, shape {tuple(x.shape[:-1])}")
            logits = self.hook_router_logits(F.one_hot(fixed, self.n_experts).to(x.dtype))
            self.aux_losses = {}
            experts = self.hook_expert_indices(fixed.unsqueeze(-1))
            return logits, experts, self.hook_expert_weights(torch.ones_like(logits[..., :1]))
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

    def forward(self, x: torch.Tensor, fixed: torch.Tensor | None = None) -> torch.Tensor:
        _, experts, weights = self.route(x, fixed)
        batch_shape, d_model = x.shape[:-1], x.shape[-1]
        dispatch = SortedDispatch(experts, self.n_experts)
        slots = x.unsqueeze(-2).expand(*batch_shape, self.k, d_model).reshape(-1, d_model)
        pre = self.hook_pre(dispatch.affine(slots, self.W_in, self.b_in).view(*batch_shape, self.k, -1))
        post = self.hook_post(self.act(pre))
        out = dispatch.affine(post.reshape(-1, post.shape[-1]), self.W_out, self.b_out)
        out = self.hook_expert_out(out.view(*batch_shape, self.k, d_model))
        return torch.einsum("...k,...kd->...d", weights, out)


def reference_forward(moe: MoE, x: torch.Tensor, fixed: torch.Tensor | None = None) -> torch.Tensor:
    """The oracle for `MoE.forward`: loop over experts, each masking all tokens for the ones that chose it.

    Slow by design; tests check the sorted dispatch against it, and benchmarks time both.
    """
    _, experts, weights = moe.route(x, fixed)
    out = torch.zeros_like(x)
    for e in range(moe.n_experts):
        for slot in range(moe.k):
            mask = experts[..., slot] == e
            h = moe.act(x[mask] @ moe.W_in[e] + moe.b_in[e])
            out[mask] += weights[..., slot][mask, None] * (h @ moe.W_out[e] + moe.b_out[e])
    return out
