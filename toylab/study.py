"""Studies: a config, a `run` that composes library functions, and a report document.

`run_study` resolves the config (defaults < `--fast` preset < config file < command line), puts
everything in `<out>/<study>/<config hash>/`, reuses finished training runs, and writes
`config.json`, `code_version.json`, `results.json`, the figures, `report.md`, `report.html` and the report's tables as
CSV files (`tables/`) atomically.
"""

from __future__ import annotations

import io as _io
import os
import re
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from toylab import io  # noqa: E402
from toylab.analysis.expert_map import N_SHOWN, routing_view, write_expert_map  # noqa: E402
from toylab.analysis.sequential import RULES, decide, look_alphas, looks, stopping_rule_text  # noqa: E402
from toylab.analysis.stats import MIN_SEEDS  # noqa: E402
from toylab.config import build, check_time, config_hash, merge, to_dict  # noqa: E402
from toylab.errors import DivergenceError, Interrupted, ToylabError  # noqa: E402
from toylab.executors import Executor, LaunchConfig, WorkerLost  # noqa: E402
from toylab.determinism import torch_threads  # noqa: E402
from toylab.registry import get_study  # noqa: E402
from toylab.runs import read_results  # noqa: E402
from toylab.splits import HELDOUT_FRACTION, in_heldout, sequence_hashes  # noqa: E402
from toylab.formatting import csv_text, fmt, table_json  # noqa: E402
from toylab.report import Document, Section, Table, Text, bottom_line, table_files, to_html, to_markdown  # noqa: E402
from toylab.task import MAX_SEED, Batch, Task  # noqa: E402
from toylab.models import TransformerConfig  # noqa: E402
from toylab.models.recurrent import CELLS  # noqa: E402
from toylab.training import (  # noqa: E402
    TrainConfig, TrainedModel, build_model, check_devices, is_finished, load_trained, task_model_config, train, train_seconds,
    trained_run,
)

R = TypeVar("R")
Plan = Callable[[Hashable, dict[str, Path]], Iterable[tuple[Hashable, tuple[Any, ...]]]]
"""`plan(group, runs)` of `StudyContext.train_and_analyse`: a finished group's usable runs (`{job key: run dir}`) to keyed
calls `(key, args)` of its analysis function."""
MAX_PERMUTATIONS = 100_000
"""Permutations of a null distribution: p-values resolve to 1e-5, beyond any family's corrected alpha."""
TIME_FIX = "ask for fewer seeds, steps or sweep points"
"""What to do about a study whose training would take too long (`toylab.config.check_time`)."""
SEED_DRAWS = 16
"""A study draws evaluation batches from `eval_seed`, `eval_seed + 1`, ...: a seed leaves this many above it."""


@dataclass(frozen=True)
class TrainJob:
    """One model a study trains; it lands in `models/<key>/` of the study directory."""

    key: str
    task: Task
    model: dict[str, Any]
    config: TrainConfig


def train_or_fail(job: TrainJob, run_dir: Path) -> None:
    """Train one job (in a worker); it raises DivergenceError if the run diverges."""
    train(job.task, job.model, job.config, run_dir, progress=False)


def routing_of_run(job: TrainJob, run_dir: Path, batch: Batch) -> tuple[int, int, dict[str, Any]]:
    """A finished MoE run's expert-map view of `batch` (in a worker, on one torch thread), with its experts and top-k."""
    model = load_trained(run_dir).model
    with torch_threads(1):
        return model.cfg.n_experts, model.cfg.top_k, routing_view(model, job.task, batch, N_SHOWN, job.config.seed)


