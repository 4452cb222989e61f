"""Study `function-state`: do experts pull out function while state stays in the residual stream?"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from toylab.analysis.expert_map import N_SHOWN
from toylab.analysis.function_state import (
    FAMILIES, PLANTED, PLANTED_SHARE, SITES, adjust_function_state, function_state, summarize_function_state,
)
from toylab.analysis.stats import INTERVAL_NOTE, MARGIN, UNIT, claim_state, mean_ci
from toylab.config import build
from toylab.errors import ToylabError
from toylab.models import TransformerConfig
from toylab.registry import get_task, register_study
from toylab.report import (
    Document, Figure, Section, Table, Text, expert_map_section, failed_runs_section, families_section, fmt, fmt_ci, interval_bars,
    training_curves, verdict_text,
)
from toylab.study import Study, StudyContext, TrainJob
from toylab.training import TrainConfig, evaluate, load_trained

QUESTION = ("The study's one primary question: do an MoE's experts pull out function (what the model computes) while "
            "state stays in the residual stream, more than a dense MLP does? The one comparison that answers it: per FFN "
            "layer, the MoE's excess contrast (function minus state labels' share at the FFN output relative to the residual "
            "stream, beyond the planted site of equal shares) vs the dense model's, paired by seed. Every layer is tested and "
            "the layers form one family, so no layer is picked after the fact; the sites are fixed in advance.")
"""The primary question of `function-state` and the family that answers it (`function_state.FAMILIES`), for the report."""

METRIC_NOTES = """\
- **Sites** of each FFN layer l: `router_input` = `blocks.{{l}}.ln2.hook_normalized` (what the router and experts read); `ffn_out` = `blocks.{{l}}.hook_mlp_out`, for the MoE the chosen experts' outputs `hook_expert_out` weighted by `hook_expert_weights` and summed, as they enter the residual stream (for the dense model, its MLP output); `resid_post` = `blocks.{{l}}.hook_resid_post`.
- **Probe**: multinomial logistic regression on standardized activations, fit on 75% of the held-out sequences and scored on the rest (split by sequence); multi-hot labels as one class per set. **Baseline**: the majority class; **shuffled**: the same probe on permuted labels.
- **Share** of a label at a site: (accuracy − control) / (1 − control) with control = max(baseline, shuffled): 0 at the control, 1 for a perfect read.
- **Relative share**: share(ffn_out) − share(resid_post), averaged over the labels of one kind (`state`: readable off the input; `function`: computed). **Contrast** = relative share of function labels − that of state labels. **Planted reference**: the same contrast for `planted`, a synthetic site per label where each token's class is written with probability {share} (else the majority class), so every label has share {share}; it is probed like the model's sites and divided by the same residual stream. **Excess** = contrast − planted reference: above 0 means the FFN output favours function labels beyond what equal shares give.
- **Verdicts** (paired by seed, at least 3 seeds): **more** / **less** (a paired t-test), **equivalent** inside ±δ (two one-sided tests; δ = {margin} in share), **inconclusive** otherwise (with the smallest difference the seeds would detect), each at the 5% level after the Benjamini–Hochberg correction within its family (see *Primary question and families of tests*); intervals are the uncorrected 90% Student-t intervals. The primary result, *MoE vs dense*, compares the two models' excess at the same layer; each model's contrast is compared with its planted reference.
- **Claims** read **supported** (*more*), **contradicted** (*equivalent* within ±δ, or *less*) or **not shown** (*inconclusive*; never *no*).
- {interval}
"""


@dataclass(frozen=True)
class FunctionStateConfig:
    task: str = "brackets"
    task_options: dict[str, Any] = field(default_factory=dict)
    seeds: int = 3
    model: dict[str, Any] = field(default_factory=lambda: {"d_model": 32, "n_heads": 2, "d_mlp": 64, "n_layers": 2})
    """Options shared by the dense and the MoE transformer (see `TransformerConfig`)."""
    n_experts: int = 4
    top_k: int = 1
    train: TrainConfig = TrainConfig(steps=1000, lr=3e-3)
    competence: float | None = None
    """Analyse only models whose held-out primary metric reaches this (None: the task's threshold, `Task.competence`;
    0: every model, a smoke test whose verdicts mean nothing)."""
    n_eval: int = 300
    """Held-out sequences probed (the same for every seed)."""
    margin: float = MARGIN
    eval_seed: int = 20261121

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.n_eval < 8:
            raise ValueError("seeds must be >= 1 and n_eval >= 8")
        if not 0 < self.margin < 1:
            raise ValueError(f"margin must be in (0, 1) (got {self.margin})")


@register_study("function-state")
class FunctionState(Study):
    """Probe labels at the router input, the expert output and the residual stream: do experts carry function, the residual state?"""

    Config = FunctionStateConfig
    fast = {"competence": 0.0, "seeds": 2, "n_eval": 80, "train": {"steps": 60, "n_train": 1000, "n_val": 100, "eval_every": 60}}
    config: FunctionStateConfig

    def __init__(self, config: FunctionStateConfig) -> None:
        super().__init__(config)
        self.task = get_task(config.task, config.task_options)
        try:
            vocab = self.task.vocab
        except NotImplementedError:
            raise ToylabError(f"task '{config.task}' has real-valued inputs; function-state needs a token task") from None
        self.kinds = {name: label.kind for name, label in self.task.labels.items()}
        self.models = {
            "dense": {**config.model, "ffn": "dense"},
            "moe": {**config.model, "ffn": "moe", "n_experts": config.n_experts, "top_k": config.top_k},
        }
        for options in self.models.values():  # fail early on a bad model option
            build(TransformerConfig, options, vocab_size=len(vocab), max_len=self.task.seq_len)

    def analyse(self, job: TrainJob, run_dir: Path) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """One finished run (in a worker): its task metrics and probe rows at every site."""
        model, batch = load_trained(run_dir).model, self.task.sample_split(self.config.n_eval, self.config.eval_seed, "heldout")
        name, seed = job.key.rsplit("-seed", 1)
        rows = function_state(model, self.task, batch, seed=int(seed))
        return evaluate(model, self.task, batch), [{"model": name, "seed": int(seed), **row} for row in rows]

    def run(self, ctx: StudyContext) -> dict[str, Any]:
        cfg = self.config
        jobs = [TrainJob(f"{name}-seed{seed}", self.task, options, replace(cfg.train, seed=seed))
                for seed in range(cfg.seeds) for name, options in reversed(self.models.items())]
        ctx.train(jobs)
        analysed = ctx.analyse_runs(jobs, self.analyse, "probing")
        ctx.expert_map([job for job in jobs if job.key.startswith("moe-seed")], ctx.heldout(self.task, cfg.n_eval, cfg.eval_seed))
        rows = sorted((row for _, found in analysed.values() for row in found), key=lambda r: (list(self.models).index(r["model"]), r["seed"]))
        summary = summarize_function_state(rows, self.kinds, cfg.margin)
        return {
            "task": {"name": self.task.name, "options": self.task.options},
            "kinds": self.kinds,
            "performance": {job.key: analysed[job.key][0] if job.key in analysed else None for job in jobs},
            "performance_summary": {
                name: {metric: mean_ci([analysed[k][0][metric] for s in range(cfg.seeds) if (k := f"{name}-seed{s}") in analysed],
                               bounds=None if metric == "loss" else UNIT)
                       for metric in next((v[0] for key, v in analysed.items() if key.startswith(f"{name}-seed")), {})}
                for name in self.models
            },
            **summary,
            "test_families": adjust_function_state(summary),
            "probes": rows,
            "runs": {job.key: str(ctx.run_dir(job.key).relative_to(ctx.directory)) for job in jobs},
        }

    def summary(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        share = {(r["model"], r["layer"], r["label"], r["site"]): r["share"] for r in results["sites"]}
        return [
            {"layer": layer, "label": label, "kind": self.kinds[label],
             **{f"MoE {site}": fmt_ci(share[("moe", layer, label, site)]) for site in SITES},
             PLANTED: fmt_ci(share[("moe", layer, label, PLANTED)]),
             "dense ffn_out": fmt_ci(share[key]) if (key := ("dense", layer, label, "ffn_out")) in share else "n/a"}
            for (model, layer, label, site) in share if model == "moe" and site == "router_input"
        ]

    def bottom_line(self, results: dict[str, Any]) -> list[str]:
        """The primary result per layer: MoE vs dense, each contrast net of its planted reference."""
        lines = []
        for row in results["primary"]:
            c, excess = row["verdict"], row["excess"]
            finding = {"more": "the MoE's expert output favours function over state labels more than the dense MLP's output does",
                       "less": "the MoE's expert output favours function over state labels less than the dense MLP's output does",
                       "equivalent": "the MoE's expert output favours function over state labels as much as the dense MLP's output does",
                       "inconclusive": "a difference between the MoE's expert output and the dense MLP's output is not shown"}[c["verdict"]]
            lines.append(f"- Layer {row['layer']}: {finding} (each measured beyond a planted site that carries every label equally; "
                         f"excess contrast {fmt_ci(excess['moe'])} MoE vs {fmt_ci(excess['dense'])} dense): **{verdict_text(c)}**; "
                         f"the claim that experts pull out function more than a dense MLP is **{claim_state(c['verdict'], ('more',))}**.")
        return lines or ["- No layer has finished runs of both models, so the MoE-vs-dense comparison is not shown."]

    def answers(self, results: dict[str, Any]) -> list[str]:
        """Per model and layer: the contrast against its planted reference of equal shares."""
        lines = []
        for row in results["contrasts"]:
            c = row["vs_planted"]
            finding = {"more": "the FFN output favours function labels beyond equal shares",
                       "less": "the FFN output favours state labels beyond equal shares",
                       "equivalent": "the FFN output is equivalent to a site of equal shares",
                       "inconclusive": "a departure of the FFN output from equal shares is not shown"}[c["verdict"]]
            lines.append(f"- `{row['model']}` layer {row['layer']}: relative share (ffn_out − resid_post) of function labels "
                         f"{fmt_ci(row['function'])} vs state labels {fmt_ci(row['state'])}, contrast {fmt_ci(row['contrast'])} against "
                         f"{fmt_ci(row['planted'])} for the planted site: {finding}, **{verdict_text(c)}**; \"it favours function "
                         f"labels\" is **{claim_state(c['verdict'], ('more',))}**.")
        return lines

    def report(self, results: dict[str, Any], ctx: StudyContext) -> Document:
        cfg, task = self.config, self.task
        figures = []
        frame = pd.DataFrame(results["sites"])
        if len(frame):
            long = pd.DataFrame([{"label": f"{r['label']} ({r['kind'][0]})", "site": r["site"], "panel": f"{r['model']} layer {r['layer']}",
                                  **r["share"]} for _, r in frame.iterrows()])
            figures.append(("Share of each label at each site ((s) state, (f) function; mean, 95% CI over seeds)",
                            ctx.figure("shares", interval_bars(long, "label", "site", "panel", "share"))))
        logs = {run: ctx.directory / path / "metrics.csv" for run, path in results["runs"].items()
                if (ctx.directory / path / "metrics.csv").is_file()}
        if logs:
            figures.append(("Training curves", ctx.figure("training_curves", training_curves(logs, ["train_loss", f"val_{task.primary_metric}"]))))
        probe_rows = [
            {"model": r["model"], "layer": r["layer"], "label": r["label"], "kind": r["kind"], "site": r["site"],
             "accuracy": fmt_ci(r["accuracy"]), "baseline": fmt(r["baseline"]["mean"]), "shuffled": fmt(r["shuffled"]["mean"]),
             "share": fmt_ci(r["share"])}
            for r in results["sites"]
        ]
        perf = [{"model": name, **{m: fmt_ci(v, 4) for m, v in metrics.items()}} for name, metrics in results["performance_summary"].items()]
        blocks = [
            Section("Bottom line", [Text("\n".join(self.bottom_line(results)))]),
            families_section(QUESTION, results.get("test_families", {}), order=FAMILIES),
            Section("What was run", [Text(
                f"Task `{task.name}` with options `{task.options}`. {task.describe()} Labels: "
                + ", ".join(f"`{n}` ({k})" for n, k in self.kinds.items()) + ".\n\n"
                f"A dense transformer and an MoE ({cfg.n_experts} experts, top-{cfg.top_k}) with shared options `{cfg.model}`, each trained "
                f"for {cfg.train.steps} steps (batch {cfg.train.batch_size}, lr {cfg.train.lr}) with {cfg.seeds} seeds. Probes read "
                f"{cfg.n_eval} held-out sequences (seed {cfg.eval_seed}).")]),
            Section("Each model against a site of equal shares", [Text(
                f"A contrast above 0 alone is no finding: where the residual stream carries state labels at the ceiling, a site "
                f"that carries every label equally scores above 0 too. The reference is that site, planted: every label written "
                f"with share {PLANTED_SHARE} into a site of its own (`{PLANTED}` in the tables), probed and divided by the same "
                f"residual stream.\n\n"
                + "\n".join(self.answers(results)))]),
            Section("Model performance (held-out, mean [95% CI] over seeds)", [Table(perf)]),
            Section("Share of each label at each site", [Table(self.summary(results))]),
            Section("Every probe", [Table(probe_rows)]),
            *expert_map_section(ctx.directory, N_SHOWN),
            Section("Figures", [Figure(path, caption) for caption, path in figures]),
            Section("What the numbers mean", [Text(METRIC_NOTES.format(margin=cfg.margin, share=PLANTED_SHARE, interval=INTERVAL_NOTE))]),
        ]
        blocks += failed_runs_section(results["failed_runs"])
        return Document(f"Function vs state on `{task.name}`: what experts pull out of the residual stream", blocks)
