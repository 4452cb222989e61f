"""Do two models represent the same tokens alike? Linear CKA, RSA, and probes carried across by Procrustes.

- `linear_cka`: centered kernel alignment with linear kernels (Kornblith et al. 2019), by default with the
  debiased HSIC estimator (Song et al. 2012), so two independent representations score about 0 rather than
  a positive bias that grows with dimension. Computed in feature space: O(n d^2), no n x n Gram matrix.
- `rsa`: representational similarity analysis, the Spearman correlation of the two representational
  dissimilarity matrices (Euclidean distances between every pair of tokens).
- `probe_transfer`: a logistic probe fit on model A's activations, scored on A (in-architecture) and on
  model B's activations mapped into A's space by orthogonal Procrustes (with one isotropic scale), fit on
  tokens disjoint from the probe's test set, and on the same map fit to shuffled token correspondences.
- `summarize_pairs`: `summarize_similarity` for every pair of several architectures, each against both of its
  architectures' seed-to-seed levels.
- `adjust_families`: the verdicts of `summarize_pairs` in families (the primary pair's first, every other pair's in
  their twins), each corrected for multiplicity on its own.

All three are invariant to rotations of either representation: a rotated copy scores CKA = RSA = 1 and
transfers exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Any

import numpy as np
from scipy.linalg import orthogonal_procrustes
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr

from toylab.analysis.probes import logistic_classifier, split
from toylab.analysis.specialization import analysable_labels, token_activations
from toylab.analysis.stats import MARGIN, UNIT, compare, correct_families, mean_ci
from toylab.errors import ToylabError
from toylab.models import Recurrent, Transformer
from toylab.task import IGNORE, Batch, Task


def _paired(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ToylabError(f"representations must be [n_tokens, d] with the same tokens (got {x.shape} and {y.shape})")
    return x, y


def _hsic(x: np.ndarray, y: np.ndarray, debiased: bool) -> float:
    """HSIC of the linear kernels K = x x^T, L = y y^T; debiased: the unbiased estimator of Song et al. (2012),
    1/(n(n-3)) [tr(K~L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] with K~, L~ the Gram
    matrices with zeroed diagonals; else tr(K H L H) / (n-1)^2 with H the centering matrix."""
    n = len(x)
    if not debiased:
        xc, yc = x - x.mean(0), y - y.mean(0)
        return float(np.sum((xc.T @ yc) ** 2) / (n - 1) ** 2)
    dx, dy = np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", y, y)  # diagonals of K and L
    trace = np.sum((x.T @ y) ** 2) - dx @ dy  # tr(K~ L~) = sum_ij K_ij L_ij - sum_i K_ii L_ii
    kx, ly = x @ x.sum(0) - dx, y @ y.sum(0) - dy  # K~ 1 and L~ 1
    return float((trace + kx.sum() * ly.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * kx @ ly) / (n * (n - 3)))


def linear_cka(x: np.ndarray, y: np.ndarray, debiased: bool = True) -> float:
    """Linear CKA of two representations `[n_tokens, d_x]`, `[n_tokens, d_y]` of the same tokens:
    HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)). 1 for representations equal up to rotation and scale;
    debiased, about 0 (it may be slightly negative) for independent ones."""
    x, y = _paired(x, y)
    if len(x) < 4:
        raise ToylabError(f"linear CKA needs at least 4 tokens (got {len(x)})")
    xy, xx, yy = _hsic(x, y, debiased), _hsic(x, x, debiased), _hsic(y, y, debiased)
    return xy / np.sqrt(xx * yy) if xx > 0 and yy > 0 else float("nan")


def rsa(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman correlation of the Euclidean dissimilarity matrices (upper triangles) of two representations."""
    x, y = _paired(x, y)
    return float(spearmanr(pdist(x), pdist(y)).statistic)


