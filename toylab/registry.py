"""Name -> class registries for tasks and studies.

Built-in tasks live one per file in the `toylab.tasks` package (the repository's `tasks/` folder) and
studies in `toylab.studies` (`studies/`); both are imported on first use, so adding a file is all it takes. Third-party packages register through
the entry-point groups `toylab.tasks` and `toylab.studies` (`name = "pkg.module:Class"`).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from pathlib import Path
from importlib.metadata import entry_points
from typing import Any, Callable, Generic, TypeVar

from toylab.errors import ToylabError

T = TypeVar("T")


class Registry(Generic[T]):
    """Classes registered by name with a decorator, discovered from a package and an entry-point group."""

    def __init__(self, kind: str, package: str, group: str) -> None:
        self.kind, self.package, self.group = kind, package, group
        self._classes: dict[str, type[T]] = {}
        self._discovered = False

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def decorator(cls: type[T]) -> type[T]:
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            cls.name = name
            self._classes[name] = cls
            return cls

        return decorator

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{self.package}.{module.name}")
        for entry in entry_points(group=self.group):
            cls = entry.load()
            if entry.name not in self._classes:
                self.register(entry.name)(cls)

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._classes)

    def summaries(self) -> dict[str, str]:
        """Name -> the first line of its class docstring, for listing: read from the built-in modules' source (so listing
        imports none of them, nor torch), and from the classes of the entry points (which it loads)."""
        found: dict[str, str] = {}
        for folder in importlib.util.find_spec(self.package).submodule_search_locations or []:
            for path in sorted(Path(folder).glob("[!_]*.py")):
                for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                    name = registered_name(node)
                    if name is not None:
                        found[name] = (ast.get_docstring(node) or name).strip().split("\n")[0]
        for entry in entry_points(group=self.group):
            if entry.name not in found:
                found[entry.name] = ((entry.load().__doc__ or entry.name).strip().split("\n")[0])
        return dict(sorted(found.items()))

    def get(self, name: str) -> type[T]:
        self._discover()
        if name not in self._classes:
            raise ToylabError(f"unknown {self.kind} '{name}'; valid: {', '.join(self.names())}")
        return self._classes[name]


def registered_name(node: ast.AST) -> str | None:
    """The name a class definition registers itself under (`@register_study("name")`, `@register_task(...)`), if any."""
    if not isinstance(node, ast.ClassDef):
        return None
    for decorator in node.decorator_list:
        if (isinstance(decorator, ast.Call) and getattr(decorator.func, "id", "").startswith("register_") and decorator.args
                and isinstance(decorator.args[0], ast.Constant)):
            return str(decorator.args[0].value)
    return None


TASKS: Registry[Any] = Registry("task", "toylab.tasks", "toylab.tasks")
STUDIES: Registry[Any] = Registry("study", "toylab.studies", "toylab.studies")

register_task = TASKS.register
register_study = STUDIES.register


def get_task(name: str, config: Any = None, **options: Any) -> Any:
    """Build the task registered as `name` with its options."""
    return TASKS.get(name)(config, **options)


def list_tasks() -> list[str]:
    return TASKS.names()


def get_study(name: str) -> Any:
    return STUDIES.get(name)


def list_studies() -> list[str]:
    return STUDIES.names()
