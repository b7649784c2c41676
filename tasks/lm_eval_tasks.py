"""Any lm-eval task or group inside a kvbench sweep: ``--tasks lm-eval:<task or group>`` (``--include-path DIR``
adds task YAMLs of your own).

Samples are lm-eval's documents with lm-eval's prompts, targets, filters and metrics (``kvbench.lmeval.tasks``);
they run through kvbench's runner, so rows, resume, measurement, shards and reports apply. One row per document:
its score is the document's value of the task's first averaged metric x 100 (lm-eval's ``acc`` 0.5 reads 50), and
the row carries lm-eval's task name and version (``lm_eval_task``, ``lm_eval_task_version``), the metric's name and
all metrics (``lm_eval_metrics``, keyed ``metric,filter``). Multiple-choice and other log-likelihood requests are
scored on the compressed context (``kvbench.evaluate.loglikelihood``); generation is greedy after a compressed
prefill. A cell holding several requests (one per choice) reports their mean KV bytes and the achieved budget of
their sum. Query-aware only: an lm-eval prompt has no boundary between document and question.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any, ClassVar

from kvbench.tasks.base import DataUnavailable, Sample, Task, TaskConfig

BRIDGE_VERSION = "1"  # bumped when kvbench changes how it builds or scores lm-eval samples
_INSTALL = "lm-eval tasks need lm-eval: pip install 'kvbench[lm-eval]'"


@cache
def lm_eval_task(name: str) -> type[Task]:
    """The task class of ``lm-eval:<name>`` (the registry's prefix factory); ``name`` is checked when its data is."""
    if not name.strip():
        raise ValueError("lm-eval: name a task or group after the colon, e.g. lm-eval:arc_easy")
    return type(f"LmEval_{name}", (LmEvalTask,), {"name": f"lm-eval:{name}", "lm_eval_name": name})


class LmEvalTask(Task):
    """One lm-eval task, group or tag, named after ``lm-eval:``; ``lm_eval_task`` makes a subclass per name."""

    name: ClassVar[str] = "lm-eval:<name>"
    lm_eval_name: ClassVar[str] = ""
    include_path: ClassVar[str | None] = None  # --include-path, kept for instances that build samples themselves
    summary: ClassVar[str] = "an lm-eval task or group, with lm-eval's prompts, filters and metrics"
    metric: ClassVar[str] = "lm-eval's first averaged metric"
    data_source: ClassVar[str] = "lm-eval's task registry and --include-path YAMLs"
    evaluation: ClassVar[str] = "lm-eval"
    grid_options: ClassVar[tuple[str, ...]] = ("max_samples",)

    def __init__(self) -> None:
        self._documents: dict[tuple[str, str], tuple[Any, dict, list]] = {}
        self._lm: Any = None

    @classmethod
    def check_data(cls) -> None:
        try:
            version("lm-eval")
        except PackageNotFoundError:
            raise DataUnavailable(_INSTALL) from None

    @classmethod
    def check_config(cls, config: TaskConfig) -> None:
        """Load the task and its data now, before any model: an unknown name or data missing offline is one line.
        The rows' ``task_version`` (which guards resume) is made of lm-eval's version and the tasks' own."""
        from kvbench.lmeval import tasks as bridge

        cls.check_data()
        leaves = bridge.load(cls.lm_eval_name, config.include_path)
        cls.include_path = config.include_path
        versions = json.dumps([(leaf.name, str(leaf.version), leaf.task.get_config("num_fewshot")) for leaf in leaves])
        digest = hashlib.sha256(versions.encode()).hexdigest()[:10]
        cls.version = f"{BRIDGE_VERSION}/lm-eval {version('lm-eval')}/{digest}"
        cls.higher_is_better = leaves[0].higher_is_better

    def info(self, config: TaskConfig) -> dict[str, Any]:
        from kvbench.lmeval import tasks as bridge

        leaves = bridge.load(self.lm_eval_name, config.include_path)
        return {
            "data_source": self.data_source,
            "lm_eval_version": version("lm-eval"),
            "include_path": config.include_path,
            "tasks": {leaf.name: {"version": leaf.version, "metric": leaf.key, "output_type": leaf.task.OUTPUT_TYPE,
                                  "num_fewshot": leaf.task.get_config("num_fewshot")} for leaf in leaves},
            "higher_is_better": self.higher_is_better,
            "protocol": "lm-eval's prompts (no chat template, few-shot seed 1234) and metrics; one row per document, "
                        "score = its value of the first metric lm-eval averages x 100; loglikelihood requests score "
                        "the continuation on the compressed context; generation greedy; query-aware only",
        }

    def samples(self, tokenizer: Any, config: TaskConfig) -> Sequence[Sample]:
        from lm_eval.models.utils import normalize_gen_kwargs

        from kvbench.lmeval import tasks as bridge

        self.check_config(config)
        out = []
        for leaf in bridge.load(self.lm_eval_name, config.include_path):
            for doc_id, (document, requests) in bridge.documents(leaf, config.max_samples).items():
                generation = requests[0].request_type == "generate_until"
                sample = Sample(
                    sample_id=_sample_id(doc_id),
                    context=requests[0].args[0],
                    question="",
                    answers=_answers(leaf.task, document),
                    max_new_tokens=normalize_gen_kwargs(requests[0].args[1])["max_gen_toks"] if generation else 0,
                    metadata={"doc_id": doc_id, "output_type": leaf.task.OUTPUT_TYPE, "requests": len(requests)},
                    task=f"lm-eval:{leaf.name}",
                    metric=leaf.metric,
                    chat_template=False,
                    verbatim=True,
                )
                self._documents[sample.task, sample.sample_id] = (leaf, document, requests)
                out.append(sample)
        return out

    def score(self, prediction: str, sample: Sample) -> float:
        raise TypeError("lm-eval tasks are scored by lm-eval's metrics in evaluate(), not from a text")

    def evaluate(self, model: Any, tokenizer: Any, cell: Any, seed: int) -> dict[str, Any]:
        """The row fields of one document: its requests answered by ``KVBenchLM`` with the cell's method and budget,
        scored by lm-eval; bytes, times and peak memory measured over all of them."""
        from kvbench.lmeval import tasks as bridge
        from kvbench.lmeval.model import QUERY_AGNOSTIC, KVBenchLM
        from kvbench.measure import PeakMemory, model_devices

        if not cell.query_aware:
            raise ValueError(QUERY_AGNOSTIC)
        leaf, document, requests = self._document(cell.sample)
        if self._lm is None or self._lm.model is not model:
            self._lm = KVBenchLM.wrap(model, tokenizer)
        self._lm.use(cell.spec, cell.budget, seed)
        with PeakMemory(model_devices(model)) as peak:
            answered, metrics = bridge.run_document(self._lm, leaf, document, requests)
        measured = self._lm.take_measurements()
        kept, full = sum(m.kv_bytes for m in measured), sum(m.full_kv_bytes for m in measured)
        fields = {
            "context_tokens": max(m.context_tokens for m in measured),
            "prediction": _prediction(answered),
            "score": 100.0 * float(metrics[leaf.key]),
            "lm_eval_task": leaf.name,
            "lm_eval_task_version": leaf.version,
            "lm_eval_metrics": metrics,
            "kv_bytes": round(kept / len(measured)),
            "full_kv_bytes": round(full / len(measured)),
            "achieved_budget": kept / full,
            **peak.fields(),
            "prefill_s": sum(m.prefill_s for m in measured),
            "decode_s": sum(m.decode_s for m in measured),
            "decode_tokens": sum(m.decode_tokens for m in measured),
            "requests": len(measured),
            **measured[-1].fields,
        }
        if answered[0].request_type == "loglikelihood":
            fields["loglikelihoods"] = [request.resps[0][0] for request in answered]
        return fields

    def _document(self, sample: Sample) -> tuple[Any, dict, list]:
        """The lm-eval task, document and requests of a sample; an instance that built no samples (a Ray actor's)
        builds its leaf's requests here: lm-eval draws few-shot examples document after document, so the first N
        documents get the same requests whatever the limit."""
        from kvbench.lmeval import tasks as bridge

        key = sample.task, sample.sample_id
        if key not in self._documents:
            for leaf in bridge.load(self.lm_eval_name, self.include_path):
                if f"lm-eval:{leaf.name}" == sample.task:
                    for doc_id, (document, requests) in bridge.documents(leaf, None).items():
                        self._documents[sample.task, _sample_id(doc_id)] = (leaf, document, requests)
        return self._documents[key]


def _sample_id(doc_id: int) -> str:
    return f"doc{doc_id:05d}"


def _answers(task: Any, document: dict) -> tuple[str, ...]:
    target = task.doc_to_target(document)
    if task.OUTPUT_TYPE == "multiple_choice" and isinstance(target, int):
        return (task.doc_to_choice(document)[target],)
    return tuple(map(str, target)) if isinstance(target, list) else (str(target),)


def _prediction(answered: list) -> str | None:
    """The generated text, or the continuation with the highest log-likelihood among several."""
    kind = answered[0].request_type
    if kind == "generate_until":
        return answered[0].resps[0]
    if kind == "loglikelihood" and len(answered) > 1:
        best = max(answered, key=lambda request: request.resps[0][0])
        return best.args[1]
    return None
