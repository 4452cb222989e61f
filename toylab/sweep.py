"""Sweeps: the grid of a study's configurations over a few keys, run in one invocation, summarized in one table.

    run_sweep("expert-specialization", {"n_experts": [4, 8], "top_k": [1, 2]})

Each configuration is an ordinary study run in its own directory (finished runs are reused), on the
same launcher; the sweep writes `summary.csv`, `summary.md` and `sweep.json` (the grid and where each
configuration's run lives) to `<out>/<study>/sweeps/<hash of the sweep>/`.
"""

from __future__ import annotations

import csv
import io as _io
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toylab import io
from toylab.config import check_time, config_hash, merge
from toylab.errors import ToylabError
from toylab.executors import LaunchConfig
from toylab.report import markdown_table
from toylab.study import TIME_FIX, nest, resolve, run_study


@dataclass
class SweepOutcome:
    directory: Path
    rows: list[dict[str, Any]]
    """Each configuration's summary rows, prefixed by its swept values and run directory."""
    seconds: float


def parse_sweep(items: Sequence[str]) -> dict[str, list[str]]:
    """`["n_experts=4,8", "top_k=1,2"]` -> `{"n_experts": ["4", "8"], "top_k": ["1", "2"]}`."""
    sweep: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ToylabError(f"invalid sweep {item!r}; expected KEY=V1,V2,... (e.g. n_experts=4,8)")
        if key in sweep:
            raise ToylabError(f"sweep key '{key}' given twice; give all its values at once: {key}=V1,V2,...")
        sweep[key] = [value.strip() for value in values.split(",")]
        repeated = next((value for i, value in enumerate(sweep[key]) if value in sweep[key][:i]), None)
        if repeated is not None:
            raise ToylabError(f"sweep {key} lists {repeated!r} twice; give each value once")
    return sweep


def grid(sweep: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the swept values, the last key varying fastest."""
    return [dict(zip(sweep, values)) for values in itertools.product(*sweep.values())]


def run_sweep(
    name: str,
    sweep: Mapping[str, Sequence[Any]],
    overrides: Mapping[str, Any] | None = None,
    out: Path = Path("runs"),
    fast: bool = False,
    progress: bool = True,
    launcher: LaunchConfig | None = None,
    force: bool = False,
) -> SweepOutcome:
    """Run study `name` at every point of the grid `sweep` (dotted keys reach nested tables); training estimated to
    take more than `toylab.config.MAX_HOURS` in all is refused unless `force`."""
    launcher = launcher or LaunchConfig()
    points = [(point, merge(overrides or {}, nest(point))) for point in grid(sweep)]
    estimate = 0.0
    for done, (_, options) in enumerate(points, 1):  # every configuration is valid, and the grid not absurdly long, before any trains
        study = resolve(name, options, fast)
        study.check()
        estimate += study.training_seconds() / launcher.workers
        if not force:
            check_time(estimate, f"training the first {done:,} of {len(points):,} configurations of the sweep", TIME_FIX)
    rows, seconds = [], 0.0
    for point, options in points:
        outcome = run_study(name, options, out, fast, progress, launcher=launcher, force=True)
        seconds += outcome.seconds
        rows += [{**point, "run": str(outcome.directory), **row} for row in outcome.summary]
    spec = {"study": name, "sweep": {key: list(values) for key, values in sweep.items()},
            "overrides": dict(overrides or {}), "fast": fast}
    directory = Path(out) / name / "sweeps" / config_hash(spec)
    io.write_json(directory / "sweep.json", {**spec, "runs": sorted({row["run"] for row in rows})})
    io.write_text(directory / "summary.csv", as_csv(rows))
    io.write_text(directory / "summary.md", f"# Sweep of {name}\n\n{markdown_table(rows)}\n")
    return SweepOutcome(directory, rows, seconds)


def as_csv(rows: list[dict[str, Any]]) -> str:
    """Rows as CSV, with the union of their columns in order of appearance."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
