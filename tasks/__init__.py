"""Built-in tasks, one module per task family."""

from kvbench.tasks.base import DataUnavailable, Sample, Task, TaskConfig
from kvbench.tasks.longbench import LongBench
from kvbench.tasks.niah import NeedleInAHaystack
from kvbench.tasks.perplexity import Perplexity
from kvbench.tasks.ruler import Ruler

BUILTIN_TASKS: tuple[type[Task], ...] = (NeedleInAHaystack, LongBench, Ruler, Perplexity)

__all__ = ["BUILTIN_TASKS", "DataUnavailable", "Sample", "Task", "TaskConfig"]
