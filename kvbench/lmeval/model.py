"""kvbench as an lm-eval model: any lm-eval task, with the KV cache compressed by any kvbench method.

``python -m kvbench.lmeval run --model kvbench --model_args pretrained=smollm2-135m,method=snapkv,budget=0.1
--tasks arc_easy`` (lm-eval 0.4.x finds models only in its own registry; importing this module registers
``kvbench`` there, which is what ``python -m kvbench.lmeval`` does before handing over to lm-eval's command line).

``KVBenchLM`` is lm-eval's ``hf`` model (``HFLM``: same tokenization, truncation, stop sequences and answer
post-processing) with two request kinds replaced:

- ``loglikelihood`` (and ``multiple_choice``, ``loglikelihood_rolling``): the context is prefilled and compressed
  by ``kvbench.prefill.prefill``, then the continuation is scored on the compressed cache
  (``kvbench.evaluate.loglikelihood``), as the DynaKV paper measures ARC, PIQA, Winogrande and HellaSwag;
- ``generate_until``: the prompt is prefilled and compressed, the first token is the argmax of the prefill's last
  logits, and ``model.generate`` continues greedily on the compressed cache until a stop sequence or
  ``max_gen_toks``.

Requests run one at a time: a kvbench cache holds one prompt (methods choose what to keep per prompt, and several
store per-head or per-token variable lengths), so ``batch_size`` is always 1. The whole prompt is compressed
(query-aware): an lm-eval request is one string with no boundary between document and question. Sampling
(``do_sample=true``) is refused: decoding is greedy. What kvbench measured (mean achieved budget, KV bytes held
before and after compression) is added to the results' ``config`` section under ``kvbench``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from statistics import fmean
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.models.utils_hf import stop_sequences_criteria
from tqdm.auto import tqdm

from kvbench.evaluate import loglikelihood
from kvbench.measure import timed
from kvbench.prefill import Prefill, cache_arguments, is_prepared, prefill, prepare

log = logging.getLogger(__name__)

# HFLM arguments that still mean something for a model kvbench has loaded.
PASSED_TO_HFLM = ("max_length", "add_bos_token", "prefix_token_id", "truncation", "softmax_dtype",
                  "think_end_token", "enable_thinking", "chat_template_args", "max_batch_size")
QUERY_AGNOSTIC = ("query_aware=false is not available: an lm-eval request is one prompt string with no boundary "
                  "between document and question, so kvbench compresses all of it (query-aware)")


@dataclass
class Measurement:
    """What one request's compressed prefill held and took."""

    kv_bytes: int
    full_kv_bytes: int
    context_tokens: int
    prefill_s: float
    decode_s: float
    decode_tokens: int
    fields: dict[str, Any] = field(default_factory=dict)  # the method's own row fields, e.g. ``masked``

    @classmethod
    def of(cls, compressed: Prefill, context_tokens: int, decode_s: float, decode_tokens: int) -> Measurement:
        return cls(compressed.kv_bytes, compressed.full_kv_bytes, context_tokens, compressed.seconds, decode_s,
                   decode_tokens, compressed.fields)


def summary(measurements: list[Measurement]) -> dict[str, Any]:
    """Means over requests: what the results' ``config`` section carries."""
    if not measurements:
        return {"requests": 0}
    return {
        "requests": len(measurements),
        "mean_achieved_budget": fmean(m.kv_bytes / m.full_kv_bytes for m in measurements),
        "max_achieved_budget": max(m.kv_bytes / m.full_kv_bytes for m in measurements),
        "mean_kv_bytes": fmean(m.kv_bytes for m in measurements),
        "mean_full_kv_bytes": fmean(m.full_kv_bytes for m in measurements),
        "mean_context_tokens": fmean(m.context_tokens for m in measurements),
    }


