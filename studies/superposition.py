"""Study `superposition`: when do toy ReLU models represent more features than dimensions (Elhage et al. 2022)?"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from toylab.analysis.stats import INTERVAL_NOTE, UNIT, compare, mean_ci
from toylab.analysis.superposition import (
    GEOMETRIC_FRACTIONS,
    REPRESENTED,
    dimensions_per_feature,
    feature_dimensionality,
    feature_norms,
    features_represented,
    fraction_shares,
    gram,
    interference,
    most_important_represented,
    plateau,
)
from toylab.config import build
from toylab.models.superposition import SparseFeatures, ToyModelConfig, ToyTrainConfig, build_toy_model, train_toy_model
from toylab.registry import get_task, register_study
from toylab.report import Document, Figure, Section, Table, Text, fmt, fmt_ci, legend_outside, series_colours, verdict_text
from toylab.study import Study, StudyContext

FRACTION_NAMES = [*GEOMETRIC_FRACTIONS, "other"]
FEATURE_MARGIN = 0.5
"""Equivalence margin, in features represented, of comparisons between sparsities (less than one feature)."""

METRIC_NOTES = """\
- **Represented**: a feature is represented when its column of W has norm ||W_i|| > 0.5 (the paper's threshold).
- **Feature dimensionality** D_i = ||W_i||² / Σ_j (Ŵ_i·W_j)², the share of a hidden dimension feature i gets: 1 for a dimension of its own, 1/2 in an antipodal pair, 2/3 in a triangle, 2/5 in a pentagon, 3/4 in a tetrahedron, 3/8 in a square antiprism. A feature counts at a fraction when D_i is within 0.03 of it.
- **Superposition of a feature** (bar colour) Σ_{j≠i} (Ŵ_i·W_j)²: 0 when no other feature shares its direction.
- **Dimensions per feature** m / ||W||_F²: hidden dimensions per (norm-weighted) learned feature; 1/(1−S) is the expected number of samples per active feature.
- **Comparing two sparsities**: the per-seed differences in features represented and their 90% Student-t interval: *more* / *less* when it lies above / below 0, *equivalent* when inside ±{margin} features (two one-sided tests at 5%), *inconclusive* otherwise, with the smallest difference the seeds would detect.
- **Intervals**: {interval}
"""


@dataclass(frozen=True)
class SuperpositionStudyConfig:
    seeds: int = 3
    n_features: int = 20
    n_hidden: int = 5
    importance_decay: float = 0.7
    sparsities: tuple[float, ...] = (0.0, 0.7, 0.9, 0.97, 0.99, 0.997, 0.999)
    """The paper's sweep for its n=20, m=5 figure."""
    train: ToyTrainConfig = ToyTrainConfig(steps=3000, batch_size=1024, lr=3e-3)
    geometry_features: int = 100
    geometry_hidden: int = 20
    """The uniform-importance model of the dimensionality sweep (the paper: n=400, m=30; its notebook: 200, 20)."""
    geometry_points: int = 14
    geometry_max_inverse_density: float = 20.0
    """Sparsities 1 - 1/r for r log-spaced from 1 to this."""
    geometry_train: ToyTrainConfig = ToyTrainConfig(steps=3000, batch_size=256, lr=3e-3)
    antipodal_share: float = 0.9
    """A sparsity is on the 1/2 plateau when at least this share of the represented features has D_i ≈ 1/2."""
    plateau_tolerance: float = 0.05
    """Also reported: grid points with |dimensions per feature - 1/2| at most this."""

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.geometry_points < 2:
            raise ValueError(f"need seeds >= 1 and geometry_points >= 2 (got {self.seeds}, {self.geometry_points})")
        if not self.sparsities or not all(0 <= s < 1 for s in self.sparsities) or list(self.sparsities) != sorted(self.sparsities):
            raise ValueError(f"sparsities must be increasing values in [0, 1) (got {self.sparsities})")
        if self.sparsities[0] != 0:
            raise ValueError("sparsities must start at 0, the dense case the paper's first claim is about")
        if not self.n_hidden < self.n_features or not self.geometry_hidden < self.geometry_features:
            raise ValueError("need n_hidden < n_features and geometry_hidden < geometry_features")
        if not 0 < self.antipodal_share <= 1 or self.plateau_tolerance <= 0:
            raise ValueError(
                f"need 0 < antipodal_share <= 1 and plateau_tolerance > 0 (got {self.antipodal_share}, {self.plateau_tolerance})"
            )
        if not self.geometry_max_inverse_density > 1:
            raise ValueError(f"geometry_max_inverse_density must be > 1 (got {self.geometry_max_inverse_density})")


def train_sweep(
    ctx: StudyContext, key: str, task: SparseFeatures, n_hidden: int, activation: str,
    sparsities: np.ndarray, seeds: int, train: ToyTrainConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Train all (sparsity, seed) instances as one model; weights `[sparsity, seed, m, n]` and losses `[sparsity, seed]`."""
    grid = [(s, seed) for s in sparsities for seed in range(seeds)]
    cfg = ToyModelConfig(n_features=task.n_features, n_hidden=n_hidden, n_instances=len(grid), activation=activation)
    model = build_toy_model(cfg, [seed for _, seed in grid])
    result = train_toy_model(model, task, train, [s for s, _ in grid], run_dir=ctx.run_dir(key))
    W = result.model.W.detach().numpy().reshape(len(sparsities), seeds, n_hidden, task.n_features)
    return W, result.loss.reshape(len(sparsities), seeds)


def describe_weights(W: np.ndarray, importance: np.ndarray, loss: np.ndarray) -> dict[str, Any]:
    """Per-sparsity summaries over seeds of weights `[sparsity, seed, m, n]`."""
    shares = fraction_shares(W).numpy()
    bounds = {"represented": (0, W.shape[-1]), "dimensions_per_feature": (0, math.inf), "loss": (0, math.inf)}
    per_seed = {
        "represented": features_represented(W).numpy(),
        "dimensions_per_feature": dimensions_per_feature(W).numpy(),
        "loss": loss,
    }
    return {
        **{name: [mean_ci(v, bounds=bounds[name]) for v in values] for name, values in per_seed.items()},
        "fraction_shares": [{f: mean_ci(shares[i, :, j], bounds=UNIT) for j, f in enumerate(FRACTION_NAMES)} for i in range(len(W))],
        "per_seed": {
            **{name: values.tolist() for name, values in per_seed.items()},
            "most_important": most_important_represented(W, importance).tolist(),
            "fraction_shares": shares.round(4).tolist(),
        },
    }


@register_study("superposition")
class Superposition(Study):
    """Sweep feature sparsity in toy ReLU models; check the paper's superposition results against the measured ones."""

    Config = SuperpositionStudyConfig
    fast = {
        "seeds": 2,
        "sparsities": (0.0, 0.9, 0.99),
        "train": {"steps": 1000, "batch_size": 256, "lr": 1e-2},
        "geometry_features": 40,
        "geometry_hidden": 8,
        "geometry_points": 6,
        "geometry_train": {"steps": 1000, "batch_size": 256, "lr": 1e-2},
    }
    config: SuperpositionStudyConfig

    def __init__(self, config: SuperpositionStudyConfig) -> None:
        super().__init__(config)
        self.task = get_task("superposition", n_features=config.n_features, importance_decay=config.importance_decay)
        self.geo_task = get_task("superposition", n_features=config.geometry_features, importance_decay=1.0)

    def check(self) -> None:
        """Besides the generic checks: both sweeps' toy models (sizes, memory)."""
        super().check()
        cfg = self.config
        build(ToyModelConfig, n_features=cfg.n_features, n_hidden=cfg.n_hidden, n_instances=len(cfg.sparsities) * cfg.seeds)
        build(ToyModelConfig, n_features=cfg.geometry_features, n_hidden=cfg.geometry_hidden,
              n_instances=cfg.geometry_points * cfg.seeds)

    def run(self, ctx: StudyContext) -> dict[str, Any]:
        cfg, task = self.config, self.task
        sparsities = np.array(cfg.sparsities)
        sweep = {}
        for activation in ctx.bar(("relu", "linear"), 2, "sparsity sweep"):
            W, loss = train_sweep(ctx, f"sweep-{activation}", task, cfg.n_hidden, activation, sparsities, cfg.seeds, cfg.train)
            sweep[activation] = describe_weights(W, task.importance, loss)
            first = W[:, 0]
            sweep[activation]["seed0"] = {
                "gram": gram(first).numpy().round(4).tolist(),
                "norms": feature_norms(first).numpy().round(4).tolist(),
                "superposition": interference(first).numpy().round(4).tolist(),
            }
            sweep[activation]["represented_sparsest_vs_dense"] = compare(
                sweep[activation]["per_seed"]["represented"][-1], sweep[activation]["per_seed"]["represented"][0], FEATURE_MARGIN
            )

        geo_task = self.geo_task
        inverse = np.logspace(0, np.log10(cfg.geometry_max_inverse_density), cfg.geometry_points)
        geo_sparsities = 1 - 1 / inverse
        W, loss = train_sweep(
            ctx, "geometry", geo_task, cfg.geometry_hidden, "relu", geo_sparsities, cfg.seeds, cfg.geometry_train
        )
        geometry = describe_weights(W, geo_task.importance, loss)
        D, represented = feature_dimensionality(W).numpy(), feature_norms(W).numpy() > REPRESENTED
        geometry["dimensionality"] = [  # D_i of the represented features, per point and seed
            [D[i, s][represented[i, s]].round(4).tolist() for s in range(cfg.seeds)] for i in range(len(inverse))
        ]
        start, length = plateau([shares["1/2"]["mean"] for shares in geometry["fraction_shares"]], 1.0, 1 - cfg.antipodal_share)
        geometry["antipodal_plateau"] = {
            "points": length,
            "inverse_density_range": [float(inverse[start]), float(inverse[start + length - 1])] if length else [],
            "dimensions_per_feature": [geometry["dimensions_per_feature"][i] for i in range(start, start + length)],
        }
        _, geometry["half_points"] = plateau(
            [stat["mean"] for stat in geometry["dimensions_per_feature"]], 0.5, cfg.plateau_tolerance
        )
        geometry["inverse_density"] = inverse.tolist()

        results = {
            "sparsities": cfg.sparsities,
            "inverse_density": (1 / (1 - sparsities)).tolist(),
            "importance": task.importance.tolist(),
            "sweep": sweep,
            "geometry": geometry,
        }
        results["claims"] = self.claims(results)
        return results

    def claims(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        """The paper's qualitative results, the measured numbers beside them, and in how many seeds each held."""
        cfg, relu, linear, geometry = self.config, results["sweep"]["relu"], results["sweep"]["linear"], results["geometry"]
        m, last = cfg.n_hidden, len(cfg.sparsities) - 1
        count, top = np.array(relu["per_seed"]["represented"]), np.array(relu["per_seed"]["most_important"])
        shares = np.array(relu["per_seed"]["fraction_shares"])  # [sparsity, seed, fraction]
        one, half = FRACTION_NAMES.index("1"), FRACTION_NAMES.index("1/2")
        best = int(np.argmax(shares[:, :, half].mean(1)))
        dpf = np.array(relu["per_seed"]["dimensions_per_feature"])
        geo_dpf = np.array(geometry["per_seed"]["dimensions_per_feature"])  # [point, seed]
        geo_half = np.array(geometry["per_seed"]["fraction_shares"])[:, :, half]  # [point, seed]
        seed_plateaus = [plateau(geo_half[:, s], 1.0, 1 - cfg.antipodal_share)[1] for s in range(cfg.seeds)]
        sticky = geometry["antipodal_plateau"]
        claims = [
            (f"At S=0 the ReLU model represents about m={m} features (m ± 1)",
             f"{fmt_ci(relu['represented'][0], 2)} features represented", np.abs(count[0] - m) <= 1),
            ("... the most important ones",
             f"represented set = the most important features in {int(top[0].sum())} of {cfg.seeds} seeds", top[0]),
            ("... orthogonally (at least 90% of them with D_i ≈ 1)",
             f"share of represented features with D_i ≈ 1: {fmt_ci(relu['fraction_shares'][0]['1'], 2)}",
             shares[0, :, one] >= 0.9),
            ("As sparsity rises, more features are represented",
             f"{fmt_ci(relu['represented'][last], 2)} at S={cfg.sparsities[last]} vs {fmt_ci(relu['represented'][0], 2)} at S=0 "
             f"(sparsest minus dense, paired over seeds: {verdict_text(relu['represented_sparsest_vs_dense'], 2)})", count[last] > count[0]),
            ("Features pair up antipodally (at some sparsity at least half the represented features at D_i ≈ 1/2)",
             f"largest mean share at D_i ≈ 1/2: {fmt_ci(relu['fraction_shares'][best]['1/2'], 2)} at S={cfg.sparsities[best]}",
             shares[best, :, half] >= 0.5),
            ("... and then denser geometries (dimensions per feature below 1/2)",
             f"dimensions per feature at S={cfg.sparsities[last]}: {fmt_ci(relu['dimensions_per_feature'][last], 3)}",
             dpf[last] < 0.5 - cfg.plateau_tolerance),
            (f"A linear model represents the m={m} most important features (m ± 1) at every sparsity",
             "features represented per sparsity: " + ", ".join(fmt(s["mean"], 1) for s in linear["represented"]),
             (np.abs(np.array(linear["per_seed"]["represented"]) - m) <= 1).all(0)
             & np.array(linear["per_seed"]["most_important"]).all(0)),
            ("Dimensions per feature start at 1 for dense features",
             f"{fmt_ci(geometry['dimensions_per_feature'][0], 3)} at 1/(1-S)=1 "
             f"(n={cfg.geometry_features}, m={cfg.geometry_hidden}, uniform importance)",
             np.abs(geo_dpf[0] - 1) <= cfg.plateau_tolerance),
            (f"... and stick at 1/2 over a range of sparsities: at least 3 consecutive grid points with "
             f"≥{cfg.antipodal_share:.0%} of represented features in antipodal pairs (D_i ≈ 1/2)",
             (f"mean over seeds: {sticky['points']} points, 1/(1-S) from {fmt(sticky['inverse_density_range'][0], 2)} to "
              f"{fmt(sticky['inverse_density_range'][1], 2)}, dimensions per feature there "
              + ", ".join(fmt(d["mean"], 3) for d in sticky["dimensions_per_feature"])
              if sticky["points"] else "mean over seeds: no such point")
             + f"; per seed: {', '.join(map(str, seed_plateaus))} points; dimensions per feature within "
               f"±{cfg.plateau_tolerance} of 1/2 at {geometry['half_points']} consecutive points",
             np.array(seed_plateaus) >= 3),
        ]
        return [
            {"claim": claim, "measured": measured, "held_seeds": int(np.sum(held)), "seeds": cfg.seeds}
            for claim, measured, held in claims
        ]

    def summary(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        relu = results["sweep"]["relu"]
        return [
            {
                "sparsity": s,
                "1/(1-S)": fmt(results["inverse_density"][i], 1),
                "represented (ReLU)": fmt_ci(relu["represented"][i], 2),
                "represented (linear)": fmt_ci(results["sweep"]["linear"]["represented"][i], 2),
                "dims/feature (ReLU)": fmt_ci(relu["dimensions_per_feature"][i], 3),
                "share D≈1": fmt(relu["fraction_shares"][i]["1"]["mean"], 2),
                "share D≈1/2": fmt(relu["fraction_shares"][i]["1/2"]["mean"], 2),
                "loss (ReLU)": fmt_ci(relu["loss"][i], 5),
            }
            for i, s in enumerate(results["sparsities"])
        ]

    def report(self, results: dict[str, Any], ctx: StudyContext) -> Document:
        cfg = self.config
        figures = [
            ("ReLU model, seed 0: ||W_i|| per feature coloured by superposition (top) and W^T W (bottom), per sparsity",
             ctx.figure("sweep_relu", weight_figure(results, "relu"))),
            ("Linear model, seed 0: the same panels", ctx.figure("sweep_linear", weight_figure(results, "linear"))),
            ("Features represented vs sparsity (mean, 95% CI over seeds)",
             ctx.figure("represented", represented_figure(results, cfg))),
            (f"Dimensions per feature vs 1/(1-S) (n={cfg.geometry_features}, m={cfg.geometry_hidden}, uniform importance)",
             ctx.figure("dimensions_per_feature", dimensions_figure(results, cfg))),
            ("Feature dimensionality D_i of every represented feature, with the geometric fractions",
             ctx.figure("feature_dimensionality", dimensionality_figure(results))),
        ]
        claims = [
            {"paper's result": c["claim"], "measured": c["measured"], "held": held_text(c["held_seeds"], c["seeds"])}
            for c in results["claims"]
        ]
        geometry = results["geometry"]
        geo_rows = [
            {
                "1/(1-S)": fmt(r, 2),
                "dims/feature": fmt_ci(geometry["dimensions_per_feature"][i], 3),
                "represented": fmt_ci(geometry["represented"][i], 1),
                **{f"share {f}": fmt(geometry["fraction_shares"][i][f]["mean"], 2) for f in FRACTION_NAMES},
            }
            for i, r in enumerate(geometry["inverse_density"])
        ]
        held = sum(c["held_seeds"] == c["seeds"] for c in results["claims"])
        partly = sum(0 < c["held_seeds"] < c["seeds"] for c in results["claims"])
        blocks = [
            Text(f"**Bottom line.** Of the paper's {len(results['claims'])} results checked here, {held} held in every seed, "
                 f"{partly} in some seeds and {len(results['claims']) - held - partly} in none (table below)."),
            Section("What was run", [Text(
                f"Toy models x' = ReLU(WᵀWx + b) (and the linear x' = WᵀWx + b) with n={cfg.n_features} features, "
                f"m={cfg.n_hidden} hidden dimensions and importance I_i = {cfg.importance_decay}^i, trained at sparsities "
                f"{', '.join(map(str, cfg.sparsities))} with {cfg.seeds} seeds each, all instances as one instance-batched model "
                f"({cfg.train.steps} steps, batch {cfg.train.batch_size}, lr {cfg.train.lr}, fresh data each step). "
                f"For the dimensionality sweep, n={cfg.geometry_features}, m={cfg.geometry_hidden}, uniform importance, "
                f"{cfg.geometry_points} sparsities with 1/(1-S) log-spaced from 1 to {cfg.geometry_max_inverse_density} "
                f"({cfg.geometry_train.steps} steps, batch {cfg.geometry_train.batch_size}, lr {cfg.geometry_train.lr}).")]),
            Section("The paper's results beside the measured ones", [Table(claims)]),
            Section("Sparsity sweep (ReLU and linear)", [Table(self.summary(results))]),
            Section("Dimensionality sweep", [Table(geo_rows)]),
            Section("Figures", [Figure(path, caption) for caption, path in figures]),
            Section("What the numbers mean", [Text(METRIC_NOTES.replace("{margin}", f"{FEATURE_MARGIN:g}").replace("{interval}", INTERVAL_NOTE))]),
        ]
        return Document("Superposition in toy models (Elhage et al. 2022)", blocks)


def held_text(held: int, seeds: int) -> str:
    """In how many seeds a claim held: a count of seeds, each checked on its own (not a test over seeds)."""
    return f"in {'every' if held == seeds else 'no' if held == 0 else f'{held} of {seeds}'} seed{'s' if 0 < held < seeds else ''} ({held}/{seeds})"


def weight_figure(results: dict[str, Any], activation: str) -> plt.Figure:
    """The paper's sweep figure: bars of ||W_i|| coloured by superposition over W^T W heatmaps."""
    seed0, sparsities = results["sweep"][activation]["seed0"], results["sparsities"]
    fig, axes = plt.subplots(2, len(sparsities), figsize=(2.2 * len(sparsities), 4.6), squeeze=False,
                             gridspec_kw={"height_ratios": [1, 1.1]})
    cmap = plt.get_cmap("viridis")
    for j, s in enumerate(sparsities):
        norms, superposition = np.array(seed0["norms"][j]), np.clip(seed0["superposition"][j], 0, 1)
        axes[0, j].barh(np.arange(len(norms)), norms, color=cmap(superposition))
        axes[0, j].invert_yaxis()
        axes[0, j].set(xlim=(0, 1.3), yticks=[], title=f"S = {s}", xlabel="||W_i||", ylabel="feature i (0 on top)")
        sns.heatmap(np.array(seed0["gram"][j]), ax=axes[1, j], vmin=-1, vmax=1, cmap="RdBu_r", cbar=False,
                    square=True, xticklabels=False, yticklabels=False)
        axes[1, j].set(xlabel="feature j", ylabel="feature i")
    fig.colorbar(plt.cm.ScalarMappable(cmap=cmap), ax=axes[0, :].tolist(), label="Σ_{j≠i}(Ŵ_i·W_j)²", shrink=0.8)
    fig.colorbar(plt.cm.ScalarMappable(plt.Normalize(-1, 1), "RdBu_r"), ax=axes[1, :].tolist(), label="(WᵀW)_ij", shrink=0.8)
    return fig


def represented_figure(results: dict[str, Any], cfg: SuperpositionStudyConfig) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    x = np.array(results["inverse_density"])
    for activation, color in zip(("relu", "linear"), series_colours(2)):
        stats = results["sweep"][activation]["represented"]
        mean = np.array([s["mean"] for s in stats])
        err = np.nan_to_num(np.array([[s["mean"] - s["ci_low"], s["ci_high"] - s["mean"]] for s in stats]).T)
        ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, color=color, label=activation)
    ax.axhline(cfg.n_hidden, color="grey", ls="--", lw=0.8, label=f"m = {cfg.n_hidden}")
    ax.set(xscale="log", xlabel="1/(1-S)", ylabel="features with ||W_i|| > 0.5", ylim=(0, cfg.n_features + 1))
    fig.tight_layout()
    legend_outside(fig, ax)
    return fig


def dimensions_figure(results: dict[str, Any], cfg: SuperpositionStudyConfig) -> plt.Figure:
    geometry = results["geometry"]
    x = np.array(geometry["inverse_density"])
    stats = geometry["dimensions_per_feature"]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    mean_colour, plateau_colour = series_colours(2)
    for seed_values in np.array(geometry["per_seed"]["dimensions_per_feature"]).T:
        ax.plot(x, seed_values, color=mean_colour, alpha=0.25, lw=0.8)
    ax.plot(x, [s["mean"] for s in stats], "o-", color=mean_colour, label="mean over seeds")
    ax.fill_between(x, [s["ci_low"] for s in stats], [s["ci_high"] for s in stats], color=mean_colour, alpha=0.2)
    for value, label in ((1.0, "1"), (0.5, "1/2"), (0.4, "2/5")):
        ax.axhline(value, color="grey", ls="--", lw=0.8)
        ax.text(x[-1], value, f" {label}", va="center", fontsize=8)
    sticky = geometry["antipodal_plateau"]
    if sticky["points"]:
        ax.axvspan(*sticky["inverse_density_range"], color=plateau_colour, alpha=0.15,
                   label=f"≥{cfg.antipodal_share:.0%} of features antipodal")
    ax.set(xscale="log", xlabel="1/(1-S)", ylabel="m / ||W||_F²", ylim=(0, 1.1))
    fig.tight_layout()
    legend_outside(fig, ax)
    return fig


def dimensionality_figure(results: dict[str, Any]) -> plt.Figure:
    geometry = results["geometry"]
    rng = np.random.default_rng(0)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for r, per_seed in zip(geometry["inverse_density"], geometry["dimensionality"]):
        values = np.concatenate([np.array(v) for v in per_seed]) if per_seed else np.array([])
        ax.scatter(r * np.exp(rng.normal(0, 0.03, len(values))), values, s=6, alpha=0.35, color=series_colours(1)[0])
    for label, value in GEOMETRIC_FRACTIONS.items():
        ax.axhline(value, color="grey", ls="--", lw=0.7)
        ax.text(geometry["inverse_density"][-1] * 1.08, value, label, va="center", fontsize=8)
    ax.set(xscale="log", xlabel="1/(1-S)", ylabel="D_i (represented features)", ylim=(0, 1.1))
    fig.tight_layout()
    return fig
