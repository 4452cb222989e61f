"""Study `transfer`: do dense, MoE and recurrent models learn the same representation, and do probes carry over?"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import pandas as pd

from toylab.analysis.expert_map import N_SHOWN
from toylab.analysis.similarity import (
    FAMILIES, OTHER_PAIRS, PRIMARY, adjust_families, architecture_pairs, pair_similarity, residual_streams, summarize_pairs,
)
from toylab.analysis.stats import INTERVAL_NOTE, MARGIN, UNIT, claim_everywhere, mean_ci
from toylab.models.routing import RouterName
from toylab.determinism import torch_threads
from toylab.registry import get_task, register_study
from toylab.report import (
    Document, Figure, Section, Table, Text, expert_map_section, failed_runs_section, families_section, fmt, fmt_ci, interval_bars,
    matrix_heatmaps, training_curves,
)
from toylab.report import verdict_text as seed_verdict_text
from toylab.study import Study, StudyContext, TrainJob, architecture_models, check_architectures
from toylab.training import TrainConfig, build_model, evaluate, load_trained

def verdict_text(comparison: dict[str, Any]) -> str:
    """`report.verdict_text`, counting replicates (the unit paired here) rather than seeds."""
    return seed_verdict_text(comparison).replace(" seeds", " replicates").replace("one seed,", "one replicate,")


Architecture = Literal["dense", "moe", "lstm", "gru"]
ARCHITECTURES: tuple[Architecture, ...] = get_args(Architecture)
NAMES = {"dense": "dense", "moe": "MoE", "lstm": "LSTM", "gru": "GRU"}
"""How the report names each architecture."""
PRIMARY_PAIR = "dense-moe"
"""The pair of architectures the primary question compares."""
SAME = ("equivalent", "more")
"""Verdicts that support "as similar as two seeds": within ±δ of the seed-to-seed level, or above it."""
GROUPS = {"supported": "as similar as two seeds (*equivalent* or *more* against both seed-to-seed levels)",
          "contradicted": "less similar than two seeds (*less* against either)", "not shown": "not shown (some verdict inconclusive)"}
"""How the bottom line groups the pairs of architectures by the state of the claim "as similar as two seeds"."""


def pair_name(kind: str) -> str:
    """`dense-lstm` -> `dense–LSTM`."""
    return "–".join(NAMES[arch] for arch in kind.split("-"))


def references(pair: str) -> list[str]:
    """The seed-to-seed kinds a pair of architectures is compared against, in its order: `dense-lstm` -> dense-dense, lstm-lstm."""
    return [f"{arch}-{arch}" for arch in pair.split("-")]


def layers(summary: dict[str, Any]) -> list[str]:
    """A pair's layers in order (`results.json` sorts keys as text); the last is fixed in advance, the same for every pair
    (depths never differ)."""
    return sorted(summary["similarity"], key=int)


def ordered(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """`(pair, summary)` of every pair of architectures compared, in the order of the architectures."""
    compared = results["architecture_pairs"]
    return [(pair, compared[pair]) for pair in (f"{a}-{b}" for a, b in architecture_pairs(results["architectures"])) if pair in compared]


def kind_name(kind: str) -> str:
    """`dense-dense` -> `dense vs dense (seeds)`, `dense-moe` -> `dense vs MoE`."""
    a, b = kind.split("-")
    return f"{NAMES[a]} vs {NAMES[b]}" + (" (seeds)" if a == b else "")


QUESTION = (
    "The one primary question: do dense and MoE transformers learn the same representation? It is answered by one "
    f"comparison, the family *{PRIMARY}*: the linear CKA between a dense and an MoE model at the last layer (fixed in "
    "advance, not picked from the results) against the CKA between two seeds of the same architecture, dense and MoE, "
    "paired by replicate. The claim *the same representation* is supported where both read *equivalent* within ±δ (or "
    "*more*: closer than two seeds), contradicted where either reads *less*, and not shown otherwise. Here the paired unit "
    f"is the replicate, so a verdict needs at least 3 replicates. Every other pair of architectures (e.g. dense–LSTM) is "
    f"compared the same way, against both of its architectures' seed-to-seed levels, in the secondary families *…, {OTHER_PAIRS}*."
)
"""The study's primary question and the family of tests that answers it (`toylab.analysis.similarity.PRIMARY`)."""