class StudyContext:
    """What a running study may touch: its directory, cached training runs, workers, figures, progress."""

    def __init__(self, directory: Path, progress: bool = True, workers: int = 1, launcher: LaunchConfig | None = None,
                 competence: float | None = None) -> None:
        self.directory = Path(directory)
        self.progress = progress
        self.launcher = launcher or LaunchConfig(workers=workers)
        self.competence = competence
        """The primary metric a trained model must reach to be analysed; None: each task's own `Task.competence`."""
        self.failures: list[dict[str, str]] = []
        self.below: list[dict[str, Any]] = []
        """Finished runs below their competence threshold: not analysed (`train` gives None for them)."""
        self.trained_keys: set[str] = set()
        """Runs trained by this context; the others it used were `reused_keys`, finished before it started."""
        self.reused_keys: set[str] = set()
        self.heldout_batches: list[dict[str, Any]] = []
        self.training_seconds = 0.0
        """Wall time in `train` and `train_and_analyse` until their last run finished (the rest of a study's run is analysis)."""
        self.steps_trained = 0
        """Optimizer steps of the runs this context trained."""
        self.run_steps: dict[str, dict[str, Any]] = {}
        """Steps of every finished run trained to a target (`TrainConfig.target`), trained here or reused."""
        self._executor: Executor | None = None
        for folder in ("models", "figures", "launcher"):  # what a study writes below its directory stays below it
            io.below(self.directory, folder)

    def __enter__(self) -> StudyContext:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        """Release the workers (started by the first `map` that needs them); stop them on an error."""
        if self._executor is not None:
            self._executor.close() if kind is None else self._executor.stop()
            self._executor = None

    @property
    def trained(self) -> int:
        return len(self.trained_keys)

    @property
    def reused(self) -> int:
        return len(self.reused_keys)

    def run_dir(self, key: str) -> Path:
        return io.below(self.directory, "models", key)

    def map(
        self, function: Callable[..., R], *iterables: Iterable[Any], description: str, errors: str = "raise"
    ) -> list[Any]:
        """`list(map(function, *iterables))`, on the study's launcher (parallel where it has several workers).

        `function` and its arguments must pickle (a module-level function or a study's method, plain
        data, tasks); results come back in order. With `errors="raise"`, an exception in any call stops
        the rest and propagates; with `errors="return"`, a call's exception (or `WorkerLost`) is its result.
        Workers start once and serve every `map` until the context exits; Ctrl-C stops them all.
        """
        calls = list(zip(*iterables))
        executor, results = self.executor(), [None] * len(calls)
        parallel = f" ({min(executor.parallel, len(calls))} at once)" if executor.parallel > 1 else ""
        try:
            for index, error, result in self.bar(executor.run(function, calls), len(calls), description + parallel):
                if error is not None and errors == "raise":
                    raise error
                results[index] = error if error is not None else result
        except BaseException:  # an error or Ctrl-C: stop everything in flight
            self.abandon()
            raise
        return results

    def executor(self) -> Executor:
        """The study's executor: its workers start with the first call that needs them and serve every later one."""
        if self._executor is None:
            self._executor = self.launcher.executor(io.below(self.directory, "launcher"))
        return self._executor

    def train(self, jobs: Sequence[TrainJob]) -> dict[str, TrainedModel | None]:
        """Train (or reuse) every job; a run that diverges or whose worker dies twice is recorded and gives None.

        Unfinished jobs train on the study's launcher (one torch thread each by default); every run is
        seeded on its own, so the results are the same whatever the launcher and number of workers.
        Ctrl-C raises `Interrupted` saying how many runs finished; if every job fails, ToylabError.
        A run below its competence threshold (`competent`) is recorded in `below` and gives None.
        """
        return self.train_and_analyse(jobs)[0]

    def train_and_analyse(
        self, jobs: Sequence[TrainJob], function: Callable[..., R] | None = None, plan: Plan | None = None,
        group_by: Callable[[TrainJob], Hashable] = lambda job: job.config.seed, description: str = "analysing",
    ) -> tuple[dict[str, TrainedModel | None], dict[Hashable, R]]:
        """`train(jobs)`, and each group's analysis on the same workers as soon as the group's runs are done.

        The jobs fall in groups by `group_by` (by default their seed). Once every run of a group has finished, failed or
        been reused, `plan(group, runs)` (here) turns the group's usable runs, `{key: run dir}` of those `train` gives a
        model for (failed and below-competence runs left out), into keyed calls `(key, args)`, and `function(*args)` runs
        in the workers, before any training still queued: no worker idles while runs remain, and the analysis of the
        last group is all that follows the last run. Returns `train`'s models and `{key: result}` in the order of the
        groups (first job first) and of each plan, so the results are the same whatever the number of workers and the
        order in which calls finish. An analysis's exception stops everything and propagates (a call lost with its
        worker is retried once, as a run is); Ctrl-C raises `Interrupted`, and a rerun reuses the finished runs.
        """
        start = time.perf_counter()
        found = {job.key: trained_run(job.task, job.model, job.config, self.run_dir(job.key), note=False) for job in jobs}
        pending = [job for job in jobs if found[job.key] is None]
        self.reused_keys |= {job.key for job in jobs if found[job.key] is not None} - self.trained_keys
        self.trained_keys |= {job.key for job in pending}
        groups: dict[Hashable, list[TrainJob]] = {}
        for job in jobs:
            groups.setdefault(group_by(job), []).append(job)
        waiting = {group: {job.key for job in members if found[job.key] is None} for group, members in groups.items()}
        models: dict[str, TrainedModel | None] = {key: model for key, model in found.items() if model is not None}
        failed: dict[str, str] = {}
        planned: dict[Hashable, list[Hashable]] = {}
        analysed: dict[Hashable, Any] = {}
        calls: deque[tuple[Hashable, tuple[Any, ...]]] = deque()
        queue, lost = deque(pending), set()
        in_flight: dict[int, tuple[TrainJob | None, Hashable, tuple[Any, ...]]] = {}
        trained_at = start

        def ready(group: Hashable) -> None:
            if plan is not None and not waiting[group]:
                runs = {job.key: self.run_dir(job.key) for job in groups[group]
                        if models.get(job.key) is not None and self.competent(job, models[job.key]) is None}
                planned[group] = []
                for key, args in plan(group, runs) if runs else ():
                    planned[group].append(key)
                    calls.append((key, args))
                bar.total += len(planned[group])
                bar.refresh()

        executor = self.executor()
        parallel = f" ({executor.parallel} at once)" if executor.parallel > 1 else ""
        bar = tqdm(total=len(pending), desc=("training" if plan is None else f"training and {description}") + parallel,
                   disable=not self.progress, leave=False)
        try:
            for group in groups:
                ready(group)
            while calls or queue or in_flight:
                while len(in_flight) < executor.parallel and calls:  # analyses first: their runs are done
                    key, args = calls.popleft()
                    in_flight[executor.submit(function, args)] = (None, key, args)
                while len(in_flight) < executor.parallel and queue:
                    job = queue.popleft()
                    in_flight[executor.submit(train_or_fail, (job, self.run_dir(job.key)))] = (job, job.key, ())
                number, error, result = executor.next_done()
                job, key, args = in_flight.pop(number)
                if isinstance(error, WorkerLost) and (job is None, key) not in lost:  # a lost worker takes its calls: retry once
                    lost.add((job is None, key))
                    if job is None:
                        calls.appendleft((key, args))
                    else:
                        queue.appendleft(job)
                    continue
                bar.update()
                if job is None:
                    if error is not None:
                        raise error
                    analysed[key] = result
                    continue
                if error is None:
                    models[job.key] = load_trained(self.run_dir(job.key))
                elif isinstance(error, (DivergenceError, WorkerLost)):
                    failed[job.key] = str(error)
                else:
                    raise error
                trained_at = time.perf_counter()
                waiting[group_by(job)].discard(job.key)
                ready(group_by(job))
        except KeyboardInterrupt:
            self.abandon()
            done = sum(is_finished(self.run_dir(job.key)) for job in jobs)
            raise Interrupted(f"interrupted: {done} of {len(jobs)} training runs finished; rerun the same command to resume") from None
        except BaseException:
            self.abandon()
            raise
        finally:
            bar.close()
        self.training_seconds += trained_at - start
        if jobs and len(failed) == len(jobs):
            raise ToylabError(f"all {len(jobs)} training runs failed; first: {jobs[0].key}: {failed[jobs[0].key]}")
        for job in jobs:  # in the jobs' order, whatever the order they failed in
            if job.key in failed:
                self.failures.append({"run": job.key, "error": failed[job.key]})
                tqdm.write(f"run {job.key} failed: {failed[job.key]}", file=sys.stderr)
        finals = {job.key: io.read_json(self.run_dir(job.key) / "final.json") for job in jobs if job.key not in failed}
        self.steps_trained += sum(finals[job.key].get("steps", job.config.steps) for job in pending if job.key in finals)
        self.run_steps |= {job.key: {"steps": finals[job.key]["steps"], "cap": job.config.steps,
                                     **{key: finals[job.key][key] for key in ("stopped_at_target", "routing_stable") if key in finals[job.key]}}
                           for job in jobs if job.key in finals and job.config.target is not None}
        below = [b for job in jobs if job.key not in failed and (b := self.competent(job, models[job.key])) is not None]
        if below and len(below) + len(failed) == len(jobs):
            best = max(below, key=lambda b: b["value"])
            raise ToylabError(f"no model reached the competence threshold of task '{best['task']}' ({best['metric']} >= "
                              f"{best['threshold']:g} on held-out validation; best {best['value']:.3f}, run {best['run']}): train "
                              "longer (--set train.steps=...), or --set competence=0 for a smoke test whose verdicts mean nothing")
        self.below += below
        left_out = {b["run"] for b in below} | set(failed)
        return ({job.key: None if job.key in left_out else models[job.key] for job in jobs},
                {key: analysed[key] for group in groups for key in planned.get(group, ())})

    def abandon(self) -> None:
        """Stop every call in flight (after Ctrl-C or an error); the next call starts fresh workers."""
        if self._executor is not None:
            self._executor.stop()
            self._executor = None

    def competent(self, job: TrainJob, trained: TrainedModel) -> dict[str, Any] | None:
        """None when the run reaches its competence threshold (or the task has none), else what it missed by."""
        threshold = job.task.competence if self.competence is None else self.competence
        metric = job.task.primary_metric
        value = trained.metrics.get(metric)
        if threshold is None or value is None or value >= threshold:
            return None
        return {"run": job.key, "task": job.task.name, "metric": metric, "value": value, "threshold": threshold}

    def analyse_runs(self, jobs: Sequence[TrainJob], function: Callable[[TrainJob, Path], R], description: str) -> dict[str, R]:
        """`function(job, run_dir)` for every job whose run finished (in the workers), by job key.

        The jobs must have been trained (`train`); a failed run is left out, and so is a run below its competence
        threshold (what `train` gives None for: the report says it was not analysed).
        """
        below = {b["run"] for b in self.below}
        finished = [job for job in jobs if is_finished(self.run_dir(job.key)) and job.key not in below]
        results = self.map(function, finished, [self.run_dir(job.key) for job in finished], description=description)
        return dict(zip([job.key for job in finished], results))

    def heldout(self, task: Task, n: int, seed: int, exclude: Sequence[Batch] = ()) -> Batch:
        """`n` evaluation sequences from the held-out part of `task`'s sequence space (`toylab.splits`), none of them in
        the batches of `exclude`; noted for the report with how many could occur in training (counted, 0 by construction)."""
        batch = task.sample_split(n, seed, "heldout", exclude)
        note = {"task": task.name, "sequences": n, "seed": seed, "distinct": len(set(sequence_hashes(batch.inputs).tolist())),
                "in_training_part": int((~in_heldout(batch.inputs)).sum()),
                **({"disjoint_from": len(exclude)} if exclude else {})}
        if note not in self.heldout_batches:
            self.heldout_batches.append(note)
        return batch

    def expert_map(self, jobs: Sequence[TrainJob], batch: Batch) -> None:
        """Write `expert_map.json` (see `toylab.analysis.expert_map`) from the finished runs among `jobs` (MoE runs of one
        task that differ by seed), on held-out `batch`; nothing if none finished."""
        finished = [job for job in jobs if is_finished(self.run_dir(job.key))]
        if finished:
            views = self.map(routing_of_run, finished, [self.run_dir(job.key) for job in finished], [batch] * len(finished),
                             description="expert map")
            write_expert_map(self.directory / "expert_map.json", finished[0].task, batch,
                             {str(job.config.seed): view for job, (_, _, view) in zip(finished, views)}, *views[0][:2])

    def bar(self, items: Iterable[Any], total: int, description: str) -> Iterable[Any]:
        return tqdm(items, total=total, desc=description, disable=not self.progress, leave=False)

    def figure(self, name: str, fig: plt.Figure) -> str:
        """Save a figure as PNG (atomically); return its path relative to the study directory."""
        buffer = _io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        path = f"figures/{name}.png"
        io.atomic_write_bytes(io.below(self.directory, path), buffer.getvalue())
        return path


