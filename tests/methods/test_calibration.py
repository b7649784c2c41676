"""Calibration text, K/V statistics, bases and the artifact store."""

from __future__ import annotations

import json

import pytest
import torch
from lowrank_helpers import CALIBRATION_FILE, CALIBRATION_TOKENS, ByteTokenizer

from kvbench import calibration
from kvbench.calibration import CalibrationDataError, calibration_data, read_calibration_file, squad_paragraphs
from kvbench.cli import main
from kvbench.methods.lowrank import statistics as statistics_module
from kvbench.methods.lowrank.statistics import heldout_error_curve, kv_statistics, principal_basis


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))


def statistics(llama, **kwargs):
    return kv_statistics(llama, ByteTokenizer(), CALIBRATION_TOKENS, source=CALIBRATION_FILE, chunk_tokens=128,
                         progress=False, **kwargs)


def test_calibration_articles_are_disjoint_from_the_tasks_squad_articles():
    pytest.importorskip("long_context_eval")
    from kvbench.tasks.ruler_sources import evaluation_squad_titles

    reserved = squad_paragraphs(calibration=True)
    assert 100 < len(reserved) < len(squad_paragraphs(calibration=False))
    assert not set(reserved) & set(squad_paragraphs(calibration=False))
    assert not {t for t in evaluation_squad_titles() if calibration.is_calibration_title(t)}


def test_user_files_text_and_jsonl(tmp_path):
    text = tmp_path / "cal.txt"
    text.write_text("first paragraph\n\nsecond one\n\n\n")
    assert read_calibration_file(text) == ["first paragraph", "second one"]
    jsonl = tmp_path / "cal.jsonl"
    jsonl.write_text(json.dumps({"text": "a"}) + "\n\n" + json.dumps({"text": "b"}) + "\n")
    assert read_calibration_file(jsonl) == ["a", "b"]
    jsonl.write_text('{"body": "no text field"}\n')
    with pytest.raises(CalibrationDataError, match="cal.jsonl:1: a jsonl line needs a 'text' field"):
        read_calibration_file(jsonl)
    with pytest.raises(CalibrationDataError, match="no such file"):
        read_calibration_file(tmp_path / "missing.txt")


def test_calibration_data_is_seeded_and_sized(tmp_path):
    source = tmp_path / "cal.txt"
    source.write_text("\n\n".join(f"paragraph number {i} " * 5 for i in range(200)))
    first = calibration_data(ByteTokenizer(), 1000, seed=1, source=source, chunk_tokens=300)
    assert [c.shape[1] for c in first.chunks] == [300, 300, 300, 100]
    assert first.fingerprint == calibration_data(ByteTokenizer(), 1000, seed=1, source=source,
                                                 chunk_tokens=300).fingerprint
    assert first.fingerprint != calibration_data(ByteTokenizer(), 1000, seed=2, source=source).fingerprint
    with pytest.raises(CalibrationDataError, match="asked for"):
        calibration_data(ByteTokenizer(), 10**7, source=source)


def test_principal_basis_is_orthonormal_and_ordered_and_its_error_curve_falls_to_zero():
    x = torch.randn(500, 12, dtype=torch.float64) * torch.linspace(3, 0.1, 12, dtype=torch.float64)
    moment = x.T @ x / 500
    basis, values = principal_basis(moment)
    torch.testing.assert_close(basis.T @ basis, torch.eye(12, dtype=torch.float64))
    assert torch.all(values[:-1] >= values[1:])
    curve = heldout_error_curve(basis, moment)
    assert curve[0] == 1 and torch.all(curve[:-1] >= curve[1:]) and curve[-1] < 1e-9


