"""What a task is: samples with a context and a question, gold answers, and a scorer.

The runner compresses the context (query-agnostic) or the context followed by the question
(query-aware); a task never needs to know which.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar


class DataUnavailable(RuntimeError):
    """The task's data cannot be found offline; the message is one line that says how to get it."""


@dataclass(frozen=True)
class Sample:
    sample_id: str
    context: str
    question: str
    answers: tuple[str, ...]
    max_new_tokens: int
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskConfig:
    """Grid settings the CLI passes to every task; a task uses those that apply to it."""

    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    max_samples: int | None
    seed: int


class Task(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    metric: ClassVar[str]
    data_source: ClassVar[str]

    @classmethod
    @abstractmethod
    def check_data(cls) -> None:
        """Raise DataUnavailable if the data is not on this machine. Cheap: runs before any model loads."""

    @abstractmethod
    def samples(self, tokenizer: Any, config: TaskConfig) -> Sequence[Sample]:
        """The same samples for the same config and tokenizer, whatever the method."""

    @abstractmethod
    def score(self, prediction: str, sample: Sample) -> float:
        """Score in 0-100."""
