"""Routers of an MoE layer: which experts each token uses, and with what weight.

Every router maps the router input x `[..., d_model]` to a `Routing`: scores `[..., n_experts]`
(`hook_router_logits`), and per token a fixed number of slots `[..., slots]` of expert ids
(`hook_expert_indices`) and weights (`hook_expert_weights`), best first.

Empty slots. Where a token has fewer experts than slots (expert-choice routing, dropped tokens),
the empty slots hold index -1 and weight 0 and come after every filled slot, so slot 0 is a
token's best expert, or -1 when it has none. Expert hooks (`hook_pre`, `hook_post`,
`hook_expert_out`) are 0 there.

    learned   p = softmax(x W_r); top-k of p                  Switch (Fedus et al. 2021), top-k (Shazeer et al. 2017)
    noisy     h = x W_r + eps * softplus(x W_noise), eps ~ N(0, 1) in training only; top-k of softmax(h)
                                                              noisy top-k gating (Shazeer et al. 2017)
    expert_choice  p = softmax(x W_r) over experts; each expert e takes the C tokens of the batch with the
              largest p[:, e], C = ceil(capacity_factor * k * n_tokens / n_experts); a token gets 0..n_experts
              experts                                        (Zhou et al. 2022)
    kmeans    s_e = cos(x, c_e) with running centroids c_e of the router inputs each expert received,
              c_e <- decay c_e + (1 - decay) mean{x routed to e} after each training forward pass (buffers, no
              parameters); top-k of s                        ("routing is clustering" made a model)
    sparsity  ReLU experts; z = x W_in[e] + b_in[e] approximated per neuron as Gaussian with mean
              mu_e = x . mean_j W_in[e, :, j] + mean_j b_in[e, j] and variance
              var_e = sum_i x_i^2 var_j W_in[e, i, j] + var_j b_in[e, j];  P(z > 0) = Phi(mu_e / sd_e);
              score s_e = -mu_e / sd_e (higher = sparser); top-k of softmax(s)
                                                              sparsity-aware routing of MoE-X (Yang et al. 2025)
    hash, label  fixed experts handed in by the model       (Roller et al. 2021; a planted control)

Token choice with a capacity (Switch / GShard, Lepikhin et al. 2021): each expert processes at most
C = ceil(capacity_factor * k * n_tokens / n_experts) slots per forward pass; slots are served first
choices first, then in token order, and the overflow is dropped (index -1, weight 0): a token whose every
slot is dropped passes through the layer on the residual stream alone.

Auxiliary losses (weighted, summed into the training loss): the Switch load-balancing loss and the
router z-loss (learned, noisy, sparsity; expert choice is balanced by construction and keeps only the
z-loss), and the orthogonality penalty (`orthogonality_penalty`) on the experts' weights or the router's
directions.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from toylab.errors import ToylabError

RouterName = Literal["learned", "noisy", "expert_choice", "kmeans", "sparsity", "hash", "label"]
ROUTERS: tuple[str, ...] = get_args(RouterName)
FIXED = ("hash", "label")
"""Routers whose experts the model hands in (top-1, weight 1, no auxiliary losses)."""
TOKEN_CHOICE = ("learned", "noisy", "kmeans", "sparsity")
"""Routers where each token picks its top-k experts (a capacity then drops the overflow)."""
WEIGHTED = ("learned", "noisy", "expert_choice")
"""Routers with a weight matrix W_r (its columns are the 'router directions')."""


@dataclass
class Routing:
    logits: torch.Tensor
    """Router scores `[..., n_experts]`."""
    experts: torch.Tensor
    """Expert per slot `[..., slots]` (long), best first, -1 for an empty slot."""
    weights: torch.Tensor
    """Weight per slot `[..., slots]`, 0 for an empty slot."""
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    """Weighted auxiliary losses."""


def load_balance_loss(probs: torch.Tensor, experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch Transformer loss n_experts * sum_e f_e P_e over the filled slots; equals 1 when routing is uniform."""
    counts = torch.bincount(torch.where(experts >= 0, experts, n_experts).flatten(), minlength=n_experts + 1)[:n_experts]
    fraction = counts / counts.sum().clamp_min(1)
    return n_experts * (fraction * probs.flatten(0, -2).mean(0)).sum()


def softmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`softmax(logits)` over experts and its log normalizer `logsumexp(logits)` `[..., 1]` (for the z-loss), from one
    reduction: over a few experts this is several times faster on CPU than `Tensor.softmax` plus `logsumexp`."""
    lse = logits.logsumexp(-1, keepdim=True)
    return (logits - lse).exp(), lse


def z_loss(lse: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022): the mean squared log normalizer of the router logits."""
    return lse.pow(2).mean()


def top_k(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best experts and their weights, renormalized over the k chosen when k > 1."""
    if k == 1:
        weights, experts = probs.max(-1, keepdim=True)
        return experts, weights
    weights, experts = probs.topk(k, dim=-1)
    return experts, weights / weights.sum(-1, keepdim=True)


def capacity(capacity_factor: float, k: int, n_tokens: int, n_experts: int) -> int:
    """Slots one expert may take in a forward pass: ceil(capacity_factor * k * n_tokens / n_experts), in [1, n_tokens]."""
    return min(n_tokens, max(1, math.ceil(capacity_factor * k * n_tokens / n_experts)))


def drop_overflow(experts: torch.Tensor, weights: torch.Tensor, n_experts: int, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token choice with a capacity: each expert keeps its first `limit` slots (first choices of all tokens first,
    then second choices, ...; within one choice, in token order); the rest become empty (-1, weight 0).
    `experts`, `weights` `[n_tokens, k]`; the result is compacted (filled slots first)."""
    n, k = experts.shape
    priority = experts.T.reshape(-1)  # slot-major: [k * n]
    order = priority.argsort(stable=True)
    counts = torch.bincount(priority, minlength=n_experts)
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device) - starts[priority[order]]
    kept = (rank < limit).view(k, n).T
    return compact(torch.where(kept, experts, -1), torch.where(kept, weights, 0.0))


