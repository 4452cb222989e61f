"""Section `flops`: achieved training FLOP/s of the quickstart's dense model against this machine's matmul peak.

Training FLOPs are counted analytically per token (PaLM's convention): 6 x the weights in matmuls (every
`nn.Linear`: attention in/out, MLP, unembedding; not the embedding lookups) + 12 x layers x d_model x context
for attention scores and mixing (the full context, as if not causal), at the mean context the training batches
have after trimming. The step time is the `lightning` section's steady state (the same measurement, cached);
the peak is the best of square fp32 matmuls (256, 512, 1024) on one thread, measured in this run.
Target: >= 40% of peak for the training run. A last row says where a raw training step's time goes
(`torch.profiler`, self CPU time): matmuls, attention, and everything else.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.profiler import profile

from benchmarks import lightning, medians, row
from toylab.registry import get_task
from toylab.training import build_model

TARGET = 0.4
PEAK_SIZES = (256, 512, 1024)
KINDS = {"matmuls": ("aten::mm", "aten::addmm", "aten::bmm"), "attention": ("scaled_dot_product",)}


def matmul_peak(sizes: tuple[int, ...], repeats: int) -> tuple[float, int]:
    """The best FLOP/s of `a @ b` over square fp32 sizes, and the size that gave it."""
    best = (0.0, 0)
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        seconds = medians({"mm": lambda: torch.mm(a, b)}, repeats)["mm"]
        best = max(best, (2 * n**3 / seconds, n))
    return best


def training_flops_per_token(model: nn.Module, context: float) -> float:
    """6 x matmul weights + 12 x n_layers x d_model x context."""
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return 6 * weights + 12 * model.cfg.n_layers * model.cfg.d_model * context


def step_profile(s: lightning.Setup, steps: int) -> dict[str, float]:
    """Share of a raw training step's self CPU time in each of `KINDS` and the rest, over `steps` profiled steps."""
    model, optimizer, _, loader = lightning.raw_setup(s)
    batches = iter(loader)

    def step() -> None:
        lightning.raw_step(model, optimizer, next(batches), s.train.grad_clip)

    for _ in range(3):
        step()
    with profile() as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    shares = {kind: sum(e.self_cpu_time_total for e in events if any(n in e.key for n in names)) / total
              for kind, names in KINDS.items()}
    return {**shares, "other": 1 - sum(shares.values())}


def run(quick: bool) -> list[dict[str, Any]]:
    trained = lightning.steady_state(quick)
    s = trained["setup"]
    model = build_model(get_task(s.task, s.task_options), s.model)
    context = trained["tokens_per_step"] / s.train.batch_size
    per_step = training_flops_per_token(model, context) * trained["tokens_per_step"]
    peak, size = matmul_peak(PEAK_SIZES[:2] if quick else PEAK_SIZES, 3 if quick else 10)
    rows = []
    for name, key in (("Lightning training", "lightning_step_s"), ("raw loop", "raw_step_s")):
        achieved = per_step / trained[key]
        rows.append(row(f"{name} FLOP/s vs matmul peak, quickstart dense model", {"step": trained[key]}, achieved / peak,
                        "achieved / peak", (">=", TARGET) if name.startswith("Lightning") else None,
                        achieved_gflops=round(achieved / 1e9, 3), peak_gflops=round(peak / 1e9, 2), peak_at=f"{size}x{size}",
                        flops_per_step=round(per_step), mean_context=round(context, 2)))
    shares = step_profile(s, 4 if quick else 30)
    rows.append(row("where a raw training step's time goes (torch.profiler, self CPU time)", {"step": trained["raw_step_s"]},
                    **{kind: f"{share:.0%}" for kind, share in shares.items()}))
    return rows
