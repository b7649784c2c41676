"""One cell: prefill with compression, then decoding (or teacher-forced scoring), measured.

The runner and the executors call ``evaluate_cell``; it returns the row fields a cell measures (prediction,
score, bytes, times, peak memory) and raises on failure, which the caller records as an error row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig

from kvbench.measure import PeakMemory, model_devices, timed
from kvbench.prefill import Prefill, cache_arguments, prefill
from kvbench.spec import MethodSpec
from kvbench.tasks import Sample, Task

QUESTION_MARK = "\x00kvbench-question\x00"


@dataclass(frozen=True)
class Cell:
    spec: MethodSpec
    budget: float
    task: Task
    sample: Sample
    query_aware: bool


def encode(tokenizer: Any, sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of the context part and the question part of the prompt.

    Both query modes use exactly these ids, so they differ only in what gets compressed. The
    chat template (when the tokenizer has one and the sample wants it) wraps context and question as
    one user turn. A verbatim sample's context + question is the whole prompt, as the task wrote it; a
    verbatim prompt without chat template is tokenized with the tokenizer's own special tokens (as
    LongBench's code does). The sample's answer prefix goes after the generation prompt.
    """
    chat = sample.chat_template and getattr(tokenizer, "chat_template", None)
    joiner = "" if sample.verbatim else "\n\n"
    if chat:
        content = sample.context + QUESTION_MARK + joiner + sample.question
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        head, tail = text.split(QUESTION_MARK)
    elif sample.verbatim:
        head, tail = sample.context, sample.question
    else:
        head, tail = sample.context, "\n\n" + sample.question + "\nAnswer:"
    tail += sample.answer_prefix
    special = bool(sample.verbatim and not chat)
    ids = [tokenizer(part, add_special_tokens=special and i == 0, return_tensors="pt").input_ids
           for i, part in enumerate((head, tail))]
    if not chat and not special and tokenizer.bos_token_id is not None:
        ids[0] = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids[0]], dim=1)
    return ids[0], ids[1]


def evaluate_generation(model: Any, tokenizer: Any, cell: Cell, seed: int) -> dict[str, Any]:
    """Prefill (with compression), then greedy decoding through ``model.generate``.

    Query-agnostic cells compress the context alone; the question then enters the compressed cache, and its
    forward counts in ``prefill_s`` (it is part of reading the prompt).
    """
    device = model.device
    context_ids, question_ids = (ids.to(device) for ids in encode(tokenizer, cell.sample))
    prompt = torch.cat([context_ids, question_ids], dim=1)
    times: dict[str, float] = {"decode_s": 0.0}
    with torch.inference_mode(), PeakMemory(model_devices(model)) as peak:
        compressed = prefill(model, cell.spec.method, cell.budget, prompt if cell.query_aware else context_ids, seed)
        cache, logits, times["prefill_s"] = compressed.cache, compressed.logits, compressed.seconds
        if not cell.query_aware:
            with timed(device, times, "prefill_s"):
                logits = model(question_ids, **cache_arguments(model, cache), logits_to_keep=1).logits
        first = logits[:, -1].argmax(dim=-1, keepdim=True)
        generated = first
        eos = _eos_ids(model, tokenizer)
        if cell.sample.max_new_tokens > 1 and first.item() not in eos:
            config = GenerationConfig(
                do_sample=False, max_new_tokens=cell.sample.max_new_tokens - 1, eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0],
            )
            with timed(device, times, "decode_s"):
                output = model.generate(torch.cat([prompt, first], dim=1), **cache_arguments(model, cache),
                                        generation_config=config)
            generated = output[:, prompt.shape[1]:]
    prediction = tokenizer.decode(generated[0], skip_special_tokens=True)
    if cell.sample.strip_prediction:
        prediction = prediction.strip()
    return {
        "context_tokens": prompt.shape[1],
        "prediction": prediction,
        "score": cell.task.score(prediction, cell.sample),
        **memory_fields(compressed, peak),
        "decode_tokens": generated.shape[1] - 1,
        **times,
        **compressed.fields,
    }


def memory_fields(compressed: Prefill, peak: PeakMemory) -> dict[str, Any]:
    """What a row says about memory: bytes right after compression, before it, at the end, and the peak."""
    return {
        "kv_bytes": compressed.kv_bytes,
        "full_kv_bytes": compressed.full_kv_bytes,
        "achieved_budget": compressed.achieved_budget,
        "final_kv_bytes": compressed.cache.nbytes(),
        **peak.fields(),  # peak_mem_bytes (sum over devices), per device, largest device, kind
    }


