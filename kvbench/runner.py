"""The runner: expand a grid into cells, skip the ones already stored, evaluate the rest.

Data flows one way: CLI -> runner -> (model + cache + method) -> result rows -> report.
"""

from __future__ import annotations

import math
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from kvbench.cache import CompressedCache
from kvbench.measure import PeakMemory, timed
from kvbench.models import ModelRef, load
from kvbench.results import ResultsStore, cell_key
from kvbench.spec import MethodSpec
from kvbench.tasks import Sample, Task, TaskConfig

QUESTION_MARK = "\x00kvbench-question\x00"


@dataclass
class RunConfig:
    run_id: str
    results_dir: Path
    model: ModelRef
    methods: Sequence[MethodSpec]
    budgets: Sequence[float]
    tasks: Sequence[type[Task]]
    task_config: TaskConfig
    query_modes: Sequence[bool]  # True = query-aware
    device: str
    dtype: torch.dtype
    attn_implementation: str = "sdpa"
    retry_errors: bool = False
    argv: Sequence[str] = field(default_factory=lambda: sys.argv)

    @property
    def run_dir(self) -> Path:
        return self.results_dir / self.run_id


@dataclass(frozen=True)
class Cell:
    spec: MethodSpec
    budget: float
    task: Task
    sample: Sample
    query_aware: bool


def budgets_for(spec: MethodSpec, budgets: Sequence[float]) -> list[float]:
    """The reference keeps everything, so it runs once, at budget 1.0."""
    return [1.0] if spec.method.family == "reference" else list(budgets)


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


def evaluate(model: Any, tokenizer: Any, cell: Cell, seed: int) -> dict[str, Any]:
    """Prefill (with compression), then greedy decoding through ``model.generate``."""
    device = model.device
    context_ids, question_ids = (ids.to(device) for ids in encode(tokenizer, cell.sample))
    prompt = torch.cat([context_ids, question_ids], dim=1)
    cache = CompressedCache(cell.spec.method, cell.budget, seed)
    times: dict[str, float] = {"prefill_s": 0.0, "decode_s": 0.0}
    with torch.inference_mode(), PeakMemory(device) as peak:
        with timed(device, times, "prefill_s"):
            if cell.query_aware:
                with cell.spec.method.prefill_context(model, cell.budget), cache.compressing():
                    logits = model(prompt, past_key_values=cache, logits_to_keep=1).logits
                kv_bytes, full_kv_bytes = cache.nbytes(), cache.full_nbytes()
            else:
                with cell.spec.method.prefill_context(model, cell.budget), cache.compressing():
                    model(context_ids, past_key_values=cache, logits_to_keep=1)
                kv_bytes, full_kv_bytes = cache.nbytes(), cache.full_nbytes()
                logits = model(question_ids, past_key_values=cache, logits_to_keep=1).logits
        method_fields = cell.spec.method.row_fields(model)  # e.g. masked: a press hid tokens instead of evicting
        first = logits[:, -1].argmax(dim=-1, keepdim=True)
        generated = first
        eos = _eos_ids(model, tokenizer)
        if cell.sample.max_new_tokens > 1 and first.item() not in eos:
            config = GenerationConfig(
                do_sample=False, max_new_tokens=cell.sample.max_new_tokens - 1, eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0],
            )
            with timed(device, times, "decode_s"):
                output = model.generate(torch.cat([prompt, first], dim=1), past_key_values=cache,
                                        generation_config=config)
            generated = output[:, prompt.shape[1]:]
    prediction = tokenizer.decode(generated[0], skip_special_tokens=True)
    if cell.sample.strip_prediction:
        prediction = prediction.strip()
    return {
        "context_tokens": prompt.shape[1],
        "prediction": prediction,
        "score": cell.task.score(prediction, cell.sample),
        **memory_fields(cache, kv_bytes, full_kv_bytes, peak),
        "decode_tokens": generated.shape[1] - 1,
        **times,
        **method_fields,
    }


