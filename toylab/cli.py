"""The `toylab` command line: a thin Typer layer over the library."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from toylab import io
from toylab.config import build, config_hash, load_file, parse_assignments, to_dict
from toylab.errors import ToylabError
from toylab.report import markdown_table
from toylab.task import Label


class App(typer.Typer):
    """A Typer app whose errors are one line on stderr: exit code 2 for bad input, never a traceback."""

    def __call__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        command = typer.main.get_command(self)
        try:
            code = command.main(args=args, prog_name="toylab", standalone_mode=False, **kwargs)
        except ToylabError as error:
            typer.echo(f"error: {error}", err=True)
            sys.exit(2)
        except typer.TyperException as error:
            typer.echo(f"error: {error.format_message()}", err=True)
            sys.exit(error.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


app = App(help="toylab: a toy-model laboratory for mechanistic interpretability.", no_args_is_help=True,
          pretty_exceptions_enable=False, add_completion=False)
tasks_app = App(help="List, inspect and export the synthetic tasks.", no_args_is_help=True)
study_app = App(help="List and run studies.", no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")
app.add_typer(study_app, name="study")

TaskOptions = typer.Option([], "--option", "-o", help="Task option KEY=VALUE (repeatable), e.g. -o k=3 -o m=6.")


def _task(name: str, options: list[str]) -> Any:
    from toylab.registry import get_task

    return get_task(name, parse_assignments(options))


def _label_text(label: Label) -> str:
    if label.ordinal:
        return f"ordinal 0..{label.n_classes - 1}"
    kind = "multi-hot over" if label.multi_hot else "classes"
    shown = ", ".join(label.classes[:8]) + (", ..." if label.n_classes > 8 else "")
    return f"{kind} {{{shown}}}"


def _cell(value: Any) -> str:
    """One label value for display: '.' where undefined, class ids joined for a multi-hot set ('-' if empty)."""
    if (value < 0).all():
        return "."
    return "".join(map(str, value.nonzero()[0])) or "-" if value.ndim else str(value)


@tasks_app.command("list", epilog="Example: toylab tasks list")
def tasks_list() -> None:
    """List the registered tasks."""
    from toylab.registry import TASKS

    for name in TASKS.names():
        task = TASKS.get(name)()
        typer.echo(f"{name:16s} {task.describe().splitlines()[0]}")


@tasks_app.command("show", epilog="Examples: toylab tasks show brackets  |  toylab tasks show brackets -o k=3 -n 5")
def tasks_show(
    name: str = typer.Argument(..., help="Task name (see `toylab tasks list`)."),
    option: list[str] = TaskOptions,
    n: int = typer.Option(3, "-n", min=0, help="Number of decoded samples to print."),
    seed: int = typer.Option(0, help="Sampling seed."),
) -> None:
    """Describe a task's options and labels, and print decoded samples with their labels."""
    task = _task(name, option)
    typer.echo(f"{task.name}: {task.describe()}\n\noptions: {json.dumps(task.options)}\n\nlabels:")
    for label in task.labels.values():
        typer.echo(f"  {label.name:16s} {label.kind:9s} {_label_text(label)}: {label.description}")
    batch = task.sample(n, seed) if n else None
    for i in range(n):
        keep = task.positions(batch[i : i + 1])[0]
        tokens = [t for t, k in zip(task.decode(batch.inputs[i]), keep) if k]
        rows = {"token": tokens}
        for label_name, values in batch.labels.items():
            values = values[i][keep]
            rows[label_name] = [_cell(v) for v in values]
        width = max(len(x) for row in rows.values() for x in row) + 1
        typer.echo(f"\nsample {i}:")
        for row_name, row in rows.items():
            typer.echo(f"  {row_name:16s}" + "".join(x.rjust(width) for x in row))


