"""Section `moe`: an MoE layer against the dense MLP of equal active parameters, and sorted dispatch against
the loop-over-experts reference, forward + backward.

Sizes are the studies': the quickstart's (expert-specialization on brackets, d_model 32, d_mlp 64) and
planning's (gridworld mazes, d_model 64, d_mlp 128); tokens = batch 64 x the task's sequence length;
E in {4, 8, 16, 32}, k in {1, 2}, d_expert = d_mlp // k as `TransformerConfig` sets it, so the dense MLP
of width k * d_expert = d_mlp has the MoE's active parameters. The MoE's time includes its router.
Targets: MoE <= 1.3x dense; reference >= 3x sorted at E=16, k=2 and >= 1x everywhere. At k = 1 a row also times
the layer with its experts handed in (a hash router): the difference is what routing costs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from benchmarks import medians, row
from toylab.models.moe import MLP, MoE, reference_forward
from toylab.registry import get_task

SIZES = {  # name: (task, task options, d_model, d_mlp)
    "quickstart": ("brackets", {}, 32, 64),
    "planning": ("gridworld", {"size": 3, "canvas": 4, "pause": 4}, 64, 128),
}
EXPERTS, TOP_K, BATCH = (4, 8, 16, 32), (1, 2), 64
DENSE_TARGET, SORTED_TARGET, SORTED_AT = 1.3, 3.0, (16, 2)


def fwd_bwd(layer: Callable[[torch.Tensor], torch.Tensor], module: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One forward and backward pass of `layer` on `x`, gradients reset each time."""

    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).pow(2).sum().backward()

    return step


def run(quick: bool) -> list[dict[str, Any]]:
    sizes = {"quickstart": SIZES["quickstart"]} if quick else SIZES
    experts, top_k, repeats = ((4, 16), (2,), 3) if quick else (EXPERTS, TOP_K, 15)
    rows = []
    for size, (task_name, options, d_model, d_mlp) in sizes.items():
        seq_len = get_task(task_name, options).seq_len
        torch.manual_seed(0)
        x = torch.randn(BATCH, seq_len, d_model, requires_grad=True)
        dense = MLP(d_model, d_mlp)
        for n_experts in experts:
            for k in top_k:
                moe = MoE(d_model, d_mlp // k, n_experts, k)
                timed = {"dense": fwd_bwd(dense, dense, x), "moe": fwd_bwd(moe, moe, x),
                         "reference": fwd_bwd(lambda inp: reference_forward(moe, inp), moe, x)}
                if k == 1:  # the same layer with experts handed in: what routing itself costs
                    fixed, choice = MoE(d_model, d_mlp, n_experts, 1, router="hash"), torch.randint(n_experts, x.shape[:-1])
                    timed["fixed"] = fwd_bwd(lambda inp: fixed(inp, choice), fixed, x)
                t = medians(timed, repeats)
                shape = f"{size} E={n_experts} k={k} (d_model {d_model}, d_expert {d_mlp // k}, {BATCH * seq_len} tokens)"
                rows.append(row(f"MoE vs dense MLP, {shape}", {"moe": t["moe"], "dense": t["dense"]},
                                t["moe"] / t["dense"], "moe / dense", ("<=", DENSE_TARGET)))
                if k == 1:
                    rows.append(row(f"MoE with a fixed (hash) router vs dense MLP, {shape}", {"fixed": t["fixed"], "dense": t["dense"]},
                                    t["fixed"] / t["dense"], "fixed / dense", routing_ms=round((t["moe"] - t["fixed"]) * 1e3, 3)))
                rows.append(row(f"sorted vs reference, {shape}", {"sorted": t["moe"], "reference": t["reference"]},
                                t["reference"] / t["moe"], "reference / sorted",
                                (">=", SORTED_TARGET if (n_experts, k) == SORTED_AT else 1.0)))
    return rows
