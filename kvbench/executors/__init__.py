"""Executors that run a run's cells elsewhere than in this process: ``ray`` (``kvbench.executors.ray``).

The process that calls an executor stays the only writer of its results file; executors only evaluate.
"""

from __future__ import annotations


class ExecutorError(RuntimeError):
    """The executor cannot go on (every worker lost); the message is one line. Finished rows are kept."""
