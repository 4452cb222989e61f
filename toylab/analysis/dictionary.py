"""Scores of a learned dictionary against planted features (after SAELens' synthetic evaluation).

Directions are rows: learned `D [n_latents, d]`, true `T [n_true, d]`; codes `[N, n_latents]`.

    cos_fl = <T^_f, D^_l>                             cosines            [n_true, n_latents]
    MMCS = mean_f max_l cos_fl                        mean_max_cosine
    mean cos over a one-to-one matching               matched_cosine     (Hungarian, scipy)
    F1 of "latent l > 0" as a detector of feature f   detection_f1       [n_true, n_latents]
    1 - |x - x'|^2 / |x - mean x|^2                   variance_explained
    mean number of nonzero latents                    l0
    latents that never fire / fire on > 10%           dead / dense

`assignment_codes` turns an MoE layer's routing into codes (one-hot chosen experts, router
probabilities), and `code_rsa` compares any two codes of the same tokens by RSA
(`toylab.analysis.similarity.rsa`) beside its shuffled-token-correspondence null; `summarize_rsa`
sets each pair against the reference of the same activations: one dictionary refit with another seed.
`matched_label_detection` scores label detection with the same number of candidate latents for every
code, each beside its own shuffled-label null. `adjust_families` corrects the verdicts of the study
`dictionaries` in families of one kind of comparison.

`chance_mean_max_cosine` is the null: the same dictionary's MMCS against as many random directions,
which is far from 0 in few dimensions, so a dictionary recovers features only well above it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from toylab.analysis.similarity import rsa
from toylab.analysis import stats
from toylab.analysis.stats import UNIT, compare, mean_ci

DENSE = 0.1
"""A latent that fires on more than this share of samples is dense."""


def score_bounds(score: str, size: int) -> tuple[float, float]:
    """The range of a planted-feature score of a dictionary of `size` latents, for `mean_ci`: cosines in [-1, 1],
    shares and F1 in [0, 1], variance explained at most 1 (negative for a reconstruction worse than the mean),
    L0 in [0, size]."""
    if score in ("mmcs", "mmcs_null", "matched_cosine"):
        return (-1.0, 1.0)
    if score == "variance_explained":
        return (-math.inf, 1.0)
    return (0.0, float(size)) if score == "l0" else UNIT


def cosines(true: torch.Tensor | np.ndarray, learned: torch.Tensor | np.ndarray) -> np.ndarray:
    """`[n_true, n_latents]` cosine similarities of true and learned directions (rows)."""
    t = F.normalize(torch.as_tensor(true, dtype=torch.float64), dim=-1)
    d = F.normalize(torch.as_tensor(learned, dtype=torch.float64), dim=-1)
    return (t @ d.T).numpy()


def mean_max_cosine(cos: np.ndarray) -> float:
    """Mean over true features of the best cosine any latent reaches."""
    return float(cos.max(1).mean())


def matched_cosine(cos: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cosine of the best one-to-one matching of true features to latents, and each feature's latent."""
    rows, cols = linear_sum_assignment(cos, maximize=True)
    match = np.full(cos.shape[0], -1)
    match[rows] = cols
    return float(cos[rows, cols].sum() / cos.shape[0]), match


