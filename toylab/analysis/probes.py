"""Linear probes: how well a label is linearly decodable from activations, against a baseline and a control.

`probe(acts, labels)` fits a multinomial logistic regression (or, for ordinal targets, a ridge
regression whose prediction is rounded) on a training split and scores the held-out split. Every
result carries the majority-class baseline and a shuffled-label control (the same probe fit and
scored after permuting the labels), so a probe is read as "above the baseline, and above what it
finds without any signal". `probe_residual_stream` runs this for every layer and position type.

`conditional_probe` asks what activations say about a label *given* another one (the move k steps
ahead given the next move): the same probe with the condition as extra input, against a probe on the
condition alone. `summarize_against` compares a probe with the same probe on a control network
(e.g. untrained weights), paired by seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from toylab.analysis.stats import MARGIN, UNIT, compare, mean_ci
from toylab.errors import ToylabError
from toylab.task import IGNORE

ProbeKind = Literal["logistic", "ridge"]


@dataclass(frozen=True)
class ProbeResult:
    """Held-out scores of one probe. `r2` is set for ridge probes only."""

    accuracy: float
    baseline: float
    """Accuracy of always predicting the training split's majority class."""
    shuffled: float
    """Held-out accuracy of the same probe trained and scored on permuted labels."""
    n_train: int
    n_test: int
    n_classes: int
    r2: float | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def split(n: int, test_fraction: float, seed: int, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices; with `groups` (e.g. sequence ids) whole groups go to one side."""
    if not 0 < test_fraction < 1:
        raise ToylabError(f"test_fraction must be in (0, 1) (got {test_fraction})")
    rng = np.random.default_rng(seed)
    ids = np.arange(n) if groups is None else np.asarray(groups)
    unique = np.unique(ids)
    test_ids = rng.permutation(unique)[: max(1, int(round(test_fraction * len(unique))))]
    test = np.isin(ids, test_ids)
    return np.flatnonzero(~test), np.flatnonzero(test)


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, C: float = 1.0, max_iter: int = 200, tol: float = 1e-4
) -> nn.Linear:
    """Multinomial logistic regression by L-BFGS, with scikit-learn's objective `C * sum(CE) + |W|^2 / 2`.

    Stops when the gradient's largest entry is below `tol` (the default is loose: probes need accuracy,
    not the last digits of the weights) or after `max_iter` iterations.
    """
    x = x.double()
    linear = nn.Linear(x.shape[1], n_classes, dtype=torch.float64)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(
        linear.parameters(), lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
        history_size=20, line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(linear(x), y) + linear.weight.pow(2).sum() / (2 * C * len(x))
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return linear.requires_grad_(False)


def fit_ridge(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression `min |y - x w - b|^2 + alpha |w|^2` in closed form; returns `(w, b)`."""
    x, y = x.double(), y.double()
    mean_x, mean_y = x.mean(0), y.mean()
    centered = x - mean_x
    gram = centered.T @ centered + alpha * torch.eye(x.shape[1], dtype=x.dtype)
    w = torch.linalg.solve(gram, centered.T @ (y - mean_y))
    return w, mean_y - mean_x @ w


def _standardize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return [(a - mean) / std for a in (train, *others)]


def _accuracy(
    x_train: torch.Tensor, y_train: np.ndarray, x_test: torch.Tensor, y_test: np.ndarray,
    kind: ProbeKind, C: float, alpha: float,
) -> tuple[float, float | None]:
    """Held-out accuracy (and R^2 for ridge) of one probe fit on standardized activations."""
    if kind == "ridge":
        w, b = fit_ridge(x_train, torch.from_numpy(y_train), alpha)
        predicted = (x_test.double() @ w + b).numpy()
        rounded = np.clip(np.rint(predicted), y_train.min(), y_train.max())
        residual = ((y_test - predicted) ** 2).sum()
        total = ((y_test - y_test.mean()) ** 2).sum()
        return float((rounded == y_test).mean()), float(1 - residual / total) if total > 0 else None
    return float((_logistic_predict(x_train, y_train, x_test, C) == y_test).mean()), None


def _logistic_predict(x_train: torch.Tensor, y_train: np.ndarray, x_test: torch.Tensor, C: float) -> np.ndarray:
    """Classes a multinomial logistic regression fit on the training rows predicts for the test rows."""
    classes, y_index = np.unique(y_train, return_inverse=True)
    if len(classes) == 1:
        return np.full(len(x_test), classes[0])
    linear = fit_logistic(x_train, torch.from_numpy(y_index), len(classes), C)
    return classes[linear(x_test.double()).argmax(-1).numpy()]