@dataclass(frozen=True)
class Procrustes:
    """The map `b -> scale * (b - mean_b) @ rotation + mean_a` of one representation onto another."""

    rotation: np.ndarray
    scale: float
    mean_a: np.ndarray
    mean_b: np.ndarray

    @classmethod
    def fit(cls, a: np.ndarray, b: np.ndarray) -> Procrustes:
        """The orthogonal map (and one isotropic scale) minimizing |scale (b - mean_b) R - (a - mean_a)|_F over paired rows."""
        a, b = _paired(a, b)
        if a.shape[1] != b.shape[1]:
            raise ToylabError(f"Procrustes alignment needs the same width in both models (got {a.shape[1]} and {b.shape[1]})")
        mean_a, mean_b = a.mean(0), b.mean(0)
        rotation, singular_sum = orthogonal_procrustes(b - mean_b, a - mean_a)
        norm = float(np.sum((b - mean_b) ** 2))
        return cls(rotation, singular_sum / norm if norm > 0 else 1.0, mean_a, mean_b)

    def __call__(self, b: np.ndarray) -> np.ndarray:
        return self.scale * (np.asarray(b, dtype=np.float64) - self.mean_b) @ self.rotation + self.mean_a


@dataclass(frozen=True)
class TransferResult:
    """Held-out accuracies of one probe fit on model A."""

    in_architecture: float
    """On A's own test tokens."""
    transfer: float
    """On B's test tokens, mapped into A's space by Procrustes fit on the alignment tokens."""
    shuffled: float
    """The same, with the map fit to shuffled token correspondences (the control)."""
    baseline: float
    """Always predicting the probe's training majority class."""

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def transfer_splits(groups: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint token indices by group (sequence): probe training (50%), alignment fit (25%), probe test (25%)."""
    rest, test = split(len(groups), 0.25, seed, groups)
    train, align = split(len(rest), 1 / 3, seed + 1, groups[rest])
    return rest[train], rest[align], test


def probe_transfer(
    a: np.ndarray, b: np.ndarray, labels: np.ndarray, splits: tuple[np.ndarray, np.ndarray, np.ndarray], seed: int, C: float = 1.0
) -> TransferResult:
    """Fit a logistic probe for `labels` on `a[train]`; score it on `a[test]`, on `b[test]` mapped by Procrustes
    fit on `(a[align], b[align])`, and on `b[test]` mapped by the fit to `a[align]` against shuffled `b[align]`
    (`splits = (train, align, test)`, e.g. from `transfer_splits`)."""
    a, b = _paired(a, b)
    train, align, test = splits
    predict = logistic_classifier(a[train], labels[train], C)
    aligned = Procrustes.fit(a[align], b[align])
    shuffled = Procrustes.fit(a[align], b[np.random.default_rng(seed).permutation(align)])
    truth = labels[test]
    values, counts = np.unique(labels[train], return_counts=True)
    return TransferResult(
        in_architecture=float((predict(a[test]) == truth).mean()),
        transfer=float((predict(aligned(b[test])) == truth).mean()),
        shuffled=float((predict(shuffled(b[test])) == truth).mean()),
        baseline=float((truth == values[counts.argmax()]).mean()),
    )


def residual_streams(model: Transformer | Recurrent, task: Task, batch: Batch) -> np.ndarray:
    """The residual stream `[n_layers + 1, n_tokens, d_model]` at the batch's real tokens: the embeddings
    (`blocks.0.hook_resid_pre`), then after each block (`blocks.{l}.hook_resid_post`), alike for a transformer and a
    recurrent model (whose layers add their hidden states to the stream)."""
    names = ["blocks.0.hook_resid_pre", *(f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers))]
    acts = token_activations(model, task, batch, names)
    return np.stack([acts[name] for name in names])


def pair_similarity(a: np.ndarray, b: np.ndarray, task: Task, batch: Batch, n_tokens: int, seed: int,
                    min_rows: int = 40) -> list[dict[str, Any]]:
    """Per layer of two models' residual streams `[layers, n_tokens, d]` on the batch's real tokens: linear CKA
    (debiased) and RSA on a fixed random subset of `n_tokens` tokens, and for every analysable label with at least
    `min_rows` defined tokens the probe transfer both ways (`a_to_b`: fit on a, applied to b), split by sequence.
    Layer l of one model is compared with layer l of the other, so both need the same depth."""
    if len(a) != len(b):
        raise ToylabError(f"models compared layer by layer need the same depth (got {len(a) - 1} and {len(b) - 1} layers)")
    keep = task.positions(batch)
    sequences = np.broadcast_to(np.arange(len(batch))[:, None], keep.shape)[keep]
    subset = np.sort(np.random.default_rng(seed).permutation(len(sequences))[:n_tokens])
    labels = {name: batch.labels[name][keep] for name in analysable_labels(task)}
    labels = {name: label for name, label in labels.items() if (label != IGNORE).sum() >= min_rows}
    rows = []
    for layer, (x, y) in enumerate(zip(a, b)):
        probes = {}
        for name, label in labels.items():
            defined = label != IGNORE
            splits = transfer_splits(sequences[defined], seed)
            probes[name] = {"a_to_b": probe_transfer(x[defined], y[defined], label[defined], splits, seed).as_dict(),
                            "b_to_a": probe_transfer(y[defined], x[defined], label[defined], splits, seed).as_dict()}
        rows.append({"layer": layer, "cka": linear_cka(x[subset], y[subset]), "rsa": rsa(x[subset], y[subset]), "probes": probes})
    return rows


def _average(pairs: Sequence[list[dict[str, Any]]], get: Any) -> list[float]:
    """Per layer, the mean over `pairs` (each `pair_similarity` rows) of `get(row)`."""
    return [float(np.mean([get(rows[layer]) for rows in pairs])) for layer in range(len(pairs[0]))]


def summarize_similarity(replicates: Sequence[dict[str, list[list[dict[str, Any]]]]], a: str = "dense", b: str = "moe",
                         margin: float = MARGIN) -> dict[str, Any]:
    """Across independent replicates, each `{kind: [pair_similarity rows, ...]}` with kinds `a-a`, `b-b` (two seeds
    of one architecture: the reference level) and `a-b` (across architectures; several pairs are averaged):
    per layer, the mean and 95% CI of CKA and RSA per kind, and the verdicts of `a-b` vs each reference; per
    label and layer, the probe transfer `a→b` and `b→a` (in-architecture, transferred, shuffled-alignment and
    majority accuracies) with verdicts of the transfer vs in-architecture accuracy, vs the shuffled alignment,
    and vs the same architecture's seed-to-seed transfer."""
    cross, kinds = f"{a}-{b}", (f"{a}-{a}", f"{b}-{b}", f"{a}-{b}")
    values = {kind: {metric: np.array([_average(r[kind], lambda row, m=metric: row[m]) for r in replicates])
                     for metric in ("cka", "rsa")} for kind in kinds}  # [replicates, layers]
    layers = range(values[cross]["cka"].shape[1])
    similarity = {
        str(layer): {
            metric: {
                **{kind: mean_ci(values[kind][metric][:, layer], bounds=(-1.0, 1.0)) for kind in kinds},
                "verdicts": {kind: compare(values[cross][metric][:, layer], values[kind][metric][:, layer], margin) for kind in kinds[:2]},
            }
            for metric in ("cka", "rsa")
        }
        for layer in layers
    }
    probes: dict[str, Any] = {}
    for label in replicates[0][cross][0][0]["probes"]:
        probes[label] = {}
        for layer in layers:
            entry = {}
            for source, target, direction in ((a, b, "a_to_b"), (b, a, "b_to_a")):
                scores = {key: [_average(r[cross], lambda row, k=key: row["probes"][label][direction][k])[layer] for r in replicates]
                          for key in ("in_architecture", "transfer", "shuffled", "baseline")}
                seed = [_average(r[f"{source}-{source}"], lambda row: np.mean([row["probes"][label][d]["transfer"]
                                                                               for d in ("a_to_b", "b_to_a")]))[layer] for r in replicates]
                entry[f"{source}→{target}"] = {
                    **{key: mean_ci(v, bounds=UNIT) for key, v in scores.items()},
                    "seed_transfer": mean_ci(seed, bounds=UNIT),
                    "vs_in_architecture": compare(scores["transfer"], scores["in_architecture"], margin),
                    "vs_shuffled": compare(scores["transfer"], scores["shuffled"], margin),
                    "vs_seed_transfer": compare(scores["transfer"], seed, margin),
                }
            probes[label][str(layer)] = entry
    return {"similarity": similarity, "probes": probes}


def architecture_pairs(architectures: Sequence[str]) -> list[tuple[str, str]]:
    """Every pair of two different `architectures`, each once, in their order: `(a, b)` with a listed before b."""
    return list(combinations(architectures, 2))


def summarize_pairs(replicates: Sequence[Mapping[str, list[list[dict[str, Any]]]]], architectures: Sequence[str],
                    margin: float = MARGIN) -> dict[str, dict[str, Any]]:
    """`summarize_similarity` for every pair `(a, b)` of `architectures` (`architecture_pairs`), keyed `a-b`: each replicate
    is `{kind: [pair_similarity rows, ...]}` with kinds `x-x` (two seeds of architecture x) and `x-y` (x listed before y),
    and each pair is summarized over the replicates that hold its three kinds (`a-a`, `b-b`, `a-b`; a failed run leaves
    some out), their number under `replicates`. A pair that no replicate completes is left out."""
    out = {}
    for a, b in architecture_pairs(architectures):
        complete = [r for r in replicates if {f"{a}-{a}", f"{b}-{b}", f"{a}-{b}"} <= set(r)]
        if complete:
            out[f"{a}-{b}"] = {"replicates": len(complete), **summarize_similarity(complete, a, b, margin)}
    return out


PRIMARY = "CKA at the last layer"
"""The family that answers "do the two architectures of the primary pair learn the same representation?"."""
PAIR_FAMILIES = {
    PRIMARY: "across-architecture linear CKA at the last layer vs each seed-to-seed reference (one per architecture)",
    "CKA, earlier layers": "across-architecture linear CKA vs each seed-to-seed reference, every earlier layer",
    "RSA": "across-architecture RSA vs each seed-to-seed reference, every layer",
    "probe transfer vs in-architecture": "transferred vs in-architecture probe accuracy, every (label, layer, direction)",
    "probe transfer vs shuffled alignment": "transferred accuracy vs the map fit to shuffled tokens, every (label, layer, direction)",
    "probe transfer vs seed transfer": "transferred accuracy across architectures vs between two seeds of the probe's own "
                                       "architecture, every (label, layer, direction)",
}
"""The families of tests of one pair's `summarize_similarity`, the primary first."""
OTHER_PAIRS = "other pairs"
FAMILIES = {**PAIR_FAMILIES, **{f"{name}, {OTHER_PAIRS}": f"{question}; every pair of architectures but the primary one"
                                for name, question in PAIR_FAMILIES.items()}}
"""The families of tests of `summarize_pairs`, each corrected for multiplicity on its own: the primary pair's (`PAIR_FAMILIES`,
the primary first), then their twins `<name>, other pairs` holding every other pair's tests together."""
PROBE_FAMILIES = {"vs_in_architecture": "probe transfer vs in-architecture", "vs_shuffled": "probe transfer vs shuffled alignment",
                  "vs_seed_transfer": "probe transfer vs seed transfer"}


def adjust_families(pairs: Mapping[str, Mapping[str, Any]], primary: str) -> dict[str, dict[str, Any]]:
    """Correct the verdicts of `summarize_pairs` within the `FAMILIES` (in place; each keeps its `raw_verdict`): the
    `primary` pair's (e.g. "dense-moe") in `PAIR_FAMILIES`, every other pair's together in the twin families; return per
    non-empty family its role (primary or secondary, and what it compares), number of tests and verdict counts before
    and after. The primary layer is fixed in advance (each pair's last), not picked from the results."""
    members: dict[str, list[tuple[dict[str, Any], str]]] = {name: [] for name in FAMILIES}
    for pair, summary in pairs.items():
        suffix = "" if pair == primary else f", {OTHER_PAIRS}"
        last = max(summary["similarity"], key=int, default=None)
        for layer, metrics in summary["similarity"].items():
            for metric, s in metrics.items():
                name = "RSA" if metric == "rsa" else PRIMARY if layer == last else "CKA, earlier layers"
                members[name + suffix] += [(s["verdicts"], kind) for kind in s["verdicts"]]
        for layers in summary["probes"].values():
            for directions in layers.values():
                for p in directions.values():
                    for key, name in PROBE_FAMILIES.items():
                        members[name + suffix].append((p, key))
    return correct_families(members, FAMILIES, PRIMARY)
