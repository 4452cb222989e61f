"""Section `studies`: each study's wall time at its defaults, split into training, analysis and the report.

Each study runs once, in a fresh folder, with as many local workers as the machine has cores, as
`toylab study run NAME` does; the row gives its wall time and phases (from the run's `timing.json`), the
optimizer steps trained and the share of the cores' time that was busy, and its ratio to the time-to-verdict budget
(`BUDGET`, issue 28: the quickstart in 90 s, any other study in 6 minutes, on a quiet 2-core machine). With --quick,
one study's `--fast` preset at one seed (it checks the section runs; its times mean nothing). Each row is printed
as its study finishes. With `TOYLAB_BENCH_RUNS=DIR` set, the studies' folders are kept under DIR (reused by a rerun
there, as `toylab study run` reuses them) instead of a temporary folder.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import row
from toylab import io
from toylab.registry import list_studies
from toylab.study import available_cpus, run_study

QUICK = {"expert-specialization": {"seeds": 1, "n_eval": 30, "n_permutations": 10, "null_draws": 0,
                                   "train": {"steps": 30, "n_train": 500, "n_val": 50, "eval_every": 30}}}
"""The quick run: the quickstart's fast preset, smaller still, at one seed."""
BUDGET = {"expert-specialization": 90.0}
"""Wall seconds a default study should take on a quiet 2-core machine; `DEFAULT_BUDGET` for any other."""
DEFAULT_BUDGET = 360.0


def run(quick: bool) -> list[dict[str, Any]]:
    rows, keep = [], os.environ.get("TOYLAB_BENCH_RUNS")
    for name in QUICK if quick else list_studies():
        with contextlib.nullcontext(keep) if keep else tempfile.TemporaryDirectory() as out:
            outcome = run_study(name, QUICK.get(name) if quick else None, Path(out), fast=quick, progress=False,
                                workers=1 if quick else available_cpus())
            timing = io.read_json(outcome.directory / "timing.json")
        phases = {phase: timing[f"{phase}_seconds"] for phase in ("training", "analysis", "report")}
        wall, budget = timing["seconds"] + timing["report_seconds"], BUDGET.get(name, DEFAULT_BUDGET)
        rows.append(row(name, {"wall": wall, **phases}, wall / budget, f"wall / {budget:g} s", ("<=", 1.0), steps=timing["steps_trained"],
                        cpu_busy=timing["cpu_busy"], runs=timing["runs_trained"], cores=timing["cpus"]))
        print(f"  {name}: {wall:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in phases.items())}), cpu_busy {timing['cpu_busy']}", file=sys.stderr, flush=True)
    return rows
