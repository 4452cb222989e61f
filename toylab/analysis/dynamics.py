"""When does routing lock in? Scores along a run's kept checkpoints (`TrainConfig.checkpoint_every`).

- **Router saturation** (OLMoE, Muennighoff et al. 2024): the share of tokens whose top-k experts at a checkpoint
  are those of the final one, beside the agreement two independent routings with the same expert usage would
  have by chance (`chance_agreement`: Σ_s p(s) q(s) over the sets s of experts).
- **Lock-in step**: the first checkpoint from which a verdict stays what it is at the end (`lock_in`). It is a
  description of one series, at the resolution of the checkpoints, not a test.
- **Learned step**: the first checkpoint from which the task metric stays at or above a threshold (`reached`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from toylab.analysis.specialization import EXPERTS, token_activations
from toylab.models import DRC, Recurrent, Transformer
from toylab.task import Batch, Task


def expert_hooks(model: Transformer | Recurrent | DRC) -> dict[str, str]:
    """`{layer: hook name}`: the expert indices of each MoE layer (none for a dense or recurrent model)."""
    return {str(layer): EXPERTS.format(layer=layer) for layer in model.moe_layers()}


def as_sets(found: Mapping[str, np.ndarray], hooks: Mapping[str, str]) -> dict[str, np.ndarray]:
    """`{layer: [n_tokens, k]}` from the activations `found` at `hooks` (`expert_hooks`): each token's experts,
    sorted (the set, whatever the order of slots; -1 marks an empty slot)."""
    return {layer: np.sort(found[name], axis=-1) for layer, name in hooks.items()}


def expert_sets(model: Transformer, task: Task, batch: Batch) -> dict[str, np.ndarray]:
    """`{layer: [n_tokens, k]}`: each analysed token's expert set per MoE layer (`as_sets`)."""
    hooks = expert_hooks(model)
    return as_sets(token_activations(model, task, batch, list(hooks.values())), hooks)


def saturation(experts: np.ndarray, final: np.ndarray) -> float:
    """The share of tokens whose set of experts `[n, k]` is the one they get at the final checkpoint."""
    return float((experts == final).all(axis=-1).mean())


def stability(previous: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray]) -> float:
    """The least share, over MoE layers, of tokens whose expert set (`as_sets`) in `current` is the one in `previous`
    (the saturation of one routing against the one before it)."""
    return min(saturation(current[layer], previous[layer]) for layer in current)


def chance_agreement(experts: np.ndarray, final: np.ndarray) -> float:
    """The saturation of two independent routings with these usages: Σ_s p(s) q(s) over the sets of experts s."""
    sets, ids = np.unique(np.concatenate([experts, final]), axis=0, return_inverse=True)
    ids = ids.reshape(-1)
    p, q = (np.bincount(part, minlength=len(sets)) / len(part) for part in (ids[:len(experts)], ids[len(experts):]))
    return float(p @ q)


def lock_in(steps: Sequence[int], values: Sequence[object]) -> int:
    """The first step from which `values` (one per step, in order) equal the last one."""
    first = len(values) - 1
    while first > 0 and values[first - 1] == values[-1]:
        first -= 1
    return steps[first]


def reached(steps: Sequence[int], values: Sequence[float], threshold: float) -> int | None:
    """The first step from which `values` stay at or above `threshold` (None if the last one is below)."""
    return lock_in(steps, [v >= threshold for v in values]) if values[-1] >= threshold else None


def timing(step: int, learned: int | None, verdict: str) -> str:
    """Whether a `verdict` that locked in at `step` did so before, with (at the same checkpoint) or after the task was
    learned at `learned`; "not a finding" for a verdict that shows nothing (inconclusive, both at floor), "task not
    learned" when it never was."""
    if verdict not in ("more", "less", "equivalent"):
        return "not a finding"
    if learned is None:
        return "task not learned"
    return "before" if step < learned else "with" if step == learned else "after"
