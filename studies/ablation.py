"""Study `ablation`: are targeted ablations easier on MoE models than on dense ones?"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from toylab.analysis.ablation import (
    ARMS, COMPARISONS, FLOOR, KINDS, MIN_COUNT, MODES, ablation_analysis, adjust_verdicts, diagonal_damage, summarize_ablations,
)
from toylab.analysis.expert_map import N_SHOWN
from toylab.analysis.stats import INTERVAL_NOTE, MARGIN, UNIT, claim_state, compare, mean_ci
from toylab.errors import ToylabError
from toylab.models.routing import RouterName
from toylab.determinism import torch_threads
from toylab.registry import get_task, register_study
from toylab.report import (
    Document, Figure, Section, Table, Text, expert_map_section, failed_runs_section, families_section, fmt, fmt_ci, interval_bars, training_curves, verdict_text,
)
from toylab.study import Study, StudyContext, TrainJob, dense_and_moe
from toylab.task import Batch
from toylab.training import TrainConfig, build_model, evaluate, is_finished, load_trained

ARM_NAMES = {
    "moe/experts": "MoE experts",
    "hash/experts": "hash-MoE experts",
    "dense/moe_partition": "dense MLP, MoE's partition",
    "dense/kmeans_tokens": "dense MLP, k-means cell",
    "dense/hash_tokens": "dense MLP, hash cell",
    "dense/random": "dense random neurons",
    "dense/kmeans": "dense k-means neurons",
    "dense/selective": "dense selective neurons",
}
HEADLINE = COMPARISONS["primary"][0]
"""The comparison that answers the study's question: experts vs the dense MLP on the MoE's own partition of the same tokens."""
ROLES = {"primary": "Primary: experts vs the dense MLP on one cell of tokens (the same intervention)",
         "hash": "Hash-routed control",
         "neuron groups": "Old design: experts vs dense neuron groups (a different intervention)"}
CONTROL_TASK = "modes"
CONTROL_LABEL = "mode"
VERDICTS = ("more", "less", "equivalent", "inconclusive")

METRIC_NOTES = """\
- **Ablations** replace neuron activations (`blocks.{{l}}.mlp.hook_post`) through `run_with_hooks`, in the MoE layers, in {e} candidates per layer and family. An **expert** ablation acts on all of expert e's neurons, only in the slots routed to e. A **token-subset control** acts on all {d_mlp} neurons of the dense MLP, only on the tokens of one cell of a partition of the dense model's tokens into {e} cells: the **MoE's partition** (each token's top-1 expert in the same-seed MoE's same layer), a **k-means cell** (k-means on the dense model's router-input site `blocks.{{l}}.ln2.hook_normalized`, fitted on the tokens of all three batches), or a **hash cell** (a seeded random map of token ids onto cells, as a hash router's). It is the same intervention as an expert ablation: the whole FFN of some tokens. A **dense neuron group** is {size} of the {d_mlp} neurons, acting on every token: **random**; **k-means** on the neurons' unit-norm weight vectors (input and output weights concatenated; balanced to equal sizes by an optimal assignment); **selective**: for each of a label's {e} most frequent classes, the {size} neurons whose activation on that class most exceeds their activation elsewhere (in standard deviations, on the reference batch). **Zero** ablation sets the activations to 0 (output biases stay); **mean** ablation to their mean on the reference batch over the same tokens (an expert's or a cell's tokens; a neuron group's: all tokens).
- **Damage** of an ablation on a class: the increase of the next-token loss (nats) at the task's scored positions whose label has that class, averaged over those positions. The causal matrix holds it for every ablation and class.
- **Selectivity** of a family for class c: the family's ablation that damages c most **on the selection batch** is scored **on the evaluation batch**: with d_c its damage on c and d_other its mean damage on all other scored tokens (where the label is defined), the index is (d_c⁺ − d_other⁺) / (d_c⁺ + d_other⁺ + {floor} nats), x⁺ = max(x, 0): 1 when only c breaks, 0 when everything breaks alike or nothing breaks beyond ~{floor} nats, negative when c is spared. Choosing on other sequences than those scored keeps the maximum over candidates from inflating the score. Averaged over the classes with at least {min_count} scored tokens in both batches (a label needs two such classes); for the selective family only the groups chosen for that label compete.
- **Which comparison answers the question.** Removing an expert removes the whole FFN on the tokens routed to it; removing a dense neuron group removes part of the FFN on every token. Experts vs neuron groups therefore mostly re-measures how routing correlates with class. The **primary** comparison is experts vs the dense MLP removed on one cell of the same kind of token subset, above all the MoE's own partition applied to the dense model's tokens: what is left is the difference between the models. The **hash-routed MoE** (trained like the MoE, each token id sent to a fixed expert drawn from the seed) is compared with the dense MLP on hash cells, and the learned experts with it.
- **Causal vs routing**: per MoE layer and label, the Spearman correlation of the causal matrix (expert × class damage) with the routing matrix (the share of each class's scored tokens routed to each expert), and the share of classes whose most damaging expert is the expert most of their tokens go to (chance: 1/{e}).
- **Verdicts** (paired by seed): from the per-seed differences of the selectivity index (first arm minus second) and their 90% Student-t interval, **more** / **less** when it lies above / below 0, **equivalent** inside ±δ (δ = {margin} in index units, two one-sided tests at the 5% level), **inconclusive** otherwise (with the smallest difference the seeds would detect). A claim of "more selective" is **supported** by *more*, **not shown** by *inconclusive* (a failure to reject says nothing), **contradicted** otherwise.
- {interval}
"""


@dataclass(frozen=True)
class AblationConfig:
    task: str = "brackets"
    task_options: dict[str, Any] = field(default_factory=dict)
    seeds: int = 5
    model: dict[str, Any] = field(default_factory=lambda: {"d_model": 32, "n_heads": 2, "d_mlp": 64, "n_layers": 2})
    """Options shared by the dense, the MoE and the hash-routed MoE transformer (see `TransformerConfig`)."""
    n_experts: int = 4
    top_k: int = 1
    router: RouterName = "learned"
    router_label: str | None = None
    train: TrainConfig = TrainConfig(steps=1000, lr=3e-3)
    competence: float | None = None
    """Analyse only models whose held-out primary metric reaches this (None: the task's threshold, `Task.competence`;
    0: every model, a smoke test whose verdicts mean nothing)."""
    n_eval: int = 500
    """Held-out sequences on which ablations are scored; a selection batch as large chooses each class's best ablation,
    and a reference batch as large gives means and selective neurons."""
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
    """Zero- and mean-ablate each expert vs the dense MLP on equal token subsets and equal neuron groups: how selectively do classes break?"""

    Config = AblationConfig
    fast = {"competence": 0.0, "seeds": 3, "control_seeds": 3, "n_eval": 100,
            "train": {"steps": 120, "n_train": 2000, "n_val": 200, "eval_every": 60}}
    config: AblationConfig

    def __init__(self, config: AblationConfig) -> None:
        super().__init__(config)
        self.task = get_task(config.task, config.task_options)
        self.models = {**dense_and_moe(config), "hash": dense_and_moe(config, router="hash", router_label=None, top_k=1)["moe"]}
        dense = build_model(self.task, self.models["dense"])  # fails early on a bad model option or a real-valued task
        build_model(self.task, self.models["moe"])
        build_model(self.task, self.models["hash"])
        if dense.cfg.d_mlp < config.n_experts:
            raise ToylabError(f"d_mlp={dense.cfg.d_mlp} cannot form {config.n_experts} neuron groups (one per expert): "
                              f"use d_mlp >= n_experts")
        self.group_size = dense.cfg.d_mlp // config.n_experts
        self.control_task = get_task(CONTROL_TASK)
        n_modes = self.control_task.labels[CONTROL_LABEL].n_classes
        self.control_model = {**config.model, "ffn": "moe", "n_experts": n_modes, "router": "label", "router_label": CONTROL_LABEL}

    def jobs(self) -> list[TrainJob]:
        cfg = self.config
        jobs = [TrainJob(f"{kind}-seed{seed}", self.task, self.models[kind], replace(cfg.train, seed=seed))
                for seed in range(cfg.seeds) for kind in KINDS]
        if cfg.control:
            jobs += [TrainJob(f"control-seed{seed}", self.control_task, self.control_model, replace(cfg.train, seed=seed))
                     for seed in range(cfg.control_seeds)]
        return jobs

    def analyse(self, batches: dict[str, tuple[Batch, Batch, Batch]], job: TrainJob, run_dir: Path) -> dict[str, Any]:
        """One finished run (in a worker, on one torch thread): its held-out metrics and every ablation on its task's
        `(evaluation, reference, selection)` batches; a dense run's token-subset controls take the same seed's MoE run
        (beside it) for the MoE's partition."""
        cfg, task = self.config, job.task
        batch, reference, selection = batches[task.name]
        model = load_trained(run_dir).model
        partner = run_dir.with_name(job.key.replace("dense-", "moe-"))
        moe = load_trained(partner).model if job.key.startswith("dense-") and is_finished(partner) else None
        with torch_threads(1):
            return {"performance": evaluate(model, task, batch),
                    **ablation_analysis(model, task, batch, selection, reference, cfg.n_experts, job.config.seed, cfg.min_count, cfg.floor, moe)}

    def run(self, ctx: StudyContext) -> dict[str, Any]:
        cfg = self.config
        jobs = self.jobs()
        ctx.train(jobs)
        batches = {}
        for task in {job.task.name: job.task for job in jobs}.values():  # three disjoint held-out batches per task
            batch = ctx.heldout(task, cfg.n_eval, cfg.eval_seed)
            reference = ctx.heldout(task, cfg.n_eval, cfg.eval_seed + 1, exclude=[batch])
            batches[task.name] = (batch, reference, ctx.heldout(task, cfg.n_eval, cfg.eval_seed + 2, exclude=[batch, reference]))
        analysed = ctx.analyse_runs(jobs, partial(self.analyse, batches), "ablating")
        ctx.expert_map([job for job in jobs if job.key.startswith("moe-seed")], batches[self.task.name][0])
        runs = {kind: [analysed.get(f"{kind}-seed{seed}") for seed in range(cfg.seeds if kind != "control" else cfg.control_seeds)]
                for kind in (*KINDS, *(("control",) if cfg.control else ()))}
        performance = {kind: {f"seed{s}": r["performance"] if r else None for s, r in enumerate(found)} for kind, found in runs.items()}
        selectivity = summarize_ablations({kind: runs[kind] for kind in KINDS}, cfg.margin)
        return {
            "task": {"name": self.task.name, "options": self.task.options, "primary_metric": self.task.primary_metric},
            "performance": performance,
            "performance_summary": {
                kind: {metric: mean_ci([r[metric] for r in seeds.values() if r], bounds=None if metric == "loss" else UNIT)
                       for metric in next((r for r in seeds.values() if r), {})}
                for kind, seeds in performance.items()
            },
            "group_size": self.group_size,
            "selectivity": selectivity,
            "test_families": adjust_verdicts(selectivity),
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
        """Per label and ablation mode: the experts' selectivity and the verdicts of the primary and the old comparisons."""
        return [
            {"label": label, "ablation": mode, "MoE experts": fmt_ci(s["arms"]["moe/experts"]["index"]),
             **{f"vs {ARM_NAMES[b]}": s["verdicts"][f"{a} vs {b}"]["verdict"] for a, b in COMPARISONS["primary"]},
             **{f"old: vs {ARM_NAMES[b]}": s["verdicts"][f"{a} vs {b}"]["verdict"] for a, b in COMPARISONS["neuron groups"]}}
            for mode, labels in self.by_mode(results) for label, s in labels.items()
        ]

    def index_rows(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"label": label, "ablation": mode, **{ARM_NAMES[arm]: fmt_ci(s["arms"][arm]["index"]) for arm in ARMS}}
                for mode, labels in self.by_mode(results) for label, s in labels.items()]

    def damage_rows(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"label": label, "ablation": mode, "arm": ARM_NAMES[arm],
             "damage on the class (nats)": fmt_ci(s["arms"][arm]["damage"]),
             "damage on the others (nats)": fmt_ci(s["arms"][arm]["other"])}
            for mode, labels in self.by_mode(results) for label, s in labels.items() for arm in ARMS
        ]

    def routing_rows(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"model": ARM_NAMES[f"{kind}/experts"], "label": label, "ablation": mode, "layer": layer,
             "Spearman(causal, routing)": fmt_ci(r["spearman"]), "most damaging = most routed": fmt_ci(r["agreement"]),
             "chance": fmt(1 / self.config.n_experts)}
            for mode, labels in self.by_mode(results) for label, s in labels.items()
            for kind in KINDS if kind in s["routing"] for layer, r in s["routing"][kind].items()
        ]

    def verdict_rows(self, results: dict[str, Any], role: str) -> list[dict[str, Any]]:
        """One row per label, ablation mode and comparison of `role` (`COMPARISONS`): both arms' selectivity and the verdict."""
        return [
            {"label": label, "ablation": mode, "first": f"{ARM_NAMES[a]} {fmt_ci(s['arms'][a]['index'])}",
             "second": f"{ARM_NAMES[b]} {fmt_ci(s['arms'][b]['index'])}", "first vs second": verdict_text(s["verdicts"][f"{a} vs {b}"])}
            for mode, labels in self.by_mode(results) for label, s in labels.items() for a, b in COMPARISONS[role]
        ]

    @staticmethod
    def by_mode(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """The selectivity summary's (mode, labels) in the order of `MODES`, modes without a scored label left out."""
        return [(mode, results["selectivity"][mode]) for mode in MODES if results["selectivity"].get(mode)]

    def bottom_line(self, results: dict[str, Any]) -> str:
        cfg, modes = self.config, self.by_mode(results)
        if not modes:
            return (f"On `{self.task.name}` nothing was compared: no seed finished with both models, or no label had two classes "
                    f"with {cfg.min_count} scored tokens.")

        def tally(pair: tuple[str, str]) -> str:
            """How many labels got each verdict on `pair`, per ablation mode: "zero: 2 more, 3 inconclusive; mean: ..."."""
            found = {mode: [s["verdicts"][" vs ".join(pair)]["verdict"] for s in labels.values()] for mode, labels in modes}
            return "; ".join(f"{mode}: " + ", ".join(f"{v.count(w)} {w}" for w in VERDICTS if w in v) for mode, v in found.items())

        states = [claim_state(s["verdicts"][" vs ".join(HEADLINE)]["verdict"], ("more",)) for _, labels in modes for s in labels.values()]
        claim = " and ".join(f"{state} in {states.count(state)}" for state in ("supported", "contradicted", "not shown") if state in states)
        primary, hashed, old = COMPARISONS["primary"], COMPARISONS["hash"], COMPARISONS["neuron groups"]
        text = (f"Are targeted ablations easier on MoEs? The comparison that answers it applies the same intervention to both models, "
                f"the whole FFN removed on one subset of tokens: the best single expert ablation vs the dense MLP removed on one cell of "
                f"the MoE's own partition of the same tokens (each class's best ablation chosen on a selection batch, scored on "
                f"another). On `{self.task.name}` over {cfg.seeds} seeds and {len(modes[0][1])} labels its verdicts (each family of "
                f"tests Benjamini–Hochberg-corrected) are "
                f"{tally(HEADLINE)}; so \"expert ablations are more selective\" is {claim} of {len(states)} label × ablation cases (an *equivalent* "
                f"or *less* verdict would contradict it). The other dense token-subset controls: k-means cells of the router input ({tally(primary[1])}); "
                f"hash cells of the token id ({tally(primary[2])}). The old comparison, experts vs dense neuron groups of equal size, "
                f"removes part of the FFN on every token, a different intervention that mostly re-measures how routing correlates "
                f"with class; it would read " + "; ".join(f"vs {ARM_NAMES[b]} ({tally((a, b))})" for a, b in old)
                + f". Hash-routed MoE experts vs the dense MLP on hash cells: {tally(hashed[0])}.")
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
        if self.by_mode(results):
            frame = pd.DataFrame([{"label": label, "arm": ARM_NAMES[arm], "mode": mode, **s["arms"][arm]["index"]}
                                  for mode, labels in self.by_mode(results) for label, s in labels.items() for arm in ARMS])
            figures.append(("Selectivity index of the best single ablation per class, chosen on the selection batch and scored on the "
                            "evaluation batch (mean over classes; mean, 95% CI over seeds)",
                            ctx.figure("selectivity", interval_bars(frame, "label", "arm", "mode", "selectivity index", reference=0.0))))
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
                f"A dense transformer, an MoE transformer ({cfg.n_experts} experts, top-{cfg.top_k}, router `{cfg.router}`) and a "
                f"hash-routed MoE ({cfg.n_experts} experts, top-1) with shared options `{cfg.model}`, each trained for {cfg.train.steps} "
                f"steps (batch {cfg.train.batch_size}, lr {cfg.train.lr}) with {cfg.seeds} seeds. In every MoE layer, {cfg.n_experts} "
                f"candidates per family were zero- and mean-ablated: the experts of each MoE; on the dense model, the whole MLP on each "
                f"cell of three token partitions (the same-seed MoE's top-1 experts, k-means on the router input, a hash of the token "
                f"id) and {cfg.n_experts} random, {cfg.n_experts} k-means and up to {cfg.n_experts} class-selective groups of "
                f"{results['group_size']} neurons. Each class's best ablation of a family was chosen on {cfg.n_eval} held-out "
                f"sequences (seed {cfg.eval_seed + 2}) and scored on {cfg.n_eval} others (seed {cfg.eval_seed}); means, k-means cells "
                f"and selective neurons also use another {cfg.n_eval} (seed {cfg.eval_seed + 1}).")]),
            Section("Model performance (held-out, mean [95% CI] over seeds)", [Table(perf_rows)]),
            families_section("The one primary question: is the best single expert ablation more selective than the dense MLP "
                             "removed on one cell of the MoE's own partition of the same tokens (the same intervention)? Its family "
                             "is that comparison over every (ablation mode, label); every other comparison is a family of its own.",
                             {name.replace("/", " "): f for name, f in results.get("test_families", {}).items()}, (),
                             [" vs ".join(pair).replace("/", " ") for pairs in COMPARISONS.values() for pair in pairs]),
            *(Section(f"Verdicts. {title}", [Table(rows) if (rows := self.verdict_rows(results, role)) else Text("(no pair of runs finished)")])
              for role, title in ROLES.items()),
            Section("Results", [
                Table(self.summary(results)),
                Section("Selectivity index of every arm", [Table(self.index_rows(results))]),
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
                    yticklabels=[f"E{e}" for e in range(len(table))], cbar_kws={"label": "loss increase (nats)"})
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(f"class of {name}", fontsize=8)
        ax.set_ylabel("ablated expert", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    return fig
