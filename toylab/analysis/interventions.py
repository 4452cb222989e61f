"""Causal interventions on routing: force or swap experts, patch routing or expert outputs across inputs, ablate an expert.

Every function returns `run_with_hooks` hooks `[(hook name, fn)]` for any MoE Transformer of the lab (top-1 or top-k,
learned or fixed routers); `layers` defaults to every MoE layer. Inputs are a run's positional arguments, `args =
(tokens, route)` (`run_args`), so label-routed models get their `route`.

- **force routing** (`force_routing_hooks`): the masked tokens' slot 0 goes to one expert; **swap** (`swap_experts_hooks`):
  every slot routed to expert a goes to b and vice versa. Both edit `hook_expert_indices` and keep the slots' weights.
- **router patching** (`routing_patch_hooks`): the base run keeps its residual stream, but every MoE layer listed takes
  its experts and weights from the source run. **Expert-output patching** (`expert_output_patch_hooks`) is its converse:
  the base's routing, the source's activations (see its docstring for the exact decomposition).
- **expert ablation** (`resample_expert_hooks`): one expert's output (`hook_expert_out`, before weighting) on every slot
  routed to it is set to 0, to its mean over the slots routed to it in a reference run, or to the expert applied to
  the token at the same position of a resample run.
- **effects**: `class_effects` scores hooks per class of a label; `patching_effect` scores an interchange intervention
  against the counterfactual targets of `Counterfactuals` pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch

from toylab.analysis.interchange import Args
from toylab.analysis.specialization import EXPERTS, ROUTER_INPUT
from toylab.errors import ToylabError
from toylab.models import Transformer
from toylab.models.hooks import HookFn, HookPoint
from toylab.models.moe import MoE
from toylab.task import IGNORE, Batch, Counterfactuals, Task

WEIGHTS = "blocks.{layer}.mlp.hook_expert_weights"
EXPERT_OUT = "blocks.{layer}.mlp.hook_expert_out"
MLP_OUT = "blocks.{layer}.hook_mlp_out"
EVERY_LAYER = "blocks.*.mlp.hook_expert_indices"
"""The expert indices of every MoE layer (a glob), for hooks built without the model."""
ABLATIONS = ("zero", "mean", "resample")
Hooks = list[tuple[str, HookFn]]


def run_args(model: Transformer, batch: Batch) -> Args:
    """A batch's positional arguments of `model`: `(tokens,)`, or `(tokens, route)` for a model that reads a label."""
    route = model.route_input(batch.labels)
    return (torch.from_numpy(np.ascontiguousarray(batch.inputs)),) + (() if route is None else (route,))


def check_expert(expert: int, n_experts: int) -> None:
    if not 0 <= expert < n_experts:
        raise ToylabError(f"expert must be in [0, {n_experts - 1}] (the model has {n_experts} experts; got {expert})")


def moe_layers(model: Transformer, layers: Sequence[int] | None) -> list[int]:
    """`layers` checked against the model's MoE layers (None: all of them)."""
    valid = model.moe_layers()
    if not valid:
        raise ToylabError("routing interventions need an MoE model (ffn='moe'); this one is dense")
    if layers is None:
        return valid
    wrong = [layer for layer in layers if layer not in valid]
    if wrong:
        raise ToylabError(f"layer {wrong[0]} is not an MoE layer of this model; valid: {', '.join(map(str, valid))}")
    return list(layers)


def index_names(layers: Sequence[int] | None) -> list[str]:
    return [EVERY_LAYER] if layers is None else [EXPERTS.format(layer=layer) for layer in layers]


def same_shape(value: torch.Tensor, like: torch.Tensor, what: str) -> None:
    """One-line error where a patched-in value does not fit the activation it replaces (base and source must be aligned)."""
    if value.shape != like.shape:
        raise ToylabError(f"{what} has shape {tuple(value.shape)} but the run's activation has {tuple(like.shape)}: "
                          "base and source inputs must have the same [batch, pos]")


