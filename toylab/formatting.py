"""Numbers, intervals and tables as text, without the plotting libraries: for reports and for the command lines
that only read (`toylab runs list`, `runs show`), which must start at once."""

from __future__ import annotations

import csv
import functools
import io
import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

TERMINAL_WIDTH = 100
"""Columns a study's terminal summary fits in."""
WIDEST_CELL = 24
"""Characters of a cell (or column name) the terminal table shows; a longer one is cut, ending in "…"."""


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


@functools.lru_cache(maxsize=1)
def markdown_renderer() -> Any:
    """The markdown parser of reports: CommonMark with tables, raw HTML shown as text (one shared, stateless instance)."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table")


def plain_text(markdown: str) -> str:
    """Inline markdown as the text a reader of the HTML report sees: emphasis and code marks dropped, escapes
    resolved ("**more** for `a` \\| b" -> "more for a | b"), line breaks as spaces."""
    children = markdown_renderer().parseInline(markdown)[0].children or []
    return "".join(t.content if t.type in ("text", "code_inline") else " " if t.type in ("softbreak", "hardbreak") else ""
                   for t in children)


def wrap_markdown(markdown: str, width: int = TERMINAL_WIDTH) -> list[str]:
    """A markdown block (paragraphs and "- " list items) as plain-text lines of at most `width` characters, a blank
    line between paragraphs and list items indented under their dash."""
    lines: list[str] = []
    for paragraph in re.split(r"\n\s*\n", markdown.strip()):
        for item in re.split(r"\n(?=[-*] )", paragraph):
            dash = item[:2] in ("- ", "* ")
            lines += textwrap.wrap(plain_text(item[2:] if dash else item), width, initial_indent="- " if dash else "",
                                   subsequent_indent="  " if dash else "")
        lines.append("")
    return lines[:-1]


def compact_table(rows: Sequence[Mapping[str, Any]], width: int = TERMINAL_WIDTH) -> list[str]:
    """Rows as aligned plain-text columns in at most `width` characters: cells as plain text cut to `WIDEST_CELL`,
    the columns that fit from the left, then a line naming the columns left out."""
    if not rows:
        return ["(no rows)"]

    def cut(value: Any) -> str:
        text = plain_text(str(value))
        return text if len(text) <= WIDEST_CELL else text[: WIDEST_CELL - 1] + "…"

    columns = list(rows[0])
    cells = [[cut(column) for column in columns], *[[cut(row[column]) for column in columns] for row in rows]]
    kept, used = 0, -2
    for i in range(len(columns)):
        used += 2 + max(len(line[i]) for line in cells)
        if used > width:
            break
        kept += 1
    lines = aligned(cells[0][:kept], [line[:kept] for line in cells[1:]]).split("\n")
    if kept < len(columns):
        lines += textwrap.wrap(f"(not shown here, see the report: {', '.join(plain_text(c) for c in columns[kept:])})", width)
    return lines


def terminal_summary(bottom_line: str, rows: Sequence[Mapping[str, Any]], notes: Sequence[str] = (),
                     width: int = TERMINAL_WIDTH) -> str:
    """What a finished study prints: its bottom line, then `notes` (such as a smoke test's warning), then its summary
    table in the report's row order, each in at most `width` columns and separated by blank lines."""
    parts = [wrap_markdown(bottom_line, width), *(wrap_markdown(note, width) for note in notes), compact_table(rows, width)]
    return "\n\n".join("\n".join(part) for part in parts if part)


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows as CSV, the keys of the first row as the header, every cell as the plain text the HTML report shows."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if rows:
        writer.writerow([plain_text(str(column)) for column in rows[0]])
        writer.writerows([plain_text(str(row[column])) for column in rows[0]] for row in rows)
    return buffer.getvalue()