def test_statistics_are_pre_rope_moments_of_every_layer(llama):
    stats, meta, path = statistics(llama)
    kv_dim = llama.config.num_key_value_heads * (llama.config.hidden_size // llama.config.num_attention_heads)
    assert stats.key_fit.shape == (llama.config.num_hidden_layers, kv_dim, kv_dim)
    assert meta["kv_heads"] == llama.config.num_key_value_heads and path.is_file()
    # Layer 0's pre-RoPE keys and values are k_proj / v_proj of the normed embeddings; chunks 0 and 1 fit,
    # the last of the three is held out.
    data = calibration_data(ByteTokenizer(), CALIBRATION_TOKENS, source=CALIBRATION_FILE, chunk_tokens=128)
    layer = llama.model.layers[0]
    with torch.inference_mode():
        hidden = torch.cat([layer.input_layernorm(llama.model.embed_tokens(c[0])) for c in data.chunks[:2]])
        keys, values = layer.self_attn.k_proj(hidden).double(), layer.self_attn.v_proj(hidden).double()
    torch.testing.assert_close(stats.key_fit[0], keys.T @ keys / 256, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats.value_fit[0], values.T @ values / 256, rtol=1e-4, atol=1e-6)


def test_artifact_round_trips_and_same_seed_gives_the_same_artifact(llama, monkeypatch):
    first, meta, path = statistics(llama)
    assert json.loads((path.parent / "meta.json").read_text())["data_fingerprint"] == meta["data_fingerprint"]
    monkeypatch.setattr(statistics_module, "collect_kv_statistics", lambda *a, **k: pytest.fail("recalibrated"))
    loaded, loaded_meta, _ = statistics(llama)  # loaded, not recomputed
    assert loaded_meta["created"] == meta["created"]
    monkeypatch.undo()
    again, _, _ = statistics(llama, force=True)
    for name, tensor in first.tensors().items():
        assert torch.equal(tensor, loaded.tensors()[name]) and torch.equal(tensor, again.tensors()[name])


def test_corrupt_or_mismatched_artifacts_are_refused_and_rebuilt(llama, capsys):
    _, _, path = statistics(llama)
    path.write_bytes(b"not a torch file")
    stats, _, _ = statistics(llama)
    assert "is unreadable" in capsys.readouterr().out and stats.key_fit.shape[0] == 3
    artifact = torch.load(path, weights_only=True)
    artifact["meta"]["model_fingerprint"] = "another-model"
    torch.save(artifact, path)
    statistics(llama)
    out = capsys.readouterr().out
    assert "was made with another model_fingerprint ('another-model'" in out and "rebuilding it" in out
    assert torch.load(path, weights_only=True)["meta"]["model_fingerprint"] != "another-model"


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda a: a.__setitem__("meta", [1, 2]), "not a kvbench artifact"),
    (lambda a: a["tensors"].pop("value_fit"), "tensor value_fit is missing"),
    (lambda a: a["tensors"].__setitem__("key_fit", torch.zeros(3, 4, 4)), "has shape (3, 4, 4)"),
    (lambda a: a["tensors"]["key_heldout"].fill_(float("nan")), "NaN or infinite"),
    (lambda a: a["tensors"].__setitem__("key_fit", torch.zeros(3, 32, 32, dtype=torch.int64)), "dtype torch.int64"),
])
def test_malformed_artifacts_are_refused_with_one_line_and_rebuilt(llama, capsys, damage, reason):
    _, _, path = statistics(llama)
    artifact = torch.load(path, weights_only=True)
    damage(artifact)
    torch.save(artifact, path)
    stats, _, _ = statistics(llama)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and reason in out[0] and "rebuilding it" in out[0]
    assert all(bool(torch.isfinite(t).all()) for t in stats.tensors().values())
    statistics(llama)  # the rebuilt artifact loads without a word
    assert capsys.readouterr().out == ""


def test_cli_refuses_bad_calibration_input_before_loading(capsys, tmp_path):
    assert main(["calibrate", "snapkv"]) == 2
    assert "snapkv needs no calibration" in capsys.readouterr().err
    assert main(["run", "--methods", "palu", "--calibration-data", str(tmp_path / "none.txt")]) == 2
    assert "none.txt: no such file" in capsys.readouterr().err
