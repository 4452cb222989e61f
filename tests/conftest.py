"""Shared fixtures: every figure a study saves, checked for what a reader needs (issue 27 §5)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest

LOOK_ALIKE = 0.3
"""Two series drawn with the same marker and line style must be at least this far apart in RGB ([0, 1] per channel);
seaborn's "colorblind" orange and vermillion, which read as one colour in bar charts, are 0.20 apart."""


def figure_problems(fig) -> list[str]:
    """What a matplotlib figure lacks, in words: a panel without an x or y label, a colorbar without a label, a legend
    over a panel's data, or two legend entries that look alike. Empty for a figure fit to save."""
    import matplotlib.colors as mcolors
    import numpy as np

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    problems, panels = [], []
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        name = ax.get_title() or ax.get_label() or "a panel"
        if ax.get_label() == "<colorbar>":
            if not (ax.get_ylabel() or ax.get_xlabel()):
                problems.append("a colorbar has no label")
            continue
        panels.append((name, ax))
        problems += [f"panel '{name}' has no {axis} label" for axis, label in (("x", ax.get_xlabel()), ("y", ax.get_ylabel())) if not label]
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    for legend in legends:
        box = legend.get_window_extent(renderer)
        problems += [f"the legend covers panel '{name}'" for name, ax in panels if box.overlaps(ax.get_window_extent(renderer))]
        entries = []
        for handle, text in zip(legend.legend_handles, legend.get_texts()):
            colour = handle.get_color() if hasattr(handle, "get_color") else handle.get_facecolor()
            colour = np.asarray(mcolors.to_rgba_array(colour))[0, :3]
            style = (getattr(handle, "get_marker", lambda: None)(), getattr(handle, "get_linestyle", lambda: None)())
            entries.append((text.get_text(), colour, style))
        problems += [f"series '{a}' and '{b}' look alike" for (a, ca, sa), (b, cb, sb) in itertools.combinations(entries, 2)
                     if sa == sb and np.linalg.norm(ca - cb) < LOOK_ALIKE]
    return problems


@pytest.fixture(name="figure_problems")
def figure_problems_fixture() -> Callable[..., list[str]]:
    """`figure_problems`, for tests of the figure-building functions."""
    return figure_problems


@pytest.fixture(scope="module")
def checked_figures() -> Iterator[dict[str, list[str]]]:
    """While the test module runs, every figure a study saves is checked as it is saved: figure name -> problems."""
    from toylab.study import StudyContext

    found: dict[str, list[str]] = {}
    save = StudyContext.figure

    def figure(self: StudyContext, name: str, fig) -> str:
        found[name] = figure_problems(fig)
        return save(self, name, fig)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StudyContext, "figure", figure)
        yield found
