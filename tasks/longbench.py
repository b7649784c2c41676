"""LongBench v1 and LongBench-E, evaluated as the official code does (THUDM/LongBench, Bai et al. 2023,
arXiv 2308.14508): its prompt per task (context first, question last), its maximum new tokens per task, middle
truncation of the prompt to the model's maximum prompt length (first half + last half of the tokens), no chat
template for the few-shot and code tasks, the first line only scored for trec/triviaqa/samsum/lsht, the metric per
task, the best value over the gold answers, x 100. LongBench-E tasks ("_e") also record the official length bucket.

Data: the official ``<task>.jsonl`` files from ``--data-dir DIR`` (also ``DIR/data/<task>.jsonl``), or the
official ``data.zip`` of the Hugging Face dataset (``zai-org/LongBench``, formerly ``THUDM/LongBench``) from the
local Hugging Face cache, downloaded through ``huggingface_hub`` when the hub is reachable. That hub repository is
a loading-script dataset, which ``datasets`` >= 4 no longer runs, so its archive is read directly: same rows.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from kvbench.tasks import longbench_metrics
from kvbench.tasks.base import DataUnavailable, Sample, Task, TaskConfig

HUB_REPOS = ("zai-org/LongBench", "THUDM/LongBench")  # the second is the former name, still in older caches
HUB_ARCHIVE = "data.zip"


@dataclass(frozen=True)
class Spec:
    prompt: str  # official template with {context} and {input}
    max_new_tokens: int
    metric: str  # key of longbench_metrics.METRICS
    language: str
    chat_template: bool = True


_QA_MULTI = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words."
    "\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give "
    "me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
)
_QASPER_RULE = (
    "as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered "
    'based on the information in the article, write "unanswerable". If the question is a yes/no question, answer '
    '"yes", "no", or "unanswerable". Do not provide any explanation.'
)
_NARRATIVE_RULE = "as concisely as you can, using a single phrase if possible. Do not provide any explanation."

# The official prompts (config/dataset2prompt.json) and generation lengths (config/dataset2maxlen.json).
SPECS: dict[str, Spec] = {
    "narrativeqa": Spec(
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        f"{_NARRATIVE_RULE}\n\nStory: {{context}}\n\nNow, answer the question based on the story {_NARRATIVE_RULE}"
        "\n\nQuestion: {input}\n\nAnswer:", 128, "qa_f1", "en"),
    "qasper": Spec(
        f"You are given a scientific article and a question. Answer the question {_QASPER_RULE}\n\nArticle: "
        f"{{context}}\n\n Answer the question based on the above article {_QASPER_RULE}\n\nQuestion: {{input}}"
        "\n\nAnswer:", 128, "qa_f1", "en"),
    "multifieldqa_en": Spec(
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on "
        "the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
        64, "qa_f1", "en"),
    "multifieldqa_zh": Spec(
        "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。"
        "\n\n问题：{input}\n回答：", 64, "qa_f1_zh", "zh"),
    "hotpotqa": Spec(_QA_MULTI, 32, "qa_f1", "en"),
    "2wikimqa": Spec(_QA_MULTI, 32, "qa_f1", "en"),
    "musique": Spec(_QA_MULTI, 32, "qa_f1", "en"),
    "dureader": Spec(
        "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
        128, "rouge_l_zh", "zh"),
    "gov_report": Spec(
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:", 512, "rouge_l", "en"),
    "qmsum": Spec(
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
        "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
        "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:", 512, "rouge_l", "en"),
    "multi_news": Spec(
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, "
        "write a one-page summary of all the news.\n\nSummary:", 512, "rouge_l", "en"),
    "vcsum": Spec(
        "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
        512, "rouge_l_zh", "zh"),
    "trec": Spec(
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
        64, "classification", "en", chat_template=False),
    "triviaqa": Spec(
        "Answer the question based on the given passage. Only give me the answer and do not output any other words. "
        "The following are some examples.\n\n{context}\n\n{input}", 32, "qa_f1", "en", chat_template=False),
    "samsum": Spec(
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
        128, "rouge_l", "en", chat_template=False),
    "lsht": Spec("请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}", 64, "classification", "zh",
                 chat_template=False),
    "passage_count": Spec(
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
        "count of unique paragraphs after removing duplicates. The output format should only contain the number, "
        "such as 1, 2, 3, and so on.\n\nThe final answer is: ", 32, "count", "en"),
    "passage_retrieval_en": Spec(
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of "
        'the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.'
        "\n\nThe answer is: ", 32, "retrieval", "en"),
    "passage_retrieval_zh": Spec(
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n"
        '请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：', 32, "retrieval_zh", "zh"),
    "lcc": Spec("Please complete the code given below. \n{context}Next line of code:\n", 64, "code_sim", "en",
                chat_template=False),
    "repobench-p": Spec("Please complete the code given below. \n{context}{input}Next line of code:\n", 64,
                        "code_sim", "en", chat_template=False),
}

ENGLISH = ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report", "qmsum",
           "multi_news", "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p")
CHINESE = ("multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh")
LONGBENCH_E = tuple(f"{name}_e" for name in (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa", "samsum",
    "passage_count", "passage_retrieval_en", "lcc", "repobench-p"))
# Names accepted after "longbench:" that stand for several datasets.
GROUPS: dict[str, tuple[str, ...]] = {
    "en": ENGLISH, "zh": CHINESE, "e": LONGBENCH_E, "all": ENGLISH + CHINESE + LONGBENCH_E,
}
DEFAULT = ENGLISH
# LongBench's rule for the maximum prompt length: the model's context minus 500 tokens for the answer
# (config/model2maxlen.json: 3500 for 4K models, 7500 for 8K, 31500 for 32K).
ANSWER_RESERVE = 500

DEVIATIONS = (
    "chat template: the tokenizer's own (apply_chat_template) where the official code hand-writes one per model",
    "samsum: decoding does not stop at the first newline as officially; only the first line is scored either way",
    "code_sim: rapidfuzz's ratio (= fuzzywuzzy with python-Levenshtein); fuzzywuzzy's difflib fallback can differ",
)


def _base(dataset: str) -> str:
    return dataset.removesuffix("_e")


def expand(names: Sequence[str]) -> tuple[str, ...]:
    """Dataset names for the subtask names given on the command line (groups expanded, order kept)."""
    out: list[str] = []
    for name in names or DEFAULT:
        out.extend(GROUPS.get(name, (name,)))
    return tuple(dict.fromkeys(out))


def _hub_archive(download: bool) -> Path | None:
    """The official data.zip from the local HF cache; downloaded when allowed and the hub is reachable."""
    from huggingface_hub import try_to_load_from_cache

    for repo in HUB_REPOS:
        cached = try_to_load_from_cache(repo, HUB_ARCHIVE, repo_type="dataset")
        if isinstance(cached, str):
            return Path(cached)
    if not download or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return None
    from huggingface_hub import hf_hub_download

    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    try:
        return Path(hf_hub_download(HUB_REPOS[0], HUB_ARCHIVE, repo_type="dataset"))
    except Exception:  # noqa: BLE001 - unreachable, gated or renamed: all mean "not available here"
        return None


def _local_file(data_dir: str, dataset: str) -> Path | None:
    for path in (Path(data_dir) / f"{dataset}.jsonl", Path(data_dir) / "data" / f"{dataset}.jsonl"):
        if path.is_file():
            return path
    return None


def _missing_line(datasets: Sequence[str], data_dir: str | None) -> str:
    where = f"not in --data-dir {data_dir}" if data_dir else "no --data-dir given and not in the Hugging Face cache"
    return (f"LongBench data for {', '.join(datasets)} not found ({where}): put the official <task>.jsonl files "
            f"(data.zip of the Hugging Face dataset {HUB_REPOS[0]}, unzipped) in a folder and pass --data-dir DIR")


def locate(datasets: Sequence[str], data_dir: str | None, download: bool = True) -> dict[str, str]:
    """Where each dataset's rows are read from: a jsonl path, or "zip:<archive>"; DataUnavailable if any is missing."""
    found: dict[str, str] = {}
    if data_dir:
        found = {d: str(p) for d in datasets if (p := _local_file(data_dir, d)) is not None}
        missing = [d for d in datasets if d not in found]
        if missing:
            raise DataUnavailable(_missing_line(missing, data_dir))
        return found
    archive = _hub_archive(download)
    if archive is None:
        raise DataUnavailable(_missing_line(datasets, None))
    try:
        with zipfile.ZipFile(archive) as zf:
            members = set(zf.namelist())
    except (OSError, zipfile.BadZipFile) as error:
        raise DataUnavailable(f"{archive} is not a readable zip archive ({error}); delete it from the Hugging Face "
                              "cache or pass --data-dir with the official files") from None
    missing = [d for d in datasets if f"data/{d}.jsonl" not in members]
    if missing:
        raise DataUnavailable(f"{archive} has no data/{missing[0]}.jsonl; pass --data-dir with the official files")
    return {d: f"zip:{archive}" for d in datasets}