@register_model("kvbench")
class KVBenchLM(HFLM):
    """lm-eval's ``hf`` model with a kvbench compressed KV cache; requests one by one (see the module docstring)."""

    def __init__(self, pretrained: Any, method: str = "full", budget: float = 1.0, query_aware: bool = True,
                 seed: int = 0, calibration_data: str | None = None, dtype: str = "auto", device: str | None = None,
                 attn_implementation: str = "sdpa", batch_size: int | str = 1, tokenizer: Any = None,
                 **kwargs: Any) -> None:
        from kvbench import checks
        from kvbench.models import ModelUnavailable, load, parse_dtype, resolve

        unknown = sorted(set(kwargs) - set(PASSED_TO_HFLM))
        if unknown:
            raise ValueError(f"--model kvbench: unknown model argument(s) {', '.join(unknown)}; valid: pretrained, "
                             "method, budget, query_aware, seed, calibration_data, dtype, device, attn_implementation, "
                             f"{', '.join(PASSED_TO_HFLM)}. A method spec with several options goes in quotes: "
                             "method=\"snapkv:window=64,kernel=5\"")
        if not query_aware:
            raise ValueError(QUERY_AGNOSTIC)
        if isinstance(pretrained, str) and tokenizer is not None:
            raise ValueError("--model kvbench loads the model's own tokenizer; drop tokenizer= (lm-eval's RULER tasks "
                             "take theirs from --metadata '{\"tokenizer\": ...}')")
        if str(batch_size) != "1":
            log.warning("kvbench runs lm-eval requests one by one (its compressed cache holds one prompt); "
                        "batch_size=%s is ignored", batch_size)
        spec = _spec(method, calibration_data)
        _check_budget(budget)
        self.name = pretrained if isinstance(pretrained, str) else getattr(pretrained, "name_or_path", "model")
        if isinstance(pretrained, str):
            try:
                device = checks.device(_available(device))
                ref = resolve(pretrained)
                model, tokenizer = load(ref, device, parse_dtype(dtype, device), attn_implementation)
            except (checks.UsageError, ModelUnavailable) as error:
                raise ValueError(str(error)) from None
        else:
            model = pretrained
        quiet = logging.getLogger("lm_eval.models.huggingface")
        level, quiet.level = quiet.level, logging.ERROR  # its warnings about a pre-loaded model do not apply here
        try:
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=1, **kwargs)
        finally:
            quiet.level = level
        self.measurements: list[Measurement] = []
        self.use(spec, budget, seed)

    @classmethod
    def wrap(cls, model: torch.nn.Module, tokenizer: Any) -> KVBenchLM:
        """An lm-eval model over a model kvbench has loaded (and its methods prepared for), for kvbench's runner."""
        return cls(pretrained=model, tokenizer=tokenizer)

    def use(self, spec: Any, budget: float, seed: int = 0) -> None:
        """Compress with ``spec`` (a ``MethodSpec``) at ``budget`` from now on; prepares the method if needed."""
        _check_budget(budget)
        self.spec, self.seed = spec, seed
        self.budget = 1.0 if spec.method.family == "reference" else float(budget)
        if not is_prepared(spec.method, self.model):
            prepare(spec.method, self.model, self.tokenizer)

    def take_measurements(self) -> list[Measurement]:
        """The measurements since the last call (kvbench's runner reads them per cell)."""
        taken, self.measurements = self.measurements, []
        return taken

    def get_model_info(self) -> dict[str, Any]:
        info = {"model_num_parameters": self.model.num_parameters(), "model_dtype": str(self.model.dtype)}
        return info | {"kvbench": {"model": self.name, "method": self.spec.canonical, "budget": self.budget,
                                   "query_aware": True, "seed": self.seed, **summary(self.measurements)}}

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), is_greedy)`` per request, the context compressed; lm-eval's left
        truncation to ``max_length`` tokens."""
        out = []
        for request, context_enc, continuation_enc in tqdm(requests, disable=disable_tqdm or self.rank != 0,
                                                            desc="kvbench loglikelihood requests"):
            tokens = (context_enc + continuation_enc)[-(self.max_length + 1):]
            context = tokens[:len(tokens) - len(continuation_enc)]
            if not context:
                raise ValueError(f"a continuation of {len(continuation_enc)} tokens leaves no context within "
                                 f"max_length {self.max_length}")
            result = loglikelihood(self.model, self.spec.method, self.budget, self._ids(context),
                                   self._ids(continuation_enc), self.seed, self.softmax_dtype)
            self.measurements.append(Measurement.of(result.compressed, len(context), result.scoring_s,
                                                    len(continuation_enc)))
            answer = (result.logprob, result.greedy)
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
            out.append(answer)
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        out = []
        for request in tqdm(requests, disable=disable_tqdm or self.rank != 0, desc="kvbench generate_until requests"):
            context, gen_kwargs = request.args[0], request.args[1]
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            if kwargs.pop("do_sample", False):
                raise ValueError(f"{request.task_name}: kvbench decodes greedily; this task asks for sampling "
                                 "(do_sample=true)")
            kwargs.pop("temperature", None)
            ids, _ = self.tok_batch_encode([context], left_truncate_len=self.max_length - max_gen_toks,
                                           truncation=self.truncation)
            max_length = kwargs.pop("max_length", ids.shape[1] + max_gen_toks)
            text = self.tok_decode(self._generate(ids.to(self.device), until, max_length, kwargs))
            think = self.think_end_token if isinstance(self.think_end_token, str) else None
            text = postprocess_generated_text(text, until, think)
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out

    def _generate(self, prompt: torch.Tensor, until: list[str], max_length: int, kwargs: dict[str, Any]) -> list:
        """Greedy tokens after ``prompt`` (compressed whole) up to ``max_length`` tokens in all, stopped as lm-eval's
        ``hf`` model stops."""
        compressed = prefill(self.model, self.spec.method, self.budget, prompt, self.seed)
        first = compressed.logits[:, -1].argmax(dim=-1, keepdim=True)
        times = {"decode_s": 0.0}
        generated = first
        if max_length > prompt.shape[1] + 1 and not self._stops(first[0].tolist(), until):
            with torch.inference_mode(), timed(prompt.device, times, "decode_s"):
                output = self.model.generate(
                    input_ids=torch.cat([prompt, first], dim=1), **cache_arguments(self.model, compressed.cache),
                    max_length=max_length, do_sample=False, use_cache=True,
                    stopping_criteria=stop_sequences_criteria(self.tokenizer, until, prompt.shape[1], 1),
                    pad_token_id=self.tokenizer.pad_token_id, **kwargs)
            generated = output[:, prompt.shape[1]:]
        self.measurements.append(Measurement.of(compressed, prompt.shape[1], times["decode_s"], generated.shape[1]))
        return generated[0].tolist()

    def _stops(self, tokens: list[int], until: list[str]) -> bool:
        """Whether generation ends after ``tokens``: an end-of-sequence token or a stop sequence in their text."""
        eos = self.model.generation_config.eos_token_id
        eos_ids = ({eos} if isinstance(eos, int) else set(eos or ())) | {self.eot_token_id}
        text = self.tokenizer.decode(tokens)
        return bool(eos_ids & set(tokens)) or any(stop and stop in text for stop in until)

    def _ids(self, tokens: list[int]) -> torch.Tensor:
        return torch.tensor([tokens], dtype=torch.long, device=self.device)


def _spec(text: str, calibration_data: str | None) -> Any:
    from kvbench import checks

    try:
        return checks.methods(str(text), reference=False, calibration_data=checks.calibration_file(calibration_data))[0]
    except checks.UsageError as error:
        raise ValueError(f"--model kvbench method={text}: {error}") from None


def _check_budget(budget: Any) -> None:
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not 0.0 < budget <= 1.0:
        raise ValueError(f"--model kvbench: budget must be a number in (0, 1], got {budget!r}")


def _available(device: str | None) -> str | None:
    """lm-eval's default device is cuda:0; on a machine without CUDA it falls back to the CPU, as its ``hf`` does."""
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        log.info("no CUDA device here: using the CPU")
        return "cpu"
    return device

