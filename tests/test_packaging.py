"""The package: a wheel that installs only `toylab*`, and imports that point one way between layers."""

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

LAYERS = {"library": 0, "tasks": 1, "studies": 2, "cli": 3}
"""Each layer may import only from layers below it (tasks and studies never from each other's files:
studies reach tasks only through the task API, by name)."""


def layer_of_file(path: Path) -> str:
    relative = path.relative_to(ROOT).as_posix()
    if relative.startswith(("tasks/", "studies/")):
        return relative.split("/")[0]
    return "cli" if relative in ("toylab/cli.py", "toylab/__main__.py") else "library"


def layer_of_module(module: str) -> str | None:
    """The layer of an imported toylab module; None for anything outside toylab."""
    parts = module.split(".")
    if parts[0] != "toylab":
        return None
    if len(parts) > 1 and parts[1] in ("tasks", "studies"):
        return parts[1]
    return "cli" if len(parts) > 1 and parts[1] in ("cli", "__main__") else "library"


def imported_modules(source: str) -> set[str]:
    """Every absolute module an `import` or `from ... import` names, at any depth (function bodies too)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def violations(path: Path, source: str) -> list[str]:
    """`file imports module` for each import of a higher layer, or of a sibling task/study layer."""
    layer = layer_of_file(path)
    bad = []
    for module in sorted(imported_modules(source)):
        target = layer_of_module(module)
        if module.split(".")[0] in ("tasks", "studies", "cli"):
            bad.append(f"{path.relative_to(ROOT)} imports top-level {module}")
        elif target is not None and target != layer and (LAYERS[target] > LAYERS[layer] or {layer, target} == {"tasks", "studies"}):
            bad.append(f"{path.relative_to(ROOT)} ({layer}) imports {module} ({target})")
    return bad


def sources() -> list[Path]:
    return sorted(p for folder in ("toylab", "tasks", "studies") for p in (ROOT / folder).rglob("*.py"))


def test_layers_point_one_way() -> None:
    bad = [line for path in sources() for line in violations(path, path.read_text())]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    ("file", "source"),
    [
        ("toylab/models/x.py", "from toylab.tasks.superposition import SparseFeatures"),
        ("toylab/report.py", "def f():\n    import toylab.cli"),
        ("tasks/x.py", "from toylab.studies.planning import probe_targets"),
        ("studies/x.py", "from toylab.tasks.gridworld import TOKEN_TYPES"),
        ("toylab/__init__.py", "from tasks.brackets import Brackets"),
    ],
)
def test_the_layer_check_catches_an_upward_import(file: str, source: str) -> None:
    assert violations(ROOT / file, source)


def test_the_layer_check_allows_downward_imports() -> None:
    assert not violations(ROOT / "studies/x.py", "from toylab.study import Study\nfrom toylab.registry import get_task")
    assert not violations(ROOT / "toylab/cli.py", "from toylab.studies.planning import Planning")


def test_wheel_installs_only_the_toylab_namespace(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("toylab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"toylab", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    assert {"toylab/tasks/brackets.py", "toylab/studies/planning.py", "toylab/cli.py", "toylab/schemas/results.schema.json",
            "toylab/templates/expert_map.js"} <= set(names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "toylab = toylab.cli:app" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_python_m_toylab_runs_from_any_folder(tmp_path: Path) -> None:
    (tmp_path / "tasks").mkdir()  # a user's own `tasks` package must not shadow ours
    (tmp_path / "tasks" / "__init__.py").write_text("raise ImportError('shadowed')\n")
    done = subprocess.run([sys.executable, "-m", "toylab", "tasks", "list"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "brackets" in done.stdout


ABOVE_MODELS = ("toylab.training", "toylab.study", "toylab.analysis", "toylab.report", "toylab.runs", "toylab.sweep")
"""Library modules built on the models: a model module imports none of them."""


def test_models_import_nothing_built_on_them() -> None:
    bad = [f"{path.relative_to(ROOT)} imports {module}" for path in sorted((ROOT / "toylab" / "models").glob("*.py"))
           for module in imported_modules(path.read_text()) if module.startswith(ABOVE_MODELS)]
    assert not bad, "\n".join(bad)
    assert imported_modules("from toylab.training import data_seed") & {"toylab.training"}  # what the check would catch