METRIC_NOTES = """\
- **Architectures**: {architectures}, every one with the same width and depth (`model`'s d_model and n_layers): transformers, and recurrent models whose layers add their hidden states to a residual stream of the same shape (`toylab.models.recurrent`). Depths never differ, so layer l of one model is compared with layer l of the other, and the last layer with the last.
- **Residual stream** at layer 0 = the embeddings (`blocks.0.hook_resid_pre`), layer l ≥ 1 = after block l (`blocks.{{l-1}}.hook_resid_post`), at every real token of {n_eval} held-out sequences.
- **Linear CKA** (Kornblith et al. 2019) with the debiased HSIC estimator (Song et al. 2012), on a fixed random set of {n_tokens} of those tokens: 1 when two representations agree up to rotation and scale, about 0 for independent ones.
- **RSA**: the Spearman correlation of the two representational dissimilarity matrices (Euclidean distances between every pair of the same {n_tokens} tokens).
- **Reference level**: two seeds of the same architecture. Each replicate trains two seeds (2r and 2r + 1) of every architecture; it gives one seed-to-seed pair per architecture and two pairs per pair of architectures (a with seed s and b with seed t, and a with t and b with s, averaged), so every pair has two different seeds (a seed fixes the initial embeddings and the data order, whatever the architecture) and replicates are independent. A cross-architecture score *equivalent* to both of its architectures' seed-to-seed levels is within the seed-to-seed range.
- **Probe transfer**: a multinomial logistic probe (standardized inputs) is fit on one model's residual stream for a label (50% of the sequences), and scored on the held-out 25% of that model (**in-architecture**) and of the other model mapped into the first one's space by orthogonal Procrustes with one isotropic scale, fit on the remaining 25% (disjoint from the test set; **transferred**). **Shuffled**: the same map fit to shuffled token correspondences (the control: a rotation that carries nothing). **Seed transfer**: the same probe transfer between two seeds of the probe's own architecture. **Majority**: always the training majority class.
- **Verdicts** (paired by replicate): from the per-replicate differences and their 90% Student-t interval, **more** / **less** when it lies above / below 0, **equivalent** inside ±δ (δ = {margin}, in CKA/RSA or accuracy units; two one-sided tests at the 5% level), **inconclusive** otherwise (with the smallest difference the replicates would detect); at least 3 replicates are needed for any verdict. Each verdict shown is corrected within its family of tests (Benjamini–Hochberg; see *Primary question and families of tests*). A probe **transfers** when its transferred accuracy is equivalent to (or above) its in-architecture accuracy at every layer after the embeddings, both ways; **not shown** where some verdict is inconclusive, never *does not transfer*.
- {interval}
"""


@dataclass(frozen=True)
class TransferConfig:
    task: str = "brackets"
    task_options: dict[str, Any] = field(default_factory=dict)
    replicates: int = 3
    """Independent replicates; each trains two seeds of every architecture."""
    architectures: tuple[Architecture, ...] = ("dense", "moe", "lstm")
    """The architectures compared: `dense` and `moe` transformers (both needed: the primary question compares them), and
    `lstm` and `gru` recurrent models with the transformers' d_model and n_layers."""
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
        check_architectures(self.architectures)


