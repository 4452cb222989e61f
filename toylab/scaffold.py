"""`toylab tasks new`: write a documented task skeleton and its test file from the templates in `templates/scaffold/`.

The skeleton is a working task with an example rule (so the generic task suite and the studies run on it
at once); its test file holds an independent-reference test that fails until the reference is written.
"""

from __future__ import annotations

import importlib.util
import keyword
import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from string import Template

from toylab import io
from toylab.errors import ToylabError
from toylab.registry import TASKS

NAME = re.compile(r"[a-z][a-z0-9_]*")
"""A task name: a lowercase Python identifier, which is also its module's name."""


@dataclass(frozen=True)
class Scaffold:
    """The files `new_task` wrote, and whether the task registers itself (it is in the `toylab.tasks` package)."""

    task_file: Path
    test_file: Path
    builtin: bool


def tasks_folder() -> Path:
    """The folder of the built-in tasks package (`toylab.tasks`: the repository's `tasks/` in an editable install)."""
    spec = importlib.util.find_spec(TASKS.package)
    assert spec is not None and spec.submodule_search_locations, f"{TASKS.package} is not a package"
    return Path(next(iter(spec.submodule_search_locations)))


def check_name(name: str) -> None:
    """Refuse (one-line ToylabError) a name that is not a lowercase identifier, or that a task already has."""
    if not NAME.fullmatch(name) or keyword.iskeyword(name):
        raise ToylabError(f"invalid task name '{name}': use a lowercase Python identifier (letters, digits and "
                          f"underscores, starting with a letter, not a keyword), e.g. my_task")
    if name in TASKS.names():
        raise ToylabError(f"task '{name}' already exists; choose another name (registered: {', '.join(TASKS.names())})")


def class_name(name: str) -> str:
    """`my_task` -> `MyTask`."""
    return "".join(part.capitalize() for part in name.split("_"))


def render(template: str, **values: str) -> str:
    """A template of `templates/scaffold/` with its `$name` placeholders filled in."""
    return Template((files("toylab") / "templates" / "scaffold" / template).read_text()).substitute(values)


def new_task(name: str, task_dir: Path | None = None, tests_dir: Path | None = None) -> Scaffold:
    """Write `task_dir/NAME.py` (default: the built-in tasks folder) and `tests_dir/test_NAME.py` (default: the
    `tests/` folder beside `task_dir`, which must exist); refuse, writing nothing, if either file exists."""
    check_name(name)
    builtin_dir = tasks_folder()
    task_dir = Path(task_dir) if task_dir is not None else builtin_dir
    if tests_dir is None:
        tests_dir = task_dir.resolve().parent / "tests"
        if not tests_dir.is_dir():
            raise ToylabError(f"no tests folder beside {task_dir} (looked for {tests_dir}); give one with --tests-dir")
    task_file, test_file = task_dir / f"{name}.py", Path(tests_dir) / f"test_{name}.py"
    for path in (task_file, test_file):
        if path.exists() or path.is_symlink():
            raise ToylabError(f"{path} already exists; choose another task name (nothing was written)")
        io.check_writable(path)
    values = {"name": name, "class_name": class_name(name), "test_file": f"{test_file.parent.name}/{test_file.name}"}
    task_text, test_text = render("task.py.tmpl", **values), render("test_task.py.tmpl", **values)
    io.write_text(task_file, task_text)
    try:
        io.write_text(test_file, test_text)
    except ToylabError:
        task_file.unlink()  # both files or neither
        raise
    return Scaffold(shown(task_file), shown(test_file), task_dir.resolve() == builtin_dir.resolve())


def shown(path: Path) -> Path:
    """`path` relative to the current folder when it lies inside it (for messages), else as it is."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path
