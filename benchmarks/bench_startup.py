"""Benchmark: start-up time of the `toylab` command line (target: at most 1 s for `--help`, `tasks list`, `study list`,
and `runs list` and `runs show` over 50 study runs).

    python benchmarks/bench_startup.py [--repeats 7] [--out results.json]

Runs each command in a fresh interpreter and prints the median and best wall time, beside a bare
`python -c pass` and `import torch` for scale (what every command would pay if it imported torch).
It also lists the heavy libraries each command imported; `--help`, `tasks list`, `study list` (which reads the
studies' source) and the `runs` commands that only read should import none. The runs are 50 small study folders written to a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from toylab.formatting import table_json

COMMANDS = {
    "python -c pass": ["-c", "pass"],
    "import torch": ["-c", "import torch"],
    "toylab --help": ["-m", "toylab", "--help"],
    "toylab --version": ["-m", "toylab", "--version"],
    "toylab tasks list": ["-m", "toylab", "tasks", "list"],
    "toylab study list": ["-m", "toylab", "study", "list"],
    "toylab runs list": ["-m", "toylab", "runs", "list", "--out", "{runs}"],
    "toylab runs show": ["-m", "toylab", "runs", "show", "{runs}/expert-specialization/run00"],
}
TARGETS = {"toylab --help": 1.0, "toylab tasks list": 1.0, "toylab study list": 1.0, "toylab runs list": 1.0, "toylab runs show": 1.0}
N_RUNS = 50
HEAVY = ("torch", "pytorch_lightning", "pandas", "matplotlib", "seaborn", "scipy", "sklearn")
PROBE = ("import runpy, sys\n"
         "sys.argv = ['toylab', *sys.argv[1:]]\n"
         "try:\n    runpy.run_module('toylab', run_name='__main__')\n"
         "except SystemExit:\n    pass\n"
         "print(','.join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)")


def write_runs(out: Path, n: int = N_RUNS) -> None:
    """`n` finished study runs as `toylab study run` leaves them (config, results and summary), small."""
    for i in range(n):
        run = out / "expert-specialization" / f"run{i:02d}"
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"study": "expert-specialization", "task": "brackets", "seeds": 5}))
        (run / "results.json").write_text(json.dumps({"task": {"name": "brackets", "options": {}}, "failed_runs": [], "runs": {"a": "b"},
                                                      "below_competence": [], "heldout": []}))
        (run / "summary.json").write_text(json.dumps(table_json([{"layer": "1", "label": "depth", "NMI routing": f"0.{i:03d}"}])))


def wall_seconds(args: list[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats + 1):  # the first run warms the file cache
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])


def heavy_imports(args: list[str]) -> list[str]:
    if args[:2] != ["-m", "toylab"]:
        return []
    probe = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args[2:]],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=True)
    return [m for m in probe.stderr.strip().splitlines()[-1].split(",") if m] if probe.stderr.strip() else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    rows = []
    print(f"{'command':22s} {'median s':>9s} {'best s':>8s}  heavy imports")
    runs = tempfile.TemporaryDirectory()
    write_runs(Path(runs.name))
    for name, template in COMMANDS.items():
        command = [part.format(runs=runs.name) for part in template]
        times = wall_seconds(command, args.repeats)
        row = {"command": name, "median_s": round(times[len(times) // 2], 3), "best_s": round(times[0], 3),
               "heavy_imports": heavy_imports(command)}
        target = TARGETS.get(name)
        verdict = "" if target is None else ("  (target <= 1 s: met)" if row["median_s"] <= target else "  (target <= 1 s: MISSED)")
        print(f"{name:22s} {row['median_s']:9.3f} {row['best_s']:8.3f}  {', '.join(row['heavy_imports']) or '-'}{verdict}")
        rows.append(row)
    runs.cleanup()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
