"""``python -m kvbench bench``: what one measurement holds, bad input, and a whole run on a random model."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvbench import bench, cli, models, runner
from kvbench.models import enable_compression
from kvbench.prefill import prepare
from kvbench.report import costs
from kvbench.report.render import Table
from kvbench.report.tables import bandwidth_limit, build_tables, load_bench, load_cells
from kvbench.results import read_rows
from kvbench.spec import parse_spec


def measure(model, spec_text, budget, prompt, **kwargs):
    spec = parse_spec(spec_text)
    prepare(spec.method, model, None)
    return bench.measure(model, spec, budget, prompt, **kwargs)


def test_random_prompt_is_seeded_and_has_no_special_tokens() -> None:
    prompt = bench.random_prompt(50, [0, 1, 2, 99], 4000, seed=3)
    assert prompt.shape == (1, 4000) and prompt.dtype == torch.int64
    assert set(prompt.unique().tolist()) == set(range(3, 50))
    assert torch.equal(prompt, bench.random_prompt(50, [0, 1, 2, 99], 4000, seed=3))
    assert not torch.equal(prompt, bench.random_prompt(50, [0, 1, 2, 99], 4000, seed=4))


def test_measure_reports_measured_bytes_and_exact_token_counts(llama) -> None:
    # Tiny Llama (conftest): 3 layers x 2 KV heads x 16 dims x (K and V) x fp32 = 768 bytes per token.
    prompt = bench.random_prompt(256, [], 200, seed=0)
    full = measure(llama, "full", 1.0, prompt, decode_tokens=4, seed=0)
    snap = measure(llama, "snapkv", 0.25, prompt, decode_tokens=4, seed=0)
    assert full["kv_bytes"] == full["full_kv_bytes"] == snap["full_kv_bytes"] == 200 * 768
    assert snap["kv_bytes"] == 50 * 768 and snap["achieved_budget"] == 0.25
    assert (full["final_kv_bytes"], snap["final_kv_bytes"]) == (204 * 768, 54 * 768)  # 4 decoded tokens each
    for row in (full, snap):
        assert row["decode_tokens"] == 4 and row["prefill_s"] > 0 and row["decode_s"] > 0
        assert row["peak_mem_kind"] == "cpu_peak_rss_delta" and row["decode_peak_mem_bytes"] >= 0


def test_peak_memory_while_decoding_drops_with_the_budget() -> None:
    """Measured (peak RSS rise), not computed, on a model whose cache dwarfs its weights and activations:
    2 layers x 8 KV heads x 128 dims x (K and V) x fp32 = 16 KiB per token, 31 MiB at 2000 tokens."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=8, num_key_value_heads=8, head_dim=128))
    enable_compression(model)
    model.eval()
    prompt = bench.random_prompt(256, [], 2000, seed=0)
    rows = {}
    for method, budget in (("full", 1.0), ("streamingllm", 0.1), ("full", 1.0)):  # the first full warms up
        rows[method] = measure(model, method, budget, prompt, decode_tokens=2, seed=0)
    full, small = rows["full"], rows["streamingllm"]
    assert full["kv_bytes"] == 2000 * 16 * 1024 and small["kv_bytes"] == 200 * 16 * 1024
    assert full["decode_peak_mem_bytes"] >= 0.9 * full["kv_bytes"], full  # the cache is in the peak
    gap = full["decode_peak_mem_bytes"] - small["decode_peak_mem_bytes"]
    assert gap > 0.5 * (full["kv_bytes"] - small["kv_bytes"]), (full, small)


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded for bad input")

    monkeypatch.setattr(models, "load", refuse)
    monkeypatch.setattr(runner, "load", refuse)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "snapk"], "unknown method 'snapk'"),
        (["--methods", "snapkv", "--budget", "0"], "--budget must be in (0, 1], got 0"),
        (["--methods", "snapkv", "--lengths", "8100"],
         "--lengths 8100 plus --decode-tokens 128 is longer than smollm2-135m's context of 8192 tokens"),
        (["--methods", "snapkv", "--lengths", "4k"], "--lengths must be whole numbers"),
        (["--methods", "snapkv", "--repeats", "0"], "--repeats must be at least 1, got 0"),
        (["--methods", "snapkv", "--decode-tokens", "0"], "--decode-tokens must be at least 1, got 0"),
        (["--methods", "snapkv", "--attn-implementation", "flash_attention_2"],
         "flash_attention_2 needs the flash-attn package and a CUDA GPU"),
        (["--methods", "snapkv", "--attn-implementation", "eager"], "'eager' is not supported; valid: sdpa"),
        (["--methods", "snapkv", "--model", "random:gpt-9"], "unknown random config 'gpt-9'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, no_model_loading, args, message) -> None:
    assert cli.main(["bench", "--lengths", "100", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_an_existing_run_is_not_resumed(tmp_path, capsys, no_model_loading) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.jsonl").write_text("")
    assert cli.main(["bench", "--methods", "snapkv", "--lengths", "100", "--results-dir", str(tmp_path),
                     "--run-id", "b"]) == 2
    assert "bench runs are not resumed" in capsys.readouterr().err


def test_weights_a_decoding_step_reads() -> None:
    """Every parameter once; the input embedding table only when it is also the output layer."""
    shape = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    untied = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False))
    tied = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True))
    total = sum(p.numel() * 4 for p in untied.parameters())
    assert bench.weights_nbytes(untied) == total - 256 * 64 * 4
    assert bench.weights_nbytes(tied) == total - 256 * 64 * 4  # the shared table counted once
    assert bandwidth_limit(300, 100, 0.5) == pytest.approx(400 / 350)
    assert bandwidth_limit(0, 100, 0.25) == pytest.approx(4.0)  # cache-bound: the limit is 1 / b


