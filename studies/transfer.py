"""Study `transfer`: do dense and MoE transformers learn the same representation, and do probes carry over?"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from toylab.analysis.expert_map import N_SHOWN
from toylab.analysis.similarity import (
    FAMILIES, PRIMARY, adjust_families, pair_similarity, residual_streams, summarize_similarity,
)
from toylab.analysis.stats import INTERVAL_NOTE, MARGIN, UNIT, claim_everywhere, mean_ci
from toylab.models.routing import RouterName
from toylab.determinism import torch_threads
from toylab.registry import get_task, register_study
from toylab.report import (
    Document, Figure, Section, Table, Text, expert_map_section, failed_runs_section, families_section, fmt, fmt_ci, interval_bars,
    training_curves,
)
from toylab.report import verdict_text as seed_verdict_text
from toylab.study import Study, StudyContext, TrainJob, dense_and_moe
from toylab.training import TrainConfig, build_model, evaluate, load_trained

def verdict_text(comparison: dict[str, Any]) -> str:
    """`report.verdict_text`, counting replicates (the unit paired here) rather than seeds."""
    return seed_verdict_text(comparison).replace(" seeds", " replicates").replace("one seed,", "one replicate,")


KINDS = {"dense-dense": "dense vs dense (seeds)", "moe-moe": "MoE vs MoE (seeds)", "dense-moe": "dense vs MoE"}
SAME = ("equivalent", "more")
"""Verdicts that support "as similar as two seeds": within ±δ of the seed-to-seed level, or above it."""
QUESTION = (
    "The one primary question: do dense and MoE transformers learn the same representation? It is answered by one "
    f"comparison, the family *{PRIMARY}*: the linear CKA between a dense and an MoE model at the last layer (fixed in "
    "advance, not picked from the results) against the CKA between two seeds of the same architecture, dense and MoE, "
    "paired by replicate. The claim *the same representation* is supported where both read *equivalent* within ±δ (or "
    "*more*: closer than two seeds), contradicted where either reads *less*, and not shown otherwise. Here the paired unit "
    "is the replicate, so a verdict needs at least 3 replicates."
)
"""The study's primary question and the family of tests that answers it (`toylab.analysis.similarity.PRIMARY`)."""

METRIC_NOTES = """\
- **Residual stream** at layer 0 = the embeddings (`blocks.0.hook_resid_pre`), layer l ≥ 1 = after block l (`blocks.{{l-1}}.hook_resid_post`), at every real token of {n_eval} held-out sequences.
- **Linear CKA** (Kornblith et al. 2019) with the debiased HSIC estimator (Song et al. 2012), on a fixed random set of {n_tokens} of those tokens: 1 when two representations agree up to rotation and scale, about 0 for independent ones.
- **RSA**: the Spearman correlation of the two representational dissimilarity matrices (Euclidean distances between every pair of the same {n_tokens} tokens).
- **Reference level**: two seeds of the same architecture. Each replicate trains two dense and two MoE seeds; it gives one dense–dense pair, one MoE–MoE pair and two dense–MoE pairs (dense s with MoE t and dense t with MoE s, averaged), so every pair has two different seeds (a seed fixes the initial embeddings and the data order, whatever the architecture) and replicates are independent. A cross-architecture score *equivalent* to the dense–dense one is within the seed-to-seed range.
- **Probe transfer**: a multinomial logistic probe (standardized inputs) is fit on one model's residual stream for a label (50% of the sequences), and scored on the held-out 25% of that model (**in-architecture**) and of the other model mapped into the first one's space by orthogonal Procrustes with one isotropic scale, fit on the remaining 25% (disjoint from the test set; **transferred**). **Shuffled**: the same map fit to shuffled token correspondences (the control: a rotation that carries nothing). **Seed transfer**: the same probe transfer between two seeds of the probe's own architecture. **Majority**: always the training majority class.
- **Verdicts** (paired by replicate): from the per-replicate differences and their 90% Student-t interval, **more** / **less** when it lies above / below 0, **equivalent** inside ±δ (δ = {margin}, in CKA/RSA or accuracy units; two one-sided tests at the 5% level), **inconclusive** otherwise (with the smallest difference the replicates would detect); at least 3 replicates are needed for any verdict. Each verdict shown is corrected within its family of tests (Benjamini–Hochberg; see *Primary question and families of tests*). A probe **transfers** when its transferred accuracy is equivalent to (or above) its in-architecture accuracy at every layer after the embeddings, both ways; **not shown** where some verdict is inconclusive, never *does not transfer*.
- {interval}
"""


