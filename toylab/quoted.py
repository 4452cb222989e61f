"""Numbers a document quotes from runs, checked against those runs.

A document (the README, a lesson) lists the numbers it quotes in an HTML comment that starts with
"numbers quoted above", one per line: `quoted | path | tolerance`. The path is a dotted path into a run's
`results.json` (integers index lists), prefixed with `study:` where the document quotes several runs; a
tolerance of `=` compares text (e.g. a verdict), a quoted percentage is a share; a path starting `timing.` reads the
run's `timing.json` (wall time lives there, not in `results.json`). A lesson's test reruns its
command and checks every line; a study page's runs (docs/studies/NAME.md) are too long for that, so

    python -m toylab.quoted docs/studies/moe-superposition.md docs/readme-numbers.json moe-superposition=runs/moe-superposition/<hash> ...

writes the values its lines name from the given runs into a small data file, which the tests check the quoted
text against.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from toylab import io

CHECKS = re.compile(r"<!-- numbers quoted above.*?\n(.*?)-->", re.S)
CODE = re.compile(r"^```[^\n]*\n.*?^```|`[^`\n]*`", re.S | re.M)
DECIMAL = re.compile(r"(?<![\w.])[−-]?\d+\.\d+%?|(?<![\w.])\d+%")
"""A decimal number or a percentage."""
LEVELS = {"5%", "10%", "80%", "90%", "95%"}
"""Percentages that are the tests' levels (alpha, power, confidence), not numbers from a run."""


def checks(text: str) -> list[tuple[str, str, str]]:
    """The document's `(quoted, path, tolerance)` lines (from every block of quoted numbers)."""
    return [tuple(part.strip() for part in line.split("|"))  # type: ignore[misc]
            for block in CHECKS.findall(text) for line in block.strip().splitlines() if line.strip()]


def prose_numbers(text: str) -> set[str]:
    """The decimal numbers and percentages of a document's prose (outside code and the blocks of quoted numbers)."""
    return set(DECIMAL.findall(CODE.sub("", CHECKS.sub("", text)))) - LEVELS


def lookup(results: Any, path: str) -> Any:
    """The value at a dotted path of `results.json` (integers index lists)."""
    for key in path.split("."):
        results = results[int(key)] if isinstance(results, list) else results[key]
    return results


def matches(quoted: str, value: Any, tolerance: str) -> bool:
    """Whether `value` reproduces the `quoted` text within `tolerance` (`=`: the same text; a percentage quotes a share)."""
    if tolerance == "=":
        return str(value) == quoted
    number = float(quoted.replace("−", "-").rstrip("%")) / (100 if quoted.endswith("%") else 1)
    return abs(float(value) - number) <= float(tolerance)


def snapshot(text: str, runs: Mapping[str, Path]) -> dict[str, Any]:
    """`{"study:path": value}` for every line of `text` whose study is in `runs` (a run directory per study)."""
    found = {}
    for _, path, _ in checks(text):
        study, _, key = path.partition(":")
        if study in runs:
            name = "timing.json" if key.startswith("timing.") else "results.json"
            found[path] = lookup(io.read_json(Path(runs[study]) / name), key.removeprefix("timing."))
    return found


def main(argv: list[str]) -> None:
    """`DOCUMENT OUT study=RUN_DIR ...`: write the values the document quotes from those runs to OUT (merged with OUT's)."""
    document, out, *pairs = argv
    runs = dict(pair.split("=", 1) for pair in pairs)
    path = Path(out)
    values = {**(io.read_json(path) if path.is_file() else {}), **snapshot(Path(document).read_text(), runs)}
    io.write_json(path, values)


if __name__ == "__main__":
    main(sys.argv[1:])