class Study(ABC):
    """Base class: subclasses set `name`, a `Config` dataclass, a `fast` preset, and implement run/report."""

    name: ClassVar[str]
    Config: ClassVar[type]
    fast: ClassVar[dict[str, Any]] = {}
    """Config overrides for `--fast`: the whole pipeline, small, in under a minute."""

    def __init__(self, config: Any) -> None:
        self.config = config

    @abstractmethod
    def run(self, ctx: StudyContext) -> dict[str, Any]:
        """Train, analyse, and return every number of the report (JSON-ready)."""

    @abstractmethod
    def report(self, results: dict[str, Any], ctx: StudyContext) -> Document:
        """The report document, from `results` alone (figures saved through `ctx.figure`); written as markdown and HTML."""

    @abstractmethod
    def summary(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        """Rows of the summary table printed by the CLI."""

    @classmethod
    def describe(cls) -> str:
        return (cls.__doc__ or cls.name).strip().split("\n")[0]

    def check(self) -> None:
        """Refuse (one-line ToylabError), before the study's directory is made, what would fail or do nothing once it runs.

        Read from the config's fields by name: every `TrainConfig` (devices here, training set in memory, no `seed` of
        its own beside `seeds`), seeds (`*_seed`, `eval_seed`) in range, `n_permutations` at most `MAX_PERMUTATIONS`,
        `n_eval` sequences of the study's `task` in memory, and the options of each of its `models` (a TransformerConfig
        for the task, no `model` key the study sets itself). A study with more to check extends this.
        """
        config, task, models = self.config, getattr(self, "task", None), getattr(self, "models", {})
        fields = vars(config)
        for name, value in fields.items():
            if isinstance(value, TrainConfig):
                check_devices(value)
                if "seeds" in fields and value.seed != 0:
                    raise ToylabError(f"{name}.seed={value.seed} has no effect: the study's runs take seeds 0..seeds-1 "
                                      "(--seeds); remove it")
                if isinstance(task, Task):
                    task.check_sample(value.n_train + value.n_val, 0)
            elif name.endswith("seed") and isinstance(value, int) and not 0 <= value <= MAX_SEED - SEED_DRAWS:
                raise ToylabError(f"{name} must be in [0, {MAX_SEED - SEED_DRAWS}] (got {value})")
        if not 1 <= fields.get("n_permutations", 1) <= MAX_PERMUTATIONS:
            raise ToylabError(f"n_permutations must be in [1, {MAX_PERMUTATIONS:,}] (got {fields['n_permutations']:,})")
        if isinstance(task, Task) and isinstance(fields.get("n_eval"), int):
            task.check_sample(fields["n_eval"], fields.get("eval_seed", 0))
        shared = fields.get("model") if isinstance(fields.get("model"), Mapping) else {}
        for options in models.values():
            for key, value in shared.items():
                if options.get(key, value) != value:
                    raise ToylabError(f"model.{key}={value!r} has no effect: the study sets {key} itself"
                                      + (f" (--set {key}=...)" if key in fields else ""))
            if isinstance(task, Task):
                task_model_config(task, options)
        for hooked, options, names in self.hooks():
            check_hooks(hooked, options, names)

    def hooks(self) -> list[tuple[Task, dict[str, Any], list[str]]]:
        """The hook points the study reads by name from a model it trains, as (task, model options, names): `check`
        refuses a name that model lacks (a layer it does not have, an expert hook of a dense model). None by default."""
        return []

    def training_seconds(self) -> float:
        """About how long training the study's `models` takes (one run per model and seed, for each `TrainConfig`);
        0 for a study that names no models of its task."""
        config, task, models = self.config, getattr(self, "task", None), getattr(self, "models", {})
        if not isinstance(task, Task):
            return 0.0
        seeds = getattr(config, "seeds", 1)
        return sum(seeds * train_seconds(value, task_model_config(task, options)) for value in vars(config).values()
                   if isinstance(value, TrainConfig) for options in models.values())


def check_hooks(task: Task, options: dict[str, Any], names: Sequence[str]) -> None:
    """Refuse (one-line ToylabError) hook `names` that the model of `options` for `task` does not have, naming the ones
    it has at other layers; the model is built on the meta device, so no weights are allocated."""
    with torch.device("meta"):
        model = build_model(task, options)
    available = model.hook_names()
    for name in names:
        if name not in available:
            site = re.sub(r"^blocks\.[^.]+\.", "", name)
            others = [n for n in available if n == site or n.endswith(f".{site}")]
            shape = ", ".join(f"{key}={getattr(model.cfg, key)!r}" for key in ("arch", "ffn", "n_layers") if hasattr(model.cfg, key))
            raise ToylabError(f"hook point '{name}' does not exist in the study's model of {task.name} ({shape}); "
                              f"valid: {', '.join(others) or 'none of that kind'}")


def dense_and_moe(config: Any, **moe: Any) -> dict[str, dict[str, Any]]:
    """Model options of a study's dense transformer and its MoE twin, from the study config's shared `model`
    options and its `n_experts`, `top_k`, `router` and `router_label` (those a config lacks keep their defaults);
    keyed "dense" and "moe". `moe` adds or overrides MoE options (any `TransformerConfig` field: a routing
    variant's `router`, `capacity_factor`, `shared_experts`, `orthogonality_weight`, ...)."""
    router, label = getattr(config, "router", "learned"), getattr(config, "router_label", None)
    routing = {"router": router, "router_label": label} if router != "learned" or label is not None else {}
    return {
        "dense": {**config.model, "ffn": "dense"},
        "moe": {**config.model, "ffn": "moe", "n_experts": config.n_experts, "top_k": config.top_k, **routing, **moe},
    }


ARCHITECTURES = ("dense", "moe", *CELLS)
"""What a study's `architectures` may name: the dense and MoE transformers, and the recurrent models."""
RECURRENT_OPTIONS = ("d_model", "n_layers")
"""The shared `model` options a study's recurrent models take (the rest describe attention and FFNs)."""


def check_architectures(names: Sequence[str]) -> None:
    """A study's `architectures`: dense and moe (the primary questions compare them), any recurrent model, each once."""
    if not {"dense", "moe"} <= set(names) or not set(names) <= set(ARCHITECTURES) or len(set(names)) < len(names):
        raise ValueError(f"architectures must name dense and moe (the primary question compares them) and may add "
                         f"{', '.join(CELLS)}, each once; valid: {', '.join(ARCHITECTURES)} (got {', '.join(names)})")


def architecture_models(config: Any, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Model options of each architecture in `names`: "dense" and "moe" as `dense_and_moe` builds them, "lstm" and
    "gru" a recurrent model as wide and as deep as the transformers (the shared `d_model` and `n_layers`)."""
    transformers = dense_and_moe(config)
    defaults = {f.name: f.default for f in fields(TransformerConfig)}
    recurrent = {key: config.model.get(key, defaults[key]) for key in RECURRENT_OPTIONS}
    return {name: transformers[name] if name in transformers else {"arch": name, **recurrent} for name in names}


def nest(assignments: Mapping[str, Any]) -> dict[str, Any]:
    """`{"train.steps": 5}` -> `{"train": {"steps": 5}}`; a key set both as a value and as a table is an error."""
    nested: dict[str, Any] = {}
    for key, value in assignments.items():
        *parents, leaf = key.split(".")
        node = nested
        for depth, parent in enumerate(parents):
            node = node.setdefault(parent, {})
            if not isinstance(node, dict):
                raise ToylabError(f"'{'.'.join(parents[: depth + 1])}' is set both as a value and as a table ('{key}')")
        if isinstance(node.get(leaf), dict):
            raise ToylabError(f"'{key}' is set both as a value and as a table")
        node[leaf] = value
    return nested


def code_version() -> dict[str, Any]:
    """The git commit of the source tree (and whether it had uncommitted changes), or the package version."""
    from importlib.metadata import version

    root = Path(__file__).resolve().parent.parent
    info: dict[str, Any] = {"toylab": version("toylab")}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            info["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def timing_note(timing: dict[str, Any]) -> Section:
    """The report's closing section: how long this invocation took, on what, and what it reused."""
    text = f"This invocation took {timing['seconds']:.0f} s of wall time on {timing['cpus']} CPU core(s)"
    if "training_seconds" in timing:
        text += f" ({timing['training_seconds']:.0f} s training, {timing['analysis_seconds']:.0f} s analysis, before this report)"
    if timing["runs_trained"] + timing["runs_reused"]:
        where = f"{timing['workers']} local worker process(es)" if timing["launcher"] == "local" else f"the {timing['launcher']} launcher"
        text += (f" with {where}; it trained {timing['runs_trained']} model(s) "
                 f"and reused {timing['runs_reused']} finished in an earlier invocation")
    return Section("Time", [Text(text + ". Timings live in `timing.json`, not in `results.json`, which is identical across invocations.")])


def heldout_note(batches: Sequence[dict[str, Any]]) -> Section:
    """The report's section on evaluation data: which held-out sequences were analysed, and their overlap with training."""
    drawn = "; ".join(f"{b['sequences']:,} of task `{b['task']}` (seed {b['seed']}, {b['distinct']:,} distinct"
                      + (f", none in the {b['disjoint_from']} batch(es) drawn before it" if "disjoint_from" in b else "") + ")"
                      for b in batches)
    overlap = sum(b["in_training_part"] for b in batches)
    return Section("Held-out data", [Text(
        f"Evaluation sequences: {drawn}. They come from the held-out {HELDOUT_FRACTION:.0%} of each task's sequence space "
        f"(by a hash of the tokens, `toylab.splits`), which training and its sampling never draw from: {overlap} of them "
        "lie in the training part, so the overlap with every training set is " + ("0" if overlap == 0 else f"at most {overlap}")
        + ". Validation sets are held out the same way (`val_overlap`, counted against the training set, in each run's "
        "`final.json`). The same evaluation sequences serve every seed, so an interval over seeds leaves out the luck of that "
        "one draw of sequences, except where it says it includes resampled evaluation sequences (a bootstrap over them, "
        "shared by all seeds, `stats.sequence_resamples`).")])


def by_kind(runs: Iterable[tuple[str, R]]) -> dict[str, list[R]]:
    """`(run key, item)` pairs grouped by the kind of model (`dense-seed3` -> `dense`), in their order."""
    kinds: dict[str, list[R]] = {}
    for key, item in runs:
        kinds.setdefault(key.rsplit("-seed", 1)[0], []).append(item)
    return kinds


def competence_note(results: Mapping[str, Any], config: Any) -> list[Section]:
    """The report's first lines on competence: a smoke test (threshold 0) says its verdicts mean nothing; runs below
    their task's threshold are named, not analysed."""
    if getattr(config, "competence", None) == 0:
        return [Section("Smoke test", [Text(
            "This run sets `competence = 0`: its models were analysed whether or not they learned the task (`--fast` presets "
            "train too briefly to), so it checks that the pipeline runs, and **its verdicts say nothing about the question**. "
            "Run without `--fast` for verdicts on models that learned the task.")])]
    below = results.get("below_competence") or []
    if not below:
        return []
    kinds = by_kind((b["run"], b) for b in below)
    lines = "; ".join(f"{len(runs)} `{kind}` run(s) (" + ", ".join(f"{r['run']}: {r['value']:.3f}" for r in runs) + ")"
                      for kind, runs in kinds.items())
    first = below[0]
    return [Section("Models below the task's competence threshold", [Text(
        f"Not analysed, because they did not learn the task ({first['metric']} below {first['threshold']:g} on held-out "
        f"validation): {lines}. Every number below comes from the other runs; train longer (`--set train.steps=...`) to "
        "analyse them.")])]


def target_note(run_steps: Mapping[str, Mapping[str, Any]]) -> list[Section]:
    """The report's first lines on training to a target: how many steps the runs took, per kind of run, of their cap."""
    if not run_steps:
        return []
    kinds = by_kind(run_steps.items())
    lines = "; ".join(f"`{kind}` {sum(r['stopped_at_target'] for r in runs)} of {len(runs)} at its target, after "
                      f"{min(r['steps'] for r in runs)}–{max(r['steps'] for r in runs)} steps (mean "
                      f"{sum(r['steps'] for r in runs) / len(runs):.0f}) of a cap of {max(r['cap'] for r in runs)}"
                      for kind, runs in kinds.items())
    return [Section("Trained to a target", [Text(
        "Runs stopped once their task's primary metric on held-out validation had reached the target at `patience` "
        f"validations in a row (`train.target`; each run's `final.json` records its steps): {lines}. A run that never "
        "reached it trained to the cap."
        + (" Runs with MoE layers also waited, at the same validations, for their routing to settle (`train.settle`: the "
           "share of validation tokens keeping their expert set from the validation before, `routing_stable` in "
           "`final.json`)." if any("routing_stable" in r for r in run_steps.values()) else ""))])]


def sequential_note(sequential: Mapping[str, Any]) -> Section:
    """The report's first section under `--seeds auto`: the stopping rule, every look and why it stopped."""
    rows = [{"look": i + 1, "seeds": look["seeds"], "alpha at this look": f"{look['alpha']:.2g}",
             "primary verdicts": ", ".join(look["verdicts"]), "mean differences": ", ".join(fmt(m) for m in look["means"])}
            for i, look in enumerate(sequential["looks"])]
    last = sequential["looks"][-1]
    why = ("no primary test was inconclusive at its look's alpha" if sequential["stopped"] == "settled" else
           f"the budget of {sequential['max_seeds']} seeds was spent with the primary family still inconclusive")
    return Section("Seeds spent sequentially: the primary verdict", [Text(
        f"{sequential['rule_text']} It stopped at {last['seeds']} seeds because {why}: the primary verdict is "
        f"**{', '.join(last['verdicts'])}**, at the error rate of the whole design (at most {sequential['alpha']:g}). The "
        f"verdicts elsewhere in this report are drawn from the same {last['seeds']} seeds at the fixed level of one look; "
        f"after repeated looks only this one keeps its error rate."), Table(rows)])


@dataclass(frozen=True)
class Written:
    """What `write_report` rendered, for the terminal: the study's bottom line and the report's first notes (markdown),
    and its summary table's rows in the report's order."""

    bottom_line: str
    notes: list[str]
    summary: list[dict[str, Any]]


def write_report(study: Study, results: dict[str, Any], ctx: StudyContext, timing: dict[str, Any] | None) -> Written:
    """Render the study's report document (with the timing section, if given) to `report.md` and `report.html`, its
    tables to `tables/*.csv` (`report.table_files`; stale ones removed), and its summary table to `summary.json` (what
    `toylab runs` reads, without importing the study).

    All are rendered before any is written, and each is written atomically.
    """
    summary = study.summary(results)
    document = study.report(results, ctx)
    notes = [heldout_note(results["heldout"])] if results.get("heldout") else []
    if timing is not None:
        notes.append(timing_note(timing))
    competence = competence_note(results, study.config) + target_note(results.get("run_steps") or {})
    first = competence + ([sequential_note(results["sequential"])] if results.get("sequential") else [])
    written = Written(bottom_line(document), [f"**{section.title}.** " + " ".join(block.markdown for block in section.blocks
                                                                                if isinstance(block, Text)) for section in competence], summary)
    document = Document(document.title, [*first, *document.blocks, *notes])
    markdown, html = to_markdown(document), to_html(document, ctx.directory)
    tables = {path: csv_text(table.rows) for path, table in table_files(document)}
    io.write_json(ctx.directory / "summary.json", table_json(summary))
    io.write_text(ctx.directory / "report.md", markdown)
    io.write_text(ctx.directory / "report.html", html)
    for path, text in tables.items():
        io.write_text(ctx.directory / path, text)
    for stale in set((ctx.directory / "tables").glob("*.csv")) - {ctx.directory / path for path in tables}:
        with io.writing(stale):
            stale.unlink()
    return written


def cpu_seconds() -> float:
    """CPU time (user and system) of this process and of its finished child processes (the workers, once stopped)."""
    import resource

    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))


