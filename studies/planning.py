"""Study `planning`: where, and how far ahead, do small transformers plan a path through a maze?"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from toylab.analysis.expert_map import N_SHOWN
from toylab.analysis.planning import FAMILIES, PRIMARY, adjust_families
from toylab.analysis.probes import (
    SCORES, ahead, probe_residual_stream, residual_stream, summarize_against, summarize_conditional_probes, summarize_probes,
    tick_states,
)
from toylab.analysis.specialization import ASSIGNMENTS, specialization, summarize
from toylab.analysis.stats import INTERVAL_NOTE, MARGIN, UNIT, claim_somewhere, compare, mean_ci
from toylab.config import build
from toylab.errors import ToylabError
from toylab.models import TransformerConfig
from toylab.registry import get_task, register_study
from toylab.report import (
    Document, Figure, Section, Table, Text, expert_map_section, failed_runs_section, families_section, fmt, fmt_ci, interval_bars,
    training_curves, verdict_text,
)
from toylab.study import Study, StudyContext, TrainJob
from toylab.task import IGNORE, Batch, Task
from toylab.training import Model, TrainConfig, build_model, evaluate, load_trained, task_model_config

PLAN_POSITIONS = ("pause", "path", "step")
"""Position types where the agent has a current cell: thinking pauses, `<path>`, and the path cells."""
TRAINED, UNTRAINED = "trained", "random init"
"""Values of the probe rows' `weights`: the trained network, and the same architecture with the weights it started from."""
PROBE_KEYS = ["model", "weights", "target", "offset", "position", "layer"]
TICK_KEYS = [*PROBE_KEYS, "tick"]
"""The keys of the DRC's probes at the ticks before a position's last (those at the last tick are the main probes')."""
QUESTION = (
    "The one primary question: do the trained models plan beyond the next move? It is answered by one comparison, "
    f"the family *{PRIMARY}*: at path cells, the probe of the optimal move k cells later with the next move set as extra "
    "input, against the stronger (in each seed) of two controls: the same probe on the next move alone (what a network "
    "that knows only its next move reads) and on the untrained network (what the current cell's token and random mixing "
    "carry). One test per (model, k, layer), every layer a candidate, corrected together; the claim *the model plans "
    "beyond the next move* is supported where any of its tests reads *more*, contradicted where every one reads "
    "*equivalent* or *less*, and not shown otherwise."
)
"""The study's primary question and the family of tests that answers it (`toylab.analysis.planning.PRIMARY`)."""

METRIC_NOTES = """\
- **Solve rate**: share of held-out mazes where greedy decoding from the prompt writes a shortest path (checked against BFS) and then `<eos>`. **Reach rate** accepts any walk along open edges that ends at the goal.
- **Teacher-forced accuracies**: with the true path as input, `move_accuracy` counts path cells whose top prediction is one of the tied optimal next cells; `maze_accuracy` counts mazes right at every step.
- **Probes**: a linear probe per (model, seed, layer, position type) on the residual stream (layer 0 = embeddings, layer l = after block l), fit on 75% of the held-out mazes and scored on the other 25% (split by maze). Distance is probed with ridge regression rounded to the nearest integer (also R²); move sets and on-path with multinomial logistic regression. **Baseline** is the majority class; **shuffled** is the same probe trained and scored on permuted labels. A probe means something only where it beats both: **vs controls** compares, paired over seeds, the accuracy with the stronger control of the same seed (see verdicts below).
- **Move +k**: at a path cell, the optimal move set k cells later (the empty set at the goal), so k = 0 is the move the model is about to make and k ≥ 1 is plan the model does not yet need to output. **Next cell** is the token the model is about to write (the cell after a move), for comparison: what the unembedding reads.
- **Move +k given the next move**: consecutive moves are correlated (a corridor continues), so a network that knows only its next move already reads move +k above the majority class. The probe is refit with the next move set (one-hot) as extra input and compared, paired by seed, with the same probe on the next move alone: *more* means the residual stream says more about move +k than the next move does, i.e. plan beyond the next step; *equivalent* means what move +k probes find is the next move.
- **Random-init control**: every probe is also fit on the same architecture with untrained weights (drawn with the run's seed, as training draws them): what the token embeddings and random mixing already make linearly readable. **vs random init** compares, paired by seed, the trained network's accuracy with it.
- **On path**: at an edge token of the maze description, whether that edge lies on some shortest path. The start and goal come before the maze, so this is computable in principle, though each edge token sees only the edges before it.
- **Expert specialization**: NMI/ARI between the top-1 expert of each MoE layer and each label, against k-means with as many clusters on the router input, k-means on the dense model's same site, and a shuffled-assignment null (see the `expert-specialization` study).
- **Verdicts** (probe vs controls, pause settings, routing vs k-means) are paired by seed, from the 90% Student-t interval of the per-seed differences: *more* / *less* when it lies above / below 0, *equivalent* when it lies inside ±{margin} (accuracy, rate or NMI; two one-sided tests at 5%), *inconclusive* otherwise, stating the smallest difference the seeds would detect. Each verdict shown is then corrected within its family of tests (Benjamini–Hochberg; see *Primary question and families of tests*), and a verdict needs at least 3 seeds. *Inconclusive* means not shown either way, never *no*.
- **Intervals**: {interval}
"""

