"""Interchange interventions and distributed alignment search (DAS).

An interchange intervention (Geiger et al. 2021) asks whether a hook point (the *site*, activations `[batch, pos, d]`)
represents a causal variable V: run the model on a *base* input with V's representation at the site replaced by its
value on a *source* input. It succeeds where the model then outputs what a causal model gives for the base with V set
to the source's value: the *counterfactual targets*, given by the caller. Interchange intervention accuracy (IIA) is
the share of scored positions where the argmax equals them; positions where the counterfactual target equals the
base's are uninformative (an intervention that does nothing is right there), so `iia` counts only the others and
`iia_all` counts every scored position.

DAS (Geiger et al. 2024, "Finding alignments between interpretable causal variables and distributed neural
representations") learns where V lives: an orthonormal basis Q `[d, r]`, intervention h' = h_base + Q Qᵀ (h_source -
h_base), fit by gradient descent on the frozen model to maximize the log-probability of the counterfactual targets.
A random subspace of the same rank is the control; swapping the whole site (Q Qᵀ = I) is the upper reference.

Written on `HookedModule.run_with_hooks` rather than pyvene, which wraps HuggingFace-style modules.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from toylab.errors import ToylabError
from toylab.models.hooks import HookedModule, HookPoint

Args = tuple[torch.Tensor, ...]
"""Positional arguments of a model's forward, each a tensor with the batch first (e.g. `(tokens,)`, `(tokens, route)`)."""


