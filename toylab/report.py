"""Reports: a document tree (sections, text, tables, figures, expert maps) with a markdown and an HTML writer,
and the building blocks studies fill it with (tables, intervals as text, the standard figures).

A study returns a `Document`; `to_markdown` and `to_html` write it, so every study gets `report.md`
and a self-contained `report.html` (figures, data and scripts inlined) from one description.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from toylab import io  # noqa: E402
from toylab.formatting import fmt, fmt_ci, markdown_renderer, markdown_table, plain_text  # noqa: E402
from toylab.analysis.stats import FLOOR, VERDICTS  # noqa: E402


def verdict_text(comparison: Mapping[str, Any], digits: int = 3) -> str:
    """A `compare` result as a phrase: the verdict, then the difference with its interval and what the seeds can detect.

    "more (Δ = 0.412 [0.380, 0.444], 90% CI over 5 seeds)", "equivalent within ±0.05 (Δ = ...)",
    "inconclusive (Δ = ..., ...; differences below 0.120 are not reliably detected)", or with one seed
    "inconclusive (one seed, so no interval: Δ = 0.200)".
    """
    c, verdict = comparison, comparison["verdict"]
    if c["n"] < 2:
        return f"inconclusive (one seed, so no interval: Δ = {fmt(c['mean'], digits)})" if c["n"] else "inconclusive (no finished seeds)"
    if c.get("identical") and c.get("both_at_floor"):
        return f"{FLOOR} (identical in every one of {c['n']} seeds and within ±{c['margin']:g} of their nulls, so their agreement says nothing)"
    if c.get("identical"):
        return f"equivalent (identical in every one of {c['n']} seeds: Δ = 0 exactly)"
    if c.get("too_few_seeds"):
        return (f"inconclusive ({c['n']} seeds, and a verdict needs at least 3: Δ = {fmt_ci(c, digits)}, "
                f"{round(100 * c['confidence'])}% CI)")
    if c.get("no_spread"):
        return f"inconclusive (Δ = {fmt(c['mean'], digits)} in every one of {c['n']} seeds: no spread, so no interval can be estimated)"
    interval = (f"Δ = {fmt_ci(c, digits)}, {round(100 * c['confidence'])}% CI over {c['n']} seeds"
                + (" and resampled evaluation sequences" if "evaluation_se" in c else ""))
    if "p_adjusted" in c:  # a verdict corrected within its family (`stats.adjust`)
        p = c["p_equivalent_adjusted"] if verdict == "equivalent" else c["p_adjusted"]
        interval += (f"; {c['adjustment']}-adjusted over {c['family_size']} test{'s' if c['family_size'] != 1 else ''}: p = {fmt(p, 4)}"
                     + (f", uncorrected {c['raw_verdict']}" if c["raw_verdict"] != verdict else ""))
    if c.get("both_at_floor"):
        interval += f"; both within ±{c['margin']:g} of their nulls"
        if verdict == "inconclusive":
            return f"{FLOOR} ({interval}, so their agreement says nothing)"
    if verdict == "equivalent":
        return f"equivalent within ±{c['margin']:g} ({interval})"
    if verdict == "inconclusive":
        return f"inconclusive ({interval}; differences below {fmt(c['detectable'], digits)} are not reliably detected)"
    return f"{verdict} ({interval})"


SERIES_COLOURS = ("#4477AA", "#EE6677", "#228833", "#CCBB44", "#66CCEE", "#AA3377", "#BBBBBB", "#000000")
"""The colours of a figure's series, in order: Paul Tol's colour-blind-safe "bright" scheme (blue, red, green, yellow,
cyan, purple, grey), then black; every two are at least 0.33 apart in RGB (seaborn's "colorblind" orange and vermillion,
0.20 apart, were hard to tell apart as bars)."""


def series_colours(n: int) -> list[str]:
    """Colours for `n` series of one figure: `SERIES_COLOURS` up to eight, evenly spaced hues beyond."""
    return list(SERIES_COLOURS[:n]) if n <= len(SERIES_COLOURS) else sns.color_palette("husl", n).as_hex()


def legend_outside(fig: plt.Figure, ax: plt.Axes, title: str | None = None) -> None:
    """One legend for the figure, of `ax`'s series, to the right of every panel, so it covers no data; call it after
    `tight_layout` (the saved PNG is cropped to include it)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, title=title, loc="upper left", bbox_to_anchor=(1.0, 0.98), fontsize=7, title_fontsize=7,
                   frameon=False)