def chance_mean_max_cosine(learned: torch.Tensor | np.ndarray, n_true: int, seed: int = 0, draws: int = 20) -> float:
    """The null for `mean_max_cosine`: this dictionary's MMCS against `n_true` random unit directions.

    Far from 0 in few dimensions, and higher for a dictionary spread evenly over the sphere (as one
    trained on noise is) than for random latents, so it is measured on the dictionary itself.
    """
    learned = torch.as_tensor(learned, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    draws_ = [mean_max_cosine(cosines(torch.randn(n_true, learned.shape[-1], generator=generator, dtype=torch.float64), learned))
              for _ in range(draws)]
    return float(np.mean(draws_))


def detection_f1(active: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """`[n_true, n_latents]` F1 of each latent firing (> 0) as a detector of each true feature being active.

    `active` `[N, n_true]` booleans (or a label's one-hot classes); `codes` `[N, n_latents]`.
    """
    truth, fires = np.asarray(active, dtype=np.float64), (np.asarray(codes) > 0).astype(np.float64)
    tp = truth.T @ fires
    precision_denominator, recall_denominator = fires.sum(0)[None, :], truth.sum(0)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * tp / (precision_denominator + recall_denominator)
    return np.nan_to_num(f1)


def variance_explained(x: torch.Tensor | np.ndarray, reconstruction: torch.Tensor | np.ndarray) -> float:
    """Fraction of the variance of `x [N, d]` that the reconstruction explains."""
    x, r = np.asarray(x, dtype=np.float64), np.asarray(reconstruction, dtype=np.float64)
    return float(1 - ((x - r) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def sparsity_stats(codes: torch.Tensor | np.ndarray) -> dict[str, float]:
    """L0 (mean nonzero latents per sample), and the shares of dead and dense latents."""
    fires = np.asarray(codes) > 0
    rate = fires.mean(0)
    return {"l0": float(fires.sum(1).mean()), "dead": float((rate == 0).mean()), "dense": float((rate > DENSE).mean())}


def score_dictionary(
    decoder: torch.Tensor | np.ndarray, codes: np.ndarray, data: np.ndarray, reconstruction: np.ndarray,
    true: np.ndarray, active: np.ndarray, recovered_at: float = 0.9,
) -> dict[str, float]:
    """Every score of one dictionary (`decoder [n_latents, d]`) on evaluation data whose true features are known:
    `true [n_true, d]` directions and their activity `active [N, n_true]`."""
    cos = cosines(true, decoder)
    matched, _ = matched_cosine(cos)
    best_f1 = detection_f1(active, codes).max(1)
    return {
        "mmcs": mean_max_cosine(cos),
        "mmcs_null": chance_mean_max_cosine(decoder, len(true)),
        "matched_cosine": matched,
        "recovered": float((cos.max(1) >= recovered_at).mean()),
        "detection_f1": float(np.median(best_f1)),
        "variance_explained": variance_explained(data, reconstruction),
        **sparsity_stats(codes),
    }


def expert_codes(neurons: np.ndarray, experts: np.ndarray, n_experts: int) -> np.ndarray:
    """The neurons of an MoE layer as one dictionary: `[N, k, d_expert]` activations of the chosen experts
    `[N, k]` -> `[N, n_experts * d_expert]`, zero for experts a token did not use."""
    n, k, width = neurons.shape
    codes = np.zeros((n, n_experts, width), dtype=neurons.dtype)
    codes[np.arange(n)[:, None], experts] = neurons
    return codes.reshape(n, n_experts * width)


def label_detection(codes: np.ndarray, label: np.ndarray) -> float:
    """Mean over the classes present of the best latent's F1 as a detector of "this token has class c"."""
    present = np.unique(label)
    one_hot = label[:, None] == present[None, :]
    return float(detection_f1(one_hot, codes).max(1).mean()) if len(present) else float("nan")


def assignment_codes(experts: np.ndarray, router_logits: np.ndarray) -> dict[str, np.ndarray]:
    """An MoE layer's routing of `N` tokens as codes: `onehot [N, E]` of the chosen experts (`experts [N, k]`,
    -1 for an empty slot ignored) and `router [N, E]`, the softmax of `router_logits [N, E]`."""
    logits = np.asarray(router_logits, dtype=np.float64)
    onehot = np.zeros_like(logits)
    rows, slots = np.nonzero(np.asarray(experts) >= 0)
    onehot[rows, np.asarray(experts)[rows, slots]] = 1.0
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return {"onehot": onehot, "router": probs / probs.sum(-1, keepdims=True)}


def code_rsa(x: np.ndarray, y: np.ndarray, seed: int) -> dict[str, float]:
    """RSA of two codes `[N, d_x]`, `[N, d_y]` of the same tokens, and the same with y's tokens shuffled (the null:
    no token correspondence; about 0)."""
    shuffled = np.asarray(y)[np.random.default_rng(seed).permutation(len(y))]
    return {"rsa": rsa(x, y), "shuffled": rsa(x, shuffled)}


def matched_label_detection(codes: Mapping[str, np.ndarray], label: np.ndarray, seed: int, draws: int = 10) -> dict[str, Any]:
    """`label_detection` of every code `[N, n_latents]` with the same number of candidate latents, beside its own null.

    The best of more latents is higher by chance alone, so every code is scored on n of its latents, n = the smallest
    code's count: per draw, n latents of each code at random (all of them for a code of n), against `label [N]` and
    against the label permuted over tokens (the null: one permutation per draw, shared by the codes). Means over
    draws: `{"latents": n, code: {"f1", "null", "lift" (= f1 - null)}}`.
    """
    rng = np.random.default_rng(seed)
    n = min(code.shape[1] for code in codes.values())
    f1: dict[str, list[float]] = {name: [] for name in codes}
    null: dict[str, list[float]] = {name: [] for name in codes}
    for _ in range(draws):
        shuffled = label[rng.permutation(len(label))]
        for name, code in codes.items():
            kept = code[:, rng.choice(code.shape[1], n, replace=False)]
            f1[name].append(label_detection(kept, label))
            null[name].append(label_detection(kept, shuffled))
    out: dict[str, Any] = {"latents": n}
    for name in codes:
        out[name] = {"f1": float(np.mean(f1[name])), "null": float(np.mean(null[name]))}
        out[name]["lift"] = out[name]["f1"] - out[name]["null"]
    return out


def summarize_detection(per_seed: Sequence[Mapping[str, Any]], codes: Sequence[str], reference: str, margin: float) -> dict[str, Any]:
    """Over seeds, from `matched_label_detection` results of one label: each code's F1 and null (mean [95% CI]) with
    the verdict F1 vs null, and each other code's lift over its null against `reference`'s (paired by seed)."""
    out: dict[str, Any] = {"latents": per_seed[0]["latents"] if per_seed else 0}
    for name in codes:
        f1, null = [s[name]["f1"] for s in per_seed], [s[name]["null"] for s in per_seed]
        out[name] = {"f1": mean_ci(f1, bounds=UNIT), "null": mean_ci(null, bounds=UNIT), "vs_null": compare(f1, null, margin)}
        if name != reference:
            out[name][f"vs_{reference}"] = compare([s[name]["lift"] for s in per_seed], [s[reference]["lift"] for s in per_seed], margin)
    return out


def summarize_rsa(codes: Sequence[Mapping[str, np.ndarray]], pairs: Sequence[tuple[str, str]], references: Mapping[str, str],
                  margin: float) -> dict[str, Any]:
    """RSA of pairs of codes over seeds, against a shuffled-token null and each code's reference on the same activations.

    `codes`: per seed, `{code: [tokens, d]}` of the same tokens of one model. A code's reference is its RSA with
    `references[code]`, the same dictionary refit with another seed on the same activations: the agreement two
    codes of one model's activations reach when only the seed differs. A pair "less" than a reference agrees less
    than two seeds of that dictionary; a code without a reference (the model's own routing) is not compared.
    """
    level = {name: [code_rsa(c[name], c[other], s)["rsa"] for s, c in enumerate(codes)] for name, other in references.items()}
    out: dict[str, Any] = {"reference": {name: mean_ci(v, bounds=(-1.0, 1.0)) for name, v in level.items()}}
    for a, b in pairs:
        scores = [code_rsa(c[a], c[b], s) for s, c in enumerate(codes)]
        pair, null = [r["rsa"] for r in scores], [r["shuffled"] for r in scores]
        out[f"{a}-{b}"] = {
            "rsa": mean_ci(pair, bounds=(-1.0, 1.0)), "shuffled": mean_ci(null, bounds=(-1.0, 1.0)),
            "per_seed": pair, "vs_shuffled": compare(pair, null, margin),
            **{f"vs_{name}_reference": compare(pair, level[name], margin) for name in (a, b) if name in level},
        }
    return out


PRIMARY = "Switch SAE vs SAE"
FAMILIES = {
    PRIMARY: "does a Switch SAE recover the planted features as well as an SAE of the same size? "
             "MMCS, Switch SAE minus SAE, at every (size, L1)",
    "router vs k-means": "the Switch SAE's router vs k-means, NMI with the planted feature groups, every (size, L1)",
    "RSA vs shuffled": "RSA of each pair of codes vs its shuffled-token null",
    "RSA vs reference": "RSA of each pair of codes vs each code's same-activation reference",
    "detection vs null": "label-class detection F1 of each code vs its shuffled-label null, every label",
    "detection lift vs SAE": "each other code's detection lift over its null vs the SAE's, every label",
}
"""The families of verdicts of the study `dictionaries`, the primary first, by their question."""


def adjust_families(grid: Sequence[dict[str, Any]], rsa: Mapping[str, Any] | None = None,
                    labels: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Correct the verdicts of the study `dictionaries` within the `FAMILIES` (in place; each keeps its `raw_verdict`)
    and return per family its role, number of tests and verdict counts before and after.

    `grid`: the planted-feature points, each with `switch_vs_sae_mmcs` and `router_vs_kmeans`; `rsa`: a
    `summarize_rsa` result; `labels`: per label a `summarize_detection` result with reference "sae". Picking the
    best setting of the grid is covered by correcting over every point of it.
    """
    members: dict[str, list[tuple[dict[str, Any], str]]] = {name: [] for name in FAMILIES}
    for point in grid:
        members[PRIMARY].append((point, "switch_vs_sae_mmcs"))
        members["router vs k-means"].append((point, "router_vs_kmeans"))
    for pair in (v for key, v in (rsa or {}).items() if key != "reference"):
        members["RSA vs shuffled"].append((pair, "vs_shuffled"))
        members["RSA vs reference"] += [(pair, key) for key in pair if key.endswith("_reference")]
    for summary in (labels or {}).values():
        for code, s in summary.items():
            if code != "latents":
                members["detection vs null"].append((s, "vs_null"))
                members["detection lift vs SAE"] += [(s, "vs_sae")] if "vs_sae" in s else []
    return stats.correct_families(members, FAMILIES, PRIMARY)