class Subspace(nn.Module):
    """A rank-r subspace of R^d with an orthonormal basis; starts uniformly random (QR of a seeded Gaussian).

    The basis stays orthonormal under gradient descent (an orthogonal parametrization, Householder map). Untrained,
    it is the random control; rank d is the full swap (up to rounding; `interchange_logits` with None is exact).
    """

    def __init__(self, d: int, rank: int, seed: int = 0) -> None:
        super().__init__()
        if not 1 <= rank <= d:
            raise ToylabError(f"rank must be in [1, d={d}] (got {rank})")
        generator = torch.Generator().manual_seed(seed)
        basis = torch.linalg.qr(torch.randn(d, rank, generator=generator)).Q
        self.proj = nn.utils.skip_init(nn.Linear, d, rank, bias=False)  # weight [rank, d]: orthonormal rows
        with torch.no_grad():
            self.proj.weight.copy_(basis.T)
        orthogonal(self.proj, orthogonal_map="householder", use_trivialization=False)

    @classmethod
    def from_basis(cls, basis: torch.Tensor) -> Subspace:
        """The subspace spanned by the columns of `basis` `[d, r]` (e.g. a probe's directions)."""
        subspace = cls(*basis.shape).to(basis.device, basis.dtype)
        with torch.no_grad():
            subspace.proj.weight = torch.linalg.qr(basis).Q.T
        return subspace

    @property
    def d(self) -> int:
        return self.proj.in_features

    @property
    def rank(self) -> int:
        return self.proj.out_features

    @property
    def basis(self) -> torch.Tensor:
        """Orthonormal basis Q `[d, rank]`."""
        return self.proj.weight.T

    def intervene(self, base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """`base` with its component in the subspace replaced by `source`'s (over the last dim)."""
        q = self.basis
        return base + (source - base) @ q @ q.T


@dataclass(frozen=True)
class Pairs:
    """Interchange pairs (row i: base i with source i) and what the causal model says they should give."""

    base: Args
    source: Args
    targets: torch.Tensor
    """Counterfactual targets `[batch, pos]`: the causal model's output for the base with V set to the source's value."""
    mask: torch.Tensor
    """Scored positions `[batch, pos]`, bool."""
    base_targets: torch.Tensor | None = None
    """The causal model's output for the base itself `[batch, pos]`; marks the informative positions."""
    positions: torch.Tensor | None = None
    """Positions `[batch, pos]` (bool) whose activations are intervened on; None: every position."""


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Run a block with the model in eval mode and its parameters frozen, then restore both."""
    training, grads = model.training, [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    try:
        yield
    finally:
        model.train(training)
        for param, grad in zip(model.parameters(), grads):
            param.requires_grad_(grad)


def site_activations(model: HookedModule, site: str, args: Args) -> tuple[str, torch.Tensor]:
    """The hook name `site` matches and its activations `[batch, pos, d]` on `args`."""
    _, cache = model.run_with_cache(*args, names=site)
    if len(cache) != 1:
        raise ToylabError(f"site '{site}' must match one hook point that the forward pass runs "
                          f"(matched: {', '.join(cache) or 'none'})")
    [(name, acts)] = cache.items()
    if acts.ndim != 3:
        raise ToylabError(f"site '{name}' has activations of shape {list(acts.shape)}; interchange needs [batch, pos, d]")
    return name, acts


def intervened_logits(
    model: HookedModule, name: str, base: Args, source_acts: torch.Tensor, subspace: Subspace | None,
    positions: torch.Tensor | None,
) -> torch.Tensor:
    """The model's output on `base` with hook `name` intervened on from the source's activations `source_acts`."""
    if subspace is not None and subspace.d != source_acts.shape[-1]:
        raise ToylabError(f"the subspace lives in d={subspace.d} but site '{name}' has d={source_acts.shape[-1]}")
    if positions is not None and (positions.shape != source_acts.shape[:2] or positions.dtype != torch.bool):
        raise ToylabError(f"positions must be a bool mask of shape {list(source_acts.shape[:2])} "
                          f"(got {positions.dtype} {list(positions.shape)})")

    def swap(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        if x.shape != source_acts.shape:
            raise ToylabError(f"base and source give site '{name}' different shapes: "
                              f"{list(x.shape)} vs {list(source_acts.shape)}")
        new = source_acts if subspace is None else subspace.intervene(x, source_acts)
        return new if positions is None else torch.where(positions.to(x.device)[..., None], new, x)

    return model.run_with_hooks(*base, fwd_hooks=[(name, swap)])


def interchange_logits(
    model: HookedModule, site: str, base: Args, source: Args, subspace: Subspace | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """The model's output on `base` with the site's activations (in `subspace`; None: all of them) taken from
    `source`, at every position or at the bool mask `positions` `[batch, pos]`."""
    name, source_acts = site_activations(model, site, source)
    return intervened_logits(model, name, base, source_acts, subspace, positions)


def interchange_accuracy(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, base_targets: torch.Tensor | None = None
) -> dict[str, float | int]:
    """IIA: argmax accuracy on the counterfactual targets over the masked positions (`iia_all`, `n_all`) and over
    those whose target differs from `base_targets` (`iia`, `n`; all masked positions without `base_targets`).
    NaN where no position counts."""
    for what, tensor in (("targets", targets), ("mask", mask), ("base_targets", base_targets)):
        if tensor is not None and tensor.shape != logits.shape[:-1]:
            raise ToylabError(f"{what} must have shape {list(logits.shape[:-1])} like the logits' [batch, pos] "
                              f"(got {list(tensor.shape)})")
    if mask.dtype != torch.bool:
        raise ToylabError(f"mask must be a bool tensor (got {mask.dtype})")
    correct = logits.argmax(-1) == targets
    informative = mask if base_targets is None else mask & (targets != base_targets)
    scores: dict[str, float | int] = {}
    for suffix, where in (("", informative), ("_all", mask)):
        n = int(where.sum())
        scores[f"iia{suffix}"], scores[f"n{suffix}"] = (int(correct[where].sum()) / n if n else float("nan")), n
    return scores


def fit_das(
    model: HookedModule, site: str, base: Args, source: Args, targets: torch.Tensor, mask: torch.Tensor, rank: int,
    steps: int = 200, lr: float = 1e-2, batch_size: int = 64, seed: int = 0, positions: torch.Tensor | None = None,
) -> Subspace:
    """A rank-`rank` subspace of the site fit by DAS: cross-entropy of the intervened output on the counterfactual
    `targets` at the `mask`ed positions, Adam on the subspace only (the model frozen, in eval mode), minibatches of
    pairs drawn with `seed`; the same seed gives the same subspace on CPU."""
    if steps < 1 or batch_size < 1:
        raise ToylabError(f"steps and batch_size must be >= 1 (got steps={steps}, batch_size={batch_size})")
    if targets.shape != mask.shape or mask.dtype != torch.bool or not mask.any():
        raise ToylabError(f"targets and a bool mask must share a shape [batch, pos] and mask a position "
                          f"(got {list(targets.shape)}, {mask.dtype} {list(mask.shape)}, {int(mask.sum())} masked)")
    with frozen(model):
        with torch.no_grad():
            name, source_acts = site_activations(model, site, source)
        subspace = Subspace(source_acts.shape[-1], rank, seed).to(source_acts.device)
        optimizer = torch.optim.Adam(subspace.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            rows = torch.randperm(len(targets), generator=generator)[:batch_size].to(targets.device)
            logits = intervened_logits(model, name, tuple(arg[rows] for arg in base), source_acts[rows], subspace,
                                       None if positions is None else positions[rows])
            scored = mask[rows]
            loss = F.cross_entropy(logits[scored], targets[rows][scored])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return subspace


def das_analysis(
    model: HookedModule, site: str, train: Pairs, test: Pairs | Mapping[str, Pairs], rank: int, steps: int = 200,
    seed: int = 0, lr: float = 1e-2, batch_size: int = 64,
) -> dict[str, Any]:
    """DAS fit on the `train` pairs, scored on held-out `test` pairs (the caller keeps them disjoint).

    `interchange_accuracy` on the test pairs of four arms: `das`, the fitted subspace; `random`, a random subspace of
    the same rank (DAS's starting point for this seed); `full`, the whole site swapped (the upper reference); `none`,
    no intervention (the floor: `iia` near 0 when the model is right on the base inputs). With a mapping of named
    test sets (one fit, several held-out sets), the arms of each under its name.
    """
    learned = fit_das(model, site, train.base, train.source, train.targets, train.mask, rank, steps, lr, batch_size, seed,
                      train.positions)
    control = Subspace(learned.d, rank, seed).to(next(learned.parameters()).device)

    def score(pairs: Pairs) -> dict[str, dict[str, float | int]]:
        name, source_acts = site_activations(model, site, pairs.source)
        logits = {arm: intervened_logits(model, name, pairs.base, source_acts, subspace, pairs.positions)
                  for arm, subspace in (("das", learned), ("random", control), ("full", None))}
        logits["none"] = model(*pairs.base)
        return {arm: interchange_accuracy(out, pairs.targets, pairs.mask, pairs.base_targets) for arm, out in logits.items()}

    with frozen(model), torch.no_grad():
        scores = score(test) if isinstance(test, Pairs) else {key: score(pairs) for key, pairs in test.items()}
    return {"site": site, "rank": rank, "d": learned.d, **scores}
