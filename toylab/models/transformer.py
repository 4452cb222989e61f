"""A small decoder-only transformer whose feed-forward slot is a dense MLP or an MoE layer.

    x_0 = W_E[tokens] + W_pos                                  hook_embed + hook_pos_embed
    x_mid = x + Attn(LN1(x))                                   blocks.{l}.hook_resid_mid
    x_post = x_mid + FFN(LN2(x_mid))                           blocks.{l}.hook_resid_post
    logits = LN_final(x_L) W_U

The FFN reads `blocks.{l}.ln2.hook_normalized`, so a router's input is that hook.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from toylab.config import check_memory
from toylab.errors import ToylabError
from toylab.models.hooks import HookedModule, HookPoint
from toylab.models.moe import MLP, MoE, Planted
from toylab.models.routing import FIXED, ROUTERS, TOKEN_CHOICE, WEIGHTED, RouterName

DIALED = {"router_supervision": WEIGHTED, "label_mix": ("learned", "noisy")}
"""The routers each dial of planted specialization applies to."""


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    max_len: int
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_mlp: int = 128
    ffn: Literal["dense", "moe"] = "dense"
    n_experts: int = 4
    top_k: int = 1
    d_expert: int | None = None
    """Expert hidden size; default d_mlp // (top_k + shared_experts), so active parameters match the dense MLP."""
    activation: Literal["gelu", "relu"] = "gelu"
    load_balance_weight: float = 0.01
    z_loss_weight: float = 0.001
    router: RouterName = "learned"
    """How an MoE layer picks experts (equations and papers in `toylab.models.routing`): `learned` top-k softmax
    routing; `noisy`, noisy top-k gating (Shazeer et al. 2017); `expert_choice`, each expert picks its top tokens
    up to a capacity, so a token gets 0..n_experts experts (Zhou et al. 2022; top_k is then the mean number per
    token); `kmeans`, parameter-free routing by cosine similarity to running centroids of the router inputs;
    `sparsity`, MoE-X's sparsity-aware routing of ReLU experts (Yang et al. 2025); `hash`, a fixed random token
    -> expert map (routing carries token identity only, as in hash layers, Roller et al. 2021); `label`, the
    class c of the task label `router_label` goes to expert c mod n_experts (experts specialize by that label by
    construction). Fixed routers (hash, label) choose one expert (top_k=1) and read `route` in `Transformer.forward`."""
    router_label: str | None = None
    """The task label the `label` router reads, and the label the dials below plant specialization on."""
    router_supervision: float = 0.0
    """Dial of planted specialization, supervised form: λ of an auxiliary loss λ · CE(router logits, class of
    `router_label` mod n_experts) added to the learned router's losses (0: the learned router). Routers with
    weights only (learned, noisy, expert_choice)."""
    label_mix: float = 0.0
    """Dial of planted specialization, mixed form: the share p of tokens routed by the label router (class of
    `router_label` mod n_experts, weight 1), the rest by the learned router (0: the learned router; 1: the label
    router). Which tokens is fixed per (position, token id) by a seeded table drawn with the weights, so a
    token routed by the label at p is routed by it at every larger p too. Top-1 learned or noisy routers only."""
    capacity_factor: float | None = None
    """Token-choice routers (learned, noisy, kmeans, sparsity): each expert takes at most
    ceil(capacity_factor * top_k * tokens / n_experts) slots per forward pass and the overflow is dropped
    (Switch/GShard); None = no capacity. Expert choice: its capacity, by the same formula (default 1)."""
    centroid_decay: float | None = None
    """The k-means router's moving-average decay of its centroids (default 0.99)."""
    shared_experts: int = 0
    """Shared experts applied to every token (DeepSeekMoE), as one MLP of shared_experts * d_expert neurons."""
    orthogonality_weight: float = 0.0
    """Weight of the orthogonality penalty (mean squared cosine between experts' weights or router directions)."""
    orthogonality: Literal["experts", "router"] = "experts"
    """What the orthogonality penalty acts on: each expert's W_in and W_out, or the router's directions (columns of W_r)."""

    def __post_init__(self) -> None:
        for key in ("vocab_size", "max_len", "d_model", "n_layers", "n_heads", "d_mlp", "n_experts"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1 (got {getattr(self, key)})")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={self.n_experts}] (got {self.top_k})")
        if self.shared_experts < 0:
            raise ValueError(f"shared_experts must be >= 0 (got {self.shared_experts})")
        if (self.d_expert is not None and self.d_expert < 1) or self.expert_size < 1:
            raise ValueError(f"d_expert must be >= 1 (got {self.d_expert}; by default it is d_mlp // (top_k + shared_experts))")
        for key in ("load_balance_weight", "z_loss_weight", "orthogonality_weight", "router_supervision"):
            if not 0 <= getattr(self, key) < math.inf:
                raise ValueError(f"{key} must be a finite number >= 0 (got {getattr(self, key)})")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        self.check_routing()
        params = self.params
        check_memory(16 * params, f"a model of about {params:,} parameters (weights, gradients, Adam state)",
                     "make it smaller (d_model, d_mlp, n_layers, n_experts) or the task's sequences shorter")

    @property
    def planted(self) -> bool:
        """Whether a dial plants specialization on `router_label` (router_supervision or label_mix above 0)."""
        return bool(self.router_supervision or self.label_mix)

    def check_routing(self) -> None:
        """The MoE options that apply to the chosen router, each in its range."""
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router '{self.router}'; valid: {', '.join(ROUTERS)}")
        if self.router in FIXED and (self.ffn != "moe" or self.top_k != 1):
            raise ValueError(f"router='{self.router}' needs ffn='moe' and top_k=1 (got ffn='{self.ffn}', top_k={self.top_k})")
        moe_only = [key for key, default in (("router", "learned"), ("capacity_factor", None), ("centroid_decay", None),
                                             ("shared_experts", 0), ("orthogonality_weight", 0.0))
                    if getattr(self, key) != default]
        if self.ffn != "moe" and moe_only:
            raise ValueError(f"{moe_only[0]} applies to ffn='moe' only (got ffn='{self.ffn}')")
        if not 0 <= self.label_mix <= 1:
            raise ValueError(f"label_mix must be a share of tokens in [0, 1] (got {self.label_mix})")
        dials = [key for key in ("router_supervision", "label_mix") if getattr(self, key)]
        if len(dials) > 1:
            raise ValueError("router_supervision and label_mix are two forms of one dial: set one of them")
        if dials and self.router not in DIALED[dials[0]]:
            raise ValueError(f"{dials[0]} applies to routers {', '.join(DIALED[dials[0]])} (got router='{self.router}')")
        if self.label_mix and self.top_k != 1:
            raise ValueError(f"label_mix mixes in the label router's one expert: it needs top_k=1 (got top_k={self.top_k})")
        if (self.router == "label" or bool(dials)) != (self.router_label is not None):
            raise ValueError("router_label names the label that router='label', router_supervision > 0 or label_mix > 0 reads "
                             "(and only they): set both or neither")
        capacity_routers = (*TOKEN_CHOICE, "expert_choice")
        if self.capacity_factor is not None:
            if self.router not in capacity_routers:
                raise ValueError(f"capacity_factor applies to routers {', '.join(capacity_routers)} (got router='{self.router}')")
            most = self.n_experts / self.top_k
            if not 0 < self.capacity_factor <= most:
                raise ValueError(f"capacity_factor must be in (0, n_experts / top_k = {most:g}] (got {self.capacity_factor})")
        if self.centroid_decay is not None:
            if self.router != "kmeans":
                raise ValueError(f"centroid_decay applies to router='kmeans' only (got router='{self.router}')")
            if not 0 < self.centroid_decay < 1:
                raise ValueError(f"centroid_decay must be in (0, 1) (got {self.centroid_decay})")
        if self.router == "sparsity" and self.activation != "relu":
            raise ValueError(f"router='sparsity' (MoE-X) routes ReLU experts: it needs activation='relu' (got '{self.activation}')")
        if self.orthogonality == "router" and self.router not in WEIGHTED:
            raise ValueError(f"orthogonality='router' needs a router with weights: {', '.join(WEIGHTED)} (got router='{self.router}')")

    @property
    def expert_size(self) -> int:
        return self.d_expert or self.d_mlp // (self.top_k + self.shared_experts)

    @property
    def params(self) -> int:
        """About how many parameters the model has (embeddings, attention, FFN; biases and norms left out)."""
        d, ffn = self.d_model, 2 * self.d_model * self.d_mlp
        if self.ffn == "moe":
            ffn = (self.n_experts + self.shared_experts) * (2 * d * self.expert_size + d)
        return (2 * self.vocab_size + self.max_len) * d + self.n_layers * (4 * d * d + ffn)


