"""Sparse autoencoders and Switch SAEs, with an instance dimension so a sweep trains as one program.

A Switch SAE (Mudide et al. 2024) routes each activation to one of E expert SAEs of n/E latents;
with E = 1 it is the ordinary SAE (Bricken et al. 2023; Cunningham et al. 2023). Einsum letters:
b batch, i instance, e expert, d input, l latent (of one expert).

    p = softmax(W_r (x - b_dec) + b_r)                hook_router_probs     [batch, inst, E]
    e* = argmax p                                     hook_expert_indices   [batch, inst]
    f_e = act(W_enc_e (x - b_dec) + b_enc_e)          hook_latents          [batch, inst, n] (zero off e*)
    x' = p_e* D_e* f_e* + b_dec                       hook_reconstruction   [batch, inst, d]

D_e has unit-norm latent directions (the decoder rows are normalized in the forward pass), so the
L1 penalty cannot be dodged by shrinking codes. `act` is ReLU with an L1 penalty on f, or TopK
(Gao et al. 2024): the k largest pre-activations, ReLU'd, and no penalty. With E = 1, p = 1.
Loss per instance: mean squared error over samples and dimensions + l1_i * mean_b sum_l f
+ load_balance_weight * E * sum_e (share routed to e) (mean p_e), the Switch Transformer's loss.
Every expert is computed for every sample and the router's choice masks the rest: E times the
arithmetic of a routed layer, small at these sizes, with fixed-shape hooks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from toylab.errors import DivergenceError
from toylab.models.hooks import HookedModule, HookPoint
from toylab.determinism import data_seed


@dataclass(frozen=True)
class SAEConfig:
    d_in: int
    n_latents: int
    """Total dictionary size (split evenly over the experts)."""
    n_instances: int = 1
    n_experts: int = 1
    """1: a plain SAE; more: a Switch SAE."""
    activation: Literal["relu", "topk"] = "relu"
    k: int = 4
    """Latents kept per sample when activation = "topk"."""
    load_balance_weight: float = 0.01

    def __post_init__(self) -> None:
        for key in ("d_in", "n_latents", "n_instances", "n_experts", "k"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1 (got {getattr(self, key)})")
        if self.n_latents % self.n_experts:
            raise ValueError(f"n_latents={self.n_latents} must be divisible by n_experts={self.n_experts}")
        if self.activation == "topk" and self.k > self.n_latents // self.n_experts:
            raise ValueError(f"k={self.k} exceeds the latents of one expert ({self.n_latents // self.n_experts})")
        if not (self.load_balance_weight >= 0 and math.isfinite(self.load_balance_weight)):
            raise ValueError(f"load_balance_weight must be a finite number >= 0 (got {self.load_balance_weight})")

    @property
    def expert_latents(self) -> int:
        return self.n_latents // self.n_experts


class SparseAutoencoder(HookedModule):
    """A (Switch) SAE per instance; instance i is initialized from `seeds[i]`."""

    def __init__(self, cfg: SAEConfig, seeds: list[int] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        inst, e, d, n = cfg.n_instances, cfg.n_experts, cfg.d_in, cfg.expert_latents
        seeds = list(range(inst)) if seeds is None else seeds
        directions = torch.stack([
            F.normalize(torch.randn(e, n, d, generator=torch.Generator().manual_seed(s)), dim=-1) for s in seeds
        ])
        self.W_dec = nn.Parameter(directions)  # [inst, E, n, d], rows normalized in forward
        self.W_enc = nn.Parameter(directions.transpose(-1, -2).clone())  # [inst, E, d, n]: tied at init
        self.b_enc = nn.Parameter(torch.zeros(inst, e, n))
        self.b_dec = nn.Parameter(torch.zeros(inst, d))
        self.W_router = nn.Parameter(torch.zeros(inst, d, e))
        self.b_router = nn.Parameter(torch.zeros(inst, e))
        self.hook_router_probs = HookPoint()
        self.hook_expert_indices = HookPoint()
        self.hook_latents = HookPoint()
        self.hook_reconstruction = HookPoint()
        self._aux = torch.zeros(inst)
        self.setup_hooks()

    def decoder(self) -> torch.Tensor:
        """Unit-norm latent directions `[inst, n_latents, d]` (expert-major)."""
        return F.normalize(self.W_dec, dim=-1).flatten(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x [batch, d]` (shared by every instance) or `[batch, inst, d]` -> reconstruction `[batch, inst, d]`."""
        cfg = self.cfg
        if x.dim() == 2:
            x = x.unsqueeze(1)
        centered = x - self.b_dec  # [b, i, d]
        probs = self.hook_router_probs(torch.softmax(torch.einsum("b i d, i d e -> b i e", centered, self.W_router)
                                                     + self.b_router, dim=-1))
        chosen = self.hook_expert_indices(probs.argmax(-1))  # [b, i]
        pre = torch.einsum("b i d, i e d l -> b i e l", centered, self.W_enc) + self.b_enc
        codes = F.relu(pre)
        if cfg.activation == "topk":
            kept = pre.topk(cfg.k, dim=-1).indices
            codes = torch.zeros_like(codes).scatter(-1, kept, codes.gather(-1, kept))
        routed = F.one_hot(chosen, cfg.n_experts).to(x.dtype)  # [b, i, E]
        codes = codes * routed.unsqueeze(-1)
        latents = self.hook_latents(codes.flatten(2))  # [b, i, n]
        gate = (probs * routed).sum(-1, keepdim=True) if cfg.n_experts > 1 else 1.0
        out = gate * torch.einsum("b i n, i n d -> b i d", latents, self.decoder()) + self.b_dec
        share, mean_prob = routed.mean(0), probs.mean(0)  # [i, E]
        self._aux = cfg.load_balance_weight * cfg.n_experts * (share * mean_prob).sum(-1) if cfg.n_experts > 1 \
            else torch.zeros(cfg.n_instances)
        return self.hook_reconstruction(out)

    def loss(self, x: torch.Tensor, out: torch.Tensor, latents: torch.Tensor, l1: torch.Tensor) -> torch.Tensor:
        """Per instance `[inst]`: reconstruction MSE + l1 * mean L1 of the codes + the load-balancing loss."""
        if x.dim() == 2:
            x = x.unsqueeze(1)
        mse = ((out - x) ** 2).mean((0, 2))
        return mse + l1 * latents.abs().sum(-1).mean(0) + self._aux


