"""Study runs on disk: list them, show one, and re-render a run's report without retraining.

A study run is a folder `<out>/<study>/<config hash>/` holding `config.json` (with the study's name);
it has finished when `results.json` exists. `rerender` rebuilds the study from `config.json` and writes
`report.md` and `report.html` again from `results.json` (and `expert_map.json`), regenerating the figures.
Listing and showing read the run's `summary.json` (written with its report) and import neither torch nor the
plotting libraries; only a run of an older toylab without one has its study rebuilt to summarize it.
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
    """"finished", "partial (k of n training runs failed)" or "unfinished (no results.json)" (running, interrupted or
    failed); for a model of `toylab train`, "trained (toylab train)" or "unfinished (no final.json)"."""
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
    """A one-line ToylabError if `directory` is not a study run."""
    if not (Path(directory) / "config.json").is_file():
        raise ToylabError(f"{directory} is not a study run (no config.json); runs are folders OUT/STUDY/HASH/ "
                          "written by `toylab study run` (see `toylab runs list`)")


def _results(directory: Path) -> dict[str, Any]:
    """A run's results; a one-line ToylabError if they are missing or corrupt."""
    path = Path(directory) / "results.json"
    if not path.is_file():
        raise ToylabError(f"{directory} has no results.json: the study did not finish (rerun `toylab study run` to resume it)")
    results = io.read_json(path)
    if not isinstance(results, dict):
        raise ToylabError(f"corrupt results file {path}: not a JSON object")
    return results


def read_results(directory: Path) -> dict[str, Any]:
    """A finished run's results for rendering its report, checked against the results schema of its study
    (`toylab.schema`): a one-line ToylabError naming the file and the offending key if they do not fit."""
    from toylab.schema import validate_results

    results, path = _results(directory), Path(directory) / "results.json"
    config = io.read_json(Path(directory) / "config.json")
    try:
        validate_results(results, config.get("study") if isinstance(config, dict) else None)
    except ToylabError as error:
        raise ToylabError(f"{path}: {error}") from None
    return results


def summary_rows(directory: Path) -> list[dict[str, Any]]:
    """The study's summary table of a finished run."""
    _check_run(directory)
    return _summary(directory, _results(directory))


def _summary(directory: Path, results: dict[str, Any]) -> list[dict[str, Any]]:
    """A run's summary table: its `summary.json`, else rebuilt from its `results` by its study."""
    path = Path(directory) / "summary.json"
    if path.is_file():
        try:
            return table_rows(io.read_json(path))
        except (KeyError, TypeError):
            raise ToylabError(f"corrupt summary file {path}: not a table (rewrite it with `toylab report {directory}`)") from None
    from toylab.study import stored_study

    return stored_study(directory).summary(results)


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

    A run whose files cannot be read is still listed, with the reason in place of its headline.
    """
    directory = Path(directory)
    _check_run(directory)
    results_path = directory / "results.json"
    stamp = (results_path if results_path.is_file() else directory / "config.json").stat().st_mtime
    date = datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M")
    study, task, status, text, seeds, config = directory.parent.name, "n/a", "unfinished (no results.json)", "", "", {}
    try:
        config = io.read_json(directory / "config.json")
        if isinstance(config, dict) and "study" not in config and "train" in config:  # a model of `toylab train`
            return trained_model(directory, config, date)
        study, task = config.get("study", study), str(config.get("task", task))
        seeds = str(config.get("seeds", ""))
        if results_path.is_file():
            status = "unreadable"
            results = _results(directory)
            found = results.get("task")
            task = found.get("name", task) if isinstance(found, dict) else task
            failed, total = len(results.get("failed_runs", [])), len(results.get("runs", {}))
            status = f"partial ({failed} of {total or '?'} training runs failed)" if failed else "finished"
            if seeds == "auto" and "sequential" in results:
                seeds = f"auto: {results['sequential']['looks'][-1]['seeds']}"
            text = headline(_summary(directory, results))
    except (ToylabError, KeyError, AttributeError) as error:  # a corrupt file, or a run of an older toylab
        text = f"(cannot summarize: {' '.join(str(error).split())})"
    return Run(directory, study, task, date, directory.name, status, text, seeds, config=flatten(config) if isinstance(config, dict) else {})


def trained_model(directory: Path, config: dict[str, Any], date: str) -> Run:
    """A model trained by `toylab train`: finished when its `final.json` exists, with its held-out metrics."""
    final = directory / "final.json"
    metrics = io.read_json(final).get("metrics", {}) if final.is_file() else {}
    text = ", ".join(f"{key} {fmt(value)}" for key, value in list(metrics.items())[:HEADLINE_COLUMNS])
    status = "trained (toylab train)" if final.is_file() else "unfinished (no final.json)"
    return Run(directory, "train", str(config.get("task", "n/a")), date, directory.name, status, text,
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

    Bad input (not a run, a missing or corrupt results.json or config, results that do not fit the schema of
    `toylab.schema`) raises ToylabError before anything is written.
    """
    from toylab.study import StudyContext, stored_study, write_report

    directory = Path(directory)
    _check_run(directory)
    with StudyContext(directory, progress=False) as ctx:  # refuses a folder linked out of the run before anything is read
        results, study = read_results(directory), stored_study(directory)
        timing = io.read_json(directory / "timing.json") if (directory / "timing.json").is_file() else None
        write_report(study, results, ctx, timing)
    return directory / "report.md", directory / "report.html"