@dataclass(frozen=True)
class TransferConfig:
    task: str = "brackets"
    task_options: dict[str, Any] = field(default_factory=dict)
    replicates: int = 3
    """Independent replicates; each trains two dense and two MoE seeds."""
    model: dict[str, Any] = field(default_factory=lambda: {"d_model": 32, "n_heads": 2, "d_mlp": 64, "n_layers": 2})
    """Options shared by the dense and the MoE transformer (see `TransformerConfig`); the same width, for Procrustes."""
    n_experts: int = 4
    top_k: int = 1
    router: RouterName = "learned"
    router_label: str | None = None
    train: TrainConfig = TrainConfig(steps=1000, lr=3e-3)
    competence: float | None = None
    """Analyse only models whose held-out primary metric reaches this (None: the task's threshold, `Task.competence`;
    0: every model, a smoke test whose verdicts mean nothing)."""
    n_eval: int = 300
    """Held-out sequences whose real tokens are compared and probed (the same for every model)."""
    n_tokens: int = 2000
    """Tokens (a fixed random subset) on which CKA and RSA are computed."""
    margin: float = MARGIN
    eval_seed: int = 20261121

    def __post_init__(self) -> None:
        if self.replicates < 1 or self.n_eval < 8 or self.n_tokens < 10:
            raise ValueError("replicates must be >= 1, n_eval >= 8 and n_tokens >= 10")
        if not 0 < self.margin < 1:
            raise ValueError(f"margin must be in (0, 1) (got {self.margin})")