def margin_text(margin: dict[str, Any]) -> str:
    """A label's margin (`label_margin`) and where it comes from."""
    if margin["rule"] == "absolute":
        return f"{margin['delta']:g} (absolute)"
    share = f"{margin['fraction']:.0%} of ceiling {fmt(margin['ceiling'])}"
    return f"{margin['delta']:.3f} ({share})" if margin["delta"] > margin["floor"] else f"{margin['delta']:g} (floor; {share} is less)"


def training_curves(metrics_files: Mapping[str, Path], metrics: Sequence[str]) -> plt.Figure:
    """One panel per metric; one line per run, from Lightning's `metrics.csv` logs, coloured by model (the run key
    without its `-seed<k>`, so a model's seeds share a colour)."""
    models = {run: run.rsplit("-seed", 1)[0] for run in metrics_files}
    colours = dict(zip(dict.fromkeys(models.values()), series_colours(len(set(models.values())))))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        labelled = set()
        for run, path in metrics_files.items():
            frame = pd.read_csv(path)
            if metric in frame:
                points = frame[["step", metric]].dropna()
                model = models[run]
                ax.plot(points["step"], points[metric], label=model if model not in labelled else "_seed", alpha=0.8, color=colours[model])
                labelled.add(model)
        ax.set(title=metric, xlabel="training step", ylabel=metric)
    fig.tight_layout()
    legend_outside(fig, axes[0][-1], "model (its seeds alike)")
    return fig


def interval_bars(frame: pd.DataFrame, x: str, hue: str, col: str, title: str, reference: float | None = None) -> plt.Figure:
    """Bars of `mean` with `[ci_low, ci_high]` error bars, grouped by `x` and `hue`, one panel per `col` value; `title`
    labels the y axis."""
    panels = list(dict.fromkeys(frame[col]))
    fig, axes = plt.subplots(1, len(panels), figsize=(1.2 + 0.9 * frame[x].nunique() * len(panels) * 1.4, 3.8), squeeze=False)
    hues = list(dict.fromkeys(frame[hue]))
    palette = series_colours(len(hues))
    width = 0.8 / len(hues)
    for ax, panel in zip(axes[0], panels):
        sub = frame[frame[col] == panel]
        xs = list(dict.fromkeys(sub[x]))
        for i, h in enumerate(hues):
            rows = sub[sub[hue] == h].set_index(x).reindex(xs)
            pos = np.arange(len(xs)) + (i - (len(hues) - 1) / 2) * width
            err = np.nan_to_num(np.stack([rows["mean"] - rows["ci_low"], rows["ci_high"] - rows["mean"]]))
            ax.bar(pos, rows["mean"], width, yerr=err, capsize=2, label=h, color=palette[i])
        ax.set_xticks(np.arange(len(xs)), xs, rotation=30, ha="right")
        ax.set(title=f"{col} {panel}", xlabel=x, ylabel=title)
        if reference is not None:
            ax.axhline(reference, color="grey", lw=0.8, ls="--")
    fig.tight_layout()
    legend_outside(fig, axes[0][-1], hue)
    return fig