def force_routing_hooks(layers: Sequence[int] | None, tokens_mask: torch.Tensor, expert: int, n_experts: int) -> Hooks:
    """Hooks sending slot 0 (the best expert) of the tokens in `tokens_mask` `[batch, pos]` (bool) to `expert` at `layers`
    (None: every MoE layer). The slot keeps its weight (so routing the token to the expert it already has changes
    nothing); a top-k token whose other slot already holds `expert` gets it twice; an empty slot (-1, weight 0) stays
    without effect."""
    check_expert(expert, n_experts)
    if tokens_mask.dtype != torch.bool or tokens_mask.dim() != 2:
        raise ToylabError(f"tokens_mask must be a bool tensor [batch, pos] (got {tokens_mask.dtype} of shape {tuple(tokens_mask.shape)})")

    def force(indices: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        same_shape(tokens_mask, indices[..., 0], "tokens_mask")
        out = indices.clone()
        out[..., 0] = torch.where(tokens_mask.to(indices.device), expert, indices[..., 0])
        return out

    return [(name, force) for name in index_names(layers)]


def swap_experts_hooks(layers: Sequence[int] | None, a: int, b: int, n_experts: int) -> Hooks:
    """Hooks swapping experts `a` and `b` at `layers` (None: every MoE layer): every slot routed to a goes to b and vice
    versa, with its weight."""
    check_expert(a, n_experts)
    check_expert(b, n_experts)

    def swap(indices: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        return torch.where(indices == a, b, torch.where(indices == b, a, indices))

    return [(name, swap) for name in index_names(layers)]


def replace_with(value: torch.Tensor, what: str) -> HookFn:
    """A hook returning `value` in place of an activation of the same shape."""

    def replace(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        same_shape(value, x, what)
        return value.to(x.device)

    return replace


def routing_cache(model: Transformer, args: Args, layers: Sequence[int]) -> dict[str, torch.Tensor]:
    """The expert indices and weights of a run at `layers`."""
    names = [name.format(layer=layer) for layer in layers for name in (EXPERTS, WEIGHTS)]
    with torch.no_grad():
        _, cache = model.run_with_cache(*args, names=names)
    return cache


def routing_hooks(cache: dict[str, torch.Tensor], what: str) -> Hooks:
    return [(name, replace_with(value, f"{what} {name}")) for name, value in cache.items()]


def routing_patch_hooks(model: Transformer, source_args: Args, layers: Sequence[int] | None = None) -> Hooks:
    """Router patching: hooks giving the base run, at `layers`, the expert indices and weights of a run on `source_args`.
    The residual stream stays the base's: the experts compute on the base's activations, but which experts and with
    what weights is the source's. Layers after a patched one route the (changed) base stream, unless patched too."""
    return routing_hooks(routing_cache(model, source_args, moe_layers(model, layers)), "the source's")


def expert_output_patch_hooks(model: Transformer, base_args: Args, source_args: Args, layers: Sequence[int] | None = None) -> Hooks:
    """Expert-output patching, the converse of router patching: at each of `layers`, the FFN output of the base run
    (`hook_mlp_out`) becomes

        y_l = sum_j w_j(x_base^l) E_{e_j(x_base^l)}(x_source^l)  (+ the shared expert on x_source^l)

    with e_j, w_j the clean base run's experts and weights at layer l and x_source^l the clean source run's router
    input there (`ln2.hook_normalized`). Each layer's y_l comes from its own source run with the base routing patched
    in at that layer only (earlier layers, hence x_source^l, stay the source's); all the layers are then patched into
    the base run together (layers in between keep computing on the changed base stream)."""
    layers = moe_layers(model, layers)
    base = routing_cache(model, base_args, layers)
    hooks = []
    with torch.no_grad():
        for layer in layers:
            at_layer = {name.format(layer=layer): base[name.format(layer=layer)] for name in (EXPERTS, WEIGHTS)}
            name = MLP_OUT.format(layer=layer)
            with model.hooks(routing_hooks(at_layer, "the base's")):
                _, cache = model.run_with_cache(*source_args, names=[name])
            hooks.append((name, replace_with(cache[name], f"the patched {name}")))
    return hooks


def expert_output(moe: MoE, expert: int, x: torch.Tensor) -> torch.Tensor:
    """E_e(x) = act(x W_in[e] + b_in[e]) W_out[e] + b_out[e] for router inputs `x` `[..., d_model]`."""
    return moe.act(x @ moe.W_in[expert] + moe.b_in[expert]) @ moe.W_out[expert] + moe.b_out[expert]


def resample_expert_hooks(model: Transformer, layer: int, expert: int, reference_args: Args | None = None,
                          mode: Literal["zero", "mean", "resample"] = "resample") -> Hooks:
    """Hooks ablating `expert` at `layer`: its output (`hook_expert_out`, before weighting; the bias included) on every
    slot routed to it becomes
    - `zero`: 0 (`reference_args` unused);
    - `mean`: its mean output over the slots routed to it in a run on `reference_args`;
    - `resample`: E_expert(x') with x' the router input (`ln2.hook_normalized`) at the same [batch, pos] of a run on
      `reference_args` (e.g. the batch rolled by one sequence), computed from the expert's weights, so x' is
      resampled whether or not the resample run routed it to the expert.
    The weights and every other slot stay the base run's."""
    if mode not in ABLATIONS:
        raise ToylabError(f"unknown ablation mode '{mode}'; valid: {', '.join(ABLATIONS)}")
    (layer,) = moe_layers(model, [layer])
    moe = model.blocks[layer].mlp
    check_expert(expert, moe.n_experts)
    if mode != "zero" and reference_args is None:
        raise ToylabError(f"mode '{mode}' needs reference_args, the {'reference' if mode == 'mean' else 'resample'} run's inputs")
    indices, out = EXPERTS.format(layer=layer), EXPERT_OUT.format(layer=layer)
    value = torch.zeros(())
    if mode == "mean":
        with torch.no_grad():
            _, cache = model.run_with_cache(*reference_args, names=[indices, out])
        routed = cache[indices] == expert
        if not routed.any():
            raise ToylabError(f"no token of the reference run is routed to expert {expert} at layer {layer}: its mean is undefined")
        value = cache[out][routed].mean(0)  # [d_model]
    elif mode == "resample":
        name = ROUTER_INPUT.format(layer=layer)
        with torch.no_grad():
            _, cache = model.run_with_cache(*reference_args, names=[name])
            value = expert_output(moe, expert, cache[name])[..., None, :]  # [batch, pos, 1, d_model]
    routed_now: dict[str, torch.Tensor] = {}

    def read(x: torch.Tensor, hook: HookPoint) -> None:
        routed_now["hit"] = (x == expert)[..., None]  # [batch, pos, slots, 1]

    def ablate(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        if mode == "resample":
            same_shape(value[..., 0, :], x[..., 0, :], "the resample run's expert output")
        return torch.where(routed_now["hit"], value.to(x), x)

    return [(indices, read), (out, ablate)]


def label_classes(task: Task, label: str) -> tuple[str, ...]:
    """The classes of a categorical label of `task` (one-line error for an unknown or multi-hot label)."""
    if label not in task.labels:
        raise ToylabError(f"unknown label '{label}' of task '{task.name}'; valid: {', '.join(task.labels)}")
    if task.labels[label].multi_hot:
        raise ToylabError(f"label '{label}' is multi-hot; class effects need a label with one class per token")
    return task.labels[label].classes


def class_effects(model: Transformer, task: Task, batch: Batch, hooks: Hooks, label: str) -> dict[str, dict[str, float]]:
    """Per class of `label` present at the scored positions, by class name: `sequences` (those with the class at a
    scored position), the task's primary metric on them without (`clean`) and with the hooks (`intervened`) and its
    `change`; `tokens` (scored positions of the class) and next-token accuracy there: `accuracy_clean`,
    `accuracy_intervened`, `accuracy_change`."""
    classes = label_classes(task, label)
    mask = batch.loss_mask
    ids = batch.labels[label]
    tokens = np.eye(len(classes) + 1, dtype=bool)[np.where(mask & (ids != IGNORE), ids, len(classes))][..., :-1]  # [b, pos, c]
    with torch.no_grad():
        logits = {run: model.run_with_hooks(*run_args(model, batch), fwd_hooks=h) for run, h in (("clean", ()), ("intervened", hooks))}
    correct = {run: (out.argmax(-1) == torch.from_numpy(batch.targets)).numpy() for run, out in logits.items()}
    count = tokens.sum((0, 1))
    accuracy = {run: np.einsum("bp,bpc->c", c, tokens, dtype=np.float64) / np.maximum(count, 1) for run, c in correct.items()}
    out = {}
    for c in np.flatnonzero(count):
        rows = np.flatnonzero(tokens[..., c].any(1))
        metric = {run: task.metrics(x[torch.from_numpy(rows)], batch[rows])[task.primary_metric] for run, x in logits.items()}
        out[classes[c]] = {"sequences": len(rows), "clean": metric["clean"], "intervened": metric["intervened"],
                           "change": metric["intervened"] - metric["clean"], "tokens": int(count[c]),
                           "accuracy_clean": float(accuracy["clean"][c]), "accuracy_intervened": float(accuracy["intervened"][c]),
                           "accuracy_change": float(accuracy["intervened"][c] - accuracy["clean"][c])}
    return out


def patching_effect(model: Transformer, pairs: Counterfactuals, hooks_fn: Callable[[Args, Args], Hooks]) -> dict[str, float]:
    """How much of an interchange intervention's effect a patch carries. `hooks_fn(base_args, source_args)` gives the
    hooks of the base run. On the pairs' informative positions (`n`; where the counterfactual targets differ from the
    base's): `base`, the clean base run's accuracy on the counterfactual targets (~0, the floor; 1 is the full
    counterfactual); `recovered`, the intervened run's accuracy on them; `kept`, its accuracy on the base targets."""
    informative = torch.from_numpy(pairs.informative)
    if not informative.any():
        raise ToylabError(f"the {len(pairs)} pairs of '{pairs.variable}' have no informative position (where the intervention changes the target)")
    base_args, source_args = run_args(model, pairs.base), run_args(model, pairs.source)
    counterfactual = torch.from_numpy(pairs.targets)[informative]
    original = torch.from_numpy(pairs.base.targets)[informative]
    with torch.no_grad():
        clean = model(*base_args).argmax(-1)[informative]
        patched = model.run_with_hooks(*base_args, fwd_hooks=hooks_fn(base_args, source_args)).argmax(-1)[informative]
    share = lambda predicted, targets: float((predicted == targets).double().mean())  # noqa: E731
    return {"n": int(informative.sum()), "base": share(clean, counterfactual), "recovered": share(patched, counterfactual),
            "kept": share(patched, original)}
