"""The `toylab` command line: a thin Typer layer over the library.

Heavy libraries (torch, Lightning, pandas, matplotlib) load inside the commands that need them, so
`toylab --help` and `toylab tasks list` start in well under a second.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Optional

import typer
from typer._click.exceptions import NoArgsIsHelpError, UsageError

from toylab import io
from toylab.config import build, check_time, config_hash, load_file, parse_assignments, to_dict
from toylab.errors import ToylabError

if TYPE_CHECKING:
    from toylab.task import Label, Task


logging.getLogger("matplotlib").setLevel(logging.ERROR)  # its cache-folder warnings (a read-only HOME) would add lines to an error

NESTED = {"run": "study run", "list": "study list"}
"""Top-level commands people type for a nested one."""


def _fail(message: str, code: int = 2) -> NoReturn:
    """Print `message` as one line on stderr and exit with `code`."""
    typer.echo("error: " + " ".join(str(message).split()), err=True)
    sys.exit(code)


class App(typer.Typer):
    """A Typer app whose errors are one line on stderr: exit code 2 for bad input, never a traceback."""

    def __call__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        command = typer.main.get_command(self)
        try:
            _check_environment()
            code = command.main(args=args, prog_name="toylab", standalone_mode=False, **kwargs)
        except ToylabError as error:
            _fail(str(error))
        except NoArgsIsHelpError as error:  # a group called without its command
            ctx = error.ctx
            _fail(f"missing command ({', '.join(ctx.command.list_commands(ctx))}); see '{ctx.command_path} --help'")
        except UsageError as error:
            where, message = error.ctx.command_path if error.ctx else "toylab", error.format_message().rstrip(".")
            nested = next((f"toylab {full}" for typed, full in NESTED.items() if message.startswith(f"No such command '{typed}'")), None)
            _fail(f"{message}" + (f" (or '{nested}'?)" if nested else "") + f"; see '{where} --help'", error.exit_code)
        except typer.TyperException as error:
            _fail(error.format_message(), error.exit_code)
        except MemoryError:
            _fail("out of memory; ask for less (fewer or shorter sequences, a smaller model)")
        except OSError as error:  # where a path is not already checked: still one line naming it
            _fail(f"{error.strerror or error}: {error.filename}" if error.filename else str(error))
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        sys.exit(code if isinstance(code, int) else 0)


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _check_environment() -> None:
    """Refuse thread counts in the environment that OpenMP would warn about on stderr, once per library, at import."""
    for name in THREAD_VARIABLES:
        value = os.environ.get(name)
        if value is not None and not (value.isascii() and value.isdigit() and int(value) > 0):
            raise ToylabError(f"environment variable {name}={value!r} is not a number of threads >= 1; unset it or set one")


def _once(assignments: dict[str, str], key: str, option: str) -> None:
    """Refuse `key` given both by a command-line `option` and by `--set`: one of the two would be dropped silently."""
    if key in assignments:
        raise ToylabError(f"'{key}' is given twice, by {option} and by --set {key}={assignments[key]}; give it once")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"toylab {version('toylab')}")
        raise typer.Exit()


def _path(value: str) -> Path:
    """A path option's value: not empty (an empty path would mean the current folder)."""
    if not value.strip():
        raise typer.BadParameter("must not be empty")
    return Path(value)


SEED_RANGE = {"min": 0, "max": 2**32 - 1}
app = App(help="toylab: a toy-model laboratory for mechanistic interpretability.", no_args_is_help=True,
          pretty_exceptions_enable=False, add_completion=False, rich_markup_mode=None)