def interval_lines(frame: pd.DataFrame, x: str, hue: str, col: str, ylabel: str, reference: float | None = None,
                   wrap: int = 4) -> plt.Figure:
    """Lines of `mean` against `x` (numeric) with `[ci_low, ci_high]` error bars, one per `hue` value, one panel per
    `col` value, `wrap` panels to a row."""
    panels, hues = list(dict.fromkeys(frame[col])), list(dict.fromkeys(frame[hue]))
    columns = min(wrap, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.5 + 4.2 * columns, 0.5 + 3.4 * rows), squeeze=False)
    palette = series_colours(len(hues))
    for ax, panel in zip(axes.flat, panels):
        sub = frame[frame[col] == panel]
        for color, h in zip(palette, hues):
            points = sub[sub[hue] == h].sort_values(x)
            err = np.nan_to_num(np.stack([points["mean"] - points["ci_low"], points["ci_high"] - points["mean"]]))
            ax.errorbar(points[x], points["mean"], yerr=err, marker="o", ms=3, capsize=2, label=h, color=color)
        ax.set(title=str(panel), xlabel=x, ylabel=ylabel)
        if reference is not None:
            ax.axhline(reference, color="grey", lw=0.8, ls="--")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    legend_outside(fig, axes.flat[0], hue)
    return fig


def contingency_heatmaps(tables: Mapping[str, np.ndarray], class_names: Mapping[str, Sequence[str]], title: str) -> plt.Figure:
    """Expert x class tables as heatmaps, each column normalized: where do a class's tokens go?"""
    fig, axes = plt.subplots(1, len(tables), figsize=(3.2 * len(tables), 3.4), squeeze=False)
    for i, (ax, (name, table)) in enumerate(zip(axes[0], tables.items())):
        table = np.asarray(table, dtype=float)
        used = table.sum(0) > 0
        share = table[:, used] / table[:, used].sum(0, keepdims=True)
        names = [c for c, u in zip(class_names[name], used) if u]
        sns.heatmap(share, ax=ax, vmin=0, vmax=1, cmap="viridis", cbar=i == len(tables) - 1, xticklabels=names,
                    yticklabels=[f"E{e}" for e in range(len(table))], cbar_kws={"label": "share of the class's tokens"})
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(f"class of {name}", fontsize=8)
        ax.set_ylabel("routed expert", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def matrix_heatmaps(values: Mapping[str, pd.DataFrame], notes: Mapping[str, pd.DataFrame], title: str, label: str,
                    axis: str) -> plt.Figure:
    """Square matrices of similarity scores (e.g. CKA; coloured from 0 to 1) as heatmaps, one panel per entry of `values` (a
    frame whose index and columns are the same `axis` values), each cell written with its value and the same cell of
    `notes` (e.g. a verdict); `label` names the colour scale. A NaN cell stays blank."""
    fig, axes = plt.subplots(1, len(values), figsize=(0.8 + 3.8 * len(values), 3.6), squeeze=False)
    for i, (ax, (name, frame)) in enumerate(zip(axes[0], values.items())):
        text = np.where(frame.isna(), "", frame.map(lambda v: f"{v:.2f}") + "\n" + notes[name])
        sns.heatmap(frame.astype(float), ax=ax, vmin=0, vmax=1, cmap="viridis", annot=text, fmt="", square=True,
                    annot_kws={"fontsize": 7}, cbar=i == len(values) - 1, cbar_kws={"label": label})
        ax.set_title(name, fontsize=9)
        ax.set(xlabel=axis, ylabel=axis)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class Text:
    """Paragraphs or a list, in markdown."""

    markdown: str


@dataclass(frozen=True)
class Table:
    """Rows with the keys of the first row as columns; cells may hold inline markdown."""

    rows: Sequence[Mapping[str, Any]]
    caption: str = ""


@dataclass(frozen=True)
class Figure:
    """A PNG saved by `StudyContext.figure`, by its path relative to the study directory."""

    path: str
    caption: str


@dataclass(frozen=True)
class ExpertMap:
    """The interactive expert map (HTML only) of a JSON file written by `toylab.analysis.expert_map`."""

    path: str
    caption: str = "Expert map: which expert each token is routed to, beside its k-means cluster"


@dataclass(frozen=True)
class Section:
    title: str
    blocks: Sequence[Block]


Block = Union[Text, Table, Figure, ExpertMap, Section]


@dataclass(frozen=True)
class Document:
    title: str
    blocks: Sequence[Block]


def walk(blocks: Sequence[Block], titles: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Block]]:
    """Every block depth-first (a section before its blocks), with the titles of the sections it lies in."""
    for block in blocks:
        yield titles, block
        if isinstance(block, Section):
            yield from walk(block.blocks, (*titles, block.title))


