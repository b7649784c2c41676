"""Calibration artifacts: tensors a method fits once per model and data, stored with fingerprints.

An artifact lives under ``kvbench.models.cache_dir()/calibration/<model>-<kind>-<settings-hash>/artifact.pt``
(``meta.json`` beside it for people). It carries the model's and the data's fingerprints and the settings, so a
stale one is never used silently. Loading checks more than the metadata: the method states what every tensor
must look like (``TensorSpec``: shape, dtype kind, finiteness), and an artifact that is unreadable, mismatched or
malformed is refused with one line and rebuilt. Writes are atomic, so a killed calibration leaves nothing half
written.

Read-only folders of prebuilt artifacts are searched first, with the same layout below them
(``calibration/<model>-<kind>-<settings-hash>/artifact.pt``) and the same checks: those named by
``KVBENCH_ARTIFACT_PATH`` (``os.pathsep``-separated), then ``kvbench/shipped/`` inside the package (artifacts of
the embedded models shipped as package data). A shipped artifact that fails a check is ignored with one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT = 2  # bump when the layout of an artifact changes: older ones are then refused and rebuilt
USED: list[Path] = []  # every artifact this process loaded or built, in order (``scripts/ship_artifacts.py``)


class ArtifactError(ValueError):
    """An artifact that cannot be used; the message is one line naming the file and the problem."""


@dataclass(frozen=True)
class TensorSpec:
    """What one stored tensor must be: its exact shape (``None`` for a free dimension) and whether it is floating."""

    shape: tuple[int | None, ...]
    floating: bool = True

    def check(self, name: str, tensor: Any) -> str | None:
        """A short reason when ``tensor`` does not fit, else None."""
        if not isinstance(tensor, torch.Tensor):
            return f"{name} is not a tensor"
        if tensor.dim() != len(self.shape) or any(want is not None and got != want
                                                  for got, want in zip(tensor.shape, self.shape, strict=True)):
            return f"{name} has shape {tuple(tensor.shape)}, expected {self.shape}"
        if tensor.is_floating_point() != self.floating:
            return f"{name} has dtype {tensor.dtype}"
        if self.floating and not bool(torch.isfinite(tensor).all()):
            return f"{name} holds NaN or infinite values"
        return None


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


def settings_hash(settings: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def artifact_path(model: torch.nn.Module, kind: str, settings: Mapping[str, Any]) -> Path:
    from kvbench.models import cache_dir

    return cache_dir() / "calibration" / f"{model_slug(model)}-{kind}-{settings_hash(settings)}" / "artifact.pt"


def shipped_folders() -> list[Path]:
    """Read-only folders searched before the user cache (module docstring)."""
    extra = [Path(p) for p in os.environ.get("KVBENCH_ARTIFACT_PATH", "").split(os.pathsep) if p]
    return [*extra, Path(__file__).parent / "shipped"]


def kvbench_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvbench")
    except PackageNotFoundError:
        return "unknown"


def save_artifact(path: Path, meta: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Write atomically (temporary file, then rename): a killed calibration leaves no half artifact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
        torch.save({"meta": meta, "tensors": {k: v.detach().cpu().contiguous() for k, v in tensors.items()}},
                   handle)
    os.replace(handle.name, path)
    (path.parent / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))


def read_artifact(path: Path, expected: Mapping[str, Any],
                  specs: Callable[[dict[str, Any]], Mapping[str, TensorSpec]]) -> dict[str, Any]:
    """The artifact's ``{"meta", "tensors"}``, checked against ``expected`` meta fields and tensor ``specs(meta)``.

    Raises ``ArtifactError`` (one line) for anything unusable: unreadable file, meta or tensors of the wrong
    type, another model/data/settings, a missing tensor, a wrong shape or dtype, NaN or infinite values.
    """
    try:
        artifact = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every unreadable file is refused the same way
        raise ArtifactError(f"calibration artifact {path} is unreadable ({type(error).__name__})") from None
    meta = artifact.get("meta") if isinstance(artifact, dict) else None
    tensors = artifact.get("tensors") if isinstance(artifact, dict) else None
    if not isinstance(meta, dict) or not isinstance(tensors, dict):
        raise ArtifactError(f"calibration artifact {path} is not a kvbench artifact (no meta/tensors mapping)")
    for key, value in expected.items():
        if meta.get(key) != value:
            raise ArtifactError(f"calibration artifact {path} was made with another {key} "
                                f"({str(meta.get(key))[:80]!r}, expected {str(value)[:80]!r})")
    try:
        wanted = specs(meta)
    except (KeyError, TypeError, ValueError):
        raise ArtifactError(f"calibration artifact {path} has incomplete metadata") from None
    reason = check_tensors(tensors, wanted)
    if reason:
        raise ArtifactError(f"calibration artifact {path}: {reason}")
    return artifact


def check_tensors(tensors: Mapping[str, Any], specs: Mapping[str, TensorSpec]) -> str | None:
    """The first reason why ``tensors`` do not fit ``specs``, or None."""
    for name, spec in specs.items():
        reason = spec.check(name, tensors[name]) if name in tensors else f"tensor {name} is missing"
        if reason:
            return reason
    return None


def load_or_build(model: torch.nn.Module, kind: str, settings: Mapping[str, Any], data_fingerprint: str,
                  build: Callable[[], tuple[dict[str, Any], dict[str, torch.Tensor]]],
                  specs: Callable[[dict[str, Any]], Mapping[str, TensorSpec]], force: bool = False,
                  ) -> tuple[dict[str, Any], Path]:
    """Load the artifact ``kind`` for this model and settings, or build (``build() -> (meta, tensors)``) and save it.

    ``specs(meta)`` says what the tensors must look like (it may read sizes from the meta, which the expected
    fields have already checked). A refused artifact is announced in one line and rebuilt; a freshly built one is
    checked too, so a method never runs on NaN statistics.
    """
    from kvbench.models import cache_dir

    path = artifact_path(model, kind, settings)
    expected = {"format": FORMAT, "kind": kind, "model_fingerprint": model_fingerprint(model),
                "data_fingerprint": data_fingerprint, "settings": json.loads(json.dumps(settings, default=str))}
    prebuilt = [folder / path.relative_to(cache_dir()) for folder in shipped_folders()]
    for candidate in [] if force else [*prebuilt, path]:
        if not candidate.is_file():
            continue
        try:
            artifact = read_artifact(candidate, expected, specs)
        except ArtifactError as error:
            print(f"kvbench: {error}; {'rebuilding' if candidate == path else 'ignoring'} it", flush=True)
            continue
        USED.append(candidate)
        return artifact, candidate
    start = time.perf_counter()
    extra, tensors = build()
    meta = expected | {"model": model_slug(model), "kvbench_version": kvbench_version(),
                       "calibration_s": round(time.perf_counter() - start, 3),
                       "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())} | extra
    reason = check_tensors(tensors, specs(meta))
    if reason:
        raise ArtifactError(f"calibration of {kind} produced an unusable artifact: {reason}")
    save_artifact(path, meta, tensors)
    USED.append(path)
    return {"meta": meta, "tensors": tensors}, path