@tasks_app.command("sample", epilog="Example: toylab tasks sample brackets -n 1000 --seed 1 --out dyck.jsonl")
def tasks_sample(
    name: str = typer.Argument(..., help="Task name."),
    n: int = typer.Option(100, "-n", min=1, help="Number of sequences."),
    seed: int = typer.Option(0, help="Sampling seed."),
    out: Optional[Path] = typer.Option(None, help="Output .jsonl file (default: standard output)."),
    option: list[str] = TaskOptions,
) -> None:
    """Export sequences as JSON lines: {"tokens": [decoded tokens], "labels": {name: [ints]}}."""
    task = _task(name, option)
    batch = task.sample(n, seed)
    keep = task.positions(batch)
    lines = [
        json.dumps({
            "tokens": [t for t, k in zip(task.decode(batch.inputs[i]), keep[i]) if k],
            "labels": {label: values[i][keep[i]].tolist() for label, values in batch.labels.items()},
        })
        for i in range(n)
    ]
    text = "\n".join(lines) + "\n"
    if out is None:
        typer.echo(text, nl=False)
    else:
        io.write_text(out, text)
        typer.echo(f"wrote {n} sequences to {out}")


@app.command(epilog="Examples: toylab train --task brackets --model moe  |  "
             "toylab train --task brackets --model dense -o m=6 --set steps=2000 --set d_model=64")
