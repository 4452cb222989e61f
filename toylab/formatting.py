"""Numbers, intervals and tables as text, without the plotting libraries: for reports and for the command lines
that only read (`toylab runs list`, `runs show`), which must start at once."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def fmt(value: float, digits: int = 3) -> str:
    """A number with `digits` decimals, "n/a" for None or NaN."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def fmt_ci(stat: Mapping[str, float], digits: int = 3) -> str:
    """`mean [low, high]` from a `mean_ci` dict."""
    if math.isnan(stat.get("ci_low", math.nan)):
        return fmt(stat["mean"], digits)
    return f"{fmt(stat['mean'], digits)} [{fmt(stat['ci_low'], digits)}, {fmt(stat['ci_high'], digits)}]"


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A GitHub-flavoured markdown table with the keys of the first row as columns."""
    if not rows:
        return "(no rows)"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def table_json(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Rows as `{"rows": [[[column, value], ...], ...]}`: lists keep the column order through a JSON file with sorted keys."""
    return {"rows": [[[column, value] for column, value in row.items()] for row in rows]}


def table_rows(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows of a `table_json` table."""
    return [{column: value for column, value in row} for row in data["rows"]]


def aligned(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text columns padded to their widest cell (the last column unpadded), under a header."""
    table = [list(header), *[[str(cell) for cell in row] for row in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths)) + "  " + row[-1] for row in table)
