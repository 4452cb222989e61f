"""Study `dynamics`: when does routing lock in, does specialization come before, with or after the task is learned, and
does the final routing hold on larger or deeper inputs than trained on?"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from toylab.analysis.dynamics import chance_agreement, expert_sets, lock_in, reached, saturation, timing
from toylab.analysis.expert_map import N_SHOWN, ood_map, ood_view, routing_view, write_expert_map
from toylab.analysis.ood import ood_routing, summarize_ood
from toylab.analysis.specialization import adjust_families, primary_labels, specialization, summarize
from toylab.analysis.stats import UNIT, mean_ci, verdict_label
from toylab.determinism import torch_threads
from toylab.models.routing import RouterName
from toylab.registry import get_task, register_study
from toylab.report import Document, Figure, Section, Table, Text, expert_map_section, failed_runs_section, fmt, fmt_ci, interval_lines
from toylab.study import Study, StudyContext, TrainJob, dense_and_moe
from toylab.training import TrainConfig, build_model, checkpoint_steps, evaluate, load_checkpoint, load_trained

SCORES = {"routing_nmi": "routing", "kmeans_moe_nmi": "k-means (router input)", "linear_nmi": "linear probe (ceiling)",
          "null_nmi": "shuffled null"}
"""The NMIs followed along training, with their names in the figure."""


def when(timing: str) -> str:
    """A verdict's `timing` in a sentence."""
    return f"{timing} the task was learned" if timing in ("before", "with", "after") else timing


@dataclass(frozen=True)
class DynamicsConfig:
    task: str = "brackets"
    task_options: dict[str, Any] = field(default_factory=dict)
    seeds: int = 3
    model: dict[str, Any] = field(default_factory=lambda: {"d_model": 32, "n_heads": 2, "d_mlp": 64, "n_layers": 2})
    """Options shared by the dense and the MoE transformer (see `TransformerConfig`)."""
    n_experts: int = 4
    top_k: int = 1
    router: RouterName = "learned"
    router_label: str | None = None
    train: TrainConfig = TrainConfig(steps=1000, lr=3e-3, checkpoint_every=10, checkpoint_spacing="log")
    """Training, with the checkpoints analysed (`checkpoint_every`, `checkpoint_spacing`)."""
    competence: float | None = None
    """The final models are analysed only when their held-out primary metric reaches this (None: the task's threshold,
    `Task.competence`; 0: every model, a smoke test). The same threshold marks when the task counts as learned."""
    n_eval: int = 300
    """Held-out sequences on which every checkpoint is analysed (the same for every seed and step)."""
    n_permutations: int = 200
    margin: float | None = None
    """Equivalence margin δ in NMI (None: per label and checkpoint, a share of its linear ceiling; see expert-specialization)."""
    primary_labels: tuple[str, ...] = ()
    """The labels of the primary question, declared before the run (empty: the task's function labels)."""
    ood: bool = True
    """Also evaluate the final models on larger or deeper inputs than trained on (`Task.shifted`), where the task has a
    size knob; the models then get positions enough for them."""
    ood_margin: float = 0.05
    """Equivalence margin of the off-distribution verdicts (agreement with the in-distribution map, NMI)."""
    eval_seed: int = 20261121

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.n_eval < 1 or self.n_permutations < 1:
            raise ValueError("seeds, n_eval and n_permutations must be >= 1")
        if not self.train.checkpoint_every:
            raise ValueError("train.checkpoint_every must be >= 1: the study analyses the checkpoints")
        if self.train.target is not None:
            raise ValueError("train.target must be None: every seed's checkpoints are compared at the same steps")


