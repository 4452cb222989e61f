"""Study `ablation`: are targeted ablations easier on MoE models than on dense ones?"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from toylab.analysis.ablation import FAMILIES, FLOOR, MIN_COUNT, MODES, ablation_analysis, diagonal_damage, summarize_ablations
from toylab.analysis.expert_map import N_SHOWN
from toylab.analysis.stats import INTERVAL_NOTE, MARGIN, UNIT, compare, mean_ci
from toylab.errors import ToylabError
from toylab.models.routing import RouterName
from toylab.models.superposition import torch_threads
from toylab.registry import get_task, register_study
from toylab.report import (
    Document, Figure, Section, Table, Text, expert_map_section, failed_runs_section, fmt, fmt_ci, interval_bars, training_curves, verdict_text,
)
from toylab.study import Study, StudyContext, TrainJob, dense_and_moe
from toylab.training import TrainConfig, build_model, evaluate, load_trained

FAMILY_NAMES = {
    "experts": "MoE experts",
    "random": "dense, random groups",
    "kmeans": "dense, k-means groups",
    "selective": "dense, class-selective groups",
}
CONTROL_TASK = "modes"
CONTROL_LABEL = "mode"

METRIC_NOTES = """\
- **Ablations** replace neuron activations (`blocks.{{l}}.mlp.hook_post`) through `run_with_hooks`. An **expert** ablation acts on all of expert e's neurons, only in the slots routed to e. A **dense group** is {size} of the dense MLP's {d_mlp} neurons ({e} groups per layer, as many as the MoE has experts), acting on every token, grouped three ways: **random**; **k-means** on the neurons' unit-norm weight vectors (input and output weights concatenated; balanced to equal sizes by an optimal assignment); **class-selective**: for each class of each label, the {size} neurons whose activation on that class most exceeds their activation elsewhere (in standard deviations, measured on a separate reference batch), the strongest competitor. **Zero** ablation sets the neurons to 0; **mean** ablation to their mean on the reference batch (an expert's neurons: their mean over the tokens routed to it).
- **Damage** of an ablation on a class: the increase of the next-token loss (nats) at the task's scored positions whose label has that class, averaged over those positions. The causal matrix holds it for every ablation and class.
- **Selectivity** of a family for class c: take the family's ablation that damages c most; with d_c its damage on c and d_other its mean damage on all other scored tokens (where the label is defined), the index is (d_c⁺ − d_other⁺) / (d_c⁺ + d_other⁺ + {floor} nats), x⁺ = max(x, 0): 1 when only c breaks, 0 when everything breaks alike or nothing breaks beyond ~{floor} nats, negative when c is spared. Averaged over the classes with at least {min_count} scored tokens (a label needs two such classes); for the class-selective family only the groups chosen for that label compete.
- **Causal vs routing**: per MoE layer and label, the Spearman correlation of the causal matrix (expert × class damage) with the routing matrix (the share of each class's scored tokens routed to each expert), and the share of classes whose most damaging expert is the expert most of their tokens go to (chance: 1/{e}).
- **Verdicts** (paired by seed): from the per-seed differences of the selectivity index (experts minus the dense family) and their 90% Student-t interval, **more** / **less** when it lies above / below 0, **equivalent** inside ±δ (δ = {margin} in index units, two one-sided tests at the 5% level), **inconclusive** otherwise (with the smallest difference the seeds would detect).
- {interval}
"""


@dataclass(frozen=True)
class AblationConfig:
    task: str = "brackets"
    task_options: dict[str, Any] = field(default_factory=dict)
    seeds: int = 5
    model: dict[str, Any] = field(default_factory=lambda: {"d_model": 32, "n_heads": 2, "d_mlp": 64, "n_layers": 2})
    """Options shared by the dense and the MoE transformer (see `TransformerConfig`)."""
    n_experts: int = 4
    top_k: int = 1
    router: RouterName = "learned"
    router_label: str | None = None
    train: TrainConfig = TrainConfig(steps=1000, lr=3e-3)
    n_eval: int = 500
    """Held-out sequences on which ablations are scored; another batch as large gives means and selective neurons."""
    control: bool = True
    """Also train a label-routed MoE on `modes` (mode c -> expert c), the positive control."""
    control_seeds: int = 3
    min_count: int = MIN_COUNT
    """Classes with fewer scored tokens are left out of the selectivity scores."""
    floor: float = FLOOR
    """Damage (nats) that counts as little: the selectivity index's floor."""
    margin: float = MARGIN
    """Equivalence margin δ in selectivity index units."""
    eval_seed: int = 20261121

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.control_seeds < 1 or self.n_eval < 1 or self.min_count < 1:
            raise ValueError("seeds, control_seeds, n_eval and min_count must be >= 1")
        if not 0 < self.margin < 1:
            raise ValueError(f"margin must be in (0, 1) (got {self.margin})")
        if not 0 <= self.floor < 10:
            raise ValueError(f"floor must be in [0, 10) nats (got {self.floor})")


@register_study("ablation")
class AblationStudy(Study):
    """Zero- and mean-ablate each expert vs equal groups of dense neurons: which classes break, how selectively?"""

    Config = AblationConfig
    fast = {"seeds": 2, "control_seeds": 2, "n_eval": 100,
            "train": {"steps": 120, "n_train": 2000, "n_val": 200, "eval_every": 60}}
    config: AblationConfig

    def __init__(self, config: AblationConfig) -> None:
        super().__init__(config)
        self.task = get_task(config.task, config.task_options)
        self.models = dense_and_moe(config)
        dense = build_model(self.task, self.models["dense"])  # fails early on a bad model option or a real-valued task
        build_model(self.task, self.models["moe"])
        if dense.cfg.d_mlp < config.n_experts:
            raise ToylabError(f"d_mlp={dense.cfg.d_mlp} cannot form {config.n_experts} neuron groups (one per expert): "
                              f"use d_mlp >= n_experts")
        self.group_size = dense.cfg.d_mlp // config.n_experts
        self.control_task = get_task(CONTROL_TASK)
        n_modes = self.control_task.labels[CONTROL_LABEL].n_classes
        self.control_model = {**config.model, "ffn": "moe", "n_experts": n_modes, "router": "label", "router_label": CONTROL_LABEL}

    def jobs(self) -> list[TrainJob]:
        cfg = self.config
        jobs = [TrainJob(f"{kind}-seed{seed}", self.task, options, replace(cfg.train, seed=seed))
                for seed in range(cfg.seeds) for kind, options in reversed(self.models.items())]
        if cfg.control:
            jobs += [TrainJob(f"control-seed{seed}", self.control_task, self.control_model, replace(cfg.train, seed=seed))
                     for seed in range(cfg.control_seeds)]
        return jobs

    def analyse(self, job: TrainJob, run_dir: Path) -> dict[str, Any]:
        """One finished run (in a worker, on one torch thread): its held-out metrics and every ablation."""
        cfg, task = self.config, job.task
        batch, reference = task.sample(cfg.n_eval, cfg.eval_seed), task.sample(cfg.n_eval, cfg.eval_seed + 1)
        model = load_trained(run_dir).model
        with torch_threads(1):
            return {"performance": evaluate(model, task, batch),
                    **ablation_analysis(model, task, batch, reference, cfg.n_experts, job.config.seed, cfg.min_count, cfg.floor)}

    def run(self, ctx: StudyContext) -> dict[str, Any]:
        cfg = self.config
        jobs = self.jobs()
        ctx.train(jobs)
        analysed = ctx.analyse_runs(jobs, self.analyse, "ablating")
        ctx.expert_map([job for job in jobs if job.key.startswith("moe-seed")], self.task.sample(cfg.n_eval, cfg.eval_seed))
        runs = {kind: [analysed.get(f"{kind}-seed{seed}") for seed in range(cfg.seeds if kind != "control" else cfg.control_seeds)]
                for kind in (*self.models, *(("control",) if cfg.control else ()))}
        performance = {kind: {f"seed{s}": r["performance"] if r else None for s, r in enumerate(found)} for kind, found in runs.items()}
        return {
            "task": {"name": self.task.name, "options": self.task.options, "primary_metric": self.task.primary_metric},
            "performance": performance,
            "performance_summary": {
                kind: {metric: mean_ci([r[metric] for r in seeds.values() if r], bounds=None if metric == "loss" else UNIT)
                       for metric in next((r for r in seeds.values() if r), {})}
                for kind, seeds in performance.items()
            },
            "group_size": self.group_size,
            "selectivity": summarize_ablations(runs["moe"], runs["dense"], cfg.margin),
            "control": self.control_summary(runs["control"]) if cfg.control else {},
            "per_seed": {kind: [None if r is None else {k: v for k, v in r.items() if k != "performance"} for r in found]
                         for kind, found in runs.items()},
            "runs": {job.key: str(ctx.run_dir(job.key).relative_to(ctx.directory)) for job in jobs},
        }

    def control_summary(self, runs: list[dict[str, Any] | None]) -> dict[str, Any]:
        """Per mode and layer of the label-routed control: damage of ablating a mode's own expert on that mode vs on the others."""
        runs = [r for r in runs if r is not None]
        if not runs:
            return {}
        n_experts = self.control_model["n_experts"]
        out: dict[str, Any] = {}
        for mode in MODES:
            out[mode] = {}
            for layer in runs[0]["modes"][mode]["labels"][CONTROL_LABEL]["causal"]:
                causal = [np.array(r["modes"][mode]["labels"][CONTROL_LABEL]["causal"][layer], dtype=np.float64) for r in runs]
                found = [diagonal_damage(c, n_experts) for c in causal]
                out[mode][layer] = {
                    "own": mean_ci([f["own"] for f in found]),
                    "others": mean_ci([f["others"] for f in found]),
                    "largest_other": max(f["largest_other"] for f in found),
                    "verdict": compare([f["own"] for f in found], [f["others"] for f in found], self.config.floor),
                    "causal_mean": np.mean(causal, axis=0).tolist(),
                }
        return out

    def summary(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        rows = []
        for mode, labels in results["selectivity"].items():
            for label, s in labels.items():
                rows.append({
                    "label": label, "ablation": mode,
                    **{FAMILY_NAMES[f]: fmt_ci(s["families"][f]["index"]) for f in FAMILIES},
                    "experts vs random": s["verdicts"]["random"]["verdict"],
                    "vs k-means": s["verdicts"]["kmeans"]["verdict"],
                    "vs selective": s["verdicts"]["selective"]["verdict"],
                })
        return rows

    def damage_rows(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"label": label, "ablation": mode, "family": FAMILY_NAMES[f],
             "damage on the class (nats)": fmt_ci(s["families"][f]["damage"]),
             "damage on the others (nats)": fmt_ci(s["families"][f]["other"])}
            for mode, labels in results["selectivity"].items() for label, s in labels.items() for f in FAMILIES
        ]

    def routing_rows(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"label": label, "ablation": mode, "layer": layer, "Spearman(causal, routing)": fmt_ci(r["spearman"]),
             "most damaging = most routed": fmt_ci(r["agreement"]), "chance": fmt(1 / self.config.n_experts)}
            for mode, labels in results["selectivity"].items() for label, s in labels.items() for layer, r in s["routing"].items()
        ]

    def bottom_line(self, results: dict[str, Any]) -> str:
        cfg = self.config
        parts = []
        for mode, labels in results["selectivity"].items():
            verdicts = {f: [s["verdicts"][f]["verdict"] for s in labels.values()] for f in FAMILIES[1:]}
            counts = "; ".join(f"vs {FAMILY_NAMES[f].split(', ')[1]}: " + ", ".join(f"{v.count(w)} {w}" for w in
                               ("more", "less", "equivalent", "inconclusive") if w in v) for f, v in verdicts.items())
            parts.append(f"{mode}-ablating experts, over {len(labels)} labels ({counts})")
        text = (f"On `{self.task.name}` over {cfg.seeds} seeds, is the best single expert ablation more class-selective "
                f"than the best dense neuron group of equal size? " + ("; ".join(parts) + "." if parts else "No pair of runs finished."))
        control = results["control"]
        if control:
            layers = "; ".join(f"layer {layer}: {fmt_ci(c['own'])} nats on its own mode, {fmt_ci(c['others'])} on the others "
                               f"(largest |damage| on another mode {fmt(c['largest_other'], 4)})" for layer, c in control["zero"].items())
            text += (f" Positive control (label-routed MoE on `{CONTROL_TASK}`, mode c → expert c): zero-ablating the expert of "
                     f"mode c hurts mode c and leaves the others — {layers}.")
        return text

    def report(self, results: dict[str, Any], ctx: StudyContext) -> Document:
        cfg, task = self.config, self.task
        figures = []
        if results["selectivity"]:
            frame = pd.DataFrame([{"label": label, "family": FAMILY_NAMES[f], "mode": mode, **s["families"][f]["index"]}
                                  for mode, labels in results["selectivity"].items() for label, s in labels.items() for f in FAMILIES])
            figures.append(("Selectivity index of the best single ablation per class (mean over classes; mean, 95% CI over seeds)",
                            ctx.figure("selectivity", interval_bars(frame, "label", "family", "mode", "selectivity index", reference=0.0))))
            first = next((r for r in results["per_seed"]["moe"] if r), None)
            if first:
                labels = first["modes"]["zero"]["labels"]
                tables = {name: table for name, entry in labels.items()
                          if np.isfinite(table := np.array(entry["causal"][list(entry["causal"])[-1]], dtype=np.float64)).all(0).any()}
                if tables:
                    figures.append(("Causal matrices of the first MoE seed's last MoE layer (zero ablation): loss increase (nats) per expert and class",
                                    ctx.figure("causal_moe", matrix_heatmaps(tables, {name: task.labels[name].classes for name in tables}))))
        if results["control"]:
            tables = {f"layer {layer}": c["causal_mean"] for layer, c in results["control"]["zero"].items()}
            names = {name: self.control_task.labels[CONTROL_LABEL].classes for name in tables}
            figures.append(("Positive control: loss increase (nats) per mode when zero-ablating each expert of the label-routed MoE (mean over seeds)",
                            ctx.figure("control", matrix_heatmaps(tables, names))))
        logs = {run: ctx.directory / path / "metrics.csv" for run, path in results["runs"].items()
                if (ctx.directory / path / "metrics.csv").is_file() and not run.startswith("control")}
        if logs:
            figures.append(("Training curves", ctx.figure("training_curves", training_curves(logs, ["train_loss", f"val_{task.primary_metric}"]))))
        perf_rows = [{"model": kind, **{metric: fmt_ci(stat, 4) for metric, stat in metrics.items()}}
                     for kind, metrics in results["performance_summary"].items() if kind != "control"]
        verdict_lines = [
            f"- `{label}`, {mode} ablation: experts {fmt_ci(s['families']['experts']['index'])}; vs "
            + "; vs ".join(f"{FAMILY_NAMES[f].split(', ')[1]} {fmt_ci(s['families'][f]['index'])}: {verdict_text(s['verdicts'][f])}"
                           for f in FAMILIES[1:])
            for mode, labels in results["selectivity"].items() for label, s in labels.items()
        ]
        control_rows = [
            {"ablation": mode, "layer": layer, "own mode (nats)": fmt_ci(c["own"]), "other modes (nats)": fmt_ci(c["others"]),
             "largest |other|": fmt(c["largest_other"], 4), "own vs others": verdict_text(c["verdict"])}
            for mode, layers in results["control"].items() for layer, c in layers.items()
        ]
        control = [Text(
            f"A label-routed MoE on `{CONTROL_TASK}` ({self.control_model['n_experts']} experts, mode c → expert c in every layer, "
            f"{cfg.control_seeds} seeds, trained like the models above): each expert alone handles one mode, so ablating it must hurt "
            f"that mode and leave the others exactly untouched. The verdict compares the damage on the own mode with that on the "
            f"others (δ = {cfg.floor} nats).") if cfg.control else Text("The positive control was switched off (`control=false`).")]
        blocks = [
            Text(f"**Bottom line.** {self.bottom_line(results)}"),
            Section("What was run", [Text(
                f"Task `{task.name}` with options `{task.options}`. {task.describe()}\n\n"
                f"A dense transformer and an MoE transformer ({cfg.n_experts} experts, top-{cfg.top_k}, router `{cfg.router}`) with shared "
                f"options `{cfg.model}`, each trained for {cfg.train.steps} steps (batch {cfg.train.batch_size}, lr {cfg.train.lr}) with "
                f"{cfg.seeds} seeds. Every expert of every MoE layer, and {cfg.n_experts} random and {cfg.n_experts} k-means groups of "
                f"{results['group_size']} neurons per dense layer plus one class-selective group per class, were zero- and mean-ablated "
                f"on {cfg.n_eval} held-out sequences (seed {cfg.eval_seed}); means and selective neurons come from another "
                f"{cfg.n_eval} (seed {cfg.eval_seed + 1}).")]),
            Section("Model performance (held-out, mean [95% CI] over seeds)", [Table(perf_rows)]),
            Section("Verdicts: selectivity of experts vs dense neuron groups", [Text("\n".join(verdict_lines) or "(no pair of runs finished)")]),
            Section("Results", [
                Table(self.summary(results)),
                Section("Damage on the class and on the others", [Table(self.damage_rows(results))]),
                Section("Does where tokens go predict what breaks?", [Table(self.routing_rows(results))]),
            ]),
            Section("Positive control", control + [Table(control_rows)] * bool(control_rows)),
            *expert_map_section(ctx.directory, N_SHOWN),
            Section("Figures", [Figure(path, caption) for caption, path in figures]),
            Section("What the numbers mean", [Text(METRIC_NOTES.format(
                size=results["group_size"], d_mlp=results["group_size"] * cfg.n_experts, e=cfg.n_experts, floor=cfg.floor,
                min_count=cfg.min_count, margin=cfg.margin, interval=INTERVAL_NOTE))]),
        ]
        blocks += failed_runs_section(results["failed_runs"])
        return Document(f"Targeted ablations on `{task.name}`", blocks)


def matrix_heatmaps(tables: dict[str, Any], class_names: dict[str, Any]) -> plt.Figure:
    """Expert x class matrices (loss increase, nats) side by side; classes without scored tokens left out."""
    fig, axes = plt.subplots(1, len(tables), figsize=(3.2 * len(tables), 3.2), squeeze=False)
    for ax, (name, table) in zip(axes[0], tables.items()):
        table = np.array(table, dtype=np.float64)
        used = np.isfinite(table).all(0)
        sns.heatmap(table[:, used], ax=ax, cmap="magma", xticklabels=[c for c, u in zip(class_names[name], used) if u],
                    yticklabels=[f"E{e}" for e in range(len(table))])
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    return fig
