"""Load balance of an MoE's routing on held-out tokens, read off `hook_expert_indices` (empty slots are -1).

Per MoE layer, over the task's real positions:
- `usage_entropy`: entropy of the share of filled slots each expert receives, divided by log(n_experts)
  (1 = every expert used equally, 0 = one expert takes everything);
- `unrouted`: share of tokens with no expert at all (expert-choice routing leaves some; a capacity drops some);
- `dropped_slots`: share of the k token-choice slots left empty (0 for a dropless router; for expert choice,
  whose slots are n_experts wide, the share of the k experts a token gets on average that it lacks, clipped at 0);
- `experts_per_token`: mean number of experts a token uses.
"""

from __future__ import annotations

import numpy as np

from toylab.analysis.specialization import EXPERTS, token_activations
from toylab.models import Transformer
from toylab.task import Batch, Task


def usage(indices: np.ndarray, n_experts: int, k: int) -> dict[str, float]:
    """The load-balance numbers of one layer's `hook_expert_indices` `[n_tokens, slots]` (see the module docstring)."""
    filled = indices >= 0
    counts = np.bincount(indices[filled], minlength=n_experts).astype(np.float64)
    share = counts / max(counts.sum(), 1.0)
    nonzero = share[share > 0]
    per_token = filled.sum(1)
    return {
        "usage_entropy": float(-(nonzero * np.log(nonzero)).sum() / np.log(n_experts)) if n_experts > 1 else 1.0,
        "unrouted": float((per_token == 0).mean()),
        "dropped_slots": float(max(0.0, 1 - per_token.mean() / k)),
        "experts_per_token": float(per_token.mean()),
    }


def routing_load(moe: Transformer, task: Task, batch: Batch) -> dict[str, dict[str, float]]:
    """`{layer: usage(...)}` for every MoE layer of `moe` on `batch`'s real tokens."""
    names = {str(layer): EXPERTS.format(layer=layer) for layer in moe.moe_layers()}
    acts = token_activations(moe, task, batch, list(names.values()))
    return {layer: usage(acts[name], moe.cfg.n_experts, moe.cfg.top_k) for layer, name in names.items()}