def _lines(source: str, dataset: str) -> Iterator[bytes]:
    if source.startswith("zip:"):
        with zipfile.ZipFile(source[4:]) as zf, zf.open(f"data/{dataset}.jsonl") as member:
            yield from member
    else:
        with open(source, "rb") as lines:
            yield from lines


def _where(source: str, dataset: str) -> str:
    return f"{source[4:]}:data/{dataset}.jsonl" if source.startswith("zip:") else source


def row_problem(row: Any, dataset: str) -> str | None:
    """What makes ``row`` unusable as an official row of ``dataset``, or None."""
    if not isinstance(row, dict):
        return f"is a JSON {type(row).__name__}, not an object"
    if not isinstance(row.get("context"), str):
        return "has no 'context' text" if "context" not in row else "has a 'context' that is not text"
    if "input" not in row or not isinstance(row["input"], (str, type(None))):
        return "has no 'input' text (the question; \"\" when the task has none)"
    answers = row.get("answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        return "has no 'answers' (a non-empty list of texts)"
    classes = row.get("all_classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        return "has an 'all_classes' that is neither null nor a list of texts"
    length = row.get("length")
    if (dataset.endswith("_e") or length is not None) and (isinstance(length, bool) or not isinstance(length, int)):
        return "has no whole-number 'length' (LongBench-E buckets rows by it)"
    return None


@lru_cache(maxsize=64)
def read_rows(source: str, dataset: str, limit: int | None = None) -> tuple[dict[str, Any], ...]:
    """The first ``limit`` official rows of one dataset (all when None), in file order.

    Each is checked: a line that is not UTF-8, not JSON, not an object or lacks a field the prompt or the metric
    needs is a ValueError naming the file and line, and so is a file without rows.
    """
    rows: list[dict[str, Any]] = []
    where = _where(source, dataset)
    for number, raw in enumerate(_lines(source, dataset), 1):
        if limit is not None and len(rows) >= limit:
            break
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
        except UnicodeDecodeError as error:
            raise ValueError(f"LongBench file {where} line {number} is not UTF-8 text (byte {error.start + 1}); "
                             "replace it with the official file") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"LongBench file {where} line {number} is not valid JSON ({error.msg} at column "
                             f"{error.colno}); replace it with the official file") from None
        if (problem := row_problem(row, dataset)) is not None:
            raise ValueError(f"LongBench file {where} line {number} {problem}; replace it with the official file")
        rows.append(row)
    if not rows:
        raise ValueError(f"LongBench file {where} has no rows; replace it with the official file")
    return tuple(rows)


def truncate_middle(tokenizer: Any, prompt: str, max_tokens: int) -> tuple[str, int]:
    """The official middle truncation: if the prompt has more than max_tokens tokens, keep the text of the first
    and last max_tokens // 2 tokens. Returns the prompt and its token count before truncation."""
    ids = tokenizer(prompt).input_ids
    if len(ids) <= max_tokens:
        return prompt, len(ids)
    half = max_tokens // 2
    return (tokenizer.decode(ids[:half], skip_special_tokens=True)
            + tokenizer.decode(ids[-half:], skip_special_tokens=True)), len(ids)


def build_prompt(dataset: str, row: dict[str, Any]) -> tuple[str, str]:
    """(context part, question part) of the official prompt: the template up to the end of {context}, and the rest."""
    template = SPECS[_base(dataset)].prompt
    cut = template.index("{context}") + len("{context}")
    head = template[:cut].format(context=row["context"])
    return head, template[cut:].format(input=row.get("input") or "")


class LongBench(Task):
    """LongBench v1 (16 English tasks by default; Chinese and LongBench-E on request), official protocol."""

    name: ClassVar[str] = "longbench"
    grid_options: ClassVar[tuple[str, ...]] = ("max_samples", "max_prompt_tokens")
    summary: ClassVar[str] = (
        "LongBench v1 / LongBench-E with the official prompts, truncation and metrics "
        "(longbench:<task>,... picks tasks; groups en, zh, e, all)"
    )
    metric: ClassVar[str] = "longbench"
    data_source: ClassVar[str] = (
        f"official LongBench jsonl files from --data-dir, or data.zip of the HF dataset {HUB_REPOS[0]} (HF cache)"
    )
    subtask_names: ClassVar[tuple[str, ...]] = (*GROUPS, *ENGLISH, *CHINESE, *LONGBENCH_E)

    @classmethod
    def check_data(cls) -> None:
        locate(DEFAULT, None, download=False)

    @classmethod
    def check_config(cls, config: TaskConfig) -> None:
        datasets = expand(config.subtasks.get(cls.name, ()))
        if any(SPECS[_base(d)].language == "zh" for d in datasets):
            try:
                import jieba  # noqa: F401
            except ImportError:
                raise DataUnavailable("Chinese LongBench tasks need jieba: pip install 'kvbench[zh]'") from None
        sources = locate(datasets, config.data_dir)
        for dataset in datasets:  # the rows a run will use, so that a broken file stops it before the model loads
            try:
                read_rows(sources[dataset], dataset, config.max_samples)
            except OSError as error:
                raise DataUnavailable(f"LongBench file {_where(sources[dataset], dataset)} cannot be read "
                                      f"({error.strerror or error})") from None

    def info(self, config: TaskConfig) -> dict[str, Any]:
        datasets = expand(config.subtasks.get(self.name, ()))
        sources = locate(datasets, config.data_dir)
        return {
            "data_source": {d: sources[d] for d in datasets},
            "datasets": {d: {"metric": SPECS[_base(d)].metric, "max_new_tokens": SPECS[_base(d)].max_new_tokens,
                             "chat_template": SPECS[_base(d)].chat_template} for d in datasets},
            "max_prompt_tokens": config.max_prompt_tokens,
            "higher_is_better": True,
            "deviations": list(DEVIATIONS),
            "aggregate": "official score of a dataset = mean of its samples' scores; LongBench-E: per length_bucket",
        }

    def samples(self, tokenizer: Any, config: TaskConfig) -> Sequence[Sample]:
        """The first --max-samples rows of each dataset, in file order, as the official prompts."""
        datasets = expand(config.subtasks.get(self.name, ()))
        sources = locate(datasets, config.data_dir)
        out: list[Sample] = []
        for dataset in datasets:
            spec = SPECS[_base(dataset)]
            rows = read_rows(sources[dataset], dataset, config.max_samples)
            for index, row in enumerate(rows):
                out.append(self._sample(tokenizer, config, dataset, spec, index, row))
        return out

    def _sample(self, tokenizer: Any, config: TaskConfig, dataset: str, spec: Spec, index: int,
                row: dict[str, Any]) -> Sample:
        head, tail = build_prompt(dataset, row)
        prompt, prompt_tokens = head + tail, None
        if config.max_prompt_tokens:
            prompt, prompt_tokens = truncate_middle(tokenizer, prompt, config.max_prompt_tokens)
        truncated = prompt != head + tail
        if truncated:
            # The question part survives in the last half unless it is itself longer than half the budget.
            head, tail = (prompt[: len(prompt) - len(tail)], tail) if prompt.endswith(tail) else (prompt, "")
        meta: dict[str, Any] = {
            "dataset": dataset, "language": spec.language, "row_id": row.get("_id"), "row_index": index,
            "length": row.get("length"), "all_classes": row.get("all_classes") or [],
            "prompt_tokens": prompt_tokens, "truncated": truncated,
        }
        if dataset.endswith("_e"):
            meta["length_bucket"] = longbench_metrics.length_bucket(int(row.get("length") or 0))
        return Sample(
            sample_id=f"{dataset}-{index:04d}",
            context=head,
            question=tail,
            answers=tuple(row["answers"]),
            max_new_tokens=spec.max_new_tokens,
            metadata=meta,
            task=f"{self.name}/{dataset}",
            metric=spec.metric,
            chat_template=spec.chat_template,
            verbatim=True,
            strip_prediction=False,
        )

    def score(self, prediction: str, sample: Sample) -> float:
        meta = sample.metadata
        return longbench_metrics.score(_base(meta["dataset"]), sample.metric or "", prediction, sample.answers,
                                       meta["all_classes"])
