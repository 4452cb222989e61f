"""Studies: a config, a `run` that composes library functions, and a markdown report.

`run_study` resolves the config (defaults < `--fast` preset < config file < command line), puts
everything in `<out>/<study>/<config hash>/`, reuses finished training runs, and writes
`config.json`, `code_version.json`, `results.json`, the figures and `report.md` atomically.
"""

from __future__ import annotations

import io as _io
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from toylab import io  # noqa: E402
from toylab.config import build, config_hash, to_dict  # noqa: E402
from toylab.errors import DivergenceError, ToylabError  # noqa: E402
from toylab.registry import get_study  # noqa: E402
from toylab.task import Task  # noqa: E402
from toylab.training import TrainConfig, TrainedModel, train  # noqa: E402


class StudyContext:
    """What a running study may touch: its directory, cached training runs, figures, progress."""

    def __init__(self, directory: Path, progress: bool = True) -> None:
        self.directory = Path(directory)
        self.progress = progress
        self.failures: list[dict[str, str]] = []

    def train(self, key: str, task: Task, model_options: dict[str, Any], cfg: TrainConfig) -> TrainedModel | None:
        """Train (or reuse) the model stored under `models/<key>`; a diverging run is recorded and gives None."""
        try:
            return train(task, model_options, cfg, self.directory / "models" / key, progress=False)
        except DivergenceError as error:
            self.failures.append({"run": key, "error": str(error)})
            tqdm.write(f"run {key} failed: {error}")
            return None

    def bar(self, items: Iterable[Any], total: int, description: str) -> Iterable[Any]:
        return tqdm(items, total=total, desc=description, disable=not self.progress, leave=False)

    def figure(self, name: str, fig: plt.Figure) -> str:
        """Save a figure as PNG (atomically); return its path relative to the study directory."""
        buffer = _io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        path = f"figures/{name}.png"
        io.atomic_write_bytes(self.directory / path, buffer.getvalue())
        return path


class Study(ABC):
    """Base class: subclasses set `name`, a `Config` dataclass, a `fast` preset, and implement run/report."""

    name: ClassVar[str]
    Config: ClassVar[type]
    fast: ClassVar[dict[str, Any]] = {}
    """Config overrides for `--fast`: the whole pipeline, small, in under a minute."""

    def __init__(self, config: Any) -> None:
        self.config = config

    @abstractmethod
    def run(self, ctx: StudyContext) -> dict[str, Any]:
        """Train, analyse, and return every number of the report (JSON-ready)."""

    @abstractmethod
    def report(self, results: dict[str, Any], ctx: StudyContext) -> str:
        """The markdown report (figures saved through `ctx.figure`)."""

    @abstractmethod
    def summary(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        """Rows of the summary table printed by the CLI."""

    @classmethod
    def describe(cls) -> str:
        return (cls.__doc__ or cls.name).strip().split("\n")[0]


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge nested config mappings."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def nest(assignments: Mapping[str, Any]) -> dict[str, Any]:
    """`{"train.steps": 5}` -> `{"train": {"steps": 5}}`."""
    nested: dict[str, Any] = {}
    for key, value in assignments.items():
        *parents, leaf = key.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return nested


def code_version() -> dict[str, str]:
    """The git commit of the source tree (and whether it had uncommitted changes), or the package version."""
    from importlib.metadata import version

    root = Path(__file__).resolve().parent.parent
    info = {"toylab": version("toylab")}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            info["git_dirty"] = str(bool(dirty.stdout.strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    return info


@dataclass
class StudyOutcome:
    directory: Path
    results: dict[str, Any]
    summary: list[dict[str, Any]]
    seconds: float


def resolve(name: str, overrides: Mapping[str, Any] | None = None, fast: bool = False) -> Study:
    """The study `name` with its config resolved from defaults, the fast preset and overrides."""
    cls = get_study(name)
    options = merge(cls.fast if fast else {}, overrides or {})
    return cls(build(cls.Config, options))


def run_study(
    name: str,
    overrides: Mapping[str, Any] | None = None,
    out: Path = Path("runs"),
    fast: bool = False,
    progress: bool = True,
) -> StudyOutcome:
    """Run (or resume) a study; everything lands in `<out>/<name>/<hash of the resolved config>/`."""
    start = time.perf_counter()
    study = resolve(name, overrides, fast)
    config = {"study": name, **to_dict(study.config)}
    directory = Path(out) / name / config_hash(config)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ToylabError(f"cannot create output directory {directory}: {error.strerror}") from None
    io.write_json(directory / "config.json", config)
    io.write_json(directory / "code_version.json", code_version())
    ctx = StudyContext(directory, progress)
    results = study.run(ctx)
    results["failed_runs"] = ctx.failures
    io.write_json(directory / "results.json", results)
    io.write_text(directory / "report.md", study.report(results, ctx))
    seconds = time.perf_counter() - start
    io.write_json(directory / "timing.json", {"seconds": round(seconds, 2)})
    return StudyOutcome(directory, results, study.summary(results), seconds)