PROBE_VERDICTS = {"more": "beats both controls", "equivalent": f"at the controls (within ±{MARGIN})",
                  "less": "below the controls", "inconclusive": "above the controls not shown (inconclusive)"}
INIT_VERDICTS = {"more": "above the untrained network", "equivalent": f"at the untrained network (within ±{MARGIN})",
                 "less": "below the untrained network", "inconclusive": "above the untrained network not shown (inconclusive)"}


@dataclass(frozen=True)
class PlanningConfig:
    size: int = 3
    """Side of the training mazes."""
    canvas: int = 4
    """Side of the grid the vocabulary covers; training mazes sit at random offsets on it."""
    pause: int = 4
    """Pause tokens before the path (thinking time)."""
    task_options: dict[str, Any] = field(default_factory=dict)
    """Other `gridworld` options (generators, p_open)."""
    seeds: int = 3
    model: dict[str, Any] = field(default_factory=lambda: {"d_model": 64, "n_heads": 4, "d_mlp": 128, "n_layers": 2})
    """Options shared by the dense and the MoE transformer (see `TransformerConfig`)."""
    n_experts: int = 4
    top_k: int = 1
    train: TrainConfig = TrainConfig(steps=2500, batch_size=64, lr=3e-3, lr_floor=0.0, n_train=160_000, eval_every=500)
    """`n_train` = steps x batch size: every training maze is seen once. The learning rate anneals to 0:
    exact paths need every step right, and the last, small steps buy that."""
    competence: float | None = None
    """Analyse only models whose held-out primary metric reaches this (None: the task's threshold, `Task.competence`;
    0: every model, a smoke test whose verdicts mean nothing)."""
    n_eval: int = 500
    """Held-out mazes for solve rates, probes and the specialization analysis (the same for every seed)."""
    larger_size: int | None = 4
    """Also decode mazes of this size on the same canvas (larger than trained on); None to skip."""
    ahead: int = 3
    """Probe the optimal move up to this many path cells ahead."""
    pauses: tuple[int, ...] = ()
    """Thinking time: also train dense models with these numbers of pause tokens (same budget) and
    compare them with the main dense model, e.g. `(0,)` for no thinking time."""
    drc: bool = False
    """Also train a DRC (stacked ConvLSTMs over the maze's grid, `drc_model`) beside the transformers, probe it per layer
    and per tick, and measure its thinking time (`extra_ticks`). Off by default: on a CPU a DRC step costs as much as
    10 to 20 transformer steps (measured; D × N ConvLSTM steps per position, in sequence)."""
    drc_model: dict[str, Any] = field(default_factory=lambda: {"channels": 16, "d_obs": 16, "depth": 2, "ticks": 2})
    """The DRC's options (see `DRCConfig`)."""
    drc_steps: int | None = None
    """The DRC's training steps (None: `train.steps`); its other training options are `train`'s."""
    extra_ticks: tuple[int, ...] = (1, 2, 4, 8)
    """The DRC's thinking time: held-out solve rates with this many extra ticks at `<path>`, before the first move, each
    compared with none (the pause tokens' counterpart, at test time)."""
    n_permutations: int = 200
    eval_seed: int = 20261121

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.n_eval < 8 or self.n_permutations < 1 or self.ahead < 0:
            raise ValueError("seeds and n_permutations must be >= 1, n_eval >= 8, ahead >= 0")
        if any(k < 1 for k in self.extra_ticks) or len(set(self.extra_ticks)) < len(self.extra_ticks):
            raise ValueError(f"extra_ticks must be distinct and >= 1 (got {self.extra_ticks})")
        if self.drc_steps is not None and self.drc_steps < 1:
            raise ValueError(f"drc_steps must be >= 1 (got {self.drc_steps})")


def probe_targets(steps_ahead: int) -> list[tuple[str, str, str, int, tuple[str, ...]]]:
    """`(target, label, probe kind, offset, position types)` of every probe."""
    return [
        ("distance", "distance", "ridge", 0, PLAN_POSITIONS),
        ("next move", "next_moves", "logistic", 0, PLAN_POSITIONS),
        ("next cell", "cell", "logistic", 1, ("step",)),
        *[(f"move +{k}", "next_moves", "logistic", k, ("step",)) for k in range(1, steps_ahead + 1)],
        ("on path", "on_path", "logistic", 0, ("edge",)),
    ]


