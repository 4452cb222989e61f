"""Run the benchmark suite in one process, on one thread; write `bench.json` and `bench.md`.

    python -m benchmarks [--out DIR] [--quick] [--only SECTION ...]

A section is one module `benchmarks/<name>.py` with `run(quick) -> rows` (see `benchmarks.row`), named in SECTIONS.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import single_thread
from toylab import io

SECTIONS = (
    "moe",
    "lightning",
    "flops",
    "analysis",
    "seeds",
    "studies",
)
"""The sections in the order they run: each names its module in `benchmarks`."""


def cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{key} {cell(v)}" for key, v in value.items())
    return str(value)


def cpu_name() -> str:
    """The processor's model name where the system says it (Linux), else its architecture."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.machine()


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# Benchmarks{' (--quick)' if results['quick'] else ''}", "",
             f"torch {results['torch']}, {results['threads']} thread, {results['machine']}; "
             f"medians over repeats, all in one process ({results['seconds']:.0f} s).", ""]
    for section, rows in results["sections"].items():
        lines += [f"## {section}", "", "| what | median ms | ratio | of | target | met | details |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {cell(r['ms'])} | {cell(r['ratio'])} | {cell(r['ratio_of'])} | {cell(r['target'])} "
                  f"| {cell(r['met'])} | {cell(r.get('details'))} |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for bench.json and bench.md (default: here)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (checks that the suite runs)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, metavar="SECTION",
                        help=f"run only these sections: {', '.join(SECTIONS)}")
    args = parser.parse_args(argv)
    single_thread()
    start = time.perf_counter()
    sections = {}
    for name in args.only or SECTIONS:
        print(f"[{name}]", file=sys.stderr, flush=True)
        sections[name] = importlib.import_module(f"benchmarks.{name}").run(args.quick)
        for r in sections[name]:
            measured = f"ratio {cell(r['ratio'])} (target {cell(r['target'])}, met {cell(r['met'])})" if r["ratio"] is not None else f"{cell(r['ms'])} ms"
            print(f"  {r['name']}: {measured}", file=sys.stderr, flush=True)
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "quick": args.quick,
               "machine": f"{cpu_name()}, Python {platform.python_version()}",
               "seconds": round(time.perf_counter() - start, 1), "sections": sections}
    io.write_json(args.out / "bench.json", results)
    io.write_text(args.out / "bench.md", markdown(results))
    print(args.out / "bench.md")


if __name__ == "__main__":
    main()
