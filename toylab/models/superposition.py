"""Toy models of superposition (Elhage et al. 2022) and their mixture of experts (Chaudhari et al. 2025).

Every weight has a leading instance dimension, so a sweep (sparsities x importances x seeds)
trains as one vectorized program. Einsum letters: b batch, i instance, e expert, h hidden, f feature.

    h = W x                                       hook_hidden      [batch, inst, m]
    x' = ReLU(W^T h + b)  (linear: W^T h + b)     hook_out         [batch, inst, n]

The MoE has E such experts and a linear softmax gate on x; each sample uses its top k experts:

    p = softmax(W_g x)                            hook_router_logits   [batch, inst, E] (logits)
    w, e = topk(p, k)                             hook_expert_indices  [batch, inst, k] (best first)
                                                  hook_expert_weights  [batch, inst, k]
    h_e = W_e x                                   hook_hidden          [batch, inst, E, m]
    y_e = ReLU(W_e^T h_e + b_e)                   hook_expert_out      [batch, inst, E, n]
    x' = sum_j w_j y_{e_j}                        hook_out             [batch, inst, n]

The weights of the k chosen experts are renormalized to sum to 1 (`gate_weights="renormalized"`,
as in Chaudhari et al.), or, with `gate_weights="softmax"` (the default) and k = 1, are the router
probability itself (Switch, as in `toylab.models.moe`). Renormalized at k = 1, the weight is p / p = 1:
the reconstruction sends the gate no gradient, so it learns only from the load-balancing loss and
otherwise keeps its initialization (an untrained gate). Softmax weights let the task train the gate, at
the price of an output scaled by p, which the expert weights learn to undo; a straight-through weight
(1 forward, p's gradient backward) would train it too, but with a gradient of an output the forward pass
never computes, so the default follows Switch, as the transformer MoEs do. Loss: sum over instances of the
importance-weighted squared error, mean over samples and features, plus the Switch load-balancing
loss E * sum_e f_e P_e (optional, weighted).

The gate starts Xavier-normal (`gate_init="xavier"`) or K-hot (`gate_init="khot"`, Chaudhari et al.'s
initialization for expert specialization, `my_gate_init` in their code): W_g = 0 except 1 at a
disjoint random block of about n/E features per expert (a random permutation split into E
near-equal blocks, drawn from the instance's generator), so each expert is first sent the samples
whose active features lie in its block; the blocks are kept in `khot_blocks [inst, n]`.

All experts run on every sample and the gate zeroes the unchosen ones: one batched einsum with a
fixed layout for every expert's activations, at E/k times the arithmetic of the chosen experts,
which is small at these sizes (no sorting by expert as in `SortedDispatch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from toylab import io
from toylab.config import check_memory, to_dict
from toylab.errors import DivergenceError, ToylabError
from toylab.models.hooks import HookedModule, HookPoint
from toylab.determinism import data_seed, torch_threads


class SparseFeatures(Protocol):
    """What the toy models train on: a task of sparse features with importances (as the `superposition` task)."""

    name: str
    options: dict[str, Any]
    config: Any
    """Has `sparsity`, the default probability that a feature is zero."""

    @property
    def n_features(self) -> int: ...

    @property
    def importance(self) -> np.ndarray: ...

    def generate(
        self, n: int, generator: torch.Generator, sparsity: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`x [n, inst, n_features]`, `active` of the same shape, `group [n, inst]`."""


@dataclass(frozen=True)
class ToyModelConfig:
    n_features: int = 20
    n_hidden: int = 5
    n_instances: int = 1
    activation: Literal["relu", "linear"] = "relu"
    n_experts: int = 1
    """1 gives the dense model; more give the mixture of experts."""
    top_k: int = 1
    gate_weights: Literal["renormalized", "softmax"] = "softmax"
    """How the chosen expert's output is weighted when top_k = 1: the router probability (the gate trains), or
    weight 1 (renormalized, as in Chaudhari et al.: the gate gets no gradient from the task)."""
    load_balance_weight: float = 0.0
    gate_init: Literal["xavier", "khot"] = "xavier"
    """Router initialization: Xavier-normal, or K-hot (each expert's gate 1 on its own block of features)."""

    def __post_init__(self) -> None:
        for key in ("n_features", "n_hidden", "n_instances", "n_experts"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1 (got {getattr(self, key)})")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={self.n_experts}] (got {self.top_k})")
        if self.gate_init == "khot" and self.n_experts > self.n_features:
            raise ValueError(f"gate_init='khot' needs n_experts <= n_features={self.n_features} (got {self.n_experts})")
        if not 0 <= self.load_balance_weight < math.inf:
            raise ValueError(f"load_balance_weight must be a finite number >= 0 (got {self.load_balance_weight})")
        params = self.n_instances * self.n_features * (self.n_experts * (self.n_hidden + 1) + 1)
        check_memory(16 * params, f"toy models of about {params:,} parameters (weights, gradients, Adam state)",
                     "use fewer instances, features, experts or hidden dimensions")