def probe_plan(resid: torch.Tensor, task: Task, batch: Batch, steps_ahead: int, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Probe rows for every target, layer and position type of one model's stack of activations `resid` `[layers, batch,
    pos, d]`, and the rows of move +k (k = 1 .. `steps_ahead`) at path cells given the next move (`conditional_probe`)."""
    types, type_names = batch.labels["token_type"], task.labels["token_type"].classes
    rows = []
    for target, label, kind, offset, positions in probe_targets(steps_ahead):
        selected = np.where(np.isin(types, [type_names.index(p) for p in positions]), types, IGNORE)
        found = probe_residual_stream(resid, ahead(batch.labels[label], offset), selected, type_names, kind, seed=seed)
        rows += [{"target": target, "offset": offset, **row} for row in found]
    steps = np.where(types == type_names.index("step"), types, IGNORE)
    conditional = [
        {"target": f"move +{k} given next move", "offset": k, **row}
        for k in range(1, steps_ahead + 1)
        for row in probe_residual_stream(resid, ahead(batch.labels["next_moves"], k), steps, type_names, "logistic",
                                         given=batch.labels["next_moves"], seed=seed)
    ]
    return rows, conditional


@register_study("planning")
class Planning(Study):
    """Train dense and MoE transformers on maze planning; probe where and how far ahead the path is represented."""

    Config = PlanningConfig
    fast = {"competence": 0.0, 
        "seeds": 2,
        "train": {"steps": 100, "n_train": 2000, "n_val": 100, "eval_every": 100},
        "n_eval": 100,
        "ahead": 1,
        "pauses": (0,),
        "n_permutations": 50,
    }
    config: PlanningConfig

    def __init__(self, config: PlanningConfig) -> None:
        super().__init__(config)
        overlap = sorted({"size", "canvas", "pause"} & set(config.task_options))
        if overlap:
            raise ToylabError(f"set {overlap[0]} as a study option, not in task_options; valid there: generators, p_open")
        self.task = get_task("gridworld", {**config.task_options, "size": config.size, "canvas": config.canvas,
                                           "pause": config.pause})
        size, canvas = self.task.config.size, self.task.canvas
        self.larger: Task | None = None
        if config.larger_size is not None:
            if not size < config.larger_size <= canvas:
                raise ToylabError(
                    f"larger_size must be in [{size + 1}, canvas={canvas}] (got {config.larger_size}); "
                    "raise canvas to test larger mazes"
                )
            self.larger = get_task("gridworld", {**self.task.options, "size": config.larger_size})
        if self.task.config.pause in config.pauses or len(set(config.pauses)) < len(config.pauses):
            raise ToylabError(
                f"pauses must be distinct and differ from the trained task's pause={self.task.config.pause} "
                f"(got {config.pauses})"
            )
        self.paused = {p: get_task("gridworld", {**self.task.options, "pause": p}) for p in config.pauses}
        # positions up to the longest sequence of any task here exist from the start; the larger mazes' are never trained
        lengths = [t.seq_len for t in (self.task, self.larger, *self.paused.values()) if t is not None]
        shared = {**config.model, "max_len": max(lengths)}
        self.models = {
            "dense": {**shared, "ffn": "dense"},
            "moe": {**shared, "ffn": "moe", "n_experts": config.n_experts, "top_k": config.top_k},
        }
        built = [build(TransformerConfig, options, vocab_size=len(self.task.vocab)) for options in self.models.values()]
        self.n_layers = built[0].n_layers  # building fails early on a bad model option
        if config.drc:
            self.models["drc"] = {**config.drc_model, "arch": "drc", "max_len": max(lengths)}
            task_model_config(self.task, self.models["drc"])

    def evaluate(self, job: TrainJob, run_dir: Path) -> tuple[dict[str, float], list[dict[str, Any]], ...]:
        """One finished run (in a worker process): teacher-forced metrics, loss and greedy solve rates on the held-out
        mazes (and on the larger ones; a DRC's also with extra ticks), and, for the main task, its probe rows and those
        given the next move, for the trained network and for the same architecture with untrained weights (drawn with
        the run's seed, as in training); then those of a trained DRC at the ticks before each position's last."""
        cfg, model = self.config, load_trained(run_dir).model
        batch = job.task.sample_split(cfg.n_eval, cfg.eval_seed, "heldout")
        scores = {**evaluate(model, job.task, batch), **job.task.solve_rate(model, batch)}
        if job.task.options != self.task.options:
            return scores, [], [], [], []
        if self.larger is not None:
            found = self.larger.solve_rate(model, self.larger.sample_split(cfg.n_eval, cfg.eval_seed, "heldout"))
            scores.update({f"larger_{name}": value for name, value in found.items()})
        kind, seed = job.key.split("-")[0], job.config.seed
        if kind == "drc":
            scores.update(self.thinking_time(model, batch))
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            networks = {TRAINED: model, UNTRAINED: build_model(job.task, job.model).eval()}
        rows: tuple[list[dict[str, Any]], ...] = ([], [], [], [])
        tokens = torch.from_numpy(batch.inputs)
        for weights, network in networks.items():
            if kind != "drc":
                stacks = [(None, residual_stream(network, tokens), 0)]
            else:  # the last tick as the main rows; the trained network's earlier ticks apart, from layer 1 (i_t is tick-free)
                states = tick_states(network, tokens)
                stacks = [(None, states[:, -1], 0)]
                stacks += [(n + 1, states[1:, n], 1) for n in range(states.shape[1] - 1) if weights == TRAINED]
            for tick, resid, first in stacks:
                for found, out in zip(probe_plan(resid, job.task, batch, cfg.ahead, seed), rows[2 * (tick is not None):]):
                    out += [{"model": kind, "weights": weights, "seed": seed, **row, "layer": row["layer"] + first,
                             **({} if tick is None else {"tick": tick})} for row in found]
        return scores, *rows

    def thinking_time(self, model: Model, batch: Batch) -> dict[str, float]:
        """A DRC's held-out solve rate with each number of `extra_ticks` at `<path>`, before its first move."""
        marker = self.task.vocab.index("<path>")
        return {f"solve_rate_{k}_extra_ticks": self.task.solve_rate(
                    lambda tokens, k=k: model(tokens, extra_ticks=k * (tokens == marker)), batch)["solve_rate"]
                for k in self.config.extra_ticks}

    def run(self, ctx: StudyContext) -> dict[str, Any]:
        cfg, task = self.config, self.task
        eval_batch = ctx.heldout(task, cfg.n_eval, cfg.eval_seed)
        steps = {"drc": {"steps": cfg.drc_steps} if cfg.drc_steps else {}}
        jobs = [TrainJob(f"{kind}-seed{seed}", task, options, replace(cfg.train, seed=seed, **steps.get(kind, {})))
                for seed in range(cfg.seeds) for kind, options in reversed(self.models.items())]  # the slowest first
        jobs += [TrainJob(f"dense-pause{p}-seed{seed}", paused, self.models["dense"], replace(cfg.train, seed=seed))
                 for p, paused in self.paused.items() for seed in range(cfg.seeds)]
        trained = ctx.train(jobs)
        evaluated = ctx.analyse_runs(jobs, self.evaluate, "evaluating")
        performance = {job.key: evaluated[job.key][0] if job.key in evaluated else None for job in jobs}
        probes, conditional, tick_probes, tick_conditional = ([row for found in evaluated.values() for row in found[i]]
                                                              for i in (1, 2, 3, 4))
        probes.sort(key=lambda row: list(self.models).index(row["model"]))
        conditional.sort(key=lambda row: list(self.models).index(row["model"]))

        per_seed = [
            specialization(trained[f"moe-seed{s}"].model, trained[f"dense-seed{s}"].model, task, eval_batch, cfg.n_permutations, s)
            if trained[f"moe-seed{s}"] and trained[f"dense-seed{s}"]
            else None
            for s in ctx.bar(range(cfg.seeds), cfg.seeds, "specialization")
        ]
        ctx.expert_map([job for job in jobs if job.key.startswith("moe-seed")], eval_batch)

        def scores_of(prefix: str) -> dict[str, list[float]]:
            runs = [performance[f"{prefix}-seed{s}"] for s in range(cfg.seeds)]
            metrics = next((r for r in runs if r), {})
            return {m: [r[m] if r else np.nan for r in runs] for m in metrics}

        settings = {kind: scores_of(kind) for kind in self.models}
        settings.update({f"dense-pause{p}": scores_of(f"dense-pause{p}") for p in cfg.pauses})
        keys = [k for k in PROBE_KEYS if k != "weights"]
        results = {
            "task": {"name": task.name, "options": task.options, "seq_len": task.seq_len, "vocab_size": len(task.vocab)},
            "larger_task": self.larger.options if self.larger else None,
            "performance": performance,
            "performance_summary": {name: {m: mean_ci(v, bounds=None if m == "loss" else UNIT) for m, v in s.items()}
                                    for name, s in settings.items()},
            "thinking_time": {
                str(p): {
                    metric: compare(settings[f"dense-pause{p}"][metric], settings["dense"][metric], MARGIN)
                    for metric in ("solve_rate", "move_accuracy", "maze_accuracy")
                    if metric in settings[f"dense-pause{p}"] and metric in settings["dense"]
                }
                for p in cfg.pauses
            },
            "drc_thinking_time": {
                str(k): compare(settings["drc"][f"solve_rate_{k}_extra_ticks"], settings["drc"]["solve_rate"], MARGIN)
                for k in cfg.extra_ticks if f"solve_rate_{k}_extra_ticks" in settings.get("drc", {})
            },
            "probes": probes,
            "probe_summary": summarize_probes(probes, PROBE_KEYS),
            "vs_random_init": summarize_against(probes, keys, "weights", UNTRAINED),
            "conditional_probes": conditional,
            "plan": summarize_against(conditional, keys, "weights", UNTRAINED, given="given_only"),
            "conditional_summary": summarize_conditional_probes(conditional, PROBE_KEYS),
            "conditional_vs_random_init": summarize_against(conditional, keys, "weights", UNTRAINED),
            "tick_probes": tick_probes,
            "tick_probe_summary": summarize_probes(tick_probes, TICK_KEYS),
            "tick_conditional_probes": tick_conditional,
            "tick_conditional_summary": summarize_conditional_probes(tick_conditional, TICK_KEYS),
            "specialization": summarize(per_seed) if any(per_seed) else {},
            "per_seed_specialization": per_seed,
            "runs": {job.key: str(ctx.run_dir(job.key).relative_to(ctx.directory)) for job in jobs},
        }
        return {**results, "test_families": adjust_families(results, TRAINED)}

    def tick_curve(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        """The DRC's held-out solve rate (mean and 95% CI) by extra ticks at `<path>`, 0 first."""
        drc, size = results["performance_summary"].get("drc", {}), self.task.config.size
        names = {0: "solve_rate", **{k: f"solve_rate_{k}_extra_ticks" for k in self.config.extra_ticks}}
        return [{"extra ticks": k, "model": "drc", "maze size": f"{size}×{size}", **drc[name]}
                for k, name in names.items() if name in drc]

    @staticmethod
    def trained(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The summary rows of the trained networks' probes."""
        return [r for r in rows if r["weights"] == TRAINED]

    def summary(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        last = self.n_layers
        probe = {(r["model"], r["target"], r["position"], r["layer"]): r for r in self.trained(results["probe_summary"])}
        plan = {(r["model"], r["layer"]): r for r in results["plan"] if r["offset"] == 1}
        rows = []
        for name, metrics in results["performance_summary"].items():
            row = {"model": name}
            for column, metric in (("solve rate", "solve_rate"), ("larger-grid solve rate", "larger_solve_rate")):
                row[column] = fmt_ci(metrics[metric]) if metric in metrics else "n/a"
            for target, position in (("next move", "path"), ("move +1", "step"), ("on path", "edge")):
                found = probe.get((name, target, position, last))
                row[f"{target} probe @{position}, layer {last}"] = fmt_ci(found["accuracy"]) if found else "n/a"
            found = plan.get((name, last))
            row[f"move +1 given next move vs stronger control, layer {last}"] = (
                f"{fmt(found['accuracy']['mean'])} vs {fmt(found['stronger_control']['mean'])}: {found['verdict']['verdict']}"
                if found else "n/a")
            rows.append(row)
        return rows

    def plan_claims(self, results: dict[str, Any]) -> dict[str, str]:
        """Per model, the state of the primary claim (it plans beyond the next move at some k and layer) and the tests it
        rests on: those reading *more* where supported, else the one with the largest mean difference."""
        claims = {}
        for kind in self.models:
            tests = [r for r in results["plan"] if r["model"] == kind]
            if not tests:
                continue
            state = claim_somewhere([r["verdict"]["verdict"] for r in tests], ("more",))
            shown = [r for r in tests if r["verdict"]["verdict"] == "more"] or [max(tests, key=lambda r: r["verdict"]["mean"])]
            claims[kind] = f"**{state}** (" + "; ".join(
                f"move +{r['offset']} at layer {r['layer']}: {verdict_text(r['verdict'])}" for r in shown) + ")"
        return claims

    def bottom_line(self, results: dict[str, Any]) -> str:
        """Solve rates of the main models, the primary claim per model, and in which state the secondary claims on the
        probe targets are (readable beyond both controls, and beyond the untrained network, somewhere)."""
        size, summary = self.task.config.size, results["performance_summary"]
        solved = [f"{kind} {fmt_ci(summary[kind]['solve_rate'])}" for kind in self.models if "solve_rate" in summary.get(kind, {})]
        if not solved:
            return "No model finished training, so nothing was measured."
        probes = self.trained(results["probe_summary"])
        targets = list(dict.fromkeys(r["target"] for r in probes))

        def states(rows: list[dict[str, Any]]) -> str:
            found = {t: claim_somewhere([r["verdict"]["verdict"] for r in rows if r["target"] == t], ("more",)) for t in targets}
            return "; ".join(f"{state} for {', '.join(t for t in targets if found[t] == state)}"
                             for state in dict.fromkeys(found.values()))

        claims = self.plan_claims(results)
        return (f"Share of held-out {size}×{size} mazes solved with a shortest path: {', '.join(solved)}. Do the trained models "
                "plan beyond the next move (move +k at path cells given the next move, above both the next move alone and the "
                "untrained network at some k and layer)? " + ("; ".join(f"{kind}: {claim}" for kind, claim in claims.items())
                                                             or "(no probe was fit)")
                + ". Secondary, a target read by linear probes on the trained networks beyond both controls at some layer "
                f"and position: {states(probes) or 'n/a'}; beyond the same probe on the untrained network: "
                f"{states(results['vs_random_init']) or 'n/a'}.")

    def findings(self, results: dict[str, Any]) -> list[str]:
        """The headline results, each beside its control, as bullet points."""
        cfg, size, probes = self.config, self.task.config.size, self.trained(results["probe_summary"])
        versus_init = {(r["model"], r["target"], r["position"], r["layer"]): r for r in results["vs_random_init"]}
        lines = []
        for kind in self.models:
            summary = results["performance_summary"][kind]
            solved = [r["solve_rate"] for s in range(cfg.seeds) if (r := results["performance"][f"{kind}-seed{s}"])]
            if not solved:
                continue
            line = (f"**{kind}** writes a shortest path for {fmt_ci(summary['solve_rate'])} of held-out {size}×{size} mazes "
                    f"(worst seed {min(solved):.3f})")
            if "larger_solve_rate" in summary:
                line += f" and for {fmt_ci(summary['larger_solve_rate'])} of {cfg.larger_size}×{cfg.larger_size} mazes, a size never trained on"
            lines.append(line + ".")
        for p, metrics in results["thinking_time"].items():
            if "solve_rate" in metrics:
                c = metrics["solve_rate"]
                lines.append(f"**Thinking time**: with {p} pause tokens instead of {self.task.config.pause}, the dense solve rate "
                             f"is {verdict_text(c)}.")
        for k, c in results["drc_thinking_time"].items():
            lines.append(f"**DRC thinking time**: with {k} extra ticks at `<path>` instead of none, the DRC's solve rate is "
                         f"{verdict_text(c)}.")
        questions = [("plan ahead, at path cells", "step", [f"move +{k}" for k in range(1, cfg.ahead + 1)]),
                     ("before the path, at `<path>`", "path", ["next move", "distance"]),
                     ("while reading the maze, at edge tokens", "edge", ["on path"])]
        claims = self.plan_claims(results)
        for kind in self.models:
            for question, position, targets in questions:
                found = []
                for target in targets:
                    rows = [r for r in probes if (r["model"], r["position"], r["target"]) == (kind, position, target)]
                    if rows:
                        r = max(rows, key=lambda row: row["accuracy"]["mean"])
                        init = versus_init.get((kind, target, position, r["layer"]))
                        found.append(f"{target} {fmt_ci(r['accuracy'])} at layer {r['layer']} vs baseline "
                                     f"{fmt(r['baseline']['mean'])} and shuffled {fmt(r['shuffled']['mean'])}: "
                                     f"{PROBE_VERDICTS.get(r['verdict']['verdict'], r['verdict']['verdict'])}"
                                     + (f"; untrained network {fmt(init['control']['mean'])}: {INIT_VERDICTS[init['verdict']['verdict']]}"
                                        if init else ""))
                if found:
                    lines.append(f"**{kind} probes, {question}** (the layer of highest mean accuracy; its verdicts are corrected "
                                 "over every layer and position of their family): " + "; ".join(found) + ".")
            rows = [r for r in results["plan"] if r["model"] == kind]
            if rows:
                lines.append(
                    f"**{kind}, plan beyond the next move** (primary: move +k at path cells given the next move, every layer, "
                    "vs the stronger of the next move alone and the same probe on the untrained network): " + "; ".join(
                        f"+{r['offset']} at layer {r['layer']} {fmt_ci(r['accuracy'])} vs {fmt(r['given_only']['mean'])} "
                        f"(next move alone) and {fmt(r['control']['mean'])} (untrained): {r['verdict']['verdict']}" for r in rows)
                    + f". The claim that {kind} plans beyond the next move: {claims[kind]}.")
        pairs = [(f"{label} (layer {layer})", s) for layer, labels in results["specialization"].items() for label, s in labels.items()]
        if pairs:
            verdicts = {v: [name for name, s in pairs if s["verdict"]["verdict"] == v]
                        for v in ("more", "less", "equivalent", "inconclusive")}
            significant = sum(s["routing_max_p_value"] <= 0.05 for _, s in pairs)
            lines.append(
                f"**Experts** (secondary, {len(pairs)} (label, layer) pairs corrected together): top-1 routing aligns with a "
                f"label more than k-means on the router input for {len(verdicts['more'])}"
                + (f" ({', '.join(verdicts['more'])})" if verdicts["more"] else "")
                + f", less for {len(verdicts['less'])}" + (f" ({', '.join(verdicts['less'])})" if verdicts["less"] else "")
                + f", equivalently (within ±{MARGIN} NMI) for {len(verdicts['equivalent'])}; for the other "
                f"{len(verdicts['inconclusive'])} neither is shown (inconclusive). Routing beats its shuffled null "
                f"(permutation p ≤ 0.05 in every seed, uncorrected over the pairs) for {significant} of them."
            )
        return [f"- {line}" for line in lines]

    def report(self, results: dict[str, Any], ctx: StudyContext) -> Document:
        cfg, task = self.config, self.task
        figures = []
        summary = pd.DataFrame(self.trained(results["probe_summary"]))
        if len(summary):
            for kind in self.models:
                frame = summary[(summary["model"] == kind) & (summary["offset"] == 0)]
                frame = pd.concat([frame.drop(columns=[*SCORES, "verdict"]), frame["accuracy"].apply(pd.Series)], axis=1)
                figures.append(Figure(ctx.figure(f"probes_{kind}", interval_bars(frame, "layer", "position", "target", "accuracy")),
                                      f"{kind}: probe accuracy by layer and position type (mean, 95% CI over seeds)"))
            steps = summary[(summary["position"] == "step") & summary["target"].str.startswith(("next move", "move +"))]
            long = [{"cells ahead": r["offset"], "series": r["model"], "layer": r["layer"], **r["accuracy"]}
                    for _, r in steps.iterrows()]
            long += [{"cells ahead": r["offset"], "series": series, "layer": r["layer"], **r[score]}
                     for series, score in (("majority baseline", "baseline"), ("shuffled control (dense)", "shuffled"))
                     for _, r in steps[steps["model"] == "dense"].iterrows()]
            long += [{"cells ahead": r["offset"], "series": f"{r['model']}, random init", "layer": r["layer"], **r["control"]}
                     for r in results["vs_random_init"] if r["position"] == "step" and r["target"].startswith(("next move", "move +"))]
            long += [{"cells ahead": r["offset"], "series": "next move alone (dense)", "layer": r["layer"], **r["given_only"]}
                     for r in self.trained(results["conditional_summary"]) if r["model"] == "dense"]
            figures.append(Figure(ctx.figure("plan_ahead", interval_bars(pd.DataFrame(long), "cells ahead", "series", "layer", "accuracy")),
                                  "How far ahead: the optimal move k path cells later, probed at path cells, beside the same probes "
                                  "on the untrained networks and the best guess from the next move alone (mean, 95% CI)"))
        if results["specialization"]:
            frame = pd.DataFrame(
                [{"layer": layer, "label": label, "assignment": kind, **s[f"{kind}_nmi"]}
                 for layer, labels in results["specialization"].items() for label, s in labels.items() for kind in ASSIGNMENTS]
                + [{"layer": layer, "label": label, "assignment": "shuffled null", **s["null_nmi"]}
                   for layer, labels in results["specialization"].items() for label, s in labels.items()]
            )
            figures.append(Figure(ctx.figure("specialization", interval_bars(frame, "label", "assignment", "layer", "NMI")),
                                  "Expert specialization: NMI of each label with routing, k-means and the null (mean, 95% CI)"))
        ticks = self.tick_curve(results)
        if ticks:
            figures.append(Figure(ctx.figure("thinking_time_drc", interval_bars(pd.DataFrame(ticks), "extra ticks", "model", "maze size",
                                                                                "solve rate")),
                                  "DRC thinking time: held-out solve rate with extra ticks at `<path>`, before the first move "
                                  "(mean, 95% CI over seeds)"))
        logs = {run: ctx.directory / path / "metrics.csv" for run, path in results["runs"].items()
                if (ctx.directory / path / "metrics.csv").is_file()}
        if logs:
            figures.append(Figure(ctx.figure("training_curves", training_curves(logs, ["train_loss", "val_maze_accuracy"])),
                                  "Training curves (training loss; validation maze accuracy, teacher-forced)"))

        perf_columns = ["solve_rate", "reach_rate", "move_accuracy", "maze_accuracy", "larger_solve_rate", "larger_reach_rate"]
        perf_rows = [
            {"model": name, **{m: fmt_ci(metrics[m], 4) if m in metrics else "" for m in perf_columns}}
            for name, metrics in results["performance_summary"].items()
        ]
        versus_init = {(r["model"], r["target"], r["position"], r["layer"]): r for r in results["vs_random_init"]}
        probe_rows = [
            {"model": r["model"], "target": r["target"], "position": r["position"], "layer": r["layer"],
             "accuracy": fmt_ci(r["accuracy"]), "baseline": fmt(r["baseline"]["mean"]), "shuffled": fmt(r["shuffled"]["mean"]),
             "R²": fmt_ci(r["r2"]) if r["r2"]["n"] else "", "vs controls": r["verdict"]["verdict"],
             "random init": fmt(init["control"]["mean"]) if init else "n/a", "vs random init": init["verdict"]["verdict"] if init else "n/a"}
            for r in self.trained(results["probe_summary"])
            for init in [versus_init.get((r["model"], r["target"], r["position"], r["layer"]))]
        ]
        conditional_init = {(r["model"], r["target"], r["layer"]): r for r in results["conditional_vs_random_init"]}
        conditional_rows = [
            {"model": r["model"], "weights": r["weights"], "target": r["target"], "layer": r["layer"],
             "accuracy (activations + next move)": fmt_ci(r["accuracy"]), "next move alone": fmt_ci(r["given_only"]),
             "baseline": fmt(r["baseline"]["mean"]), "vs next move alone": r["verdict"]["verdict"],
             "vs random init": init["verdict"]["verdict"] if init and r["weights"] == TRAINED else ""}
            for r in results["conditional_summary"]
            for init in [conditional_init.get((r["model"], r["target"], r["layer"]))]
        ]
        spec_rows = [
            {"layer": layer, "label": label, "kind": task.labels[label].kind,
             "NMI routing": fmt_ci(s["routing_nmi"]), "NMI k-means (router input)": fmt_ci(s["kmeans_moe_nmi"]),
             "NMI k-means (dense)": fmt_ci(s["kmeans_dense_nmi"]), "NMI null": fmt(s["null_nmi"]["mean"]),
             "routing max p": fmt(s["routing_max_p_value"], 4), "routing vs k-means": s["verdict"]["verdict"]}
            for layer, labels in results["specialization"].items() for label, s in labels.items()
        ]
        plan_rows = [
            {"model": r["model"], "k": r["offset"], "layer": r["layer"], "accuracy (activations + next move)": fmt_ci(r["accuracy"]),
             "next move alone": fmt_ci(r["given_only"]), "untrained network": fmt_ci(r["control"]), "verdict": verdict_text(r["verdict"])}
            for r in results["plan"]
        ]
        blocks = [
            Text(f"**Bottom line.** {self.bottom_line(results)}"),
            families_section(QUESTION, results["test_families"], [Table(plan_rows, caption=(
                "The primary tests: accuracy against the stronger control of the same seed, paired by seed."))] if plan_rows else [],
                FAMILIES),
            Section("What was run", [Text(
                f"Task `gridworld` with options `{task.options}` (sequence length {task.seq_len}). {task.describe()}\n\n"
                f"A dense and an MoE transformer ({cfg.n_experts} experts, top-{cfg.top_k}) with shared options `{cfg.model}`, "
                f"each trained for {cfg.train.steps} steps (batch {cfg.train.batch_size}, lr {cfg.train.lr}) with {cfg.seeds} seeds. "
                f"Everything is measured on {cfg.n_eval} held-out mazes (seed {cfg.eval_seed})"
                + (f"; larger mazes: size {cfg.larger_size} on the same canvas, whose positions beyond the training length "
                   "exist in every model but are never trained." if self.larger else ".")
                + (f"\n\nA DRC (ConvLSTMs over the maze's grid) with options `{cfg.drc_model}`, trained for "
                   f"{cfg.drc_steps or cfg.train.steps} steps with the same seeds and options, is probed per layer (at the "
                   "last tick of each position) and per tick; its thinking time is measured with "
                   f"{', '.join(map(str, cfg.extra_ticks))} extra ticks at `<path>`." if cfg.drc else ""))]),
            Section("Findings", [Text("\n".join(self.findings(results)))]),
            Section("Solving mazes (held-out, mean [95% CI] over seeds)", [Table(perf_rows)]),
        ]
        if results["thinking_time"]:
            blocks.append(Section("Thinking time: pause tokens before the path", [Table([
                {"pauses": p, "metric": metric, f"Δ vs {task.config.pause} pauses (90% CI)": fmt_ci(c), "p": fmt(c["p_value"]),
                 "p adjusted": fmt(c["p_adjusted"]), "detectable": fmt(c["detectable"]), "uncorrected verdict": c["raw_verdict"],
                 "verdict": c["verdict"]}
                for p, metrics in results["thinking_time"].items() for metric, c in metrics.items()
            ])]))
        if results["drc_thinking_time"]:
            drc = results["performance_summary"]["drc"]
            blocks.append(Section("DRC thinking time: extra ticks before the first move", [Table([
                {"extra ticks": k, "solve rate": fmt_ci(drc[f"solve_rate_{k}_extra_ticks"], 4),
                 "Δ vs 0 extra ticks (90% CI)": fmt_ci(c), "p": fmt(c["p_value"]), "p adjusted": fmt(c["p_adjusted"]),
                 "detectable": fmt(c["detectable"]), "uncorrected verdict": c["raw_verdict"], "verdict": c["verdict"]}
                for k, c in results["drc_thinking_time"].items()
            ], caption=f"0 extra ticks: {fmt_ci(drc['solve_rate'], 4)}. The DRC is trained with none; the extra ticks "
                       "are given at test time only.")]))
        if results["tick_probe_summary"]:
            last = {(r["target"], r["position"], r["layer"]): r for r in self.trained(results["probe_summary"]) if r["model"] == "drc"}
            blocks.append(Section("DRC probes per tick", [Table([
                {"target": r["target"], "position": r["position"], "layer": r["layer"], "tick": r["tick"],
                 "accuracy": fmt_ci(r["accuracy"]), "at the last tick": fmt_ci(final["accuracy"]) if final else "n/a",
                 "given the next move": "", "vs controls": r["verdict"]["verdict"]}
                for r in results["tick_probe_summary"]
                for final in [last.get((r["target"], r["position"], r["layer"]))]
            ] + [
                {"target": r["target"], "position": r["position"], "layer": r["layer"], "tick": r["tick"],
                 "accuracy": fmt_ci(r["accuracy"]), "at the last tick": "", "given the next move": fmt_ci(r["given_only"]),
                 "vs controls": r["verdict"]["verdict"]}
                for r in results["tick_conditional_summary"]
            ], caption=("The DRC's hidden states at the ticks before each position's last (the last tick's are in the "
                        "tables above, model drc); *vs controls*: against the stronger of the majority class and the "
                        "shuffled-label probe, or, given the next move, against the next move alone."))]))
        blocks += [
            Section("Where the plan appears: linear probes", [Table(probe_rows, caption=(
                "Trained networks; *random init* is the same probe on the same architecture with untrained weights, and *vs random "
                "init* the paired verdict of the trained accuracy against it."))]),
            Section("Plan beyond the next move: move +k given the next move", [Table(conditional_rows, caption=(
                "At path cells: the probe of move +k with the next move set as extra input, against the same probe on the next "
                "move alone (*more*: the residual stream says more about move +k than the next move does), for trained and "
                "untrained networks; *vs random init* compares the trained network's accuracy with the untrained one's (the "
                "current cell's token alone can narrow move +k down beyond the next move, and an untrained network carries it)."))] if conditional_rows else [Text("(`ahead` = 0: no move ahead was probed)")]),
            Section("Expert specialization on the planning labels", [Table(spec_rows) if spec_rows else Text("(no MoE runs finished)")]),
        ]
        blocks += [
            *expert_map_section(ctx.directory, N_SHOWN, "Below the tokens, each maze is drawn with its path's cells coloured by "
                                "the expert of the step that enters them."),
            Section("Figures", figures),
            Section("What the numbers mean", [Text(METRIC_NOTES.format(margin=MARGIN, interval=INTERVAL_NOTE))]),
        ]
        blocks += failed_runs_section(results["failed_runs"])
        return Document("Planning in gridworld mazes", blocks)