def available_cpus() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class StudyOutcome:
    directory: Path
    results: dict[str, Any]
    seconds: float
    report: Written
    """What the report says first, and its summary table, rendered from the stored `results.json`."""

    @property
    def summary(self) -> list[dict[str, Any]]:
        """The summary table's rows, in the report's order."""
        return self.report.summary


def resolve(name: str, overrides: Mapping[str, Any] | None = None, fast: bool = False) -> Study:
    """The study `name` with its config resolved from defaults, the fast preset and overrides."""
    cls = get_study(name)
    options = merge(cls.fast if fast else {}, overrides or {})
    return cls(build(cls.Config, options))


def stored_study(directory: Path) -> Study:
    """The study of a run directory, resolved from its `config.json` (one-line ToylabError if it names no study);
    a study run with `--seeds auto` resolves with the seeds its last look used (`results.json`)."""
    config = io.read_json(Path(directory) / "config.json")
    if not isinstance(config, dict) or not isinstance(config.get("study"), str):
        raise ToylabError(f"{directory}/config.json names no study; it is not a study run's config")
    options = {key: value for key, value in config.items() if key not in ("study", "sequential")}
    if "sequential" in config:
        results = io.read_json(Path(directory) / "results.json")
        options["seeds"] = results["sequential"]["looks"][-1]["seeds"] if isinstance(results, dict) and "sequential" in results else MIN_SEEDS
    return resolve(config["study"], options)


