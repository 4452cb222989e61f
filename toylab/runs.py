"""Study runs on disk: list them, show one, and re-render a run's report without retraining.

A study run is a folder `<out>/<study>/<config hash>/` holding `config.json` (with the study's name);
it has finished when `results.json` exists. `rerender` rebuilds the study from `config.json` and writes
`report.md` and `report.html` again from `results.json` (and `expert_map.json`), regenerating the figures.
Listing and showing read the run's `summary.json` (written with its report) and import neither torch nor the
plotting libraries; only a run of an older toylab without one has its study rebuilt to summarize it. Every file read
is first checked against its schema (`toylab.schema`).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from toylab import io
from toylab.errors import ToylabError
from toylab.formatting import fmt, table_rows
from toylab.schema import read_checked

HEADLINE_COLUMNS = 3
"""Columns of the summary's first row shown as a run's headline numbers (besides its row names)."""


@dataclass(frozen=True)
class Run:
    """One study run as found on disk."""

    directory: Path
    study: str
    task: str
    date: str
    config_hash: str
    status: str
    """"finished", "partial (k of n training runs failed)", "unfinished (no results.json)" (running, interrupted or
    failed) or "corrupt" (a file unreadable or not of its schema); for a model of `toylab train`, "trained (toylab
    train)" or "unfinished (no final.json)"."""
    headline: str
    seeds: str = ""
    """A study's seeds ("auto" with `--seeds auto`), or a trained model's seed."""
    differs: str = ""
    """The config values that tell this run apart from the other runs of its study found beside it."""
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    """Its config, flattened to dotted keys."""

    def as_dict(self) -> dict[str, Any]:
        """The run as JSON-ready data (`toylab runs list --json`)."""
        return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(self).items() if key != "config"}


def _check_run(directory: Path) -> None:
    """A one-line ToylabError if `directory` is not a study run, or its `config.json` is not a regular file."""
    path = Path(directory) / "config.json"
    if not path.exists():
        raise ToylabError(f"{directory} is not a study run (no config.json); runs are folders OUT/STUDY/HASH/ "
                          "written by `toylab study run` (see `toylab runs list`)")
    io.regular(path)


def study_config(directory: Path) -> dict[str, Any]:
    """A study run's `config.json`, checked against its schema (`toylab.schema`)."""
    return read_checked(Path(directory) / "config.json", "study-config")


def read_results(directory: Path, whole: bool = True) -> dict[str, Any]:
    """A finished run's results, checked against the results schema (`toylab.schema`): the envelope every study writes
    and, if `whole`, the keys its study always writes (what the study reads); its config is checked too. A one-line
    ToylabError names the file and the offending key if either does not fit, or says that the study did not finish."""
    study, path = study_config(directory)["study"], Path(directory) / "results.json"
    if not (path.exists() or path.is_symlink()):
        raise ToylabError(f"{directory} has no results.json: the study did not finish (rerun `toylab study run` to resume it)")
    return read_checked(path, "results", study if whole else None)


def summary_rows(directory: Path) -> list[dict[str, Any]]:
    """The study's summary table of a finished run."""
    _check_run(directory)
    read_results(directory, whole=False)
    return _summary(directory)


def _summary(directory: Path) -> list[dict[str, Any]]:
    """A run's summary table: its `summary.json`, else rebuilt by its study from its results (checked whole)."""
    path = Path(directory) / "summary.json"
    if path.exists():
        return table_rows(read_checked(path, "summary"))
    from toylab.study import stored_study

    return stored_study(directory).summary(read_results(directory))


