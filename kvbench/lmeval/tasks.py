"""lm-eval's tasks for kvbench's runner: load a task or group from lm-eval's registry (and ``--include-path``),
build its requests per document as ``lm_eval`` builds them, and score a document with lm-eval's filters and metrics.

The prompts are lm-eval's: its ``TaskManager`` and ``build_all_requests`` with lm-eval's default few-shot seed,
no chat template, the first ``--max-samples`` documents (lm-eval's ``--limit``). Each document's requests go through
``KVBenchLM`` (the lm-eval model of ``kvbench.lmeval.model``), so a kvbench row and ``lm_eval --model kvbench``
give the same answer on the same document; then lm-eval's filter pipelines and ``process_results`` score it.

kvbench averages rows, so a row's score is the document's value of the first metric lm-eval itself averages over
documents (``aggregation: mean``), x 100; tasks whose every metric is aggregated over the corpus (BLEU, F1,
perplexity) are refused. Every metric of every filter is kept in the row (``lm_eval_metrics``).

Data on the Hugging Face hub: when the hub cannot be reached, datasets are read from the local cache only and a
missing one is a single line before any model loads (otherwise ``datasets`` retries for half a minute).
"""

from __future__ import annotations

import difflib
import socket
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cache
from typing import Any
from urllib.parse import urlparse

from kvbench.tasks.base import DataUnavailable

FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed: the same few-shot examples as `lm_eval`
HUB_TIMEOUT_S = 3


@dataclass(frozen=True)
class Leaf:
    """One lm-eval task (a group's member or the task itself), loaded, with the metric kvbench rows carry."""

    name: str
    task: Any  # lm_eval.api.task.Task
    metric: str  # the first metric lm-eval averages over documents
    filter: str  # the first filter pipeline ("none" when the task has none)
    higher_is_better: bool

    @property
    def version(self) -> Any:
        return self.task.VERSION

    @property
    def key(self) -> str:
        """lm-eval's name for the value in its results, e.g. ``acc,none``."""
        return f"{self.metric},{self.filter}"


@cache
def manager(include_path: str | None) -> Any:
    """lm-eval's task index (its own tasks, then the YAMLs under ``include_path``); built once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


@cache
def load(name: str, include_path: str | None = None) -> tuple[Leaf, ...]:
    """The leaf tasks of an lm-eval task, group or tag, with their data; ValueError or DataUnavailable otherwise."""
    tasks = manager(include_path)
    if name not in tasks.all_tasks:
        close = difflib.get_close_matches(name, tasks.all_tasks, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown lm-eval task or group {name!r}{hint} (lm-eval's own: lm_eval ls tasks; yours: "
                         "--include-path DIR with their YAML files)")
    try:
        with _hub_or_cache(name):
            loaded = tasks.load([name])["tasks"]
    except DataUnavailable:
        raise
    except Exception as error:  # noqa: BLE001 - a task YAML's mistake, whatever it is, is one line for the user
        raise ValueError(f"lm-eval:{name} cannot be loaded: {type(error).__name__}: {_line(error)}") from None
    return tuple(_leaf(leaf, task) for leaf, task in loaded.items())


def _leaf(name: str, task: Any) -> Leaf:
    from lm_eval.api.registry import get_aggregation

    if getattr(task, "MULTIMODAL", False):
        raise ValueError(f"lm-eval task {name} needs images or audio, which kvbench's models do not take")
    if getattr(task, "UNSAFE_CODE", False):
        raise ValueError(f"lm-eval task {name} runs model-written code; run it with lm_eval "
                         "--confirm_run_unsafe_code (python -m kvbench.lmeval)")
    mean = get_aggregation("mean")
    averaged = [m for m, aggregate in task._aggregation_list.items() if aggregate is mean]
    if not averaged:
        raise ValueError(f"lm-eval task {name}: its metrics ({', '.join(task._aggregation_list)}) are aggregated over "
                         "the corpus, not averaged per document, so kvbench rows cannot carry them; run it with "
                         "python -m kvbench.lmeval --model kvbench")
    if task.get_config("num_fewshot") is None:  # as lm_eval does when neither the task nor the user sets it
        task.set_config(key="num_fewshot", value=0)
    metric = averaged[0]
    return Leaf(name, task, metric, task._filters[0].name, bool(task._higher_is_better.get(metric, True)))


def documents(leaf: Leaf, limit: int | None) -> dict[int, tuple[dict, list]]:
    """Each document's id -> (document, its lm-eval requests), as ``lm_eval --limit`` builds them."""
    leaf.task.set_fewshot_seed(FEWSHOT_SEED)  # before each build: the same few-shot draws every time
    leaf.task.build_all_requests(limit=limit, rank=0, world_size=1)
    by_document: dict[int, list] = defaultdict(list)
    for instance in leaf.task.instances:
        by_document[instance.doc_id].append(instance)
    return {doc_id: (requests[0].doc, sorted(requests, key=lambda r: r.idx))
            for doc_id, requests in by_document.items()}


def run_document(lm: Any, leaf: Leaf, document: dict, requests: list) -> tuple[list, dict[str, Any]]:
    """Answer one document's requests with ``lm`` and score them as lm-eval's evaluator does: its repeats, its
    filter pipelines, then ``process_results`` once per filter. Returns the answered requests and every metric,
    keyed ``metric,filter`` as in lm-eval's results."""
    answered = [replace(request, resps=[], filtered_resps={}) for request in requests]
    for kind in dict.fromkeys(request.request_type for request in answered):
        batch = [request for request in answered if request.request_type == kind for _ in range(request.repeats)]
        for request, response in zip(batch, getattr(lm, kind)(batch, disable_tqdm=True), strict=True):
            request.resps.append(response)
    for pipeline in leaf.task._filters:
        pipeline.apply(answered)
    metrics: dict[str, Any] = {}
    for pipeline in answered[0].filtered_resps:
        results = leaf.task.process_results(document, [request.filtered_resps[pipeline] for request in answered])
        metrics |= {f"{metric},{pipeline}": value for metric, value in results.items()}
    return answered, metrics


@cache
def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers (a TCP connection within a few seconds); False in offline mode."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=HUB_TIMEOUT_S).close()
    except OSError:
        return False
    return True


@contextmanager
def _hub_or_cache(name: str):
    """Load normally when the hub is reachable; otherwise from the local caches only, a miss being one line."""
    if hub_reachable():
        yield
        return
    import datasets.config
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    except (ConnectionError, FileNotFoundError) as error:
        raise DataUnavailable(
            f"lm-eval:{name}: its data is not on this machine ({_line(error)}) and the Hugging Face hub cannot be "
            "reached from here: run it once where the hub is reachable (the datasets cache keeps it), or point a task "
            "YAML at local files and pass its folder with --include-path") from None
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def _line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