def _xavier(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """Xavier-normal `[..., fan_out, fan_in]` drawn from one instance's generator."""
    return torch.randn(*shape, generator=generator) * math.sqrt(2 / (shape[-1] + shape[-2]))


def khot_blocks(generator: torch.Generator, n_experts: int, n_features: int) -> torch.Tensor:
    """Expert of each feature `[n]`: a random permutation split into `n_experts` near-equal blocks."""
    blocks = torch.empty(n_features, dtype=torch.long)
    blocks[torch.randperm(n_features, generator=generator)] = torch.arange(n_features) * n_experts // n_features
    return blocks


class _ToyBase(HookedModule):
    """Shared parts: instance seeds, input checks, the activation and the loss."""

    def __init__(self, cfg: ToyModelConfig, seeds: Sequence[int] | None) -> None:
        super().__init__()
        self.cfg = cfg
        seeds = list(range(cfg.n_instances)) if seeds is None else list(seeds)
        if len(seeds) != cfg.n_instances:
            raise ToylabError(f"need one seed per instance ({cfg.n_instances}); got {len(seeds)}")
        self.seeds = [int(s) for s in seeds]

    def _generators(self) -> list[torch.Generator]:
        """One initialization generator per instance, so instance i does not depend on the others."""
        return [torch.Generator().manual_seed(s) for s in self.seeds]

    def act(self, pre: torch.Tensor) -> torch.Tensor:
        return F.relu(pre) if self.cfg.activation == "relu" else pre

    def _instances(self, x: torch.Tensor) -> torch.Tensor:
        """Check `x [batch, inst, n_features]`; a size-1 instance dimension is shared by all instances."""
        inst, n = self.cfg.n_instances, self.cfg.n_features
        if x.dim() != 3 or x.shape[-1] != n or x.shape[1] not in (1, inst):
            raise ToylabError(f"toy model input must be [batch, {inst} (or 1), {n}]; got {list(x.shape)}")
        return x.expand(-1, inst, -1)

    def aux_loss(self) -> torch.Tensor:
        """Weighted auxiliary loss per instance `[inst]` of the last forward pass."""
        return torch.zeros(self.cfg.n_instances)

    def loss(self, x: torch.Tensor, out: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
        """Importance-weighted squared error per instance `[inst]`: mean over samples and features."""
        return torch.einsum("b i f, i f -> i", (out - x) ** 2, importance) / (x.shape[0] * x.shape[-1])


class ToyModel(_ToyBase):
    """x' = act(W^T W x + b) with W `[inst, m, n]`; instance i is initialized from `seeds[i]`."""

    def __init__(self, cfg: ToyModelConfig, seeds: Sequence[int] | None = None) -> None:
        super().__init__(cfg, seeds)
        m, n = cfg.n_hidden, cfg.n_features
        self.W = nn.Parameter(torch.stack([_xavier(g, m, n) for g in self._generators()]))  # [inst, m, n]
        self.b = nn.Parameter(torch.zeros(cfg.n_instances, n))
        self.hook_hidden = HookPoint()  # [batch, inst, m]
        self.hook_out = HookPoint()  # [batch, inst, n]
        self.setup_hooks()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._instances(x)
        h = self.hook_hidden(torch.einsum("b i f, i h f -> b i h", x, self.W))
        return self.hook_out(self.act(torch.einsum("b i h, i h f -> b i f", h, self.W) + self.b))


class ToyMoE(_ToyBase):
    """E toy models per instance (W `[inst, E, m, n]`) mixed by a top-k softmax gate W_g `[inst, E, n]`."""

    def __init__(self, cfg: ToyModelConfig, seeds: Sequence[int] | None = None) -> None:
        super().__init__(cfg, seeds)
        E, m, n = cfg.n_experts, cfg.n_hidden, cfg.n_features
        generators = self._generators()
        self.W = nn.Parameter(torch.stack([_xavier(g, E, m, n) for g in generators]))  # [inst, E, m, n]
        self.b = nn.Parameter(torch.zeros(cfg.n_instances, E, n))
        if cfg.gate_init == "khot":
            blocks = torch.stack([khot_blocks(g, E, n) for g in generators])  # [inst, n]
            gate = F.one_hot(blocks, E).transpose(1, 2).float()  # [inst, E, n]
        else:
            blocks = torch.full((cfg.n_instances, n), -1)
            gate = torch.stack([_xavier(g, E, n) for g in generators])
        self.W_gate = nn.Parameter(gate)  # [inst, E, n]
        self.register_buffer("khot_blocks", blocks, persistent=False)  # [inst, n]; -1 without K-hot init
        self.hook_router_logits = HookPoint()  # [batch, inst, E]
        self.hook_expert_indices = HookPoint()  # [batch, inst, k], best first
        self.hook_expert_weights = HookPoint()  # [batch, inst, k]
        self.hook_hidden = HookPoint()  # [batch, inst, E, m]
        self.hook_expert_out = HookPoint()  # [batch, inst, E, n]
        self.hook_out = HookPoint()  # [batch, inst, n]
        self._aux = torch.zeros(cfg.n_instances)
        self.setup_hooks()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities `[batch, inst, E]`, chosen experts and their weights `[batch, inst, k]`."""
        logits = self.hook_router_logits(torch.einsum("b i f, i e f -> b i e", x, self.W_gate))
        probs = logits.softmax(-1)
        weights, experts = probs.topk(self.cfg.top_k, dim=-1)
        if self.cfg.top_k > 1 or self.cfg.gate_weights == "renormalized":
            weights = weights / weights.sum(-1, keepdim=True)
        return probs, self.hook_expert_indices(experts), self.hook_expert_weights(weights)

    def load_balance_loss(self, probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Switch loss per instance `[inst]`: E * sum_e f_e P_e, 1 when routing is uniform."""
        routed = torch.zeros_like(probs).scatter_(-1, experts, 1.0)  # [batch, inst, E]
        fraction = routed.mean(0) / self.cfg.top_k
        return self.cfg.n_experts * (fraction * probs.mean(0)).sum(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._instances(x)
        probs, experts, weights = self.route(x)
        self._aux = self.cfg.load_balance_weight * self.load_balance_loss(probs, experts)
        gate = torch.zeros_like(probs).scatter(-1, experts, weights)  # [batch, inst, E], zero if unchosen
        h = self.hook_hidden(torch.einsum("b i f, i e h f -> b i e h", x, self.W))
        y = self.hook_expert_out(self.act(torch.einsum("b i e h, i e h f -> b i e f", h, self.W) + self.b))
        return self.hook_out(torch.einsum("b i e, b i e f -> b i f", gate, y))

    def aux_loss(self) -> torch.Tensor:
        return self._aux


def build_toy_model(cfg: ToyModelConfig, seeds: Sequence[int] | None = None) -> ToyModel | ToyMoE:
    """The dense model when `n_experts == 1`, else the mixture of experts."""
    return ToyModel(cfg, seeds) if cfg.n_experts == 1 else ToyMoE(cfg, seeds)


@dataclass(frozen=True)
class ToyTrainConfig:
    steps: int = 5000
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.0
    log_every: int = 100
    n_eval: int = 10000
    seed: int = 0
    threads: int = 1
    """Torch intra-op threads while training and evaluating; for models this small, syncing a second
    thread costs more than it saves (2 threads on 2 busy cores ran a 100-instance sweep 4x slower)."""

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "log_every", "n_eval", "threads"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1 (got {getattr(self, key)})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number (got {self.lr})")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be a finite number >= 0 (got {self.weight_decay})")
        if not 0 <= self.seed <= 2**32 - 1:
            raise ValueError(f"seed must be in [0, {2**32 - 1}] (got {self.seed})")


class ToyTrainer(pl.LightningModule):
    """Trains all instances at once on fresh torch-sampled batches, one sparsity and importance per instance.

    The summed loss gives each instance exactly its own gradient, and Adam is elementwise, so
    every instance trains as it would alone. Lightning costs about 1 ms per step, a few percent of
    a step over a sweep of instances.
    """

    def __init__(
        self, model: ToyModel | ToyMoE, task: SparseFeatures, cfg: ToyTrainConfig,
        sparsity: torch.Tensor, importance: torch.Tensor,
    ) -> None:
        super().__init__()
        self.model, self.task, self.cfg = model, task, cfg
        self.sparsity, self.importance = sparsity, importance
        self.generator = torch.Generator().manual_seed(data_seed(cfg.seed, "train"))
        self.history: list[torch.Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, _, _ = self.task.generate(self.cfg.batch_size, self.generator, self.sparsity)
        reconstruction = self.model.loss(x, self.model(x), self.importance)
        loss = (reconstruction + self.model.aux_loss()).sum()
        if not torch.isfinite(loss):
            raise DivergenceError(
                f"training diverged: loss is {loss.item()} at step {self.global_step}; try a lower lr (now {self.cfg.lr})"
            )
        if batch_idx % self.cfg.log_every == 0:
            self.history.append(reconstruction.detach())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)


@dataclass
class ToyTrainResult:
    model: ToyModel | ToyMoE
    loss: np.ndarray
    """Final importance-weighted loss per instance `[inst]` on a fresh evaluation batch."""
    history: np.ndarray
    """Training loss per instance every `log_every` steps `[n_logged, inst]`."""


def instance_settings(
    model: ToyModel | ToyMoE, task: SparseFeatures,
    sparsity: Sequence[float] | torch.Tensor | None = None, importance: np.ndarray | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-instance sparsity `[inst]` and importance `[inst, n]`; defaults come from the task config."""
    inst, n = model.cfg.n_instances, model.cfg.n_features
    if task.n_features != n:
        raise ToylabError(f"task has {task.n_features} features but the model has n_features={n}")
    sparsity = torch.full((inst,), task.config.sparsity) if sparsity is None else torch.as_tensor(sparsity)
    importance = torch.as_tensor(task.importance if importance is None else importance, dtype=torch.float32)
    if sparsity.shape != (inst,):
        raise ToylabError(f"sparsity must give one value per instance ({inst}); got shape {list(sparsity.shape)}")
    if importance.shape not in ((n,), (inst, n)):
        raise ToylabError(f"importance must be [{n}] or [{inst}, {n}]; got {list(importance.shape)}")
    return sparsity.float(), importance.expand(inst, n).contiguous()


def train_toy_model(
    model: ToyModel | ToyMoE,
    task: SparseFeatures,
    cfg: ToyTrainConfig,
    sparsity: Sequence[float] | torch.Tensor | None = None,
    importance: np.ndarray | torch.Tensor | None = None,
    run_dir: Path | None = None,
    progress: bool = False,
) -> ToyTrainResult:
    """Train every instance of `model` on `task`'s features at its own sparsity `[inst]` and importance.

    With `run_dir`, a finished run there with the same settings is loaded instead, and a new run
    is saved there: `config.json`, `model.safetensors`, then `final.json` (its presence marks it finished).
    """
    sparsity, importance = instance_settings(model, task, sparsity, importance)
    n, inst = max(cfg.batch_size, cfg.n_eval), model.cfg.n_instances
    check_memory(n * inst * task.n_features * 4 * 8, f"batches of {n:,} samples x {inst} instances x {task.n_features} features",
                 "use a smaller batch_size or n_eval")
    config = {
        "task": task.name, "task_options": task.options, "model": to_dict(model.cfg), "seeds": model.seeds,
        "train": to_dict(cfg), "sparsity": sparsity.tolist(), "importance": importance.tolist(),
    }
    run_dir = None if run_dir is None else Path(run_dir)
    if run_dir is not None and (run_dir / "final.json").is_file() and io.read_json(run_dir / "config.json") == config:
        return load_toy_run(model, run_dir)
    with torch_threads(cfg.threads):
        result = _fit(model, task, cfg, sparsity, importance, progress)
    if run_dir is not None:
        io.write_json(run_dir / "config.json", config)
        io.save_tensors(run_dir / "model.safetensors", model.state_dict())
        io.write_json(run_dir / "final.json", {"loss": result.loss.tolist(), "history": result.history.tolist()})
    return result


def _fit(
    model: ToyModel | ToyMoE, task: SparseFeatures, cfg: ToyTrainConfig,
    sparsity: torch.Tensor, importance: torch.Tensor, progress: bool,
) -> ToyTrainResult:
    """Fit with Lightning, then evaluate on a fresh batch."""
    module = ToyTrainer(model, task, cfg, sparsity, importance)
    trainer = pl.Trainer(
        max_steps=cfg.steps,
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, DataLoader(range(cfg.steps), batch_size=None))
    model.eval()
    loss = evaluate_toy_model(model, task, sparsity, importance, cfg.n_eval, data_seed(cfg.seed, "val"))
    return ToyTrainResult(model, loss, torch.stack(module.history).numpy())


def load_toy_run(model: ToyModel | ToyMoE, run_dir: Path) -> ToyTrainResult:
    """Load a finished run's weights into `model` (built with the run's config) and its losses."""
    try:
        model.load_state_dict(io.load_tensors(run_dir / "model.safetensors"))
    except RuntimeError as error:
        raise ToylabError(f"checkpoint {run_dir / 'model.safetensors'} does not match its config: {error}") from None
    final = io.read_json(run_dir / "final.json")
    return ToyTrainResult(model.eval(), np.array(final["loss"]), np.array(final["history"]))


@torch.no_grad()
def evaluate_toy_model(
    model: ToyModel | ToyMoE, task: SparseFeatures, sparsity: torch.Tensor, importance: torch.Tensor, n: int, seed: int
) -> np.ndarray:
    """Importance-weighted loss per instance `[inst]` on `n` fresh samples, run in chunks of 1024."""
    x, _, _ = task.generate(n, torch.Generator().manual_seed(seed), sparsity)
    total = sum(len(chunk) * model.loss(chunk, model(chunk), importance) for chunk in x.split(1024))
    return (total / n).numpy()
