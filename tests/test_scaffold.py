"""`toylab tasks new`: a task skeleton that the generic task suite and a study pick up with no other edit,
a reference test that fails until it is written, and one-line refusals that overwrite nothing."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from toylab import scaffold
from toylab.cli import app

ROOT = Path(__file__).resolve().parent.parent
RULE = ("    return np.maximum.accumulate(symbols, axis=1)\n",
        "    return np.cumsum(symbols, axis=1) % n_symbols  # the running sum mod n_symbols\n")
REFERENCE = ("""    raise NotImplementedError("write an independent reference for the rule of task 'running_total' here")\n""",
             "    total, outputs = 0, []\n"
             "    for s in symbols:\n"
             "        total = (total + s) % n_symbols\n"
             "        outputs.append(total)\n"
             "    return outputs\n")


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        app(list(args))
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def fill_in(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} not once in {path}"
    path.write_text(text.replace(old, new))


def pytest_run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """pytest in a new process with the project's settings, one worker, no cache."""
    command = [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "-o", "addopts=", "-p", "no:xdist",
               "-p", "no:cacheprovider", "-q", *args]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)


@pytest.fixture
def plugin(tmp_path: Path, capsys) -> tuple[Path, Path, dict[str, str]]:
    """The task `running_total`, scaffolded into the package `scaffolded` of a plugin distribution in a temporary folder,
    registered through the entry-point group `toylab.tasks` as an installed plugin is; the environment puts it on
    the import path. Returns the task file, the test file and that environment."""
    site = tmp_path / "site"
    (site / "scaffolded").mkdir(parents=True)
    (site / "scaffolded" / "__init__.py").write_text("")
    dist = site / "scaffolded-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: scaffolded\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[toylab.tasks]\nrunning_total = scaffolded.running_total:RunningTotal\n")
    code, out, err = run(capsys, "tasks", "new", "running_total", "--dir", str(site / "scaffolded"),
                         "--tests-dir", str(tmp_path / "tests"))
    assert code == 0, err
    assert 'running_total = "PACKAGE.running_total:RunningTotal"' in out
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    return site / "scaffolded" / "running_total.py", tmp_path / "tests" / "test_running_total.py", env


def test_a_scaffolded_task_is_picked_up_by_the_task_suite_and_a_study(plugin, tmp_path):
    task_file, test_file, env = plugin
    unfilled = pytest_run(env, str(test_file))
    assert unfilled.returncode == 1 and "NotImplementedError: write an independent reference" in unfilled.stdout
    assert "2 failed, 1 passed" in unfilled.stdout  # the reference test fails until it is written

    fill_in(task_file, *RULE)
    fill_in(test_file, *REFERENCE)
    filled = pytest_run(env, str(test_file), str(ROOT / "tests" / "test_task_api.py"), "-k", "running_total")
    assert filled.returncode == 0, filled.stdout[-3000:]
    assert "7 passed" in filled.stdout  # 3 of its own, 4 generic checks run on it

    fill_in(task_file, RULE[1], "    return np.cumsum(symbols, axis=1)  # a bug: outputs out of range\n")
    broken = pytest_run(env, str(test_file), "-k", "match_the_reference")
    assert broken.returncode == 1  # the reference catches a wrong rule
    fill_in(task_file, "    return np.cumsum(symbols, axis=1)  # a bug: outputs out of range\n", RULE[1])

    study = subprocess.run(
        [sys.executable, "-m", "toylab", "study", "run", "expert-specialization", "--task", "running_total", "--fast",
         "--seeds", "2", "--set", "train.steps=60", "--set", "n_permutations=50", "--workers", "1", "--no-progress",
         "--out", str(tmp_path / "runs")],
        env=env, cwd=tmp_path, capture_output=True, text=True,
    )
    assert study.returncode == 0, study.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "expert-specialization").iterdir()
    report = (run_dir / "report.md").read_text()
    assert "running_total" in report and "`output`" in report
    assert "for model logits" not in report  # the base class's docstring does not leak into the report (issue 27 §6)


def test_default_folder_is_the_builtin_tasks_package(tmp_path, capsys, monkeypatch):
    assert (scaffold.tasks_folder() / "brackets.py").is_file()
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tests").mkdir()
    monkeypatch.setattr(scaffold, "tasks_folder", lambda: tmp_path / "tasks")
    code, out, _ = run(capsys, "tasks", "new", "counting")
    assert code == 0
    assert (tmp_path / "tasks" / "counting.py").is_file() and (tmp_path / "tests" / "test_counting.py").is_file()
    assert "entry-point" not in out and "tests/test_task_api.py -k counting" in out
    assert '@register_task("counting")\nclass Counting(Task):' in (tmp_path / "tasks" / "counting.py").read_text()


@pytest.mark.parametrize("name,message", [
    ("brackets", "task 'brackets' already exists"),
    ("My_task", "invalid task name 'My_task': use a lowercase Python identifier"),
    ("my-task", "invalid task name 'my-task'"),
    ("2x", "invalid task name '2x'"),
    ("_private", "invalid task name '_private'"),
    ("lambda", "invalid task name 'lambda'"),
])
def test_bad_names_give_one_line_and_exit_2(tmp_path, capsys, name, message):
    code, _, err = run(capsys, "tasks", "new", name, "--dir", str(tmp_path), "--tests-dir", str(tmp_path))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_existing_files_are_never_overwritten(tmp_path, capsys):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mine.py").write_text("mine\n")
    code, _, err = run(capsys, "tasks", "new", "mine", "--dir", str(tmp_path / "tasks"), "--tests-dir", str(tmp_path / "t"))
    assert code == 2 and "mine.py already exists" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "tasks" / "mine.py").read_text() == "mine\n" and not (tmp_path / "t").exists()

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "test_theirs.py").write_text("theirs\n")
    code, _, err = run(capsys, "tasks", "new", "theirs", "--dir", str(tmp_path / "tasks"), "--tests-dir", str(tmp_path / "t"))
    assert code == 2 and "test_theirs.py already exists" in err
    assert not (tmp_path / "tasks" / "theirs.py").exists() and (tmp_path / "t" / "test_theirs.py").read_text() == "theirs\n"

    code, _, err = run(capsys, "tasks", "new", "lonely", "--dir", str(tmp_path / "elsewhere" / "tasks"))
    assert code == 2 and "no tests folder beside" in err and "--tests-dir" in err
    assert not (tmp_path / "elsewhere").exists()
