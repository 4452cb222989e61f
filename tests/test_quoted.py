"""Numbers quoted in documents (`toylab.quoted`): the parser on a known text, and the numbers the README, the study
pages and the verdict rules quote against the data file written from the runs they come from."""

from pathlib import Path

import pytest

from toylab import io, quoted

ROOT = Path(__file__).resolve().parent.parent
README, NUMBERS = ROOT / "README.md", ROOT / "docs" / "readme-numbers.json"
PAGES = [*sorted((ROOT / "docs" / "studies").glob("*.md")), ROOT / "docs" / "verdicts.md"]
"""The study pages and the verdict rules quote their runs like the README, from the same data file, and quote every
number of their prose."""


def test_the_number_checks_parse_and_fail_on_a_wrong_number(tmp_path) -> None:
    text = ("Routing NMI 0.059 (73% of tokens, 95% CI), verdict *more*; `2.13` in code.\n\n"
            "<!-- numbers quoted above, checked:\n0.059 | a.b.0 | 0.001\n73% | s:c | 0.005\nmore | v | =\n-->\n")
    assert quoted.checks(text) == [("0.059", "a.b.0", "0.001"), ("73%", "s:c", "0.005"), ("more", "v", "=")]
    assert quoted.prose_numbers(text) == {"0.059", "73%"}  # not the test's level, not code
    assert quoted.lookup({"a": {"b": [0.0594]}}, "a.b.0") == 0.0594
    assert quoted.matches("0.059", 0.0594, "0.001") and not quoted.matches("0.059", 0.061, "0.001")
    assert quoted.matches("73%", 0.7312, "0.005") and not quoted.matches("73%", 0.74, "0.005")
    assert quoted.matches("−0.023", -0.0231, "0.001") and not quoted.matches("more", "inconclusive", "=")
    io.write_json(tmp_path / "run" / "results.json", {"c": 0.731})
    out = tmp_path / "numbers.json"
    (tmp_path / "doc.md").write_text(text)
    quoted.main([str(tmp_path / "doc.md"), str(out), f"s={tmp_path / 'run'}"])
    assert io.read_json(out) == {"s:c": 0.731}  # only the lines of the runs given


def test_every_number_the_readme_quotes_from_a_run_matches_the_file_written_from_it() -> None:
    """The README is a front door (its findings live on the study pages), so it may quote few numbers or none; those
    it quotes appear in its prose and match their runs."""
    text, values = README.read_text(), io.read_json(NUMBERS)
    lines = quoted.checks(text)
    prose = quoted.CHECKS.sub("", text)
    assert [n for n, _, _ in lines if n not in prose] == []
    wrong = [(n, path, values.get(path)) for n, path, tolerance in lines
             if path not in values or not quoted.matches(n, values[path], tolerance)]
    assert wrong == [], "quoted vs written from the run (rerun `python -m toylab.quoted`, see its docstring)"


@pytest.mark.parametrize("document", PAGES, ids=lambda path: path.name)
def test_every_number_a_page_quotes_matches_its_run_and_every_number_is_quoted(document) -> None:
    text, values = document.read_text(), io.read_json(NUMBERS)
    lines = quoted.checks(text)
    wrong = [(n, path, values.get(path)) for n, path, tolerance in lines
             if path not in values or not quoted.matches(n, values[path], tolerance)]
    assert wrong == [], "quoted vs written from the run (rerun `python -m toylab.quoted`, see its docstring)"
    assert quoted.prose_numbers(text) - {n for n, _, _ in lines} == set(), "a number in the prose is not quoted from a run"