@dataclass(frozen=True)
class SeedBudget:
    """`--seeds auto`: start at the study's default seeds (at least `MIN_SEEDS`) and, while its primary family of
    tests is inconclusive, add `batch` seeds at a time up to `max_seeds`, each look testing at its share of
    `alpha` spent by `rule` (`toylab.analysis.sequential`)."""

    max_seeds: int
    batch: int = 2
    alpha: float = 0.05
    rule: str = "obrien_fleming"

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown spending rule '{self.rule}'; valid: {', '.join(RULES)}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1) (got {self.alpha})")


def primary_comparisons(results: Mapping[str, Any], name: str) -> list[dict[str, Any]]:
    """The `compare` results of a study's primary family (`stats.correct_families`), for a sequential look."""
    families = results.get("test_families") or results.get("families") or {}
    found = [f["comparisons"] for f in families.values() if f["role"].startswith("primary") and f.get("comparisons")]
    if not found:
        raise ToylabError(f"--seeds auto needs a primary family of paired comparisons over seeds; study '{name}' reported none")
    return found[0]


def run_looks(name: str, overrides: Mapping[str, Any], fast: bool, budget: SeedBudget, ctx: StudyContext) -> dict[str, Any]:
    """Run the study at each look of the budget's schedule (finished runs are reused from look to look) until its
    primary family is settled at the look's alpha or the budget is spent; the last look's results, with the record
    of every look under `sequential`."""
    start = max(resolve(name, overrides, fast).config.seeds, MIN_SEEDS)
    schedule = looks(start, budget.batch, max(budget.max_seeds, start))
    record = []
    for seeds, alpha in zip(schedule, look_alphas(schedule, budget.alpha, budget.rule)):
        ctx.failures, ctx.heldout_batches, ctx.below = [], [], []
        results = resolve(name, {**overrides, "seeds": seeds}, fast).run(ctx)
        decision = decide(primary_comparisons(results, name), alpha)
        record.append({"seeds": seeds, "alpha": alpha, "verdicts": decision["verdicts"], "settled": decision["settled"],
                       "means": [c["mean"] for c in decision["tests"]], "p_values": [c["p_value"] for c in decision["tests"]]})
        if decision["settled"]:
            break
    return {**results, "sequential": {"max_seeds": budget.max_seeds, "batch": budget.batch, "alpha": budget.alpha, "rule": budget.rule,
                                      "schedule": schedule, "rule_text": stopping_rule_text(budget.rule, budget.alpha, schedule),
                                      "looks": record, "stopped": "settled" if record[-1]["settled"] else "budget spent"}}