@register_study("dynamics")
class Dynamics(Study):
    """Train dense and MoE transformers with checkpoints; follow routing vs k-means, router saturation and the task metric."""

    Config = DynamicsConfig
    fast = {"competence": 0.0, "seeds": 3, "n_eval": 100, "n_permutations": 50,
            "train": {"steps": 120, "n_train": 2000, "n_val": 200, "eval_every": 60, "checkpoint_every": 30,
                      "checkpoint_spacing": "linear"}}
    config: DynamicsConfig

    def __init__(self, config: DynamicsConfig) -> None:
        super().__init__(config)
        self.task = get_task(config.task, config.task_options)
        self.shifted = self.task.shifted() if config.ood else None
        longest = max(self.task.seq_len, self.shifted.seq_len if self.shifted else 0)
        self.models = {kind: {**options, **({"max_len": longest} if longest > self.task.seq_len else {})}
                       for kind, options in dense_and_moe(config).items()}
        primary_labels(self.task, config.primary_labels)  # fail early on an unknown primary label
        for options in self.models.values():
            build_model(self.task, options)

    @property
    def threshold(self) -> float | None:
        """The metric at which the task counts as learned (the competence threshold)."""
        return self.task.competence if self.config.competence is None else self.config.competence

    def run(self, ctx: StudyContext) -> dict[str, Any]:
        cfg, task = self.config, self.task
        batch = ctx.heldout(task, cfg.n_eval, cfg.eval_seed)
        models = ctx.train([TrainJob(f"{kind}-seed{seed}", task, options, replace(cfg.train, seed=seed))
                            for seed in range(cfg.seeds) for kind, options in self.models.items()])
        pairs = [seed for seed in range(cfg.seeds) if models[f"moe-seed{seed}"] and models[f"dense-seed{seed}"]]
        steps, runs = checkpoint_steps(cfg.train), {seed: (ctx.run_dir(f"moe-seed{seed}"), ctx.run_dir(f"dense-seed{seed}")) for seed in pairs}
        calls = [(seed, step, *runs[seed]) for seed in pairs for step in steps]  # one call per checkpoint keeps every worker busy
        found = ctx.map(self.analyse_step, *zip(*calls), description="analysing checkpoints")
        series = [self.at_step(found[i::len(steps)]) for i in range(len(steps))] if pairs else []
        finals = ctx.map(self.analyse_final, pairs, *zip(*runs.values()), description="final models")
        ood = {**summarize_ood([final["ood"] for final in finals], cfg.ood_margin), "task_options": self.shifted.options,
               "metrics": {kind: {metric: mean_ci([final["ood_metrics"][kind][metric] for final in finals], bounds=None if metric == "loss" else UNIT)
                                  for metric in finals[0]["ood_metrics"][kind]} for kind in ("moe", "dense")}} if self.shifted and pairs else {}
        if pairs:
            shifted = ood_map(self.shifted, task.shifted_sample(cfg.n_eval, cfg.eval_seed), self.shifted_change(ood),
                              {str(s): final["ood_map"] for s, final in zip(pairs, finals)}, ood["labels"]) if ood else None
            write_expert_map(ctx.directory / "expert_map.json", task, batch, {str(s): final["map"] for s, final in zip(pairs, finals)},
                             cfg.n_experts, cfg.top_k, ood=shifted)
        return {"task": {"name": task.name, "options": task.options, "primary_metric": task.primary_metric},
                "steps": steps, "seeds_analysed": pairs, "threshold": self.threshold, "series": series,
                "lock_in": self.lock_ins(steps, series) if series else {}, "ood": ood,
                "runs": {key: str(ctx.run_dir(key).relative_to(ctx.directory)) for key in models}}

    def analyse_step(self, seed: int, step: int, moe_dir: Path, dense_dir: Path) -> dict[str, Any]:
        """One seed's scores at one kept step (in a worker, on one thread): both models' task metrics, the MoE's
        saturation against its final routing and the specialization scores of `expert-specialization`."""
        cfg = self.config
        batch = self.task.sample_split(cfg.n_eval, cfg.eval_seed, "heldout")
        moe_run, dense_run = load_trained(moe_dir), load_trained(dense_dir)
        with torch_threads(1):
            final = expert_sets(moe_run.model, self.task, batch)
            moe, dense = load_checkpoint(moe_run, step), load_checkpoint(dense_run, step)
            experts = expert_sets(moe, self.task, batch)
            return {
                "metrics": {"moe": evaluate(moe, self.task, batch), "dense": evaluate(dense, self.task, batch)},
                "saturation": {layer: saturation(e, final[layer]) for layer, e in experts.items()},
                "chance": {layer: chance_agreement(e, final[layer]) for layer, e in experts.items()},
                "scores": specialization(moe, dense, self.task, batch, cfg.n_permutations, seed),
            }

    def analyse_final(self, seed: int, moe_dir: Path, dense_dir: Path) -> dict[str, Any]:
        """One seed's final models (in a worker, on one thread): the MoE's expert map; with shifted inputs, both
        models' metrics on them, the MoE's routing on them (`ood_routing`) and its map of them (`ood_view`)."""
        cfg = self.config
        batch = self.task.sample_split(cfg.n_eval, cfg.eval_seed, "heldout")
        moe_run, dense_run = load_trained(moe_dir), load_trained(dense_dir)
        with torch_threads(1):
            view = routing_view(moe_run.model, self.task, batch, N_SHOWN, seed)
            if self.shifted is None:
                return {"map": view}
            shifted = self.task.shifted_sample(cfg.n_eval, cfg.eval_seed)
            ood = ood_routing(moe_run.model, self.task, batch, self.shifted, shifted, cfg.n_permutations, seed)
            return {"map": view, "ood": ood, "ood_map": ood_view(moe_run.model, self.task, self.shifted, shifted, ood, N_SHOWN, seed),
                    "ood_metrics": {kind: evaluate(run.model, self.shifted, shifted) for kind, run in (("moe", moe_run), ("dense", dense_run))}}

    def at_step(self, seeds: list[dict[str, Any]]) -> dict[str, Any]:
        """Across seeds at one step: metrics, saturation and its chance level, and per (layer, label) the NMIs and the
        verdicts of `expert-specialization` (corrected within this step's families)."""
        summary = summarize([s["scores"] for s in seeds], self.config.margin)
        families = adjust_families(summary, {}, self.task, self.config.primary_labels)
        return {
            "metrics": {kind: {metric: mean_ci([s["metrics"][kind][metric] for s in seeds], bounds=None if metric == "loss" else UNIT)
                               for metric in seeds[0]["metrics"][kind]} for kind in ("moe", "dense")},
            "saturation": {layer: mean_ci([s["saturation"][layer] for s in seeds], bounds=UNIT) for layer in seeds[0]["saturation"]},
            "chance": {layer: mean_ci([s["chance"][layer] for s in seeds], bounds=UNIT) for layer in seeds[0]["chance"]},
            "labels": {layer: {label: {**{key: s[key] for key in SCORES}, "delta": s["margin"]["delta"],
                                       "verdict": verdict_label(s["verdict"]),
                                       "conditional_verdict": verdict_label(s["conditional_verdict"])}
                               for label, s in labels.items()} for layer, labels in summary.items()},
            "primary_family": families.get("primary", {}),
        }

    def lock_ins(self, steps: list[int], series: list[dict[str, Any]]) -> dict[str, Any]:
        """Per (layer, label) the final verdicts and the steps from which they hold; when the task was learned; the step
        from which each layer's saturation stays at 0.9 or more."""
        metric = self.task.primary_metric
        learned = reached(steps, [s["metrics"]["moe"][metric]["mean"] for s in series], self.threshold) if self.threshold is not None else None
        last = series[-1]["labels"]
        labels = {layer: {label: {key: {"final": series[-1]["labels"][layer][label][key],
                                        "step": (step := lock_in(steps, [s["labels"][layer][label][key] for s in series])),
                                        "timing": timing(step, learned, series[-1]["labels"][layer][label][key])}
                                  for key in ("verdict", "conditional_verdict")}
                          for label in labels} for layer, labels in last.items()}
        saturated = {layer: reached(steps, [s["saturation"][layer]["mean"] for s in series], 0.9) for layer in series[-1]["saturation"]}
        return {"learned": learned, "labels": labels, "saturated": saturated}

    def primary(self) -> list[str]:
        return primary_labels(self.task, self.config.primary_labels)

    def bottom_line(self, results: dict[str, Any]) -> str:
        if not results["series"]:
            return "No pair of dense and MoE runs finished, so there is nothing to follow."
        found, steps = results["lock_in"], results["steps"]
        last = max(found["labels"], key=int)
        learned = (f"the MoE's held-out {self.task.primary_metric} (mean over seeds) reached {results['threshold']:g} from step "
                   f"{found['learned']} on" if found["learned"] is not None
                   else f"the MoE's held-out {self.task.primary_metric} never stayed at {results['threshold']:g}"
                   if results["threshold"] is not None else "the task has no competence threshold")
        labels = "; ".join(f"`{label}`: {v['verdict']['final']} from step {v['verdict']['step']} ({when(v['verdict']['timing'])})"
                           for label, v in found["labels"][last].items() if label in self.primary())
        saturated = ", ".join(f"layer {layer} from step {step}" if step is not None else f"layer {layer} never"
                              for layer, step in found["saturated"].items())
        return (f"Over {len(results['seeds_analysed'])} seeds and {len(steps)} checkpoints (steps 0 to {steps[-1]}), {learned}. "
                f"Routing vs k-means at the last MoE layer, the final verdict and the checkpoint from which it holds: {labels}. "
                f"Router saturation (top-{self.config.top_k} experts as at the end) stays at 0.9 or more: {saturated}. "
                "Lock-in steps describe one series at the resolution of the checkpoints; they are not tests." + self.ood_line(results))

    def ood_line(self, results: dict[str, Any]) -> str:
        """The off-distribution finding for the primary labels at the last MoE layer, in a sentence (none if not run)."""
        ood = results["ood"]
        if not ood:
            return ""
        metric, last = self.task.primary_metric, max(ood["labels"], key=int)
        holds = "; ".join(f"`{label}`: {verdict_label(s['holds'])} (agreement {fmt(s['agreement_ood']['mean'])} off vs "
                          f"{fmt(s['agreement_id']['mean'])} in distribution, null {fmt(s['agreement_null']['mean'])})"
                          for label, s in ood["labels"][last].items() if label in self.primary())
        return (f" On shifted inputs (`{self.shifted_change(ood)}`), the final MoE's {metric} is {fmt_ci(ood['metrics']['moe'][metric])} "
                f"and its class → expert map at the last layer, off vs in distribution (±{ood['margin']:g}): {holds}.")

    def shifted_change(self, ood: dict[str, Any]) -> str:
        """The task options that the shifted inputs change, as `key=value`."""
        return ", ".join(f"{k}={v}" for k, v in ood["task_options"].items() if self.task.options.get(k) != v)

    def ood_rows(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"layer": layer, "label": label, "agreement in": fmt_ci(s["agreement_id"]), "agreement off": fmt_ci(s["agreement_ood"]),
                 "agreement null": fmt(s["agreement_null"]["mean"]), "map holds": verdict_label(s["holds"]),
                 "vs null": verdict_label(s["vs_null"]), "NMI routing off": fmt_ci(s["nmi_ood"]), "NMI k-means refit": fmt_ci(s["kmeans_nmi_ood"]),
                 "NMI null": fmt(s["null_nmi_ood"]["mean"]), "routing vs k-means": verdict_label(s["vs_kmeans"])}
                for layer, labels in results["ood"]["labels"].items() for label, s in labels.items()]

    def ood_section(self, results: dict[str, Any]) -> list[Section]:
        ood = results["ood"]
        if not ood:
            return []
        metric = self.task.primary_metric
        final = results["series"][-1]["metrics"]
        return [Section("Off-distribution routing", [Text(
            f"The final models on {self.config.n_eval} shifted sequences (`{self.shifted_change(ood)}`; none of them a sequence of "
            f"the training task): {metric} {fmt_ci(ood['metrics']['moe'][metric])} for the MoE and "
            f"{fmt_ci(ood['metrics']['dense'][metric])} for the dense model, against {fmt_ci(final['moe'][metric])} and "
            f"{fmt_ci(final['dense'][metric])} in distribution. Each class's expert is fitted on half of the in-distribution "
            "sequences; *agreement* is the share of tokens of the classes both distributions have sent to their class's "
            "expert, on the other half (in) and on the shifted inputs (off); its null shuffles the experts among the shifted "
            f"tokens. *Map holds*: agreement off vs in distribution, *equivalent* within ±{ood['margin']:g} when it holds, "
            "*less* when it breaks. NMI compares routing with k-means refitted on the shifted router inputs. All verdicts "
            f"are one family ({ood['family']['adjustment']}-adjusted, secondary)."), Table(self.ood_rows(results))])]

    def summary(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"layer": layer, "label": label, "final verdict": v["verdict"]["final"], "holds from step": v["verdict"]["step"],
                 "vs task learned": v["verdict"]["timing"], "given the token": v["conditional_verdict"]["final"],
                 "holds from": v["conditional_verdict"]["step"]}
                for layer, labels in results["lock_in"].get("labels", {}).items() for label, v in labels.items()]

    def step_rows(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        """Per checkpoint: the task metric of both models, saturation per layer, and the primary labels' NMIs at the last layer."""
        metric = self.task.primary_metric
        rows = []
        for step, s in zip(results["steps"], results["series"]):
            last = max(s["labels"], key=int)
            rows.append({"step": step, f"MoE {metric}": fmt_ci(s["metrics"]["moe"][metric]),
                         f"dense {metric}": fmt_ci(s["metrics"]["dense"][metric]),
                         **{f"saturation L{layer} [chance]": f"{fmt_ci(v)} [{fmt(s['chance'][layer]['mean'])}]"
                            for layer, v in s["saturation"].items()},
                         **{f"`{label}` routing / k-means / ceiling": " / ".join(fmt(s["labels"][last][label][key]["mean"])
                                                                               for key in ("routing_nmi", "kmeans_moe_nmi", "linear_nmi"))
                            + f" ({s['labels'][last][label]['verdict']})"
                            for label in self.primary() if label in s["labels"][last]}})
        return rows

    def report(self, results: dict[str, Any], ctx: StudyContext) -> Document:
        cfg, task = self.config, self.task
        figures = []
        if results["series"]:
            steps, metric = results["steps"], task.primary_metric
            last = max(results["series"][-1]["labels"], key=int)
            frame = pd.DataFrame(
                [{"step": step, "label": f"`{label}`, layer {layer}", "score": name, **s["labels"][layer][label][key]}
                 for step, s in zip(steps, results["series"]) for layer, labels in s["labels"].items() for label in labels
                 for key, name in SCORES.items()]
                + [{"step": step, "label": f"{metric} and saturation", "score": name, **value}
                   for step, s in zip(steps, results["series"])
                   for name, value in ((f"MoE {metric}", s["metrics"]["moe"][metric]), (f"dense {metric}", s["metrics"]["dense"][metric]),
                                       (f"saturation, layer {last}", s["saturation"][last]))])
            fig = interval_lines(frame, "step", "score", "label", "NMI (panels); metric and share (last panel)")
            for ax in fig.axes:
                ax.set_xscale("symlog", linthresh=steps[1])
            figures.append(Figure(ctx.figure("dynamics", fig), "Each label's NMI with routing, k-means on the router input, the "
                                  "linear probe and the shuffled null along training (mean, 95% CI over seeds; symmetric-log step "
                                  "axis), and the task metric with the last layer's router saturation"))
        blocks = [
            Text(f"**Bottom line.** {self.bottom_line(results)}"),
            Section("What was run", [Text(
                f"Task `{task.name}` with options `{task.options}`. {task.describe()}\n\n"
                f"A dense and an MoE transformer ({cfg.n_experts} experts, `{cfg.router}` router, top-{cfg.top_k}) with shared options "
                f"`{cfg.model}`, {cfg.seeds} seeds, {cfg.train.steps} steps, weights kept at steps {', '.join(map(str, results['steps']))}. "
                f"Every checkpoint is analysed on the same {cfg.n_eval} held-out sequences with `expert-specialization`'s "
                f"scores and verdict rules ({cfg.n_permutations} shuffles), each checkpoint's families corrected on their own.")]),
            Section("When verdicts lock in", [Text(
                "The final verdict of routing vs k-means on the router input (and given the token) per (layer, label), the first "
                "checkpoint from which it holds, and whether that is before, with or after the task was learned (the MoE's metric "
                "reaching the competence threshold for good)."), Table(self.summary(results))]),
            Section("Along training", [Text(
                "Saturation is the share of tokens routed to the experts they get at the end; chance is what two independent "
                "routings with these usages would share. The last columns give routing / k-means / linear-ceiling NMI at the "
                "last MoE layer, with the (corrected) verdict at that checkpoint."), Table(self.step_rows(results))]),
            *self.ood_section(results),
            Section("Figures", figures),
            *expert_map_section(ctx.directory, N_SHOWN, "The map shows the final MoE models."
                                + (" Its second tab routes the same number of shifted sequences and marks each token whose class goes "
                                   "to its in-distribution expert, with the agreement numbers above." if results["ood"] else "")),
        ]
        return Document(f"Training dynamics of routing on `{task.name}`", blocks + failed_runs_section(results["failed_runs"]))