def headline(rows: list[dict[str, Any]]) -> str:
    """The first summary row, abbreviated: its first few non-empty columns as `name value`."""
    cells = [(key, value) for key, value in (rows[0] if rows else {}).items() if value not in ("", None)]
    return ", ".join(f"{key} {fmt(value) if isinstance(value, float) else value}" for key, value in cells[:HEADLINE_COLUMNS + 1])


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as `{"train.steps": 1000, ...}`."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def describe(directory: Path) -> Run:
    """What a run directory holds: study, task, date, hash, status, headline numbers and seeds; a model trained by
    `toylab train` is listed as study `train` with its metrics.

    A run whose files cannot be read or do not fit their schemas is still listed, as "corrupt", with the reason in place
    of its headline.
    """
    directory = Path(directory)
    results_path = directory / "results.json"
    stamp = (results_path if results_path.is_file() else directory / "config.json").lstat().st_mtime
    date = datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M")
    study, task, status, text, seeds, config = directory.parent.name, "n/a", "unfinished (no results.json)", "", "", {}
    try:
        _check_run(directory)
        found = io.read_json(directory / "config.json")
        if isinstance(found, dict) and "study" not in found and "train" in found:  # a model of `toylab train`
            return trained_model(directory, date)
        config = study_config(directory)
        study, task, seeds = config["study"], str(config.get("task", task)), str(config.get("seeds", ""))
        if results_path.exists() or results_path.is_symlink():
            results = read_results(directory, whole=False)  # the envelope: the study's own keys are its report's
            task = results["task"]["name"] if "task" in results else task
            failed, total = len(results["failed_runs"]), len(results.get("runs", {}))
            status = f"partial ({failed} of {total or '?'} training runs failed)" if failed else "finished"
            if seeds == "auto" and "sequential" in results:
                seeds = f"auto: {results['sequential']['looks'][-1]['seeds']}"
            text = headline(_summary(directory))
    except (ToylabError, KeyError, AttributeError) as error:  # a corrupt file, or a run of an older toylab
        status, text = "corrupt", f"(cannot summarize: {' '.join(str(error).split())})"
    return Run(directory, study, task, date, directory.name, status, text, seeds, config=flatten(config))


def trained_model(directory: Path, date: str) -> Run:
    """A model trained by `toylab train`: finished when its `final.json` exists, with its held-out metrics (both files
    checked against their schemas)."""
    config, final = read_checked(directory / "config.json", "train-config"), directory / "final.json"
    metrics = read_checked(final, "final")["metrics"] if final.exists() else {}
    text = ", ".join(f"{key} {fmt(value)}" for key, value in list(metrics.items())[:HEADLINE_COLUMNS])
    status = "trained (toylab train)" if final.exists() else "unfinished (no final.json)"
    return Run(directory, "train", config["task"], date, directory.name, status, text,
               f"seed {config['train'].get('seed', '?')}", config=flatten(config))


def with_differences(runs: list[Run]) -> list[Run]:
    """Each run with `differs`: its values of the config keys whose values differ among the runs of its study."""
    found = []
    for run in runs:
        others = [r.config for r in runs if r.study == run.study]
        keys = sorted({key for c in others for key in c if len({repr(o.get(key)) for o in others}) > 1} - {"seeds"})
        found.append(replace(run, differs=", ".join(f"{key}={run.config.get(key, '-')}" for key in keys)))
    return found


def find_runs(out: Path) -> list[Run]:
    """Every study run under `out` (`out/<study>/<hash>/config.json`), newest first."""
    out = Path(out)
    if not out.is_dir():
        raise ToylabError(f"no such folder: {out} (pass the --out of `toylab study run`; default runs)")
    runs = with_differences([describe(path.parent) for path in out.glob("*/*/config.json")])
    return sorted(runs, key=lambda run: (run.date, str(run.directory)), reverse=True)


def rerender(directory: Path) -> tuple[Path, Path]:
    """Write a finished run's `report.md` and `report.html` again, from its results (no training); return their paths.

    Bad input (not a run; a missing, unreadable or corrupt file; a run file that does not fit its schema in
    `toylab.schema`; a FIFO or a folder where a report file goes) raises ToylabError before anything is written.
    """
    from toylab.study import StudyContext, stored_study, write_report

    directory = Path(directory)
    _check_run(directory)
    with StudyContext(directory, progress=False) as ctx:  # refuses a folder linked out of the run before anything is read
        results, study = read_results(directory), stored_study(directory)
        timing = read_checked(directory / "timing.json", "timing") if (directory / "timing.json").exists() else None
        if (directory / "expert_map.json").exists():  # read again by the HTML writer
            read_checked(directory / "expert_map.json", "expert-map")
        for path in [directory / name for name in ("summary.json", "report.md", "report.html")] + [
                *directory.glob("figures/*.png"), *directory.glob("tables/*.csv")]:  # what it replaces: no FIFO or folder in the way
            io.check_writable(path)
        write_report(study, results, ctx, timing)
    return directory / "report.md", directory / "report.html"