class LayerNorm(nn.LayerNorm):
    def __init__(self, d_model: int) -> None:
        super().__init__(d_model)
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook_normalized(super().forward(x))


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.W_QKV = nn.Linear(d_model, 3 * d_model)
        self.W_O = nn.Linear(d_model, d_model)
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()  # [batch, pos, head, d_head]
        self.hook_pattern = HookPoint()  # [batch, head, query, key]
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, pos, _ = x.shape
        q, k, v = self.W_QKV(x).view(batch, pos, 3, self.n_heads, self.d_head).unbind(2)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if self.hook_pattern.active:  # a hook reads or edits the pattern: compute it
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.d_head)
            causal = torch.ones(pos, pos, dtype=torch.bool, device=x.device).tril()
            pattern = self.hook_pattern(scores.masked_fill(~causal, float("-inf")).softmax(-1))
            z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
        else:  # the same computation, fused without materializing the pattern (about 2x faster on CPU)
            z = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True).transpose(1, 2)
        z = self.hook_z(z)
        return self.W_O(z.reshape(batch, pos, -1))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2 = LayerNorm(cfg.d_model), Attention(cfg.d_model, cfg.n_heads), LayerNorm(cfg.d_model)
        if cfg.ffn == "moe":
            self.mlp: nn.Module = MoE(
                cfg.d_model, cfg.expert_size, cfg.n_experts, cfg.top_k, cfg.activation, cfg.load_balance_weight,
                cfg.z_loss_weight, cfg.router, cfg.capacity_factor, cfg.centroid_decay, cfg.shared_experts,
                cfg.orthogonality_weight, cfg.orthogonality, cfg.router_supervision,
            )
        else:
            self.mlp = MLP(cfg.d_model, cfg.d_mlp, cfg.activation)
        self.hook_resid_pre, self.hook_resid_mid, self.hook_resid_post = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_out, self.hook_mlp_out = HookPoint(), HookPoint()  # [batch, pos, d_model]

    def forward(self, x: torch.Tensor, experts: torch.Tensor | None = None, planted: Planted | None = None) -> torch.Tensor:
        """`experts` `[batch, pos]`: the choice of a fixed router; `planted`: a dial's planted experts (None otherwise)."""
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.attn(self.ln1(x))))
        ffn = self.mlp(self.ln2(x), experts, planted) if isinstance(self.mlp, MoE) else self.mlp(self.ln2(x))
        return self.hook_resid_post(x + self.hook_mlp_out(ffn))


