"""Section `seeds`: S seeds trained together as one vectorized program against S sequential training steps.

The program is the standard tool for it: the S models' weights stacked (`torch.func.stack_module_state`)
and one `torch.func.vmap` over `functional_call`, with one AdamW over the stacked weights (AdamW is
elementwise, so each seed's update is its own). Each seed has its own weights and batch. The model is
the quickstart's (expert-specialization: brackets, d_model 32, 2 heads, d_mlp 64, 2 layers), dense and
MoE (4 experts, top-1), batch 64; a step is forward, backward and the optimizer step.

Alongside, the most any such program could gain on this machine, two ways: a step's fixed cost (Python,
dispatch, optimizer bookkeeping) is what it costs at batch 1; S seeds together at best pay it once, so their
throughput is at most S t_B / (t_1 + S (t_B - t_1)) of S sequential steps (t_B: one step at batch B). And
measured directly: one model trained at batch S B, the same arithmetic with one set of weights, so no
program over S weight sets can beat it by much.
Target: 8 seeds together >= 2.5x the throughput of 8 sequential runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from benchmarks import medians, row
from toylab.models import Transformer, TransformerConfig
from toylab.registry import get_task

MODEL = {"d_model": 32, "n_heads": 2, "d_mlp": 64, "n_layers": 2}
FFNS = {"dense": {}, "moe": {"ffn": "moe", "n_experts": 4, "top_k": 1}}
SEEDS, BATCH, TARGET = (1, 4, 8), 64, 2.5


def models(cfg: TransformerConfig, seeds: int) -> list[Transformer]:
    out = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        out.append(Transformer(cfg))
    return out


def loss_of(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()) + model.aux_loss()


def sequential(cfg: TransformerConfig, tokens: torch.Tensor) -> Callable[[], None]:
    """One training step of each of the S models, one after another."""
    ms = models(cfg, len(tokens))
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in ms]

    def step() -> None:
        for model, optimizer, batch in zip(ms, optimizers, tokens):
            optimizer.zero_grad(set_to_none=True)
            loss_of(model, batch).backward()
            optimizer.step()

    return step


def together(cfg: TransformerConfig, tokens: torch.Tensor) -> Callable[[], None]:
    """One training step of the S models as one vmapped program over stacked weights."""
    params, buffers = stack_module_state(models(cfg, len(tokens)))
    params = {name: torch.nn.Parameter(p) for name, p in params.items()}
    template = Transformer(cfg).to("meta")
    optimizer = torch.optim.AdamW(params.values(), lr=1e-3)

    def one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        logits = functional_call(template, (p, b), (batch,))
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        return loss + template.aux_loss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        vmap(one)(params, buffers, tokens).sum().backward()  # the sum hands each seed the gradient of its own loss
        optimizer.step()

    return step


def run(quick: bool) -> list[dict[str, Any]]:
    warnings.filterwarnings("ignore", message="There is a performance drop")  # vmap's per-seed loop for ops without a batching rule
    task = get_task("brackets", {})
    repeats, seeds = (2, (1, 4)) if quick else (9, SEEDS)
    rows = []
    for ffn, options in FFNS.items():
        cfg = TransformerConfig(vocab_size=len(task.vocab), max_len=task.seq_len, **MODEL, **options)
        sample = torch.from_numpy(task.sample(BATCH * max(seeds), seed=0).inputs).long()
        for s in seeds:
            tokens = sample.view(max(seeds), BATCH, -1)[:s]
            one_batch = f"one model, batch {s * BATCH}"
            fns = {"sequential": sequential(cfg, tokens), "together": together(cfg, tokens)}
            if s > 1:
                fns[one_batch] = sequential(cfg, sample[None, : s * BATCH])
            t = medians(fns, repeats)
            rows.append(row(f"{ffn}: {s} seed{'s' if s > 1 else ''} together vs sequential (vmap, batch {BATCH})", t,
                            t["sequential"] / t["together"], "sequential / together",
                            (">=", TARGET) if s == max(SEEDS) else None))
            if s > 1:
                rows.append(row(f"{ffn}: one model at batch {s * BATCH} vs {s} sequential steps at batch {BATCH}", t,
                                t["sequential"] / t[one_batch], f"sequential / {one_batch}"))
        t = medians({"batch 1": sequential(cfg, sample[None, :1]), f"batch {BATCH}": sequential(cfg, sample[None, :BATCH])},
                    repeats * 3)
        fixed = t["batch 1"] / t[f"batch {BATCH}"]
        for s in seeds[1:]:
            bound = s * t[f"batch {BATCH}"] / (t["batch 1"] + s * (t[f"batch {BATCH}"] - t["batch 1"]))
            rows.append(row(f"{ffn}: most {s} seeds together could gain (fixed cost {fixed:.0%} of a step)", t,
                            bound, "S t_B / (t_1 + S (t_B - t_1))"))
    return rows