def bottom_line(document: Document) -> str:
    """The markdown of the document's first text, depth-first: every study's report opens with its bottom line."""
    return next((block.markdown for _, block in walk(document.blocks) if isinstance(block, Text)), "")


def table_files(document: Document) -> list[tuple[str, Table]]:
    """Every table of the document in order, with the path of its CSV file in the study directory:
    `tables/<title of its section, as a slug>.csv`, numbered `-2`, `-3`, ... where titles repeat."""
    found, seen = [], set()
    for titles, block in walk(document.blocks):
        if isinstance(block, Table):
            slug = re.sub(r"[^a-z0-9]+", "-", plain_text(titles[-1] if titles else "table").lower()).strip("-")[:60].rstrip("-")
            name, n = slug or "table", 1
            while name in seen:
                n += 1
                name = f"{slug}-{n}"
            seen.add(name)
            found.append((f"tables/{name}.csv", block))
    return found


def to_markdown(document: Document) -> str:
    """The document as GitHub-flavoured markdown (figures as image links, expert maps as a pointer to report.html)."""

    def blocks(items: Sequence[Block], level: int) -> list[str]:
        out = []
        for block in items:
            if isinstance(block, Section):
                out += [f"{'#' * level} {block.title}", *blocks(block.blocks, level + 1)]
            elif isinstance(block, Text):
                out.append(block.markdown.strip("\n"))
            elif isinstance(block, Table):
                out += [block.caption] * bool(block.caption) + [markdown_table(block.rows)]
            elif isinstance(block, Figure):
                out += [f"{'#' * level} {block.caption}", f"![{block.caption}]({block.path})"]
            else:
                out += [f"{'#' * level} {block.caption}",
                        f"Open `report.html` for the interactive expert map (data: `{block.path}`)."]
        return out

    return "\n\n".join([f"# {document.title}", *blocks(document.blocks, 2)]) + "\n"


def to_html(document: Document, directory: Path) -> str:
    """The document as one self-contained HTML page: figures as base64 data URIs, expert-map data and scripts inlined.

    Paths in the document are relative to `directory` (the study directory). A figure or expert map whose
    file is missing is named in the page instead. Each table links to its CSV file (`table_files`).
    """
    from jinja2 import Environment, PackageLoader, select_autoescape

    directory, renderer = Path(directory), markdown_renderer()
    env = Environment(loader=PackageLoader("toylab", "templates"), autoescape=select_autoescape(["html", "j2"]),
                      trim_blocks=True, lstrip_blocks=True)

    def prepare(block: Block, level: int, counter: list[int]) -> dict[str, Any]:
        if isinstance(block, Section):
            counter[0] += 1
            return {"kind": "section", "title": renderer.renderInline(block.title), "level": min(level, 6),
                    "anchor": f"s{counter[0]}", "blocks": [prepare(b, level + 1, counter) for b in block.blocks]}
        if isinstance(block, Text):
            return {"kind": "text", "html": renderer.render(block.markdown)}
        if isinstance(block, Table):
            return {"kind": "table", "caption": renderer.renderInline(block.caption), "html": renderer.render(markdown_table(block.rows)),
                    "csv": csv[id(block)]}
        file = directory / block.path
        if isinstance(block, Figure):
            data = base64.b64encode(file.read_bytes()).decode() if file.is_file() else None
            return {"kind": "figure", "caption": renderer.renderInline(block.caption), "alt": block.caption, "path": block.path,
                    "data": data, "level": min(level, 6)}
        counter[1] += 1
        data = io.read_json(file) if file.is_file() else None
        return {"kind": "expert_map", "caption": renderer.renderInline(block.caption), "path": block.path, "data": data,
                "id": f"expert-map-{counter[1]}", "level": min(level, 6)}

    counter, csv = [0, 0], {id(table): path for path, table in table_files(document)}
    blocks = [prepare(block, 2, counter) for block in document.blocks]
    return env.get_template("report.html.j2").render(title=renderer.renderInline(document.title), blocks=blocks,
                                                      has_map=counter[1] > 0)


