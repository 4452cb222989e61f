"""toylab: a toy-model laboratory for controlled mechanistic-interpretability studies."""

from typing import Any

from toylab.errors import DivergenceError, ToylabError
from toylab.registry import get_study, get_task, list_studies, list_tasks

__all__ = [
    "Batch",
    "DivergenceError",
    "Label",
    "Task",
    "ToylabError",
    "get_study",
    "get_task",
    "list_studies",
    "list_tasks",
]


def __getattr__(name: str) -> Any:
    """The task API (numpy) loads on first use, so `toylab --help` starts fast."""
    if name in ("Batch", "Label", "Task"):
        from toylab import task

        return getattr(task, name)
    raise AttributeError(f"module 'toylab' has no attribute '{name}'")