def train(
    task: str = typer.Option("brackets", help="Task name."),
    model: str = typer.Option("dense", help="Model: dense or moe."),
    option: list[str] = TaskOptions,
    set_: list[str] = typer.Option([], "--set", "-s", help="Model or training option KEY=VALUE (TransformerConfig or TrainConfig field)."),
    config: Optional[Path] = typer.Option(None, help="JSON/TOML file with `task_options`, `model` and `train` tables."),
    seed: int = typer.Option(0, help="Training seed."),
    out: Path = typer.Option(Path("runs/train"), help="Parent directory of the run directory."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Train one dense or MoE transformer on a task; print its held-out metrics."""
    from toylab.models import TransformerConfig
    from toylab.training import TrainConfig
    from toylab.training import train as train_model

    if model not in ("dense", "moe"):
        raise ToylabError(f"unknown model '{model}'; valid: dense, moe")
    file = load_file(config) if config else {}
    if set(file) - {"task_options", "model", "train"}:
        unknown = sorted(set(file) - {"task_options", "model", "train"})[0]
        raise ToylabError(f"unknown config key '{unknown}'; valid: task_options, model, train")
    from toylab.registry import get_task

    the_task = get_task(task, {**file.get("task_options", {}), **parse_assignments(option)})
    model_fields, train_fields = TransformerConfig.__dataclass_fields__, TrainConfig.__dataclass_fields__
    model_options, train_options = dict(file.get("model", {})), {**file.get("train", {}), "seed": seed}
    for key, value in parse_assignments(set_).items():
        if key in model_fields and key not in ("vocab_size", "max_len", "ffn"):
            model_options[key] = value
        elif key in train_fields:
            train_options[key] = value
        else:
            valid = sorted({*model_fields, *train_fields} - {"vocab_size", "max_len", "ffn"})
            raise ToylabError(f"unknown option '{key}'; valid: {', '.join(valid)}")
    model_options["ffn"] = model
    model_cfg = build(TransformerConfig, model_options, vocab_size=len(the_task.vocab), max_len=the_task.seq_len)
    model_options = {k: v for k, v in to_dict(model_cfg).items() if k not in ("vocab_size", "max_len")}
    train_cfg = build(TrainConfig, train_options)
    run_dir = out / f"{task}-{model}-{config_hash([the_task.options, model_options, to_dict(train_cfg)])}"
    try:
        result = train_model(the_task, model_options, train_cfg, run_dir, progress=progress)
    except KeyboardInterrupt:
        typer.echo(f"interrupted: the run in {run_dir} did not finish; rerun the same command to train it", err=True)
        raise typer.Exit(130) from None
    typer.echo(markdown_table([{"metric": k, "value": f"{v:.4f}"} for k, v in result.metrics.items()]))
    typer.echo(f"run directory: {run_dir}")


@study_app.command("list", epilog="Example: toylab study list")
def study_list() -> None:
    """List the registered studies."""
    from toylab.registry import STUDIES

    for name in STUDIES.names():
        typer.echo(f"{name:24s} {STUDIES.get(name).describe()}")


@study_app.command("run", epilog="Examples: toylab study run expert-specialization  |  "
                   "toylab study run expert-specialization --fast --seeds 2 --out /tmp/runs  |  "
                   "toylab study run expert-specialization -o m=6 --set train.steps=2000 --set n_experts=8  |  "
                   "toylab study run expert-specialization --sweep n_experts=4,8 --sweep top_k=1,2  |  "
                   "toylab study run planning --launcher ray --address auto  |  "
                   "toylab study run planning --launcher slurm --partition cpu --time 30")
def study_run(
    name: str = typer.Argument(..., help="Study name (see `toylab study list`)."),
    task: Optional[str] = typer.Option(None, help="Task to study (default: the study's own)."),
    seeds: Optional[int] = typer.Option(None, min=1, help="Number of seeds (default 3)."),
    out: Path = typer.Option(Path("runs"), help="Output root; the study writes to OUT/NAME/ID/."),
    fast: bool = typer.Option(False, "--fast", help="Smoke preset: the full pipeline, small, in under a minute."),
    option: list[str] = TaskOptions,
    set_: list[str] = typer.Option([], "--set", "-s", help="Study config KEY=VALUE; dotted keys reach nested tables (train.steps=500)."),
    config: Optional[Path] = typer.Option(None, help="JSON/TOML file of study config keys."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", min=1,
                                          help="Training runs at once, one process each (default: one per CPU core)."),
    launcher: str = typer.Option("local", help="Where training runs go: local (processes here), ray or slurm."),
    address: Optional[str] = typer.Option(None, help="ray: 'auto' or HOST:PORT / ray://HOST:PORT of a running cluster "
                                          "(default: a local Ray instance)."),
    partition: Optional[str] = typer.Option(None, help="slurm: partition to submit to."),
    time_limit: int = typer.Option(60, "--time", help="slurm: time limit of each job in minutes."),
    sweep: list[str] = typer.Option([], "--sweep", help="Run the grid KEY=V1,V2,... (repeatable; dotted keys as in --set)."),
) -> None:
    """Run a study (resuming finished runs); print a summary table and the report's path.

    With --sweep, run every combination of the swept values (each its own run directory) and write a
    sweep summary (CSV and markdown) beside them.
    """
    from toylab.executors import LaunchConfig
    from toylab.study import available_cpus, merge, nest, run_study
    from toylab.sweep import parse_sweep, run_sweep

    overrides = merge(load_file(config) if config else {}, nest(parse_assignments(set_)))
    if task is not None:
        overrides["task"] = task
    if seeds is not None:
        overrides["seeds"] = seeds
    if option:
        overrides["task_options"] = {**overrides.get("task_options", {}), **parse_assignments(option)}
    where = build(LaunchConfig, {"launcher": launcher, "workers": workers or (available_cpus() if launcher == "local" else 2),
                             "address": address, "partition": partition, "time": time_limit})
    grid = parse_sweep(sweep)
    try:
        if grid:
            swept = run_sweep(name, grid, overrides, out, fast=fast, progress=progress, launcher=where)
            typer.echo(markdown_table(swept.rows))
            typer.echo(f"finished in {swept.seconds:.1f} s\nsweep summary: {swept.directory / 'summary.csv'}")
            return
        outcome = run_study(name, overrides, out, fast=fast, progress=progress, launcher=where)
    except KeyboardInterrupt as interrupted:  # `Interrupted` says how many runs finished
        typer.echo(str(interrupted) or "interrupted; rerun the same command to resume", err=True)
        raise typer.Exit(130) from None
    typer.echo(markdown_table(outcome.summary))
    if outcome.results.get("failed_runs"):
        typer.echo(f"{len(outcome.results['failed_runs'])} run(s) failed; see the report.")
    typer.echo(f"finished in {outcome.seconds:.1f} s\nreport: {outcome.directory / 'report.md'}")


if __name__ == "__main__":
    app()
