"""The lessons in docs/lessons/: every `toylab ...` command in their code blocks runs, every file a lesson
tells the student to open (`report.md`, `report.html`, `results.json`, `figures/*.png`) is in the run directory,
and every number a lesson quotes from its run is checked against the rerun's `results.json`.

A lesson lists its quoted numbers in a comment at its end (`toylab.quoted`): every decimal number in its prose
must be listed there, and the rerun must reproduce each within its tolerance.

Each command is a study of up to about four minutes on 2 cores, too long to run them all in the default
suite on 2 cores: the superposition lesson (the quickest) runs by default, the other lessons are marked slow
(`python -m pytest tests/test_lessons.py -m slow`).
"""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from toylab import quoted

LESSONS = Path(__file__).resolve().parent.parent / "docs" / "lessons"
DEFAULT = "01-superposition.md"
"""The lesson that runs in the default suite."""
CODE_BLOCK = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
MENTIONED = re.compile(r"`((?:figures/[\w.-]+\.png)|report\.md|report\.html|results\.json)`")


def commands(text: str) -> list[str]:
    """The `toylab ...` lines of a lesson's code blocks."""
    return [line.strip() for block in CODE_BLOCK.findall(text) for line in block.splitlines()
            if line.strip().startswith("toylab ")]


def mentioned_files(text: str) -> set[str]:
    """The run-directory files a lesson names in inline code."""
    return set(MENTIONED.findall(text))


def lesson_params() -> list:
    return [pytest.param(path, id=path.stem, marks=[] if path.name == DEFAULT else [pytest.mark.slow])
            for path in sorted(LESSONS.glob("[0-9]*.md"))]


def test_the_parsers_find_commands_and_files() -> None:
    text = ("Intro `toylab tasks list` inline is not run.\n\n```bash\ntoylab study run x --fast\n```\n\n"
            "```text\n<bos> toylab\n```\nOpen `figures/a_b.png`, `report.html` and `report.md`; not `figures/`.\n")
    assert commands(text) == ["toylab study run x --fast"]
    assert mentioned_files(text) == {"figures/a_b.png", "report.html", "report.md"}


def test_every_number_a_lesson_quotes_is_checked_against_its_run() -> None:
    for path in sorted(LESSONS.glob("[0-9]*.md")):
        text = path.read_text()
        numbers = [row[0] for row in quoted.checks(text)]
        assert all(len(row) == 3 for row in quoted.checks(text)), path.name
        prose = quoted.CHECKS.sub("", text)
        assert all(n in prose for n in numbers), f"{path.name}: {[n for n in numbers if n not in prose]} not in the text"
        unchecked = sorted(quoted.prose_numbers(text) - set(numbers))
        assert not unchecked, f"{path.name}: {unchecked} quoted but not checked against a run"


def test_there_are_five_lessons_with_one_command_each() -> None:
    lessons = sorted(LESSONS.glob("[0-9]*.md"))
    assert len(lessons) == 5
    for path in lessons:
        text = path.read_text()
        assert len(commands(text)) == 1, path.name
        assert "--fast" in commands(text)[0], path.name
        exercises = text.split("## Exercises")[-1]
        assert "\n1. " in exercises and "\n2. " in exercises and "\n3. " not in exercises, f"{path.name}: two exercises"
        assert mentioned_files(text), f"{path.name} names no file to look at"


@pytest.mark.parametrize("lesson", lesson_params())
def test_lesson_command_runs_and_makes_the_files_it_mentions(lesson: Path, tmp_path: Path) -> None:
    text = lesson.read_text()
    (command,) = commands(text)
    args = shlex.split(command)[1:] + ["--out", str(tmp_path), "--no-progress"]
    done = subprocess.run([sys.executable, "-m", "toylab", *args], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = [path.parent for path in tmp_path.glob("*/*/results.json")]
    missing = sorted(name for name in mentioned_files(text) if not (run_dir / name).is_file())
    assert not missing, f"{lesson.name}: {missing} not in {run_dir}"
    results = json.loads((run_dir / "results.json").read_text())
    wrong = [(number, path, quoted.lookup(results, path)) for number, path, tolerance in quoted.checks(text)
             if not quoted.matches(number, quoted.lookup(results, path), tolerance)]
    assert not wrong, f"{lesson.name}: quoted vs rerun {wrong}"