tasks_app = App(help="List, inspect and export the synthetic tasks.", no_args_is_help=True, rich_markup_mode=None)
study_app = App(help="List and run studies.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(tasks_app, name="tasks")
app.add_typer(study_app, name="study")


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """toylab: a toy-model laboratory for mechanistic interpretability."""


TaskOptions = typer.Option([], "--option", "-o", help="Task option KEY=VALUE (repeatable), e.g. -o k=3 -o m=6.")
Seed = typer.Option(0, **SEED_RANGE, help="Sampling seed.")


def _task(name: str, options: list[str]) -> Task:
    from toylab.registry import get_task

    return get_task(name, parse_assignments(options))


def _label_text(label: Label) -> str:
    if label.ordinal:
        return f"ordinal 0..{label.n_classes - 1}"
    kind = "multi-hot over" if label.multi_hot else "classes"
    shown = ", ".join(label.classes[:8]) + (", ..." if label.n_classes > 8 else "")
    return f"{kind} {{{shown}}}"


def _cell(value: Any, label: Label) -> str:
    """One label value for display: '.' where undefined, the class name (the number of an ordinal label),
    a multi-hot set as `{a,b}`."""
    if (value < 0).all():
        return "."
    if label.multi_hot:
        return "{" + ",".join(label.classes[i] for i in value.nonzero()[0]) + "}"
    return str(value) if label.ordinal else label.classes[value]


@tasks_app.command("list", epilog="Example: toylab tasks list")
def tasks_list() -> None:
    """List the registered tasks."""
    from toylab.registry import TASKS

    for name in TASKS.names():
        typer.echo(f"{name:16s} {TASKS.get(name)().describe().splitlines()[0]}")


@tasks_app.command("show", epilog="Examples: toylab tasks show brackets  |  toylab tasks show brackets -o k=3 -n 5")
def tasks_show(
    name: str = typer.Argument(..., help="Task name (see `toylab tasks list`)."),
    option: list[str] = TaskOptions,
    n: int = typer.Option(3, "-n", min=0, max=1000, help="Number of decoded samples to print."),
    seed: int = Seed,
) -> None:
    """Describe a task's options and labels, and print decoded samples with their labels.

    Label values are class names (numbers for ordinal labels), '.' where a label is undefined, and
    {a,b} for the set of a multi-hot label.
    """
    task = _task(name, option)
    batch = task.sample(n, seed) if n else None
    typer.echo(f"{task.name}: {task.describe()}\n\noptions: {json.dumps(task.options)}\n\nlabels:")
    for label in task.labels.values():
        typer.echo(f"  {label.name:16s} {label.kind:9s} {_label_text(label)}: {label.description}")
    for i in range(n):
        keep = task.positions(batch[i : i + 1])[0]
        tokens = [t for t, k in zip(task.decode(batch.inputs[i]), keep) if k]
        rows = {"token": tokens}
        for label_name, values in batch.labels.items():
            rows[label_name] = [_cell(v, task.labels[label_name]) for v in values[i][keep]]
        width = max(len(x) for row in rows.values() for x in row) + 1
        typer.echo(f"\nsample {i}:")
        for row_name, row in rows.items():
            typer.echo(f"  {row_name:16s}" + "".join(x.rjust(width) for x in row))


@tasks_app.command("sample", epilog="Example: toylab tasks sample brackets -n 1000 --seed 1 --out dyck.jsonl")
def tasks_sample(
    name: str = typer.Argument(..., help="Task name."),
    n: int = typer.Option(100, "-n", min=1, help="Number of sequences."),
    seed: int = Seed,
    out: Optional[Path] = typer.Option(None, parser=_path, help="Output .jsonl file (default: standard output)."),
    option: list[str] = TaskOptions,
) -> None:
    """Export sequences as JSON lines, one object per sequence:

    \b
    {"tokens": [token, ...], "labels": {label: [value per token, ...], ...}}

    Only real positions are written (no padding). A label value is a class id (-1 where the label is
    undefined) or, for a multi-hot label, a list of 0/1 per class; `toylab tasks show NAME` lists every
    label's classes.
    """
    if out is not None:
        io.check_writable(out)
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


@tasks_app.command("new", epilog="Examples: toylab tasks new running_sum  |  "
                   "toylab tasks new running_sum --dir mypkg/tasks --tests-dir mypkg/tests")
def tasks_new(
    name: str = typer.Argument(..., help="Task name: a lowercase Python identifier, also the file name NAME.py."),
    dir_: Optional[Path] = typer.Option(None, "--dir", parser=_path, help="Folder for NAME.py (default: toylab's tasks/ folder)."),
    tests_dir: Optional[Path] = typer.Option(None, "--tests-dir", parser=_path,
                                             help="Folder for test_NAME.py (default: tests/ beside the task's folder)."),
) -> None:
    """Write a documented task skeleton NAME.py (a working example rule to replace) and its test file with an
    independent-reference test to fill in; nothing is overwritten. docs/adding-a-task.md walks through it."""
    from toylab.scaffold import class_name, new_task

    made = new_task(name, dir_, tests_dir)
    typer.echo(f"wrote {made.task_file}\nwrote {made.test_file}")
    check = f"python -m pytest {made.test_file}" + (f" tests/test_task_api.py -k {name}" if made.builtin else "")
    if not made.builtin:
        typer.echo(f"register it in your package's entry-point group toylab.tasks: {name} = \"PACKAGE.{name}:{class_name(name)}\"")
    typer.echo(f"next: replace the example rule, fill in reference_outputs, then: {check}")


def _table(file: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    """Table `key` of a config file (empty if absent); a one-line error if it is not a table."""
    value = file.get(key, {})
    if not isinstance(value, dict):
        raise ToylabError(f"'{key}' in {path} must be a table of keys, not {value!r}")
    return value


@app.command(epilog="Examples: toylab train --task brackets --model moe  |  "
             "toylab train --task brackets --model dense -o m=6 --set steps=2000 --set d_model=64  |  "
             "toylab train --task brackets --model lstm --set d_model=32  |  toylab train --task gridworld --model drc")
def train(
    task: str = typer.Option("brackets", help="Task name: any token task (`toylab tasks list`)."),
    model: str = typer.Option("dense", help="Model: dense or moe (transformers), lstm or gru (recurrent), drc (ConvLSTMs "
                              "over a task's grid)."),
    option: list[str] = TaskOptions,
    set_: list[str] = typer.Option([], "--set", "-s", help="Model or training option KEY=VALUE (a field of TrainConfig or "
                                    "of the model's config: TransformerConfig, RecurrentConfig for lstm and gru, DRCConfig for drc)."),
    config: Optional[Path] = typer.Option(None, parser=_path, help="JSON/TOML file with `task_options`, `model` and `train` tables."),
    seed: Optional[int] = typer.Option(None, **SEED_RANGE, help="Training seed (default 0)."),
    out: Path = typer.Option("runs/train", parser=_path, help="Parent directory of the run directory."),
    progress: bool = typer.Option(True, help="Show a progress bar (on stderr)."),
    force: bool = typer.Option(False, "--force", help="Train even where the estimate says it takes more than 12 hours."),
) -> None:
    """Train one model (a dense or MoE transformer, an LSTM, a GRU or a DRC) on a task; print its held-out metrics.

    A run directory that already holds this finished run is reused (it says so on stderr).
    """
    import contextlib

    from toylab.models import DRCConfig, RecurrentConfig, TransformerConfig
    from toylab.models.recurrent import CELLS
    from toylab.registry import get_task
    from toylab.report import markdown_table
    from toylab.training import TrainConfig, check_devices, is_trained, task_model_config, train_seconds
    from toylab.training import train as train_model

    if model not in ("dense", "moe", *CELLS, "drc"):
        raise ToylabError(f"unknown model '{model}'; valid: {', '.join(('dense', 'moe', *CELLS, 'drc'))}")
    chosen = "ffn" if model in ("dense", "moe") else "arch"  # the model option --model sets
    file = load_file(config) if config else {}
    if set(file) - {"task_options", "model", "train"}:
        unknown = sorted(set(file) - {"task_options", "model", "train"})[0]
        raise ToylabError(f"unknown config key '{unknown}'; valid: task_options, model, train")
    the_task = get_task(task, {**_table(file, "task_options", config), **parse_assignments(option)})
    the_task.vocab  # a one-line error for a task with real-valued inputs
    model_fields = (DRCConfig if model == "drc" else RecurrentConfig if model in CELLS else TransformerConfig).__dataclass_fields__
    train_fields, fixed = TrainConfig.__dataclass_fields__, {"vocab_size", "max_len", "rows", "cols", chosen}
    model_options, train_options = dict(_table(file, "model", config)), dict(_table(file, "train", config))
    for key in set(model_options) & {"vocab_size", "max_len", "rows", "cols", "ffn", "arch"}:
        raise ToylabError(f"'{key}' in the model table of {config} does nothing: "
                          + ("choose the model with --model dense|moe|lstm|gru|drc" if key in ("ffn", "arch") else "the task sets it"))
    assignments = parse_assignments(set_)
    if seed is not None:
        _once(assignments, "seed", f"--seed {seed}")
        train_options["seed"] = seed
    for key, value in assignments.items():
        if key in model_fields and key not in fixed:
            model_options[key] = value
        elif key in train_fields:
            train_options[key] = value
        else:
            valid = sorted({*model_fields, *train_fields} - fixed)
            raise ToylabError(f"unknown option '{key}'; valid: {', '.join(valid)}")
    model_options[chosen] = model
    model_cfg = task_model_config(the_task, model_options)
    model_options = {k: v for k, v in to_dict(model_cfg).items() if k not in ("vocab_size", "max_len", "rows", "cols")}
    train_cfg = build(TrainConfig, train_options)
    the_task.check_sample(train_cfg.n_train + train_cfg.n_val, train_cfg.seed)
    check_devices(train_cfg)
    if not force:
        check_time(train_seconds(train_cfg, model_cfg), f"training {train_cfg.steps:,} steps", "ask for fewer (--set steps=...)")
    run_dir = out / f"{task}-{model}-{config_hash([the_task.options, model_options, to_dict(train_cfg)])}"
    with io.writing(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    if is_trained(the_task, model_options, train_cfg, run_dir):
        typer.echo(f"reusing the finished run in {run_dir} (delete it to train again)", err=True)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # Lightning's progress bar and messages: stderr
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

    for name, description in STUDIES.summaries().items():
        typer.echo(f"{name:24s} {description}")


@study_app.command("run", epilog="Examples: toylab study run expert-specialization  |  "
                   "toylab study run expert-specialization --fast --seeds 5 --out /tmp/runs  |  "
                   "toylab study run expert-specialization --task modes --seeds auto --max-seeds 20  |  "
                   "toylab study run expert-specialization -o m=6 --set train.steps=2000 --set n_experts=8  |  "
                   "toylab study run expert-specialization --sweep n_experts=4,8 --sweep top_k=1,2  |  "
                   "toylab study run planning --launcher ray --address auto  |  "
                   "toylab study run planning --launcher slurm --partition cpu --time 30")
def study_run(
    name: str = typer.Argument(..., help="Study name (see `toylab study list`)."),
    task: Optional[str] = typer.Option(None, help="Task to study (default: the study's own)."),
    seeds: Optional[str] = typer.Option(None, help="Number of seeds (default: the study's own, e.g. 5 for "
                                        "expert-specialization; a verdict needs at least 3), or 'auto': start there and add "
                                        "seeds while the primary verdict is inconclusive, up to --max-seeds, with alpha spent "
                                        "across the looks (a group-sequential design)."),
    max_seeds: int = typer.Option(20, min=3, help="With --seeds auto: the most seeds to spend."),
    seed_batch: int = typer.Option(2, min=1, help="With --seeds auto: seeds added at each look."),
    out: Path = typer.Option("runs", parser=_path, help="Output root; the study writes to OUT/NAME/ID/."),
    fast: bool = typer.Option(False, "--fast", help="Smoke preset: the full pipeline, small, in under a minute."),
    option: list[str] = TaskOptions,
    set_: list[str] = typer.Option([], "--set", "-s", help="Study config KEY=VALUE; dotted keys reach nested tables (train.steps=500)."),
    config: Optional[Path] = typer.Option(None, parser=_path, help="JSON/TOML file of study config keys."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", min=1,
                                          help="Training runs at once, one process each (default: one per CPU core)."),
    launcher: str = typer.Option("local", help="Where training runs go: local (processes here), ray or slurm."),
    address: Optional[str] = typer.Option(None, help="ray: 'auto' or HOST:PORT / ray://HOST:PORT of a running cluster "
                                          "(default: a local Ray instance)."),
    partition: Optional[str] = typer.Option(None, help="slurm: partition to submit to."),
    time_limit: int = typer.Option(60, "--time", help="slurm: time limit of each job in minutes."),
    sweep: list[str] = typer.Option([], "--sweep", help="Run the grid KEY=V1,V2,... (repeatable; dotted keys as in --set)."),
    force: bool = typer.Option(False, "--force", help="Run even where the estimate says training takes more than 12 hours."),
) -> None:
    """Run a study (resuming finished runs); print its bottom line, a summary table in 100 columns and the report's path.

    With --sweep, run every combination of the swept values (each its own run directory) and write a
    sweep summary (CSV and markdown) beside them.
    """
    from toylab.executors import LaunchConfig
    from toylab.formatting import markdown_table, terminal_summary
    from toylab.config import merge
    from toylab.study import SeedBudget, available_cpus, nest, run_study
    from toylab.sweep import parse_sweep, run_sweep

    assignments = parse_assignments(set_)
    overrides = merge(load_file(config) if config else {}, nest(assignments))
    if task is not None:
        _once(assignments, "task", f"--task {task}")
        overrides["task"] = task
    budget = None
    if seeds == "auto":
        budget = SeedBudget(max_seeds, seed_batch)
    elif seeds is not None:
        if not (seeds.isascii() and seeds.isdigit()) or int(seeds) < 1:
            raise ToylabError(f"invalid --seeds {seeds!r}; valid: a number of seeds >= 1, or auto")
        overrides["seeds"] = int(seeds)
    if seeds is not None:
        _once(assignments, "seeds", f"--seeds {seeds}")
    task_options = parse_assignments(option)
    for key in task_options:
        _once(assignments, f"task_options.{key}", f"-o {key}")
    if task_options:
        overrides["task_options"] = {**overrides.get("task_options", {}), **task_options}
    where = build(LaunchConfig, {"launcher": launcher, "workers": workers or (available_cpus() if launcher == "local" else 2),
                             "address": address, "partition": partition, "time": time_limit})
    grid = parse_sweep(sweep)
    for key in grid:
        _once(assignments, key, f"--sweep {key}=...")
    try:
        if grid:
            if budget is not None:
                raise ToylabError("--seeds auto runs one study at a time; it does not combine with --sweep")
            swept = run_sweep(name, grid, overrides, out, fast=fast, progress=progress, launcher=where, force=force)
            typer.echo(markdown_table(swept.rows))
            typer.echo(f"finished in {swept.seconds:.1f} s\nsweep summary: {swept.directory / 'summary.csv'}")
            return
        outcome = run_study(name, overrides, out, fast=fast, progress=progress, launcher=where, budget=budget, force=force)
    except KeyboardInterrupt as interrupted:  # `Interrupted` says how many runs finished
        typer.echo(str(interrupted) or "interrupted; rerun the same command to resume", err=True)
        raise typer.Exit(130) from None
    typer.echo(terminal_summary(outcome.report.bottom_line, outcome.summary, outcome.report.notes))
    if outcome.results.get("failed_runs"):
        typer.echo(f"{len(outcome.results['failed_runs'])} run(s) failed; see the report.")
    typer.echo(f"finished in {outcome.seconds:.1f} s\nreport: {outcome.directory / 'report.md'} (and report.html)")


external_app = App(help="Analyse pretrained Hugging Face MoE models on labelled text (needs the [hf] extra).", no_args_is_help=True,
                   rich_markup_mode=None)
app.add_typer(external_app, name="external")


def _ints(value: str) -> tuple[int, ...]:
    """A comma-separated list of integers ("" for none)."""
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if not all(p.isdigit() for p in parts):
        raise ToylabError(f"invalid --layers {value!r}; valid: comma-separated layer numbers, e.g. 0,3")
    return tuple(int(p) for p in parts)


@external_app.command("analyse", epilog="Examples: toylab external analyse ./tiny-mixtral --text docs --labels brackets,indent  |  "
                      "toylab external analyse allenai/OLMoE-1B-7B-0924 --text corpus/ --labels depth,latex_env --dtype bfloat16 --layers 15")
def external_analyse(
    model: str = typer.Argument(..., help="A folder written by save_pretrained, or a Hugging Face hub name (Mixtral, OLMoE, "
                                "Qwen2-MoE, Qwen3-MoE)."),
    text: Path = typer.Option(..., "--text", parser=_path, help="A folder of text files (read recursively) or one file."),
    labels: str = typer.Option("depth,stack_top,indent", help="Comma-separated labels: depth, stack_top, match_distance, latex_depth, "
                               "latex_env, indent, token_class, position; 'brackets' is depth,stack_top,match_distance and "
                               "'latex' latex_depth,latex_env."),
    out: Path = typer.Option("runs/external", parser=_path, help="Folder for report.md, report.html and results.json."),
    seq_len: int = typer.Option(128, min=2, help="Tokens per sequence, the BOS token included."),
    folds: int = typer.Option(5, min=1, help="Disjoint folds of the text: the 'seeds' of the intervals (a verdict needs 3)."),
    max_tokens: int = typer.Option(50_000, min=1, help="Most tokens read from the text."),
    layers: str = typer.Option("", help="Comma-separated MoE layers to analyse (default: every MoE layer)."),
    permutations: int = typer.Option(200, min=1, help="Shuffles of each permutation null."),
    null_draws: int = typer.Option(0, min=0, help="Random linear routers drawn per fold and layer (0: no usage-matched nulls)."),
    margin: Optional[float] = typer.Option(None, min=0, help="Equivalence margin in NMI (default: 10% of each label's linear ceiling)."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1, ... (default: cuda when available)."),
    seed: int = typer.Option(0, **SEED_RANGE, help="Seed of k-means, probes and nulls (fold f uses seed + f)."),
) -> None:
    """Label every token of the text, run the expert-specialization analysis on the model's router input (routing vs
    k-means, NMI given the token, the linear ceiling, nulls) with folds of the text as seeds, and write the report."""
    from toylab.external.analyse import AnalyseConfig, analyse
    from toylab.external.labels import expand_labels

    cfg = AnalyseConfig(labels=tuple(expand_labels(labels)), seq_len=seq_len, folds=folds, max_tokens=max_tokens,
                        layers=_ints(layers), n_permutations=permutations, null_draws=null_draws, margin=margin, dtype=dtype,
                        device=device, seed=seed)
    results = analyse(model, text, out, cfg)
    typer.echo(f"analysed {results['text']['tokens']:,} tokens in {results['seconds']:.1f} s\n"
               f"report: {out / 'report.md'} (and report.html, results.json)")


runs_app = App(help="Find finished study runs and show them.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(runs_app, name="runs")
RunDir = typer.Argument(..., parser=_path, help="A study run's folder, OUT/STUDY/HASH (see `toylab runs list`).")


@runs_app.command("list", epilog="Examples: toylab runs list  |  toylab runs list --out /tmp/runs  |  toylab runs list --json")
def runs_list(out: Path = typer.Option("runs", parser=_path, help="Output root the studies wrote to."),
              as_json: bool = typer.Option(False, "--json", help="One JSON list of runs, for scripts.")) -> None:
    """One line per run, newest first: study, task, date, config hash, seeds, status, what differs from the other runs
    of its study, and headline numbers (models of `toylab train` too)."""
    import json

    from toylab.formatting import aligned
    from toylab.runs import find_runs

    runs = find_runs(out)
    if as_json:
        typer.echo(json.dumps([run.as_dict() for run in runs], indent=2))
        return
    rows = [[run.study, run.task, run.date, run.config_hash, run.seeds, run.status, run.differs, run.headline, str(run.directory)]
            for run in runs]
    typer.echo(aligned(["study", "task", "date", "hash", "seeds", "status", "differs", "headline", "folder"], rows))


@runs_app.command("show", epilog="Example: toylab runs show runs/expert-specialization/0123456789")
def runs_show(directory: Path = RunDir) -> None:
    """Print a finished run's summary table and the paths of its reports."""
    from toylab.formatting import markdown_table
    from toylab.runs import summary_rows

    typer.echo(markdown_table(summary_rows(directory)))
    typer.echo(f"report: {directory / 'report.md'}\nhtml report: {directory / 'report.html'}")


@app.command("report", epilog="Example: toylab report runs/expert-specialization/0123456789")
def report(directory: Path = RunDir) -> None:
    """Write a finished run's report.md and report.html again from its results, without retraining."""
    from toylab.runs import rerender

    markdown, html = rerender(directory)
    typer.echo(f"report: {markdown}\nhtml report: {html}")


if __name__ == "__main__":
    app()