def run_study(
    name: str,
    overrides: Mapping[str, Any] | None = None,
    out: Path = Path("runs"),
    fast: bool = False,
    progress: bool = True,
    workers: int = 1,
    launcher: LaunchConfig | None = None,
    budget: SeedBudget | None = None,
    force: bool = False,
) -> StudyOutcome:
    """Run (or resume) a study; everything lands in `<out>/<name>/<hash of the resolved config>/`.

    With a seed `budget` (`--seeds auto`), seeds are added look by look (`run_looks`); the directory's config
    says `seeds = "auto"` with the budget, and `results.json` holds every look under `sequential`.

    Training runs (and other `ctx.map` calls) go to `launcher`, by default `workers` local processes.
    Local processes are spawned, so a script that uses several must guard its entry point with
    `if __name__ == "__main__":`. Training estimated to take more than `toylab.config.MAX_HOURS` is refused unless `force`.
    """
    launcher = launcher or build(LaunchConfig, {"workers": workers})
    start, cpu = time.perf_counter(), cpu_seconds()
    study = resolve(name, overrides, fast)
    study.check()  # before any folder is written
    launcher.check()
    if not force:
        largest = study if budget is None else resolve(name, {**(overrides or {}), "seeds": budget.max_seeds}, fast)
        check_time(largest.training_seconds() / launcher.workers, "training this study's models", TIME_FIX)
    config = {"study": name, **to_dict(study.config)}
    if budget is not None:
        if "seeds" not in config:
            raise ToylabError(f"--seeds auto needs a study with seeds; '{name}' has none")
        config = {**config, "seeds": "auto", "sequential": to_dict(budget)}
    directory = Path(out) / name / config_hash(config)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ToylabError(f"cannot create output directory {directory}: {error.strerror}") from None
    with StudyContext(directory, progress, launcher=launcher, competence=getattr(study.config, "competence", None)) as ctx:
        io.write_json(directory / "config.json", config)
        io.write_json(directory / "code_version.json", code_version())
        results = study.run(ctx) if budget is None else run_looks(name, overrides or {}, fast, budget, ctx)
    results["failed_runs"] = ctx.failures
    results["below_competence"] = ctx.below
    results["heldout"] = ctx.heldout_batches
    results["run_steps"] = ctx.run_steps
    io.write_json(directory / "results.json", results)
    ran = time.perf_counter() - start
    timing = {"seconds": round(ran, 2), "cpus": available_cpus(), "launcher": launcher.launcher,
              "workers": launcher.workers, "runs_trained": ctx.trained, "runs_reused": ctx.reused,
              "training_seconds": round(ctx.training_seconds, 2), "analysis_seconds": round(ran - ctx.training_seconds, 2),
              "steps_trained": ctx.steps_trained}
    io.write_json(directory / "timing.json", timing)
    # the report is written from what the run directory stores, as `toylab report` (toylab.runs.rerender) writes it again
    document = write_report(stored_study(directory), read_results(directory), ctx, timing)
    seconds = time.perf_counter() - start  # `seconds` stays the time the report states (a re-rendered report is identical)
    timing.update(report_seconds=round(seconds - ran, 2), cpu_busy=round((cpu_seconds() - cpu) / (seconds * available_cpus()), 3))
    io.write_json(directory / "timing.json", timing)
    return StudyOutcome(directory, results, timing["seconds"], document)