def token_hash(vocab_size: int, n_experts: int) -> torch.Tensor:
    """A random token -> expert map `[vocab_size]`, balanced: a random permutation of the ids, mod n_experts.

    Drawn from torch's global generator, like the weights, so each training seed has its own map (a study's
    intervals over seeds then include the map's luck); it is saved with the weights, as a buffer.
    """
    return torch.randperm(vocab_size) % n_experts


class Transformer(HookedModule):
    """Decoder-only transformer over token ids `[batch, pos]` returning logits `[batch, pos, vocab]`."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.W_E = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.W_pos = nn.Parameter(torch.randn(cfg.max_len, cfg.d_model) * 0.02)
        self.hook_embed, self.hook_pos_embed = HookPoint(), HookPoint()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = LayerNorm(cfg.d_model)
        self.W_U = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.W_E.weight, std=0.02)
        if cfg.router in FIXED:
            self.register_buffer("expert_of_token", token_hash(cfg.vocab_size, cfg.n_experts))
        if cfg.label_mix:  # drawn after the weights, so every p (and the learned router) starts from the same weights
            self.register_buffer("mix_draw", torch.rand(cfg.max_len, cfg.vocab_size))
        self.setup_hooks()

    def forward(self, tokens: torch.Tensor, route: torch.Tensor | None = None) -> torch.Tensor:
        """Logits; `route` `[batch, pos]` holds the ids of label `router_label` for the label router and the dials
        (ignored otherwise)."""
        experts = self.fixed_experts(tokens, route) if self.cfg.router in FIXED else None
        planted = self.planted_experts(tokens, route) if self.cfg.planted else None
        x = self.hook_embed(self.W_E(tokens)) + self.hook_pos_embed(self.W_pos[: tokens.shape[1]])
        for block in self.blocks:
            x = block(x, experts, planted)
        return self.W_U(self.ln_final(x))

    def label_route(self, tokens: torch.Tensor, route: torch.Tensor | None) -> torch.Tensor:
        """The ids of `router_label` `[batch, pos]` on the tokens' device (one-line error when missing or misshapen)."""
        if route is None or route.shape != tokens.shape:
            raise ToylabError(f"router='{self.cfg.router}' with router_label needs route=the ids of label '{self.cfg.router_label}', "
                              f"shape {tuple(tokens.shape)} like the tokens (Transformer.route_input(batch.labels) gives it)")
        return route.to(tokens.device)

    def planted_experts(self, tokens: torch.Tensor, route: torch.Tensor | None) -> Planted:
        """A dial's planted expert per token: class c of `router_label` -> expert c mod n_experts (-1 where the label is
        undefined), and with `label_mix` the tokens routed by it: those whose seeded draw for (position, token) is below p."""
        route = self.label_route(tokens, route)
        experts = torch.where(route >= 0, route % self.cfg.n_experts, -1)
        mixed = self.mix_draw[torch.arange(tokens.shape[1], device=tokens.device), tokens] < self.cfg.label_mix if self.cfg.label_mix else None
        return Planted(experts, mixed)

    def fixed_experts(self, tokens: torch.Tensor, route: torch.Tensor | None) -> torch.Tensor:
        """The expert of each token `[batch, pos]` under a fixed router, the same in every MoE layer.

        Hash router: `expert_of_token[token]`. Label router: class c of the label goes to expert c mod
        n_experts; where the label is undefined (IGNORE, any negative id) the token's hash decides.
        """
        hashed = self.expert_of_token[tokens]
        if self.cfg.router == "hash":
            return hashed
        route = self.label_route(tokens, route)
        return torch.where(route >= 0, route % self.cfg.n_experts, hashed)

    def route_input(self, labels: Mapping[str, np.ndarray]) -> torch.Tensor | None:
        """`forward`'s `route` from a batch's labels: the ids of `router_label` (label router, dials), else None."""
        if self.cfg.router_label is None:
            return None
        return torch.from_numpy(np.ascontiguousarray(labels[self.cfg.router_label]))

    def aux_loss(self) -> torch.Tensor:
        """Weighted MoE auxiliary losses of the last forward pass (0 for a dense model)."""
        losses = [loss for block in self.blocks if isinstance(block.mlp, MoE) for loss in block.mlp.aux_losses.values()]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def moe_layers(self) -> list[int]:
        return [layer for layer, block in enumerate(self.blocks) if isinstance(block.mlp, MoE)]