def logistic_classifier(x_train: np.ndarray, y_train: np.ndarray, C: float = 1.0) -> Callable[[np.ndarray], np.ndarray]:
    """A multinomial logistic probe fit on standardized rows; it predicts classes for any rows (e.g. another
    model's), standardized with the training statistics."""
    x = torch.as_tensor(np.asarray(x_train)).double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    classes, y_index = np.unique(y_train, return_inverse=True)
    linear = fit_logistic((x - mean) / std, torch.from_numpy(y_index), len(classes), C) if len(classes) > 1 else None

    def predict(rows: np.ndarray) -> np.ndarray:
        if linear is None:
            return np.full(len(rows), classes[0])
        return classes[linear((torch.as_tensor(np.asarray(rows)).double() - mean) / std).argmax(-1).numpy()]

    return predict


def logistic_predictions(
    acts: torch.Tensor | np.ndarray, labels: np.ndarray, groups: np.ndarray | None = None,
    test_fraction: float = 0.25, seed: int = 0, C: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out `(predicted, true)` classes of the multinomial logistic probe `probe` fits (same split, standardization)."""
    x = torch.as_tensor(acts).reshape(len(labels), -1).double()
    train, test = split(len(labels), test_fraction, seed, groups)
    x_train, x_test = _standardize(x[train], x[test])
    return _logistic_predict(x_train, labels[train], x_test, C), labels[test]


def probe(
    acts: torch.Tensor | np.ndarray,
    labels: np.ndarray,
    kind: ProbeKind = "logistic",
    groups: np.ndarray | None = None,
    test_fraction: float = 0.25,
    seed: int = 0,
    C: float = 1.0,
    alpha: float = 1.0,
) -> ProbeResult:
    """Fit a linear probe from activations `[n, d]` to integer labels `[n]` and score it on a held-out split.

    `kind="logistic"`: multinomial logistic regression (inverse L2 strength `C`) over the classes of
    the training split. `kind="ridge"`: ridge regression (strength `alpha`) on the label value,
    rounded to the nearest class; also reports held-out R^2. Activations are standardized with
    training-split statistics. `groups` keeps related rows (one sequence's positions) on one side.
    """
    if kind not in ("logistic", "ridge"):
        raise ToylabError(f"unknown probe kind '{kind}'; valid: logistic, ridge")
    x = torch.as_tensor(acts).reshape(len(labels), -1).double()
    labels = np.asarray(labels)
    if len(labels) < 4:
        raise ToylabError(f"a probe needs at least 4 labelled rows (got {len(labels)})")
    train, test = split(len(labels), test_fraction, seed, groups)
    x_train, x_test = _standardize(x[train], x[test])
    accuracy, r2 = _accuracy(x_train, labels[train], x_test, labels[test], kind, C, alpha)
    shuffled_labels = np.random.default_rng(seed + 1).permutation(labels)
    shuffled, _ = _accuracy(x_train, shuffled_labels[train], x_test, shuffled_labels[test], kind, C, alpha)
    values, counts = np.unique(labels[train], return_counts=True)
    return ProbeResult(
        accuracy=accuracy,
        baseline=float((labels[test] == values[counts.argmax()]).mean()),
        shuffled=shuffled,
        n_train=len(train),
        n_test=len(test),
        n_classes=len(values),
        r2=r2,
    )


@dataclass(frozen=True)
class ConditionalProbeResult:
    """Held-out accuracies of a probe given a condition (`conditional_probe`)."""

    accuracy: float
    """The probe on the activations and the one-hot condition."""
    given_only: float
    """The same probe on the one-hot condition alone: what the condition alone says about the label."""
    baseline: float
    """Accuracy of always predicting the training split's majority class."""
    n_train: int
    n_test: int
    n_classes: int
    n_given: int
    """Values of the condition."""

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def conditional_probe(
    acts: torch.Tensor | np.ndarray, labels: np.ndarray, given: np.ndarray, groups: np.ndarray | None = None,
    test_fraction: float = 0.25, seed: int = 0, C: float = 1.0,
) -> ConditionalProbeResult:
    """What activations `[n, d]` say about `labels` `[n]` beyond a condition `given` `[n]` (integer classes).

    Two multinomial logistic probes on the same split: one on the activations with the one-hot condition appended,
    one on the one-hot condition alone. Activations that carry only the condition (or what follows from it) give the
    first nothing the second lacks, so `accuracy` - `given_only` is what they add about the label given the condition.
    """
    labels = np.asarray(labels)
    if len(labels) < 4:
        raise ToylabError(f"a probe needs at least 4 labelled rows (got {len(labels)})")
    values, index = np.unique(np.asarray(given), return_inverse=True)
    onehot = torch.from_numpy(np.eye(len(values))[index.ravel()])
    both = torch.cat([torch.as_tensor(acts).reshape(len(labels), -1).double(), onehot], dim=1)
    train, test = split(len(labels), test_fraction, seed, groups)
    scores = []
    for x in (both, onehot):
        x_train, x_test = _standardize(x[train], x[test])
        scores.append(float((_logistic_predict(x_train, labels[train], x_test, C) == labels[test]).mean()))
    classes, counts = np.unique(labels[train], return_counts=True)
    return ConditionalProbeResult(
        accuracy=scores[0], given_only=scores[1], baseline=float((labels[test] == classes[counts.argmax()]).mean()),
        n_train=len(train), n_test=len(test), n_classes=len(classes), n_given=len(values),
    )


SCORES = ("accuracy", "baseline", "shuffled", "r2")
CONDITIONAL_SCORES = ("accuracy", "given_only", "baseline")


def _groups(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def summarize_probes(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Across seeds, per group of `keys`: mean and 95% CI of every score, and whether the probe finds signal.

    `rows` are probe results (`ProbeResult.as_dict()` plus the keys), one per seed. The verdict is `compare`
    (margin `MARGIN` in accuracy) over seeds of the accuracy with the stronger control of the same seed,
    `max(baseline, shuffled)`: "more" means the probe beats both controls, "equivalent" that it is within
    the margin of them.
    """
    out = []
    for group, members in _groups(rows, keys).items():
        scores = {s: [np.nan if r[s] is None else r[s] for r in members] for s in SCORES}
        control = np.maximum(scores["baseline"], scores["shuffled"])
        out.append({**dict(zip(keys, group)), **{s: mean_ci(v, bounds=None if s == "r2" else UNIT) for s, v in scores.items()},
                    "verdict": compare(scores["accuracy"], control, MARGIN)})
    return out


def summarize_conditional_probes(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Across seeds, per group of `keys`: mean and 95% CI of `CONDITIONAL_SCORES`, and the verdict (`compare`, margin
    `MARGIN`, paired by seed) of the probe on activations and condition against the probe on the condition alone:
    "more" means the activations say more about the label than the condition does."""
    out = []
    for group, members in _groups(rows, keys).items():
        scores = {s: [r[s] for r in members] for s in CONDITIONAL_SCORES}
        out.append({**dict(zip(keys, group)), **{s: mean_ci(v, bounds=UNIT) for s, v in scores.items()},
                    "verdict": compare(scores["accuracy"], scores["given_only"], MARGIN)})
    return out


def summarize_against(
    rows: Sequence[dict[str, Any]], keys: Sequence[str], column: str, control: str, score: str = "accuracy",
    given: str | None = None,
) -> list[dict[str, Any]]:
    """A probe against the same probe on a control (rows whose `column` is `control`, e.g. untrained weights).

    Per group of `keys` and `column` (other than `control`): mean and 95% CI of `score` and of the control's in the
    same group and seeds (rows carry `seed`), and the verdict of `compare` paired by seed (margin `MARGIN`). With
    `given` (e.g. "given_only" of conditional probes) the probe is compared with the stronger of two controls in each
    seed, the control's `score` and its own `given` score (also summarized, with `stronger_control`): "more" then
    means it beats both, e.g. says more about move +k than the next move alone and than the untrained network.
    """
    controls = {(tuple(r[k] for k in keys), r["seed"]): r[score] for r in rows if r[column] == control}
    out = []
    for group, members in _groups([r for r in rows if r[column] != control], [*keys, column]).items():
        paired = [r for r in members if (group[:-1], r["seed"]) in controls]
        if paired:
            treated, network = [r[score] for r in paired], [controls[group[:-1], r["seed"]] for r in paired]
            reference, extra = network, {}
            if given is not None:
                alone = [r[given] for r in paired]
                reference = np.maximum(network, alone).tolist()
                extra = {given: mean_ci(alone, bounds=UNIT), "stronger_control": mean_ci(reference, bounds=UNIT)}
            out.append({**dict(zip([*keys, column], group)), score: mean_ci(treated, bounds=UNIT),
                        "control": mean_ci(network, bounds=UNIT), **extra, "verdict": compare(treated, reference, MARGIN)})
    return out


def multi_hot_classes(labels: np.ndarray) -> np.ndarray:
    """Multi-hot labels `[..., k]` as one class per set (bit mask), IGNORE where any entry is IGNORE."""
    codes = (np.maximum(labels, 0) << np.arange(labels.shape[-1])).sum(-1)
    return np.where((labels == IGNORE).any(-1), IGNORE, codes)


def ahead(labels: np.ndarray, offset: int) -> np.ndarray:
    """Labels `[batch, pos, ...]` moved `offset` positions back: position t holds the label of t + offset."""
    out = np.full_like(labels, IGNORE)
    if offset < labels.shape[1]:
        out[:, : labels.shape[1] - offset] = labels[:, offset:]
    return out


@torch.no_grad()
def residual_stream(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Residual stream `[n_layers + 1, batch, pos, d_model]`: the embeddings, then after each block.

    Read from the hooks `blocks.0.hook_resid_pre` and `blocks.{l}.hook_resid_post`.
    """
    _, cache = model.run_with_cache(tokens, names=["blocks.0.hook_resid_pre", "blocks.*.hook_resid_post"])
    layers = [cache["blocks.0.hook_resid_pre"]]
    layers += [cache[f"blocks.{layer}.hook_resid_post"] for layer in range(len(cache) - 1)]
    return torch.stack(layers)


@torch.no_grad()
def tick_states(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A DRC's states `[depth + 1, ticks, batch, pos, d]`: its encoding i_t (the same at every tick), then each layer's
    hidden state at each of the N ticks of every position, read from `hook_encoded` and `blocks.{d}.hook_hidden_ticks`.
    `[:, -1]`, the last tick, is the stack `residual_stream` gives a transformer: layer l = after l layers."""
    _, cache = model.run_with_cache(tokens, names=["hook_encoded", "blocks.*.hook_hidden_ticks"])
    ticks = [cache[f"blocks.{d}.hook_hidden_ticks"].movedim(2, 0) for d in range(len(cache) - 1)]
    return torch.stack([cache["hook_encoded"].expand_as(ticks[0]), *ticks])


def probe_residual_stream(
    resid: torch.Tensor,
    labels: np.ndarray,
    position_types: np.ndarray,
    type_names: Sequence[str],
    kind: ProbeKind = "logistic",
    min_rows: int = 40,
    given: np.ndarray | None = None,
    **options: float,
) -> list[dict[str, float | int | str | None]]:
    """Probe `labels` `[batch, pos]` at every layer of `resid` `[layers, batch, pos, d]` and every position type.

    `position_types` `[batch, pos]` gives each position's type (an index into `type_names`, IGNORE
    to skip); only positions where the label is defined are used, split by sequence. Types with
    fewer than `min_rows` such positions are skipped. Returns one row per (layer, type), with
    `layer` counting the blocks applied (0 = embeddings). `options` go to `probe`. With `given`
    (labels of the same shape, defined where used) each row is a logistic `conditional_probe` given it.
    """
    labels, given = (multi_hot_classes(x) if x is not None and x.ndim == 3 else x for x in (labels, given))
    if labels.shape != position_types.shape or resid.shape[1:3] != labels.shape or (given is not None and given.shape != labels.shape):
        raise ToylabError(
            f"shapes do not match: resid {tuple(resid.shape)}, labels {labels.shape}, position_types {position_types.shape}"
            + (f", given {given.shape}" if given is not None else "")
        )
    if given is not None and kind != "logistic":
        raise ToylabError(f"a probe given a condition is logistic (got kind '{kind}')")
    sequence = np.broadcast_to(np.arange(labels.shape[0])[:, None], labels.shape)
    rows = []
    for type_index, type_name in enumerate(type_names):
        keep = (position_types == type_index) & (labels != IGNORE) & (True if given is None else given != IGNORE)
        if keep.sum() < min_rows:
            continue
        index = torch.from_numpy(np.flatnonzero(keep))
        for layer, acts in enumerate(resid):
            x = acts.reshape(-1, acts.shape[-1])[index]
            result = (probe(x, labels[keep], kind, groups=sequence[keep], **options) if given is None
                      else conditional_probe(x, labels[keep], given[keep], groups=sequence[keep], **options))
            rows.append({"layer": layer, "position": type_name, **result.as_dict()})
    return rows
