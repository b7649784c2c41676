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
    # The row's task and metric when a task family holds several (e.g. "longbench/hotpotqa", "qa_f1").
    task: str | None = None
    metric: str | None = None
    # False: the prompt is used as plain text, without the tokenizer's chat template (LongBench's few-shot
    # and code tasks). verbatim: context + question is the whole prompt as written by the task, with no
    # separator or "Answer:" added. answer_prefix: text the answer starts with, after the generation prompt.
    chat_template: bool = True
    verbatim: bool = False
    answer_prefix: str = ""
    # False: the prediction is scored and stored as decoded, leading/trailing whitespace kept (code tasks).
    strip_prediction: bool = True


@dataclass(frozen=True)
class TaskConfig:
    """Grid settings the CLI passes to every task; a task uses those that apply to it."""

    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    max_samples: int | None
    seed: int
    # Per task family, the subtasks picked on the command line ("longbench:hotpotqa,trec" -> {"longbench": (...)}).
    subtasks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Folder of data files given with --data-dir (e.g. LongBench's official *.jsonl files).
    data_dir: str | None = None
    # Folder of lm-eval task YAMLs given with --include-path (lm-eval:<name> tasks of the user's own).
    include_path: str | None = None
    # The model's longest prompt in tokens; tasks with long real documents truncate their middle to fit it.
    max_prompt_tokens: int | None = None


class Task(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    metric: ClassVar[str]
    data_source: ClassVar[str]
    # False for metrics where lower is better (perplexity); result rows carry it as "higher_is_better".
    higher_is_better: ClassVar[bool] = True
    # "generate" (prefill, then greedy decoding) or "perplexity" (teacher-forced loss of the question part).
    evaluation: ClassVar[str] = "generate"
    # Subtask names accepted after "name:" on the command line; empty if the task has none.
    subtask_names: ClassVar[tuple[str, ...]] = ()
    # Bumped whenever the samples a config yields change (prompts, data, scoring): rows of another version are
    # not comparable, so a resume refuses to mix them.
    version: ClassVar[str] = "1"
    # The TaskConfig fields that shape this task's samples, shown with the grid (e.g. NIAH: lengths, depths).
    grid_options: ClassVar[tuple[str, ...]] = ()

    @classmethod
    @abstractmethod
    def check_data(cls) -> None:
        """Raise DataUnavailable if the data is not on this machine. Cheap: runs before any model loads."""

    @classmethod
    def check_config(cls, config: TaskConfig) -> None:
        """Like check_data, for the data this config selects (subtasks, --data-dir); ValueError for bad ones."""
        cls.check_data()

    def info(self, config: TaskConfig) -> dict[str, Any]:
        """Where the data came from and how the protocol differs from the official one, for run.json."""
        return {"data_source": self.data_source, "metric": self.metric, "higher_is_better": self.higher_is_better}

    @abstractmethod
    def samples(self, tokenizer: Any, config: TaskConfig) -> Sequence[Sample]:
        """The same samples for the same config and tokenizer, whatever the method."""

    @abstractmethod
    def score(self, prediction: str, sample: Sample) -> float:
        """Score in 0-100."""
