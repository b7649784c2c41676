"""Prebuilt artifacts in read-only folders (``KVBENCH_ARTIFACT_PATH``, the package's ``shipped/``): found before the
user cache, checked the same way, ignored with one line when they fail a check."""

from __future__ import annotations

import shutil

import pytest
import torch

from kvbench import artifacts
from kvbench.methods.lowrank import statistics as statistics_module
from kvbench.methods.lowrank.statistics import kv_statistics
from kvbench.testing import CALIBRATION_TOKENS, ByteTokenizer, calibration_file


def statistics(model, data, **kwargs):
    return kv_statistics(model, ByteTokenizer(), CALIBRATION_TOKENS, source=data, chunk_tokens=128, progress=False,
                         **kwargs)


@pytest.fixture
def shipped(llama, tmp_path, monkeypatch):
    """A float16 copy of a freshly built artifact in a read-only folder, and an empty user cache."""
    data = str(calibration_file(tmp_path))
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "built"))
    built, _, path = statistics(llama, data)
    relative = path.relative_to(tmp_path / "built")
    copy = tmp_path / "shipped" / relative
    copy.parent.mkdir(parents=True)
    artifact = torch.load(path, weights_only=True)
    artifact["tensors"] = {k: v.half() for k, v in artifact["tensors"].items()}
    torch.save(artifact, copy)
    shutil.rmtree(tmp_path / "built")
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "user"))
    monkeypatch.setenv("KVBENCH_ARTIFACT_PATH", str(tmp_path / "shipped"))
    return built, copy, data


def refuse_calibration(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("calibrated although a valid artifact was shipped")

    monkeypatch.setattr(statistics_module, "collect_kv_statistics", refuse)


def test_a_shipped_artifact_is_used_before_calibrating(llama, shipped, monkeypatch, tmp_path):
    built, copy, data = shipped
    refuse_calibration(monkeypatch)
    used = len(artifacts.USED)
    loaded, _, path = statistics(llama, data)
    assert path == copy and not (tmp_path / "user").exists()  # nothing written to the user cache
    assert artifacts.USED[used:] == [copy]  # what scripts/ship_artifacts.py reads to know what a job needs
    torch.testing.assert_close(loaded.key_fit, built.key_fit, atol=1e-3, rtol=1e-2)  # float16 on disk


def test_a_shipped_artifact_for_another_model_is_ignored_with_one_line(llama, shipped, capsys, tmp_path):
    _, copy, data = shipped
    artifact = torch.load(copy, weights_only=True)
    artifact["meta"]["model_fingerprint"] = "another-model"
    torch.save(artifact, copy)
    _, _, path = statistics(llama, data)
    assert path.is_relative_to(tmp_path / "user")  # calibrated into the user cache instead
    out = capsys.readouterr().out
    assert "was made with another model_fingerprint" in out and "ignoring it" in out and out.count("\n") == 1


def test_force_rebuilds_even_with_a_shipped_artifact(llama, shipped, tmp_path):
    _, _, data = shipped
    _, _, path = statistics(llama, data, force=True)
    assert path.is_relative_to(tmp_path / "user")
