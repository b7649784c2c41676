"""Built-in tasks, one module per task family."""

from kvbench.tasks.base import DataUnavailable, Sample, Task, TaskConfig
from kvbench.tasks.niah import NeedleInAHaystack

BUILTIN_TASKS: tuple[type[Task], ...] = (NeedleInAHaystack,)

__all__ = ["BUILTIN_TASKS", "DataUnavailable", "Sample", "Task", "TaskConfig"]
