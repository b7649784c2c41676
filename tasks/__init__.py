"""Built-in tasks, one module per task family; ``kvbench.registry`` names them.

Nothing is imported here but the base classes, so that naming a task loads only that task's module.
"""

from kvbench.tasks.base import DataUnavailable, Sample, Task, TaskConfig

__all__ = ["DataUnavailable", "Sample", "Task", "TaskConfig"]