@register_study("transfer")
class TransferStudy(Study):
    """Residual streams of every pair of architectures (dense vs MoE primary): CKA and RSA against the seed-to-seed levels,
    and probes moved across by Procrustes."""

    Config = TransferConfig
    fast = {"competence": 0.0, "replicates": 3, "n_eval": 60, "n_tokens": 500,
            "train": {"steps": 120, "n_train": 2000, "n_val": 200, "eval_every": 60}}
    config: TransferConfig

    def __init__(self, config: TransferConfig) -> None:
        super().__init__(config)
        self.task = get_task(config.task, config.task_options)
        self.models = architecture_models(config, [arch for arch in ARCHITECTURES if arch in config.architectures])
        for options in self.models.values():  # fail early on a bad model option or a real-valued task
            build_model(self.task, options)

    def pairs(self) -> list[tuple[int, str, str, str]]:
        """`(replicate, kind, run a, run b)`: per replicate r and seeds s = 2r, t = 2r + 1, one seed pair `x-x` per architecture
        x and two `x-y` per pair of architectures (x seed s with y seed t, and x t with y s). Every pair has two different
        seeds (a seed fixes the initial embeddings and the data order, whatever the architecture)."""
        out = []
        for r in range(self.config.replicates):
            s, t = 2 * r, 2 * r + 1
            out += [(r, f"{x}-{x}", f"{x}-seed{s}", f"{x}-seed{t}") for x in self.models]
            out += [(r, f"{x}-{y}", f"{x}-seed{u}", f"{y}-seed{v}") for x, y in architecture_pairs(list(self.models))
                    for u, v in ((s, t), (t, s))]
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
        compared = summarize_pairs([replicates[r] for r in sorted(replicates)], list(self.models), cfg.margin)
        families = adjust_families(compared, PRIMARY_PAIR)
        return {
            "task": {"name": self.task.name, "options": self.task.options, "primary_metric": self.task.primary_metric},
            "architectures": list(self.models),
            "performance": {job.key: performance.get(job.key) for job in jobs},
            "performance_summary": {
                kind: {metric: mean_ci([p[metric] for key, p in performance.items() if key.startswith(f"{kind}-")],
                                       bounds=None if metric == "loss" else UNIT)
                       for metric in next((p for key, p in performance.items() if key.startswith(f"{kind}-")), {})}
                for kind in self.models
            },
            "architecture_pairs": compared,
            "test_families": families,
            "pairs": [{"replicate": r, "kind": kind, "a": a, "b": b, "layers": rows} for (r, kind, a, b), rows in zip(pairs, found)],
            "runs": {job.key: str(ctx.run_dir(job.key).relative_to(ctx.directory)) for job in jobs},
        }

    def similarity_rows(self, results: dict[str, Any], every_layer: bool) -> list[dict[str, Any]]:
        """Per pair of architectures, layer (the last only unless `every_layer`), metric and seed-to-seed reference: the
        verdict, the score across the pair and the reference level."""
        return [
            {"pair": pair_name(pair), "layer": layer, "metric": metric.upper(), "reference": f"{NAMES[kind.split('-')[0]]} seeds",
             "verdict": v["verdict"], "across": fmt_ci(s[pair]), "reference level": fmt_ci(s[kind])}
            for pair, summary in ordered(results) for layer in (layers(summary) if every_layer else layers(summary)[-1:])
            for metric, s in summary["similarity"][layer].items() for kind in references(pair) for v in [s["verdicts"][kind]]
        ]

    def summary(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        return self.similarity_rows(results, every_layer=False)

    def probe_rows(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"pair": pair_name(pair), "label": label, "layer": layer, "probe": direction, "in-architecture": fmt_ci(p["in_architecture"]),
             "transferred": fmt_ci(p["transfer"]), "seed transfer": fmt_ci(p["seed_transfer"]), "shuffled": fmt_ci(p["shuffled"]),
             "majority": fmt(p["baseline"]["mean"]), "vs in-arch.": p["vs_in_architecture"]["verdict"],
             "vs shuffled": p["vs_shuffled"]["verdict"], "vs seed transfer": p["vs_seed_transfer"]["verdict"]}
            for pair, summary in ordered(results) for label, by_layer in summary["probes"].items()
            for layer in layers(summary) for direction, p in by_layer[layer].items()
        ]

    def pair_states(self, results: dict[str, Any]) -> dict[str, str]:
        """Per pair of architectures, the state of the claim "as similar as two seeds": its CKA at the last layer *equivalent*
        to (or *more* than) both of its architectures' seed-to-seed levels (corrected verdicts)."""
        return {pair: claim_everywhere([v["verdict"] for v in summary["similarity"][layers(summary)[-1]]["cka"]["verdicts"].values()], SAME)
                for pair, summary in ordered(results)}

    def claims(self, results: dict[str, Any]) -> dict[str, dict[str, dict[str, str]]]:
        """Per pair of architectures and label, the states of two claims over every layer after the embeddings and both
        directions: `transfers` (transferred accuracy equivalent to or above the in-architecture one) and `carries` (above
        the shuffled alignment)."""
        out: dict[str, dict[str, dict[str, str]]] = {}
        for pair, summary in ordered(results):
            for label, by_layer in summary["probes"].items():
                deep = [p for layer, directions in by_layer.items() if layer != "0" for p in directions.values()]
                out.setdefault(pair, {})[label] = {
                    "transfers": claim_everywhere([p["vs_in_architecture"]["verdict"] for p in deep], SAME),
                    "carries": claim_everywhere([p["vs_shuffled"]["verdict"] for p in deep], ("more",))}
        return out

    def bottom_line(self, results: dict[str, Any]) -> str:
        compared = results["architecture_pairs"]
        if not compared:
            return "No replicate finished all the runs of any pair, so there is nothing to compare."
        states, claims = self.pair_states(results), self.claims(results)
        if PRIMARY_PAIR in compared:
            summary = compared[PRIMARY_PAIR]
            cka = summary["similarity"][layers(summary)[-1]]["cka"]
            primary = (f"On `{self.task.name}` over {summary['replicates']} replicates: do dense and MoE transformers learn the "
                       f"same representation (at the last layer, dense–MoE CKA as high as between two seeds of one architecture)? "
                       f"**{states[PRIMARY_PAIR]}**. The dense–MoE CKA is {fmt_ci(cka[PRIMARY_PAIR])} against "
                       f"{fmt_ci(cka['dense-dense'])} between dense seeds ({verdict_text(cka['verdicts']['dense-dense'])}) and "
                       f"{fmt_ci(cka['moe-moe'])} between MoE seeds ({verdict_text(cka['verdicts']['moe-moe'])}).")
        else:
            primary = f"On `{self.task.name}`, no replicate finished its dense and MoE runs, so the primary question has no answer."
        groups = " ".join(f"{words}: {', '.join(pair_name(p) for p, s in states.items() if s == state) or 'none'}."
                          for state, words in GROUPS.items())

        def probes(claim: str) -> str:
            def labels(pair: str) -> str:
                found = {label: c[claim] for label, c in claims[pair].items()}
                return " / ".join(f"{state} for {', '.join(f'`{n}`' for n, s in found.items() if s == state)}"
                                  for state in dict.fromkeys(found.values()))
            return "; ".join(f"{pair_name(pair)}: {labels(pair)}" for pair in claims) or "n/a"

        return (f"{primary} Every pair of architectures, by its CKA at the last layer against both of its architectures' "
                f"seed-to-seed levels: {groups} Secondary, probes moved across architectures by Procrustes, at every layer "
                f"after the embeddings and both ways: *transfers* (within ±{self.config.margin:g} of, or above, the "
                f"in-architecture accuracy) — {probes('transfers')}; *carries the label* (above the shuffled alignment) — "
                f"{probes('carries')}.")

    def similarity_matrices(self, results: dict[str, Any]) -> tuple[dict[str, pd.DataFrame], dict[str, pd.DataFrame]]:
        """Per metric, architecture x architecture at the last layer: the mean score between two seeds of one architecture
        (diagonal) or across two (off it), and a note: "seeds", or the verdict of the pair against the row's seed level."""
        names = [NAMES[arch] for arch in results["architectures"]]
        values, notes = {}, {}
        for metric in ("cka", "rsa"):
            value = pd.DataFrame(float("nan"), index=names, columns=names)
            note = pd.DataFrame("", index=names, columns=names)
            for pair, summary in ordered(results):
                s = summary["similarity"][layers(summary)[-1]][metric]
                a, b = pair.split("-")
                for row, column in ((a, b), (b, a)):
                    value.loc[NAMES[row], NAMES[column]] = s[pair]["mean"]
                    note.loc[NAMES[row], NAMES[column]] = s["verdicts"][f"{row}-{row}"]["verdict"]
                    value.loc[NAMES[row], NAMES[row]] = s[f"{row}-{row}"]["mean"]
                    note.loc[NAMES[row], NAMES[row]] = "seeds"
            values[metric.upper()], notes[metric.upper()] = value, note
        return values, notes

    def report(self, results: dict[str, Any], ctx: StudyContext) -> Document:
        cfg, task, compared = self.config, self.task, ordered(results)
        figures = []
        if compared:
            figures.append(("Every pair of architectures at the last layer (mean over replicates): two seeds of one architecture "
                            "on the diagonal, two architectures off it, with the corrected verdict against the seed-to-seed level "
                            "of the row's architecture",
                            ctx.figure("similarity_matrix", matrix_heatmaps(*self.similarity_matrices(results),
                                                                            "Similarity at the last layer", "mean over replicates",
                                                                            "architecture"))))
            frame = pd.DataFrame([{"layer": layer, "pair": kind_name(kind), "metric": metric.upper(), **s[kind]}
                                  for pair, summary in compared for layer in layers(summary)
                                  for metric, s in summary["similarity"][layer].items() for kind in [*references(pair), pair]]).drop_duplicates(
                                      ["layer", "pair", "metric"])
            figures.append(("CKA and RSA per layer: across architectures vs between seeds (mean, 95% CI over replicates)",
                            ctx.figure("similarity", interval_bars(frame, "layer", "pair", "metric", "similarity"))))
            for pair, summary in compared:
                last = layers(summary)[-1]
                frame = pd.DataFrame([{"label": label, "probe": f"{direction}, {name}", "layer": layer, **p[key]}
                                      for label, layers in summary["probes"].items() for layer, directions in layers.items()
                                      if layer == last for direction, p in directions.items()
                                      for key, name in (("in_architecture", "in-arch."), ("transfer", "transferred"), ("shuffled", "shuffled"))])
                if not frame.empty:
                    name = "probe_transfer" if pair == PRIMARY_PAIR else f"probe_transfer_{pair}"
                    figures.append((f"{pair_name(pair)}: probe accuracy at layer {last}: in-architecture, transferred by Procrustes, "
                                    "and the shuffled control", ctx.figure(name, interval_bars(frame, "label", "probe", "layer", "accuracy"))))
        logs = {run: ctx.directory / path / "metrics.csv" for run, path in results["runs"].items() if (ctx.directory / path / "metrics.csv").is_file()}
        if logs:
            figures.append(("Training curves", ctx.figure("training_curves", training_curves(logs, ["train_loss", f"val_{task.primary_metric}"]))))
        perf_rows = [{"model": kind, **{metric: fmt_ci(stat, 4) for metric, stat in metrics.items()}}
                     for kind in results["architectures"] for metrics in [results["performance_summary"][kind]]]
        similarity_lines = [
            f"- {pair_name(pair)}, layer {layer}, {metric.upper()}: "
            + "; ".join(f"vs {kind_name(kind)}: {verdict_text(s['verdicts'][kind])}" for kind in references(pair)) + "."
            for pair, summary in compared for layer in layers(summary)[-1:]
            for metric, s in summary["similarity"][layer].items()
        ]
        primary = results["architecture_pairs"].get(PRIMARY_PAIR)
        primary_rows = [
            {"layer": layer, "reference": kind_name(kind), "dense vs MoE": fmt_ci(cka[PRIMARY_PAIR]), "reference CKA": fmt_ci(cka[kind]),
             "verdict": verdict_text(v)}
            for layer in (layers(primary)[-1:] if primary else []) for cka in [primary["similarity"][layer]["cka"]]
            for kind in references(PRIMARY_PAIR) for v in [cka["verdicts"][kind]]
        ]
        recurrent = [NAMES[arch] for arch in self.models if "arch" in self.models[arch]]
        blocks = [
            Text(f"**Bottom line.** {self.bottom_line(results)}"),
            families_section(QUESTION, results["test_families"], [Table(primary_rows)] if primary_rows else [], FAMILIES),
            Section("What was run", [Text(
                f"Task `{task.name}` with options `{task.options}`. {task.describe()}\n\n"
                f"{cfg.replicates} replicates, each with two seeds (2r and 2r + 1) of every architecture: "
                f"{', '.join(NAMES[arch] for arch in self.models)}. The transformers share the options `{cfg.model}` (MoE: "
                f"{cfg.n_experts} experts, top-{cfg.top_k}, router `{cfg.router}`)"
                + (f"; the recurrent models ({', '.join(recurrent)}) have the same d_model and n_layers" if recurrent else "")
                + f". Every model trained for {cfg.train.steps} steps (batch {cfg.train.batch_size}, lr {cfg.train.lr}). Residual "
                f"streams were compared on the real tokens of {cfg.n_eval} held-out sequences (seed {cfg.eval_seed}); CKA and "
                f"RSA on {cfg.n_tokens} of them.")]),
            Section("Model performance (held-out, mean [95% CI] over seeds)", [Table(perf_rows)]),
            Section("Is each pair's similarity within the seed-to-seed range?",
                    [Text("\n".join(similarity_lines) or "(no replicate finished)"),
                     Text("Every layer (layer 0: the embeddings):"), Table(self.similarity_rows(results, every_layer=True))]),
            Section("Which labels' probes transfer?", [Table(self.probe_rows(results))]),
            *expert_map_section(ctx.directory, N_SHOWN),
            Section("Figures", [Figure(path, caption) for caption, path in figures]),
            Section("What the numbers mean", [Text(METRIC_NOTES.format(
                architectures=", ".join(NAMES[arch] for arch in self.models), n_eval=cfg.n_eval, n_tokens=cfg.n_tokens,
                margin=cfg.margin, interval=INTERVAL_NOTE))]),
        ]
        blocks += failed_runs_section(results["failed_runs"])
        return Document(f"Do dense and MoE transformers learn the same representation? (`{task.name}`)", blocks)