def evaluate_perplexity(model: Any, tokenizer: Any, cell: Cell, seed: int) -> dict[str, Any]:
    """Compress the context (a long prefix of text), then score the question part (the next chunk) with the
    compressed cache, teacher-forced in one forward: perplexity = exp(mean negative log-likelihood).

    The chunk is never compressed, whatever the query mode, so both modes measure the same thing. Its first
    token is predicted from the prefix's last logits, the others from the chunk's own forward.
    """
    device = model.device
    sample = cell.sample
    prefix = tokenizer(sample.context, return_tensors="pt").input_ids  # the tokenizer's own BOS convention
    chunk = tokenizer(sample.question, add_special_tokens=False, return_tensors="pt").input_ids
    prefix, chunk = prefix.to(device), chunk.to(device)
    times: dict[str, float] = {"decode_s": 0.0}
    with torch.inference_mode(), PeakMemory(model_devices(model)) as peak:
        compressed = prefill(model, cell.spec.method, cell.budget, prefix, seed)
        times["prefill_s"] = compressed.seconds
        with timed(device, times, "decode_s"):
            rest = model(chunk[:, :-1], **cache_arguments(model, compressed.cache)).logits
        logits = torch.cat([compressed.logits[:, -1:], rest], dim=1).float()
        nll = torch.nn.functional.cross_entropy(logits[0], chunk[0], reduction="mean").item()
    return {
        "context_tokens": prefix.shape[1],
        "prediction": None,
        "score": math.exp(nll),
        "nll": nll,
        "scored_tokens": chunk.shape[1],
        **memory_fields(compressed, peak),
        "decode_tokens": chunk.shape[1],
        **times,
        **compressed.fields,
    }


@dataclass(frozen=True)
class Loglikelihood:
    """``log P(continuation | context)`` on a compressed cache, whether it is the greedy continuation, and the
    prefill that compressed the context."""

    logprob: float
    greedy: bool
    compressed: Prefill
    scoring_s: float


def loglikelihood(model: Any, method: Any, budget: float, context_ids: torch.Tensor, continuation_ids: torch.Tensor,
                  seed: int = 0, softmax_dtype: torch.dtype | None = None) -> Loglikelihood:
    """Prefill and compress the context, then score the continuation teacher-forced on the compressed cache.

    This is how the DynaKV paper measures multiple-choice tasks (ARC, PIQA, Winogrande, HellaSwag) under
    compression, and what lm-eval's ``loglikelihood`` requests get from kvbench: the continuation (the answer) is
    never compressed. Its first token is predicted from the context's last logits, the others from one forward of
    the continuation on the compressed cache. ``greedy`` is lm-eval's ``is_greedy``: every continuation token is
    the argmax of its logits. The log-softmax runs in the logits' dtype unless ``softmax_dtype`` is given, as in
    lm-eval's ``hf`` model.
    """
    times: dict[str, float] = {"scoring_s": 0.0}
    with torch.inference_mode():
        compressed = prefill(model, method, budget, context_ids, seed)
        logits = compressed.logits[:, -1:]
        if continuation_ids.shape[1] > 1:
            with timed(context_ids.device, times, "scoring_s"):
                rest = model(continuation_ids[:, :-1], **cache_arguments(model, compressed.cache)).logits
            logits = torch.cat([logits, rest], dim=1)
        logprobs = torch.log_softmax(logits, dim=-1, dtype=softmax_dtype)[0]
        target = continuation_ids[0]
        logprob = float(logprobs.gather(-1, target[:, None]).sum())
        greedy = bool((logprobs.argmax(dim=-1) == target).all())
    return Loglikelihood(logprob, greedy, compressed, times["scoring_s"])


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


def evaluate_cell(model: Any, tokenizer: Any, cell: Cell, seed: int) -> dict[str, Any]:
    """The measured fields of one cell, by the task's kind of evaluation."""
    if cell.task.evaluation == "perplexity":
        return evaluate_perplexity(model, tokenizer, cell, seed)
    if cell.task.evaluation == "lm-eval":  # the task runs lm-eval's requests through `loglikelihood` and `prefill`
        return cell.task.evaluate(model, tokenizer, cell, seed)
    return evaluate_generation(model, tokenizer, cell, seed)