@dataclass(frozen=True)
class SAETrainConfig:
    steps: int = 3000
    batch_size: int = 256
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1 (got {getattr(self, key)})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number (got {self.lr})")


class SAETrainer(pl.LightningModule):
    """Trains every instance at once on random minibatches of cached activations `[N, d]`."""

    def __init__(self, sae: SparseAutoencoder, data: torch.Tensor, l1: torch.Tensor, cfg: SAETrainConfig) -> None:
        super().__init__()
        self.sae, self.data, self.l1, self.cfg = sae, data, l1, cfg
        self.generator = torch.Generator().manual_seed(data_seed(cfg.seed, "train"))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = self.data[torch.randint(len(self.data), (self.cfg.batch_size,), generator=self.generator)]
        out, cache = self.sae.run_with_cache(x, names="hook_latents", detach=False)
        loss = self.sae.loss(x, out, cache["hook_latents"], self.l1).sum()
        if not torch.isfinite(loss):
            raise DivergenceError(f"SAE training diverged: loss is {loss.item()} at step {self.global_step}; try a lower lr")
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.sae.parameters(), lr=self.cfg.lr)


def train_sae(
    sae: SparseAutoencoder, data: torch.Tensor | np.ndarray, cfg: SAETrainConfig, l1: float | list[float] = 0.0
) -> SparseAutoencoder:
    """Fit every instance on `data [N, d]` (l1: one coefficient, or one per instance); return `sae` in eval mode."""
    data = torch.as_tensor(data, dtype=torch.float32)
    l1 = torch.as_tensor(l1, dtype=torch.float32).expand(sae.cfg.n_instances).contiguous()
    with torch.no_grad():
        sae.b_dec.copy_(data.mean(0).expand_as(sae.b_dec))
    trainer = pl.Trainer(max_steps=cfg.steps, max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0)
    trainer.fit(SAETrainer(sae, data, l1, cfg), DataLoader(range(cfg.steps), batch_size=None))
    return sae.eval()


@torch.no_grad()
def encode(sae: SparseAutoencoder, data: torch.Tensor | np.ndarray, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent codes `[N, inst, n_latents]` and reconstructions `[N, inst, d]` of `data [N, d]`."""
    data = torch.as_tensor(data, dtype=torch.float32)
    codes, outs = [], []
    for x in data.split(chunk):
        out, cache = sae.run_with_cache(x, names="hook_latents")
        codes.append(cache["hook_latents"])
        outs.append(out)
    return torch.cat(codes), torch.cat(outs)