def memory_fields(cache: CompressedCache, kv_bytes: int, full_kv_bytes: int, peak: PeakMemory) -> dict[str, Any]:
    """What a row says about memory: bytes right after compression, before it, at the end, and the peak."""
    return {
        "kv_bytes": kv_bytes,
        "full_kv_bytes": full_kv_bytes,
        "achieved_budget": kv_bytes / full_kv_bytes,
        "final_kv_bytes": cache.nbytes(),
        "peak_mem_bytes": peak.peak_bytes,
        "peak_mem_kind": peak.kind,
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
    cache = CompressedCache(cell.spec.method, cell.budget, seed)
    times: dict[str, float] = {"prefill_s": 0.0, "decode_s": 0.0}
    with torch.inference_mode(), PeakMemory(device) as peak:
        with timed(device, times, "prefill_s"), cell.spec.method.prefill_context(model, cell.budget), \
                cache.compressing():
            first = model(prefix, past_key_values=cache, logits_to_keep=1).logits[:, -1:]
        kv_bytes, full_kv_bytes = cache.nbytes(), cache.full_nbytes()
        method_fields = cell.spec.method.row_fields(model)
        with timed(device, times, "decode_s"):
            rest = model(chunk[:, :-1], past_key_values=cache).logits
        logits = torch.cat([first, rest], dim=1).float()
        nll = torch.nn.functional.cross_entropy(logits[0], chunk[0], reduction="mean").item()
    return {
        "context_tokens": prefix.shape[1],
        "prediction": None,
        "score": math.exp(nll),
        "nll": nll,
        "scored_tokens": chunk.shape[1],
        **memory_fields(cache, kv_bytes, full_kv_bytes, peak),
        "decode_tokens": chunk.shape[1],
        **times,
        **method_fields,
    }


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


def run_metadata(config: RunConfig) -> dict[str, Any]:
    return {
        "run_id": config.run_id,
        "command": shlex.join(["python", "-m", "kvbench", *config.argv[1:]]),
        "git_commit": git_commit(),
        "versions": {name: package_version(name) for name in ("kvbench", "torch", "transformers")}
        | {"python": platform.python_version()},
        "device": device_name(config.device),
        "seed": config.task_config.seed,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": config.model.name,
        "model_kind": config.model.kind,
        "dtype": str(config.dtype).removeprefix("torch."),
        "attn_implementation": config.attn_implementation,
        "methods": [spec.canonical for spec in config.methods],
        "budgets": list(config.budgets),
        "tasks": [task.name for task in config.tasks],
        "query_modes": ["query-aware" if mode else "query-agnostic" for mode in config.query_modes],
        "task_config": {k: v for k, v in vars(config.task_config).items() if k != "seed"},
        "task_info": {task.name: task().info(config.task_config) for task in config.tasks},
    }


def package_version(name: str) -> str:
    try:
        return version(name)
    except Exception:  # noqa: BLE001 - a missing version is recorded, not fatal
        return "unknown"


def git_commit() -> str | None:
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def expand(config: RunConfig, tasks: Sequence[Task], samples: dict[str, Sequence[Sample]]) -> list[Cell]:
    """Sample-major order, so an interrupted run has compared every method on the same samples."""
    return [
        Cell(spec, budget, task, sample, query_aware)
        for task in tasks
        for sample in samples[task.name]
        for query_aware in config.query_modes
        for spec in config.methods
        for budget in budgets_for(spec, config.budgets)
    ]


def row_for(config: RunConfig, cell: Cell) -> dict[str, Any]:
    return {
        "run_id": config.run_id,
        "model": config.model.name,
        "method": cell.spec.canonical,
        "method_options": cell.spec.options,
        "budget": cell.budget,
        "task": cell.sample.task or cell.task.name,
        "sample_id": cell.sample.sample_id,
        "sample_meta": cell.sample.metadata,
        "query_aware": cell.query_aware,
        "metric": cell.sample.metric or cell.task.metric,
        "higher_is_better": cell.task.higher_is_better,
        "seed": config.task_config.seed,
        "quality_meaningful": config.model.meaningful_quality,
    }


def load_prepared(ref: ModelRef, device: str, dtype: torch.dtype, attn_implementation: str,
                  methods: Sequence[MethodSpec]) -> tuple[Any, Any]:
    """Load the model and let every method prepare for it (e.g. load or fit its calibration artifact)."""
    print(f"kvbench: loading {ref.name} on {device} ({dtype})", flush=True)
    model, tokenizer = load(ref, device, dtype, attn_implementation)
    for spec in methods:
        spec.method.prepare(model, tokenizer)
    return model, tokenizer


def run(config: RunConfig) -> Path:
    """Evaluate every cell not yet in the store; returns the run directory."""
    store = ResultsStore(config.run_dir)
    store.open(run_metadata(config))
    model, tokenizer = load_prepared(config.model, config.device, config.dtype, config.attn_implementation,
                                     config.methods)
    tasks = [task_cls() for task_cls in config.tasks]
    samples = {task.name: task.samples(tokenizer, config.task_config) for task in tasks}
    cells = expand(config, tasks, samples)
    done = store.done_keys(include_errors=not config.retry_errors)
    todo = [c for c in cells if cell_key(row_for(config, c)) not in done]
    _print_grid(config, samples, len(cells), len(cells) - len(todo))
    failures = 0
    with tqdm(total=len(todo), unit="cell", desc="kvbench", dynamic_ncols=True) as progress:
        for cell in todo:
            progress.set_postfix_str(f"{cell.spec.canonical} @ {cell.budget:g} {cell.sample.sample_id}")
            row = row_for(config, cell)
            try:
                evaluator = evaluate_perplexity if cell.task.evaluation == "perplexity" else evaluate
                row |= evaluator(model, tokenizer, cell, config.task_config.seed) | {"status": "ok", "error": None}
            except Exception as error:  # noqa: BLE001 - a failing cell is recorded and the sweep goes on
                failures += 1
                row |= {"status": "error", "error": f"{type(error).__name__}: {error}"}
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            store.append(row)
            progress.update(1)
    if failures:
        print(f"kvbench: {failures} cell(s) failed; their errors are in {store.results_path}", flush=True)
    return config.run_dir


def _print_grid(config: RunConfig, samples: dict[str, Sequence[Sample]], total: int, done: int) -> None:
    tc = config.task_config
    task_text = "; ".join(f"{name}: {len(s)} samples" for name, s in samples.items())
    modes = " + ".join("query-aware" if m else "query-agnostic" for m in config.query_modes)
    print(
        f"kvbench: grid = model {config.model.name} | methods {', '.join(s.canonical for s in config.methods)}"
        f" | budgets {','.join(f'{b:g}' for b in config.budgets)} | {task_text}"
        f" (lengths {','.join(map(str, tc.lengths))} x depths {','.join(f'{d:g}' for d in tc.depths)})"
        f" | {modes} | {total} cells, {done} already done, {total - done} to run",
        flush=True,
    )