def compact(experts: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move empty slots (-1) behind the filled ones, keeping the order of the filled slots."""
    order = (experts < 0).to(torch.int8).argsort(dim=-1, stable=True)
    return experts.gather(-1, order), weights.gather(-1, order)


def orthogonality_penalty(vectors: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine similarity over distinct pairs of the rows of `vectors` `[n_experts, n]`:
    0 when they are pairwise orthogonal, up to 1 when they are parallel."""
    n = vectors.shape[0]
    if n < 2:
        return vectors.new_zeros(())
    unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    gram = unit @ unit.T
    return (gram.pow(2).sum() - gram.diagonal().pow(2).sum()) / (n * (n - 1))


class Router(nn.Module, ABC):
    """Base class: `forward` routes; `update` adjusts buffers after a training forward pass (only k-means has any)."""

    def __init__(self, n_experts: int, k: int) -> None:
        super().__init__()
        self.n_experts, self.k = n_experts, k

    @property
    def slots(self) -> int:
        """Width of the expert hooks `[..., slots]`."""
        return self.k

    @abstractmethod
    def forward(self, x: torch.Tensor, fixed: torch.Tensor | None = None, W_in: torch.Tensor | None = None,
                b_in: torch.Tensor | None = None) -> Routing:
        """Route `x` `[..., d_model]`; `fixed` is a fixed router's choice, `W_in`, `b_in` the experts' input weights."""

    def update(self, x: torch.Tensor, routing: Routing) -> None:
        """Nothing to update, except for the k-means router."""


class TopKRouter(Router):
    """Learned softmax top-k routing (Switch; Shazeer et al. 2017); with `noisy`, noisy top-k gating: Gaussian
    noise scaled by a learned softplus(x W_noise) is added to the logits in training (W_noise starts at 0)."""

    def __init__(self, d_model: int, n_experts: int, k: int, load_balance_weight: float, z_loss_weight: float,
                 noisy: bool = False) -> None:
        super().__init__(n_experts, k)
        self.load_balance_weight, self.z_loss_weight = load_balance_weight, z_loss_weight
        self.W_router = nn.Parameter(torch.randn(d_model, n_experts) * 0.02)
        self.W_noise = nn.Parameter(torch.zeros(d_model, n_experts)) if noisy else None

    def forward(self, x: torch.Tensor, fixed: torch.Tensor | None = None, W_in: torch.Tensor | None = None,
                b_in: torch.Tensor | None = None) -> Routing:
        logits = x @ self.W_router
        if self.W_noise is not None and self.training:
            logits = logits + torch.randn_like(logits) * F.softplus(x @ self.W_noise)
        probs, lse = softmax(logits)
        experts, weights = top_k(probs, self.k)
        return Routing(logits, experts, weights, {
            "load_balance": self.load_balance_weight * load_balance_loss(probs, experts, self.n_experts),
            "router_z": self.z_loss_weight * z_loss(lse),
        })


class FixedRouter(Router):
    """The model hands each token's expert in (`fixed` `[...]`): hash or label routing; one-hot logits, weight 1."""

    def forward(self, x: torch.Tensor, fixed: torch.Tensor | None = None, W_in: torch.Tensor | None = None,
                b_in: torch.Tensor | None = None) -> Routing:
        if fixed is None or fixed.shape != x.shape[:-1]:
            raise ToylabError(f"a fixed router needs one expert per token, shape {tuple(x.shape[:-1])}")
        logits = F.one_hot(fixed, self.n_experts).to(x.dtype)
        return Routing(logits, fixed.unsqueeze(-1), torch.ones_like(logits[..., :1]))


class ExpertChoiceRouter(Router):
    """Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens of the batch by softmax affinity,
    C = `capacity(capacity_factor, k, n_tokens, n_experts)`, so every expert gets exactly C tokens and a token
    0..n_experts experts (k is the mean number per token). Slots `[..., n_experts]`, best first, -1 when empty.
    A token's experts depend on the other tokens of the batch (not causal), as in the paper."""

    def __init__(self, d_model: int, n_experts: int, k: int, capacity_factor: float, z_loss_weight: float) -> None:
        super().__init__(n_experts, k)
        self.capacity_factor, self.z_loss_weight = capacity_factor, z_loss_weight
        self.W_router = nn.Parameter(torch.randn(d_model, n_experts) * 0.02)

    @property
    def slots(self) -> int:
        return self.n_experts

    def forward(self, x: torch.Tensor, fixed: torch.Tensor | None = None, W_in: torch.Tensor | None = None,
                b_in: torch.Tensor | None = None) -> Routing:
        logits = x @ self.W_router
        probs, lse = softmax(logits)
        probs = probs.reshape(-1, self.n_experts)  # [n, E]
        chosen_tokens = probs.topk(capacity(self.capacity_factor, self.k, len(probs), self.n_experts), dim=0).indices  # [C, E]
        chosen = torch.zeros_like(probs, dtype=torch.bool).scatter_(0, chosen_tokens, True)
        gate = torch.where(chosen, probs, 0.0)
        order = torch.where(chosen, probs, -1.0).argsort(dim=-1, descending=True, stable=True)
        experts = torch.where(chosen.gather(-1, order), order, -1)
        shape = (*x.shape[:-1], self.n_experts)
        return Routing(logits, experts.view(shape), gate.gather(-1, order).view(shape),
                       {"router_z": self.z_loss_weight * z_loss(lse)})


class KMeansRouter(Router):
    """Parameter-free routing by cosine similarity to running centroids `[n_experts, d_model]` (a buffer) of the
    router inputs each expert received (top-1), updated by an exponential moving average in training.
    Weights: softmax of the chosen similarities, renormalized over the k chosen (1 when k = 1)."""

    def __init__(self, d_model: int, n_experts: int, k: int, decay: float) -> None:
        super().__init__(n_experts, k)
        self.decay = decay
        self.register_buffer("centroids", torch.randn(n_experts, d_model))

    def forward(self, x: torch.Tensor, fixed: torch.Tensor | None = None, W_in: torch.Tensor | None = None,
                b_in: torch.Tensor | None = None) -> Routing:
        logits = F.normalize(x, dim=-1) @ F.normalize(self.centroids, dim=-1).T
        experts, _ = top_k(logits, self.k)
        weights = logits.gather(-1, experts).softmax(-1)
        return Routing(logits, experts, weights)

    @torch.no_grad()
    def update(self, x: torch.Tensor, routing: Routing) -> None:
        """c_e <- decay c_e + (1 - decay) mean of the inputs whose best expert is e (experts that got none keep c_e)."""
        x, best = x.reshape(-1, x.shape[-1]), routing.experts.reshape(-1, routing.experts.shape[-1])[:, 0]
        counts = torch.bincount(best, minlength=self.n_experts)
        sums = torch.zeros_like(self.centroids).index_add_(0, best, x.to(self.centroids.dtype))
        received = counts > 0
        means = sums[received] / counts[received, None]
        self.centroids[received] = self.decay * self.centroids[received] + (1 - self.decay) * means


class SparsityRouter(Router):
    """MoE-X's sparsity-aware routing (Yang et al. 2025): no router weights; each token goes to the ReLU experts
    whose pre-activations are expected to be sparsest, estimated from the experts' own `W_in`, `b_in` by a
    Gaussian approximation over their neurons (see the module docstring). The paper describes routing "to the
    experts with the highest activation sparsity"; this closed-form estimate is toylab's reading of that
    description, not a transcription of the paper's equations, which may estimate the sparsity differently."""

    def __init__(self, n_experts: int, k: int, load_balance_weight: float) -> None:
        super().__init__(n_experts, k)
        self.load_balance_weight = load_balance_weight

    def forward(self, x: torch.Tensor, fixed: torch.Tensor | None = None, W_in: torch.Tensor | None = None,
                b_in: torch.Tensor | None = None) -> Routing:
        assert W_in is not None and b_in is not None
        mean = x @ W_in.mean(-1).T + b_in.mean(-1)  # [..., E]
        variance = x.pow(2) @ W_in.var(-1, unbiased=False).T + b_in.var(-1, unbiased=False)
        logits = -mean / variance.clamp_min(1e-12).sqrt()  # Phi^-1 of the expected share of inactive neurons
        probs, _ = softmax(logits)
        experts, weights = top_k(probs, self.k)
        return Routing(logits, experts, weights,
                       {"load_balance": self.load_balance_weight * load_balance_loss(probs, experts, self.n_experts)})


def make_router(name: str, d_model: int, n_experts: int, k: int, load_balance_weight: float, z_loss_weight: float,
                capacity_factor: float | None, centroid_decay: float | None) -> Router:
    """The router called `name` (one of `ROUTERS`)."""
    if name in ("learned", "noisy"):
        return TopKRouter(d_model, n_experts, k, load_balance_weight, z_loss_weight, noisy=name == "noisy")
    if name == "expert_choice":
        return ExpertChoiceRouter(d_model, n_experts, k, capacity_factor or 1.0, z_loss_weight)
    if name == "kmeans":
        return KMeansRouter(d_model, n_experts, k, 0.99 if centroid_decay is None else centroid_decay)
    if name == "sparsity":
        return SparsityRouter(n_experts, k, load_balance_weight)
    if name in FIXED:
        return FixedRouter(n_experts, k)
    raise ToylabError(f"unknown router '{name}'; valid: {', '.join(ROUTERS)}")