FAMILIES_NOTE = (
    "Every other verdict in this report is secondary. Tests are grouped into families of one kind of comparison, and "
    "each family, the primary one included, is corrected on its own by Benjamini–Hochberg: on average at most 5% of a "
    "family's claims are false, and in a family with no effect anywhere the chance of any *more* or *less* is at most 5%. "
    "*Equivalent* uses the adjusted two one-sided tests. A verdict needs at least 3 seeds; with fewer, or where a test "
    "fails to reject, it reads *inconclusive*: not shown, never *no*."
)


def families_section(
    question: str, families: Mapping[str, Mapping[str, Any]], blocks: Sequence[Block] = (), order: Sequence[str] = (),
) -> Section:
    """The "Primary question and families of tests" section: the study's primary `question` (markdown), then `blocks`
    (e.g. the primary verdicts), then one row per family of `stats.adjust_family` results (with its `role`): its number
    of tests and its verdict counts before and after the correction (inconclusive ones `both_at_floor` said so), the
    primary family first, then in `order` (a study's family names; `results.json` keeps keys sorted)."""
    def counts(tally: Mapping[str, int]) -> str:
        return ", ".join(f"{tally[verdict]} {verdict}" for verdict in VERDICTS if tally.get(verdict)) or "none"

    def floor(f: Mapping[str, Any], stage: str) -> str:
        return f" (of which {n} {FLOOR})" if (n := f.get("at_floor", {}).get(stage)) else ""

    rows = [{"family": name, "role": f["role"], "tests": f["tests"], "uncorrected verdicts": counts(f["raw"]) + floor(f, "raw"),
             "adjusted verdicts": counts(f["adjusted"]) + floor(f, "adjusted")}
            for name, f in sorted(families.items(), key=lambda item: (not item[1]["role"].startswith("primary"),
                                                                      list(order).index(item[0]) if item[0] in order else len(order)))]
    return Section("Primary question and families of tests", [Text(f"{question} {FAMILIES_NOTE}"), *blocks, Table(rows)])


def failed_runs_section(failures: Sequence[Mapping[str, str]]) -> list[Section]:
    """A "Failed runs" section naming each failed training run and its error (none if every run finished)."""
    return [Section("Failed runs", [Text("\n".join(f"- `{f['run']}`: {f['error']}" for f in failures))])] if failures else []


EXPERT_MAP_NOTE = (
    "The first {n} held-out sequences, every token coloured by the expert it is routed to (left) and by its k-means cluster on "
    "the router input (right; as many clusters as experts, renamed to the expert they overlap most, so equal colours mean the "
    "same group). Choose the layer and seed; pick label classes to dim every other token; hover a token for its labels, "
    "router probabilities and chosen experts at every layer."
)


def expert_map_section(directory: Path, shown: int, note: str = "") -> list[Section]:
    """The "Expert map" section if the study wrote `expert_map.json` into `directory` (none otherwise); `note` is added
    to the standard explanation."""
    if not (Path(directory) / "expert_map.json").is_file():
        return []
    return [Section("Expert map", [Text(" ".join([EXPERT_MAP_NOTE.format(n=shown), note]).strip()), ExpertMap("expert_map.json")])]
