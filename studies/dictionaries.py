"""Study `dictionaries`: do SAEs and Switch SAEs recover planted features, and do MoE experts do as well?"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch

from toylab.analysis.clustering import kmeans, nmi
from toylab.analysis.dictionary import (
    FAMILIES, adjust_families, assignment_codes, expert_codes, matched_label_detection, score_bounds, score_dictionary,
    summarize_detection, summarize_rsa,
)
from toylab.analysis.expert_map import N_SHOWN
from toylab.analysis.specialization import ROUTER_INPUT, analysable_labels, token_activations
from toylab.analysis.stats import INTERVAL_NOTE, UNIT, compare, mean_ci
from toylab.models.sae import SAEConfig, SAETrainConfig, SparseAutoencoder, encode, train_sae
from toylab.models.superposition import ToyModelConfig, ToyTrainConfig, build_toy_model, train_toy_model
from toylab.registry import get_task, register_study
from toylab.report import (
    Document, Figure, Section, Table, Text, expert_map_section, failed_runs_section, families_section, fmt, fmt_ci, legend_outside,
    series_colours, verdict_text,
)
from toylab.study import Study, StudyContext, TrainJob
from toylab.task import IGNORE, Task
from toylab.training import TrainConfig, task_model_config

METHODS = ("sae", "switch")
METHOD_NAMES = {"sae": "SAE", "switch": "Switch SAE", "experts": "MoE expert neurons"}
SCORES = ("mmcs", "mmcs_null", "matched_cosine", "recovered", "detection_f1", "variance_explained", "l0", "dead", "dense")
QUESTION = ("Does a Switch SAE recover the planted features of a toy model of superposition as well as an SAE of the same "
            "total size?")
"""The study's primary question, answered by one comparison: MMCS with the planted features, Switch SAE minus SAE,
paired by seed, at every (size, L1) of the grid (corrected over the grid, so picking the best setting is part of the
test). The router-vs-k-means, RSA and label-detection verdicts are secondary, in `dictionary.FAMILIES`."""


METRIC_NOTES = """\
- **Planted features**: a toy model of superposition (Elhage et al. 2022) is trained on the `superposition` task; feature i's true direction in its hidden layer is W_i (column i of W), and it is active when x_i > 0. Dictionaries are trained on hidden activations h = W x and scored on fresh ones.
- **MMCS**: mean over true features of the best cosine any latent direction reaches (SAELens' synthetic evaluation); **null**: the same dictionary against as many random directions; **matched**: the mean cosine of the best one-to-one matching (Hungarian); **recovered**: share of true features some latent matches with cosine ≥ 0.9.
- **Detection F1**: per true feature, the best latent's F1 as a detector of the feature being active (latent > 0); median over features. For the token task, per label class (token has class c), mean over classes, every code (SAE, Switch SAE, expert neurons) on the same number of candidate latents (random subsets of the larger codes) and against its own null (the same latents, labels shuffled over tokens).
- **RSA reference**: a dictionary refit with another seed on the same activations; a pair of codes that agrees less than that agrees less than two runs of one dictionary do.
- **Variance explained**: 1 − |h − h'|² / |h − mean h|²; **L0**: mean nonzero latents per sample; **dead / dense**: shares of latents never firing / firing on more than 10% of samples.
- **Switch SAE** (Mudide et al. 2024): a router sends each activation to one of E expert SAEs of n/E latents; the same total dictionary size as the SAE. Its router's NMI with the planted feature groups is compared with k-means (E clusters) on the same activations.
- **Comparisons** are paired over seeds with four outcomes (more / less / equivalent within ±δ / inconclusive, from the 90% interval of the differences; at least 3 seeds), then corrected within their family (see *Primary question and families of tests*).
"""


@dataclass(frozen=True)
class DictionariesConfig:
    seeds: int = 3
    n_features: int = 20
    n_hidden: int = 10
    sparsity: float = 0.9
    n_groups: int = 4
    """Planted feature groups: a sample's active features come from one group."""
    toy_train: ToyTrainConfig = ToyTrainConfig(steps=3000, batch_size=1024, lr=3e-3)
    sizes: tuple[int, ...] = (20, 40)
    """Dictionary sizes (total latents), here 1x and 2x the number of true features."""
    l1: tuple[float, ...] = (0.003, 0.01, 0.03)
    """L1 penalties, trained together as instances of one model."""
    n_experts: int = 4
    """Experts of the Switch SAE."""
    sae_train: SAETrainConfig = SAETrainConfig(steps=2000, batch_size=256)
    n_samples: int = 20_000
    """Activations to train each dictionary on; as many fresh ones score it."""
    margin: float = 0.05
    """Equivalence margin δ for the comparisons (in MMCS, F1 and NMI units)."""
    token_task: str | None = "brackets"
    """Also: dictionaries on a token task's residual stream, against its labels and the MoE's experts (None to skip)."""
    token_model: dict[str, Any] = field(default_factory=lambda: {"d_model": 32, "n_heads": 2, "d_mlp": 64, "n_layers": 2,
                                                                 "ffn": "moe", "n_experts": 4})
    token_train: TrainConfig = TrainConfig(steps=1000, lr=3e-3)
    competence: float | None = None
    """Analyse only models whose held-out primary metric reaches this (None: the task's threshold, `Task.competence`;
    0: every model, a smoke test whose verdicts mean nothing)."""
    token_layer: int = 1
    """The MoE layer whose router input the dictionaries read."""
    token_size: int = 64
    token_l1: float = 0.01
    rsa_tokens: int = 400
    """Evaluation tokens (a fixed random subset) on which codes are compared by RSA."""
    n_eval: int = 500
    eval_seed: int = 20261124

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.n_samples < 100 or self.n_eval < 10 or self.rsa_tokens < 10:
            raise ValueError("need seeds >= 1, n_samples >= 100, n_eval >= 10 and rsa_tokens >= 10")
        if not self.n_hidden < self.n_features:
            raise ValueError(f"need n_hidden < n_features for superposition (got {self.n_hidden}, {self.n_features})")
        if not self.sizes or any(s % self.n_experts for s in (*self.sizes, self.token_size)):
            raise ValueError(f"every dictionary size must be divisible by n_experts={self.n_experts} (got {self.sizes}, {self.token_size})")
        if not self.l1 or any(not value >= 0 for value in (*self.l1, self.token_l1)):
            raise ValueError(f"l1 penalties must be >= 0 (got {self.l1}, {self.token_l1})")
        if self.margin <= 0:
            raise ValueError(f"margin must be > 0 (got {self.margin})")


def fit_planted(seed: int, h: np.ndarray, h_eval: np.ndarray, true: np.ndarray, active: np.ndarray, group: np.ndarray,
                cfg: DictionariesConfig) -> dict[str, Any]:
    """One seed of the superposition part (in a worker): every (method, size) over the L1 grid, and the Switch router vs groups."""
    scores: dict[str, Any] = {}
    grouped = group >= 0
    for method in METHODS:
        for size in cfg.sizes:
            sae_cfg = SAEConfig(d_in=h.shape[1], n_latents=size, n_instances=len(cfg.l1), n_experts=1 if method == "sae" else cfg.n_experts)
            sae = train_sae(SparseAutoencoder(sae_cfg, [seed] * len(cfg.l1)), h, replace(cfg.sae_train, seed=seed), list(cfg.l1))
            codes, out = encode(sae, h_eval)
            rows = []
            for i, l1 in enumerate(cfg.l1):
                row = {"l1": l1, **score_dictionary(sae.decoder()[i].detach(), codes[:, i].numpy(), h_eval, out[:, i].numpy(), true, active)}
                if method == "switch":
                    _, cache = sae.run_with_cache(torch.as_tensor(h_eval[grouped]), names="hook_expert_indices")
                    row["router_group_nmi"] = nmi(cache["hook_expert_indices"][:, i].numpy(), group[grouped])
                rows.append(row)
            scores[f"{method}-{size}"] = rows
    scores["kmeans_group_nmi"] = nmi(kmeans(h_eval[grouped], cfg.n_experts, seed), group[grouped])
    return scores


RSA_PAIRS = (("sae", "switch"), ("sae", "onehot"), ("sae", "router"), ("switch", "onehot"), ("switch", "router"))
"""Codes compared by RSA on the same tokens: the two dictionaries, and each against the MoE's expert assignments."""
RESEED = 1000
"""Offset of the second dictionary's seed: each dictionary is refit with seed + RESEED on the same activations,
and the RSA of the two fits is that code's reference."""
REFERENCES = {method: f"{method}_reseed" for method in METHODS}
DETECTION_CODES = (*METHODS, "experts")
CODE_NAMES = {**METHOD_NAMES, "onehot": "expert assignment (one-hot)", "router": "router probabilities"}


def fit_tokens(seed: int, resid: np.ndarray, resid_eval: np.ndarray, experts: np.ndarray, labels: dict[str, np.ndarray],
               subset: np.ndarray, cfg: DictionariesConfig) -> dict[str, Any]:
    """One seed of the token part (in a worker): label-class detection of SAE, Switch SAE and the MoE's expert neurons
    (matched latent counts, each with its null), and the codes on the RSA tokens `subset` of each dictionary and of
    the same dictionary refit with seed + RESEED on the same activations."""
    codes = {"experts": experts}
    for method in METHODS:
        sae_cfg = SAEConfig(d_in=resid.shape[1], n_latents=cfg.token_size, n_experts=1 if method == "sae" else cfg.n_experts)
        for name, init in ((method, seed), (REFERENCES[method], seed + RESEED)):
            sae = train_sae(SparseAutoencoder(sae_cfg, [init]), resid, replace(cfg.sae_train, seed=init), cfg.token_l1)
            codes[name] = encode(sae, resid_eval)[0][:, 0].numpy()
    detection = {name: matched_label_detection({code: codes[code][label != IGNORE] for code in DETECTION_CODES},
                                               label[label != IGNORE], seed)
                 for name, label in labels.items()}
    return {"detection": detection, "codes": {name: codes[name][subset] for name in (*METHODS, *REFERENCES.values())}}


def tally(verdicts: dict[str, dict[str, Any]]) -> str:
    """Labels by verdict, e.g. "more: depth, position; not shown (inconclusive): stack_top"."""
    groups = {verdict: [name for name, c in verdicts.items() if c["verdict"] == verdict]
              for verdict in ("more", "less", "equivalent", "inconclusive")}
    return "; ".join(f"{'not shown (inconclusive)' if verdict == 'inconclusive' else verdict}: {', '.join(names)}"
                     for verdict, names in groups.items() if names) or "no labels"


@register_study("dictionaries")
class Dictionaries(Study):
    """SAEs and Switch SAEs against planted features (toy superposition) and labels, next to MoE experts."""

    Config = DictionariesConfig
    fast = {"competence": 0.0, "seeds": 3, "toy_train": {"steps": 1000}, "sizes": (20,), "l1": (0.01,), "sae_train": {"steps": 300},
            "n_samples": 4000, "token_train": {"steps": 120, "n_train": 2000, "n_val": 200, "eval_every": 60},
            "token_size": 32, "n_eval": 100}
    config: DictionariesConfig

    def __init__(self, config: DictionariesConfig) -> None:
        super().__init__(config)
        self.task = get_task("superposition", n_features=config.n_features, sparsity=config.sparsity,
                             importance_decay=1.0, n_groups=config.n_groups)
        self.token_task = get_task(config.token_task) if config.token_task else None

    def check(self) -> None:
        """Besides the generic checks (the hooks read at `token_layer` among them): the token model fits the token task."""
        super().check()
        if self.token_task is not None:
            task_model_config(self.token_task, self.config.token_model)
            self.token_task.check_sample(self.config.n_eval, self.config.eval_seed)

    def token_sites(self) -> list[str]:
        """The hooks read from the token model at `token_layer`: router input, neurons, chosen experts, router logits."""
        layer = self.config.token_layer
        return [ROUTER_INPUT.format(layer=layer), *(f"blocks.{layer}.mlp.hook_{site}" for site in ("post", "expert_indices", "router_logits"))]

    def hooks(self) -> list[tuple[Task, dict[str, Any], list[str]]]:
        return [(self.token_task, self.config.token_model, self.token_sites())] if self.token_task is not None else []

    def run(self, ctx: StudyContext) -> dict[str, Any]:
        cfg = self.config
        toy = build_toy_model(ToyModelConfig(n_features=cfg.n_features, n_hidden=cfg.n_hidden, n_instances=cfg.seeds), range(cfg.seeds))
        W = train_toy_model(toy, self.task, cfg.toy_train, run_dir=ctx.run_dir("toy")).model.W.detach()
        x, _, _ = self.task.generate(cfg.n_samples, torch.Generator().manual_seed(cfg.eval_seed))
        x_eval, active, group = self.task.generate(cfg.n_samples, torch.Generator().manual_seed(cfg.eval_seed + 1))
        hidden = [torch.einsum("b f, i h f -> b i h", data[:, 0], W).numpy() for data in (x, x_eval)]  # [b, inst, m]
        per_seed = ctx.map(fit_planted, range(cfg.seeds), [hidden[0][:, s] for s in range(cfg.seeds)],
                           [hidden[1][:, s] for s in range(cfg.seeds)], [W[s].T.numpy() for s in range(cfg.seeds)],
                           [active[:, 0].numpy()] * cfg.seeds, [group[:, 0].numpy()] * cfg.seeds, [cfg] * cfg.seeds,
                           description="dictionaries on planted features")
        results: dict[str, Any] = {"planted": self.summarize_planted(per_seed), "planted_per_seed": per_seed}
        if self.token_task is not None:
            results["tokens"] = self.run_tokens(ctx)
        tokens = results.get("tokens", {})
        results["test_families"] = adjust_families(results["planted"]["grid"], tokens.get("rsa"), tokens.get("labels"))
        return results

    def summarize_planted(self, per_seed: list[dict[str, Any]]) -> dict[str, Any]:
        cfg = self.config
        summary: dict[str, Any] = {"grid": []}
        for size in cfg.sizes:
            for i, l1 in enumerate(cfg.l1):
                point: dict[str, Any] = {"size": size, "l1": l1}
                for method in METHODS:
                    runs = [seed[f"{method}-{size}"][i] for seed in per_seed]
                    point[method] = {score: mean_ci([r[score] for r in runs], bounds=score_bounds(score, size)) for score in SCORES}
                    if method == "switch":
                        point["router_group_nmi"] = mean_ci([r["router_group_nmi"] for r in runs], bounds=UNIT)
                        point["router_vs_kmeans"] = compare([r["router_group_nmi"] for r in runs],
                                                            [seed["kmeans_group_nmi"] for seed in per_seed], cfg.margin)
                point["switch_vs_sae_mmcs"] = compare([s[f"switch-{size}"][i]["mmcs"] for s in per_seed],
                                                      [s[f"sae-{size}"][i]["mmcs"] for s in per_seed], cfg.margin)
                summary["grid"].append(point)
        summary["kmeans_group_nmi"] = mean_ci([seed["kmeans_group_nmi"] for seed in per_seed], bounds=UNIT)
        return summary

    def run_tokens(self, ctx: StudyContext) -> dict[str, Any]:
        cfg, task = self.config, self.token_task
        jobs = [TrainJob(f"moe-seed{seed}", task, cfg.token_model, replace(cfg.token_train, seed=seed)) for seed in range(cfg.seeds)]
        models = ctx.train(jobs)
        site, neurons, chosen, logits = self.token_sites()
        train_batch = ctx.heldout(task, cfg.n_eval, cfg.eval_seed)  # the dictionaries' training tokens
        eval_batch = ctx.heldout(task, cfg.n_eval, cfg.eval_seed + 1, exclude=[train_batch])
        ctx.expert_map(jobs, eval_batch)
        keep = task.positions(eval_batch)
        labels = {name: eval_batch.labels[name][keep] for name in analysable_labels(task)}
        subset = np.sort(np.random.default_rng(cfg.eval_seed).permutation(int(keep.sum()))[:cfg.rsa_tokens])
        seeds = [seed for seed in range(cfg.seeds) if models[f"moe-seed{seed}"] is not None]
        inputs, routing = [], []
        for seed in seeds:
            model = models[f"moe-seed{seed}"].model
            acts = token_activations(model, task, eval_batch, [site, neurons, chosen, logits])
            experts = expert_codes(acts[neurons], acts[chosen], model.cfg.n_experts)
            inputs.append((seed, token_activations(model, task, train_batch, [site])[site], acts[site], experts))
            routing.append(assignment_codes(acts[chosen][subset], acts[logits][subset]))
        fitted = ctx.map(fit_tokens, *zip(*inputs), [labels] * len(inputs), [subset] * len(inputs), [cfg] * len(inputs),
                         description="dictionaries on the residual stream")
        per_seed = [f["detection"] for f in fitted]
        return {
            "site": site,
            "rsa_tokens": len(subset),
            "rsa": summarize_rsa([{**f["codes"], **r} for f, r in zip(fitted, routing)], RSA_PAIRS, REFERENCES, cfg.margin),
            "labels": {name: summarize_detection([s[name] for s in per_seed], DETECTION_CODES, "sae", cfg.margin) for name in labels},
            "per_seed": per_seed,
        }

    def summary(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"size": p["size"], "l1": p["l1"], **{f"MMCS {METHOD_NAMES[m]}": fmt_ci(p[m]["mmcs"]) for m in METHODS},
             **{f"L0 {METHOD_NAMES[m]}": fmt(p[m]["l0"]["mean"], 2) for m in METHODS},
             "Switch vs SAE (MMCS)": p["switch_vs_sae_mmcs"]["verdict"]}
            for p in results["planted"]["grid"]
        ]

    def figure(self, results: dict[str, Any], ctx: StudyContext) -> str:
        """MMCS and variance explained against L0, one marker per (method, size, L1), with intervals."""
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for method, color in zip(METHODS, series_colours(len(METHODS))):
            for marker, size in zip("os^v", self.config.sizes):
                points = [p for p in results["planted"]["grid"] if p["size"] == size]
                l0 = [p[method]["l0"]["mean"] for p in points]
                for ax, score in zip(axes, ("mmcs", "variance_explained")):
                    mean = np.array([p[method][score]["mean"] for p in points])
                    low = np.array([p[method][score]["ci_low"] for p in points])
                    high = np.array([p[method][score]["ci_high"] for p in points])
                    ax.errorbar(l0, mean, yerr=np.nan_to_num([mean - low, high - mean]), color=color, marker=marker,
                                label=f"{METHOD_NAMES[method]}, {size} latents", capsize=3)
        for ax, title in zip(axes, ("mean max cosine with true features", "variance explained")):
            ax.set(xlabel="L0 (latents active per sample)", ylabel=title, title=title)
        fig.tight_layout()
        legend_outside(fig, axes[0], "dictionary")
        return ctx.figure("planted_recovery", fig)

    def token_lines(self, tokens: dict[str, Any]) -> list[str]:
        """Bottom-line sentences of the token part: SAE–Switch SAE RSA against the same-activation references, and
        label detection at matched latent counts."""
        pair = tokens["rsa"]["sae-switch"]
        reference = tokens["rsa"]["reference"]
        labels = tokens["labels"]
        latents = next(iter(labels.values()))["latents"] if labels else 0
        return [
            f"- On `{self.config.token_task}`'s residual stream (`{tokens['site']}`), the SAE's and the Switch SAE's codes agree "
            f"with RSA {fmt_ci(pair['rsa'])}; two seeds of one dictionary on the same activations agree with "
            f"{fmt_ci(reference['sae'])} (SAE) and {fmt_ci(reference['switch'])} (Switch SAE). SAE–Switch SAE against the SAE's "
            f"reference: {verdict_text(pair['vs_sae_reference'])}; against the Switch SAE's: {verdict_text(pair['vs_switch_reference'])}.",
            f"- Label-class detection with {latents} candidate latents for every code, each against its own shuffled-label null "
            "(verdicts per label):",
            *[f"  - {METHOD_NAMES[code]} vs its null: {tally({n: s[code]['vs_null'] for n, s in labels.items()})}."
              for code in DETECTION_CODES],
            *[f"  - {METHOD_NAMES[code]} vs SAE, lift over the null: {tally({n: s[code]['vs_sae'] for n, s in labels.items()})}."
              for code in DETECTION_CODES[1:]],
        ]

    def token_section(self, tokens: dict[str, Any]) -> Section:
        """The token part: label detection at matched latent counts and RSA of codes, each with its reference."""
        cfg = self.config
        detection_rows = [
            {"label": name, **{column: value for code in DETECTION_CODES for column, value in (
                (METHOD_NAMES[code], fmt_ci(s[code]["f1"])), (f"{METHOD_NAMES[code]} null", fmt(s[code]["null"]["mean"])))},
             "above null (SAE / Switch / experts)": " / ".join(s[code]["vs_null"]["verdict"] for code in DETECTION_CODES),
             "Switch vs SAE (lift)": s["switch"]["vs_sae"]["verdict"], "experts vs SAE (lift)": s["experts"]["vs_sae"]["verdict"]}
            for name, s in tokens["labels"].items()
        ]
        latents = next(iter(tokens["labels"].values()))["latents"] if tokens["labels"] else 0
        reference_rows = [{"code": CODE_NAMES[name], "reference RSA (two seeds, same activations)": fmt_ci(stat)}
                          for name, stat in tokens["rsa"]["reference"].items()]
        rsa_rows = [
            {"pair": f"{CODE_NAMES[a]} – {CODE_NAMES[b]}", "RSA": fmt_ci(tokens["rsa"][f"{a}-{b}"]["rsa"]),
             "shuffled": fmt_ci(tokens["rsa"][f"{a}-{b}"]["shuffled"]),
             "vs shuffled": verdict_text(tokens["rsa"][f"{a}-{b}"]["vs_shuffled"]),
             **{f"vs {METHOD_NAMES[code]} reference": verdict_text(tokens["rsa"][f"{a}-{b}"][f"vs_{code}_reference"])
                if f"vs_{code}_reference" in tokens["rsa"][f"{a}-{b}"] else "—" for code in METHODS}}
            for a, b in RSA_PAIRS
        ]
        return Section(f"Token task `{cfg.token_task}`: label classes in the residual stream", [
            Text(f"MoE transformers (`{cfg.token_model}`, {cfg.token_train.steps} steps); dictionaries of {cfg.token_size} latents "
                 f"(L1 {cfg.token_l1}) on `{tokens['site']}`, next to the layer's expert neurons as a dictionary "
                 f"({cfg.token_model.get('n_experts', 4)} experts × their hidden units, zero where a token was not routed). "
                 f"Each cell: mean over classes of the best latent's F1 for \"the token has class c\", with {latents} candidate "
                 f"latents for every code (random subsets of the larger codes, mean over draws); *null*: the same with the labels "
                 f"shuffled over tokens. Codes are compared by their lift over their own null."),
            Table(detection_rows),
            Section(f"Representational similarity of codes (RSA on {tokens['rsa_tokens']} evaluation tokens)", [
                Text("Spearman correlation of the Euclidean dissimilarities between tokens in two codes of the same tokens; "
                     "*shuffled*: the same with one code's tokens permuted (no correspondence, about 0); *reference*: the same "
                     f"dictionary refit with seed + {RESEED} on the same activations of the same model, the agreement two codes "
                     "of those activations reach when only the seed differs. The model's routing has no reference: it is fixed "
                     "once the model is."),
                Table(rsa_rows),
                Table(reference_rows),
            ]),
        ])

    def report(self, results: dict[str, Any], ctx: StudyContext) -> Document:
        cfg, planted = self.config, results["planted"]
        rows = [
            {"size": p["size"], "L1": p["l1"], "method": METHOD_NAMES[m], "MMCS": fmt_ci(p[m]["mmcs"]), "null": fmt(p[m]["mmcs_null"]["mean"]),
             "matched": fmt_ci(p[m]["matched_cosine"]), "recovered": fmt_ci(p[m]["recovered"]), "F1": fmt_ci(p[m]["detection_f1"]),
             "var. explained": fmt_ci(p[m]["variance_explained"]), "L0": fmt_ci(p[m]["l0"], 2), "dead": fmt(p[m]["dead"]["mean"], 2)}
            for p in planted["grid"] for m in METHODS
        ]
        best = max(planted["grid"], key=lambda p: p["sae"]["mmcs"]["mean"])
        lines = [
            f"- At the best setting for the SAE ({best['size']} latents, L1 {best['l1']}), the SAE reaches MMCS {fmt_ci(best['sae']['mmcs'])} "
            f"(null {fmt(best['sae']['mmcs_null']['mean'])}) at L0 {fmt(best['sae']['l0']['mean'], 2)}, and the Switch SAE "
            f"{fmt_ci(best['switch']['mmcs'])} at L0 {fmt(best['switch']['l0']['mean'], 2)}: Switch vs SAE is {verdict_text(best['switch_vs_sae_mmcs'])}.",
            f"- The Switch SAE's router recovers the planted feature groups with NMI {fmt_ci(best['router_group_nmi'])}, against "
            f"{fmt_ci(planted['kmeans_group_nmi'])} for k-means with {cfg.n_experts} clusters on the same activations: "
            f"{verdict_text(best['router_vs_kmeans'])}.",
        ]
        blocks = [
            Section("What was run", [Text(
                f"Toy ReLU models of superposition with {cfg.n_features} features in {cfg.n_hidden} hidden dimensions, sparsity "
                f"{cfg.sparsity}, uniform importance, {cfg.n_groups} planted feature groups, {cfg.seeds} seeds ({cfg.toy_train.steps} steps). "
                f"On each seed's hidden activations ({cfg.n_samples} samples): SAEs and Switch SAEs ({cfg.n_experts} experts) of "
                f"{', '.join(map(str, cfg.sizes))} latents at L1 penalties {', '.join(map(str, cfg.l1))} ({cfg.sae_train.steps} steps each), "
                f"scored on {cfg.n_samples} fresh samples.")]),
            Section("Planted features (mean [95% CI] over seeds)", [Table(rows), Figure(self.figure(results, ctx), "recovery")]),
        ]
        if "tokens" in results:
            lines += self.token_lines(results["tokens"])
            blocks.append(self.token_section(results["tokens"]))
        primary = Table([{"size": p["size"], "L1": p["l1"], "MMCS SAE": fmt_ci(p["sae"]["mmcs"]), "MMCS Switch SAE": fmt_ci(p["switch"]["mmcs"]),
                          "Switch SAE vs SAE": verdict_text(p["switch_vs_sae_mmcs"])} for p in planted["grid"]])
        blocks[:0] = [Section("Bottom line", [Text("\n".join(lines))]),
                      families_section(f"The primary question: {QUESTION} Its one comparison is MMCS with the planted features, "
                                       "Switch SAE minus SAE paired by seed, at every (size, L1) of the grid, corrected over the "
                                       "grid so that the bottom line's best setting is no free pick.", results["test_families"], [primary],
                                       FAMILIES)]
        blocks += expert_map_section(ctx.directory, N_SHOWN, f"The map shows the MoE transformers trained on `{cfg.token_task}`.")
        blocks.append(Section("What the numbers mean", [Text(METRIC_NOTES + f"- **Intervals**: {INTERVAL_NOTE}")]))
        blocks += failed_runs_section(results["failed_runs"])
        return Document("Dictionaries against planted features", blocks)