def _bench_row(method: str, repeat: int, prefill_s: float, decode_s: float, budget: float, kv: int) -> dict:
    return {"kind": "bench", "run_id": "b", "model": "m", "method": method, "budget": budget, "task": "bench",
            "sample_id": f"1000/{repeat}", "context_tokens": 1000, "repeat": repeat, "status": "ok", "error": None,
            "prefill_s": prefill_s, "decode_s": decode_s, "decode_tokens": 10, "kv_bytes": kv,
            "full_kv_bytes": 1000, "achieved_budget": kv / 1000, "weights_bytes": 3000,
            "prefill_peak_mem_bytes": 1, "decode_peak_mem_bytes": 1, "peak_mem_kind": "cpu_peak_rss_delta",
            "masked": False, "query_aware": True}


def test_report_sets_decoding_against_its_limit_and_kvbench_beside_kvpress(tmp_path) -> None:
    rows = [_bench_row("full", r, 1.0, 2.0, 1.0, 1000) for r in range(3)]
    rows += [_bench_row("snapkv:kernel=5,pooling=avg,window=64", r, 1.0, 1.6, 0.5, 500) for r in range(3)]
    rows += [_bench_row("kvpress:SnapKVPress", r, 1.5, 1.7, 0.5, 500) for r in range(3)]
    rows += [_bench_row("knorm", r, 1.0, 1.6, 0.5, 500) for r in range(3)]  # no kvpress counterpart measured
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    tables = build_tables(load_cells([tmp_path]), load_bench([tmp_path]))
    snap = tables.bench.set_index("method").loc["snapkv:kernel=5,pooling=avg,window=64"]
    # decode 10 / 1.6 s vs full's 10 / 2 s: 1.25x; the limit (3000 + 1000) / (3000 + 500) = 1.143
    assert snap["decode_limit"] == pytest.approx(4000 / 3500)
    assert snap["of_limit"] == pytest.approx(1.25 / (4000 / 3500))
    assert snap["sample_s"] == pytest.approx(2.6)
    blocks = {tuple(b.header): b.rows for b in costs.bench_section(tables) if isinstance(b, Table)}
    limits = next(rows for header, rows in blocks.items() if "of limit" in header)
    assert [r[1] for r in limits] == ["knorm", "kvpress:SnapKVPress", "snapkv:kernel=5,pooling=avg,window=64"]
    pairs = next(rows for header, rows in blocks.items() if "kvbench / kvpress" in header)
    assert pairs == [["1000", "snapkv:kernel=5,pooling=avg,window=64", "kvpress:SnapKVPress", "0.500", "2.60",
                      "3.20", "0.81", "1.00", "1.50", "6.25", "5.88", "500 B", "500 B"]]


def test_bench_command_measures_every_config_side_by_side_and_reports(tmp_path, capsys) -> None:
    args = ["bench", "--model", "random:llama-tiny", "--methods", "snapkv", "--budget", "0.5,0.25",
            "--lengths", "64,160", "--decode-tokens", "3", "--repeats", "2", "--warmup", "1",
            "--results-dir", str(tmp_path / "results"), "--reports-dir", str(tmp_path / "reports"), "--run-id", "b"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("of limit") == 2  # a summary per length, with the bandwidth limit
    assert re.search(r"snapkv\s+0.250\s", printed) and re.search(r"full\s+1.000\s", printed)
    rows = list(read_rows(tmp_path / "results" / "b" / "results.jsonl"))
    assert len(rows) == 2 * 3 * 2  # lengths x (full + snapkv x 2 budgets) x repeats; warm-up not stored
    assert {r["status"] for r in rows} == {"ok"} and {r["kind"] for r in rows} == {"bench"}
    # random:llama-tiny: 2 layers x 2 KV heads x 16 dims x (K and V) x fp32 = 512 bytes per token.
    for row in rows:
        assert row["full_kv_bytes"] == row["context_tokens"] * 512 and row["decode_tokens"] == 3
        assert row["kv_bytes"] == int(row["budget"] * row["context_tokens"]) * 512
        assert row["quality_meaningful"] is False
        # per layer q, o 64x64, k, v 64x32, MLP 3 x 64x128, 2 norms; final norm; output layer (input table not read)
        assert row["weights_bytes"] == 4 * (2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64 + 64 * 49152)
    report = (tmp_path / "reports" / "b" / "report.md").read_text()
    assert "## Speed and memory benchmark" in report and "Warning: Random weights" in report
    assert re.search(r"\|\s+160 \| snapkv\s+\|\s+0.250 \|", report) and "## Headline" not in report
    assert (tmp_path / "reports" / "b" / "report.html").read_text().count("data:image/png;base64,") == 2
