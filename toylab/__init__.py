"""toylab: a toy-model laboratory for controlled mechanistic-interpretability studies."""

from toylab.errors import DivergenceError, ToylabError
from toylab.registry import get_study, get_task, list_studies, list_tasks
from toylab.task import Batch, Label, Task

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