@register_study("transfer")
class TransferStudy(Study):
    """Dense vs MoE residual streams: CKA and RSA against the seed-to-seed level, and probes moved across by Procrustes."""

    Config = TransferConfig
    fast = {"competence": 0.0, "replicates": 3, "n_eval": 60, "n_tokens": 500,
            "train": {"steps": 120, "n_train": 2000, "n_val": 200, "eval_every": 60}}
    config: TransferConfig

    def __init__(self, config: TransferConfig) -> None:
        super().__init__(config)
        self.task = get_task(config.task, config.task_options)
        self.models = dense_and_moe(config)
        for options in self.models.values():  # fail early on a bad model option or a real-valued task
            build_model(self.task, options)

    def pairs(self) -> list[tuple[int, str, str, str]]:
        """`(replicate, kind, run a, run b)`: per replicate r, seeds s = 2r and t = 2r + 1 of each architecture. Every
        pair has two different seeds (a seed fixes the initial embeddings and the data order in both architectures)."""
        out = []
        for r in range(self.config.replicates):
            s, t = 2 * r, 2 * r + 1
            out += [(r, "dense-dense", f"dense-seed{s}", f"dense-seed{t}"), (r, "moe-moe", f"moe-seed{s}", f"moe-seed{t}"),
                    (r, "dense-moe", f"dense-seed{s}", f"moe-seed{t}"), (r, "dense-moe", f"dense-seed{t}", f"moe-seed{s}")]
        return out

    def compare_runs(self, dir_a: Path, dir_b: Path, seed: int) -> list[dict[str, Any]]:
        """One pair of finished runs (in a worker, on one torch thread): `pair_similarity` of their residual streams."""
        cfg, task = self.config, self.task
        batch = task.sample_split(cfg.n_eval, cfg.eval_seed, "heldout")
        with torch_threads(1):
            a, b = (residual_streams(load_trained(d).model, task, batch) for d in (dir_a, dir_b))
            return pair_similarity(a, b, task, batch, cfg.n_tokens, seed)

    def evaluate_run(self, job: TrainJob, run_dir: Path) -> dict[str, float]:
        with torch_threads(1):
            return evaluate(load_trained(run_dir).model, self.task, self.task.sample_split(self.config.n_eval, self.config.eval_seed, "heldout"))

    def run(self, ctx: StudyContext) -> dict[str, Any]:
        cfg = self.config
        jobs = [TrainJob(f"{kind}-seed{seed}", self.task, options, replace(cfg.train, seed=seed))
                for seed in range(2 * cfg.replicates) for kind, options in reversed(self.models.items())]
        ctx.train(jobs)
        performance = ctx.analyse_runs(jobs, self.evaluate_run, "evaluating")
        ctx.expert_map([job for job in jobs if job.key.startswith("moe-seed")], ctx.heldout(self.task, cfg.n_eval, cfg.eval_seed))
        pairs = [p for p in self.pairs() if p[2] in performance and p[3] in performance]
        found = ctx.map(self.compare_runs, [ctx.run_dir(p[2]) for p in pairs], [ctx.run_dir(p[3]) for p in pairs],
                        [p[0] for p in pairs], description="comparing")
        replicates: dict[int, dict[str, list]] = {}
        for (r, kind, _, _), rows in zip(pairs, found):
            replicates.setdefault(r, {}).setdefault(kind, []).append(rows)
        complete = [replicates[r] for r in sorted(replicates) if set(replicates[r]) == set(KINDS)]
        summary = summarize_similarity(complete, margin=cfg.margin) if complete else {"similarity": {}, "probes": {}}
        families = adjust_families(summary)
        return {
            "task": {"name": self.task.name, "options": self.task.options, "primary_metric": self.task.primary_metric},
            "performance": {job.key: performance.get(job.key) for job in jobs},
            "performance_summary": {
                kind: {metric: mean_ci([p[metric] for key, p in performance.items() if key.startswith(f"{kind}-")],
                                       bounds=None if metric == "loss" else UNIT)
                       for metric in next((p for key, p in performance.items() if key.startswith(f"{kind}-")), {})}
                for kind in self.models
            },
            **summary,
            "test_families": families,
            "replicates_complete": len(complete),
            "pairs": [{"replicate": r, "kind": kind, "a": a, "b": b, "layers": rows} for (r, kind, a, b), rows in zip(pairs, found)],
            "runs": {job.key: str(ctx.run_dir(job.key).relative_to(ctx.directory)) for job in jobs},
        }

    def summary(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"layer": layer, "metric": metric.upper(), **{name: fmt_ci(s[kind]) for kind, name in KINDS.items()},
             "cross vs dense seeds": s["verdicts"]["dense-dense"]["verdict"], "cross vs MoE seeds": s["verdicts"]["moe-moe"]["verdict"]}
            for layer, metrics in results["similarity"].items() for metric, s in metrics.items()
        ]

    def probe_rows(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"label": label, "layer": layer, "probe": direction, "in-architecture": fmt_ci(p["in_architecture"]),
             "transferred": fmt_ci(p["transfer"]), "seed transfer": fmt_ci(p["seed_transfer"]), "shuffled": fmt_ci(p["shuffled"]),
             "majority": fmt(p["baseline"]["mean"]), "vs in-arch.": p["vs_in_architecture"]["verdict"],
             "vs shuffled": p["vs_shuffled"]["verdict"], "vs seed transfer": p["vs_seed_transfer"]["verdict"]}
            for label, layers in results["probes"].items() for layer, directions in layers.items() for direction, p in directions.items()
        ]

    def claims(self, results: dict[str, Any]) -> dict[str, dict[str, str]]:
        """Per label, the states of two claims over every layer after the embeddings and both directions: `transfers`
        (transferred accuracy equivalent to or above the in-architecture one) and `carries` (above the shuffled alignment)."""
        out = {}
        for label, layers in results["probes"].items():
            deep = [p for layer, directions in layers.items() if layer != "0" for p in directions.values()]
            out[label] = {"transfers": claim_everywhere([p["vs_in_architecture"]["verdict"] for p in deep], SAME),
                          "carries": claim_everywhere([p["vs_shuffled"]["verdict"] for p in deep], ("more",))}
        return out

    def bottom_line(self, results: dict[str, Any]) -> str:
        if not results["similarity"]:
            return "No replicate finished all its pairs, so there is nothing to compare."
        last = list(results["similarity"])[-1]
        cka = results["similarity"][last]["cka"]
        same = claim_everywhere([v["verdict"] for v in cka["verdicts"].values()], SAME)
        claims = self.claims(results)

        def states(claim: str) -> str:
            found = {label: c[claim] for label, c in claims.items()}
            return "; ".join(f"{state} for {', '.join(f'`{n}`' for n, s in found.items() if s == state)}"
                             for state in dict.fromkeys(found.values())) or "n/a"

        return (f"On `{self.task.name}` over {results['replicates_complete']} replicates: do dense and MoE transformers learn the "
                f"same representation (at the last layer, dense–MoE CKA as high as between two seeds of one architecture)? "
                f"**{same}**. The dense–MoE CKA is {fmt_ci(cka['dense-moe'])} against {fmt_ci(cka['dense-dense'])} between dense "
                f"seeds ({verdict_text(cka['verdicts']['dense-dense'])}) and {fmt_ci(cka['moe-moe'])} between MoE seeds "
                f"({verdict_text(cka['verdicts']['moe-moe'])}). Secondary, probes moved across architectures by Procrustes, "
                f"at every layer after the embeddings and both ways: *transfers* (within ±{self.config.margin:g} of, or above, "
                f"the in-architecture accuracy): {states('transfers')}; *carries the label* (above the shuffled alignment): "
                f"{states('carries')}.")

    def report(self, results: dict[str, Any], ctx: StudyContext) -> Document:
        cfg, task = self.config, self.task
        figures = []
        if results["similarity"]:
            frame = pd.DataFrame([{"layer": layer, "pair": KINDS[kind], "metric": metric.upper(), **s[kind]}
                                  for layer, metrics in results["similarity"].items() for metric, s in metrics.items() for kind in KINDS])
            figures.append(("CKA and RSA per layer: across architectures vs between seeds (mean, 95% CI over replicates)",
                            ctx.figure("similarity", interval_bars(frame, "layer", "pair", "metric", "similarity"))))
            last = list(results["similarity"])[-1]
            frame = pd.DataFrame([{"label": label, "probe": f"{direction}, {name}", "layer": layer, **p[key]}
                                  for label, layers in results["probes"].items() for layer, directions in layers.items() if layer == last
                                  for direction, p in directions.items()
                                  for key, name in (("in_architecture", "in-arch."), ("transfer", "transferred"), ("shuffled", "shuffled"))])
            figures.append((f"Probe accuracy at layer {last}: in-architecture, transferred by Procrustes, and the shuffled control",
                            ctx.figure("probe_transfer", interval_bars(frame, "label", "probe", "layer", "accuracy"))))
        logs = {run: ctx.directory / path / "metrics.csv" for run, path in results["runs"].items() if (ctx.directory / path / "metrics.csv").is_file()}
        if logs:
            figures.append(("Training curves", ctx.figure("training_curves", training_curves(logs, ["train_loss", f"val_{task.primary_metric}"]))))
        perf_rows = [{"model": kind, **{metric: fmt_ci(stat, 4) for metric, stat in metrics.items()}}
                     for kind, metrics in results["performance_summary"].items()]
        similarity_lines = [
            f"- Layer {layer}, {metric.upper()}: dense–MoE vs dense seeds: {verdict_text(s['verdicts']['dense-dense'])}; "
            f"vs MoE seeds: {verdict_text(s['verdicts']['moe-moe'])}."
            for layer, metrics in results["similarity"].items() for metric, s in metrics.items()
        ]
        primary_rows = [
            {"layer": layer, "reference": KINDS[kind], "dense vs MoE": fmt_ci(cka["dense-moe"]), "reference CKA": fmt_ci(cka[kind]),
             "verdict": verdict_text(v)}
            for layer in list(results["similarity"])[-1:] for cka in [results["similarity"][layer]["cka"]]
            for kind, v in cka["verdicts"].items()
        ]
        blocks = [
            Text(f"**Bottom line.** {self.bottom_line(results)}"),
            families_section(QUESTION, results["test_families"], [Table(primary_rows)] if primary_rows else [], FAMILIES),
            Section("What was run", [Text(
                f"Task `{task.name}` with options `{task.options}`. {task.describe()}\n\n"
                f"{cfg.replicates} replicates, each with two dense and two MoE transformers ({cfg.n_experts} experts, top-{cfg.top_k}, "
                f"router `{cfg.router}`; seeds 2r and 2r + 1) with shared options `{cfg.model}`, trained for {cfg.train.steps} steps "
                f"(batch {cfg.train.batch_size}, lr {cfg.train.lr}). Residual streams were compared on the real tokens of {cfg.n_eval} "
                f"held-out sequences (seed {cfg.eval_seed}); CKA and RSA on {cfg.n_tokens} of them.")]),
            Section("Model performance (held-out, mean [95% CI] over seeds)", [Table(perf_rows)]),
            Section("Is dense–MoE similarity within the seed-to-seed range?",
                    [Text("\n".join(similarity_lines) or "(no replicate finished)"), Table(self.summary(results))]),
            Section("Which labels' probes transfer?", [Table(self.probe_rows(results))]),
            *expert_map_section(ctx.directory, N_SHOWN),
            Section("Figures", [Figure(path, caption) for caption, path in figures]),
            Section("What the numbers mean", [Text(METRIC_NOTES.format(n_eval=cfg.n_eval, n_tokens=cfg.n_tokens, margin=cfg.margin,
                                                                        interval=INTERVAL_NOTE))]),
        ]
        blocks += failed_runs_section(results["failed_runs"])
        return Document(f"Do dense and MoE transformers learn the same representation? (`{task.name}`)", blocks)
