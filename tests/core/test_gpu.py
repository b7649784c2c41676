"""The GPU path. Tests marked ``gpu`` need CUDA and are skipped without it (``scripts/gpu-check.sh`` runs them on a
GPU machine); the others check on the CPU what can be checked there: kvbench's flash-attn calls against reference
kernels with flash-attn's semantics, per-device memory accounting, ``--device-map`` on a CPU-only machine, and the
whole GPU check script in its dry-run mode."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kvbench import checks, cli, flash
from kvbench.measure import PeakMemory, model_devices
from kvbench.models import enable_compression, parse_dtype
from kvbench.prefill import cache_arguments
from kvbench.results import read_rows
from kvbench.spec import parse_spec
from kvbench.testing import compress, greedy, random_prompt, tiny_model

ROOT = Path(__file__).resolve().parents[2]
# Token methods whose layers hold the same tokens per head (full, snapkv), another number per layer (pyramidkv),
# or another number per KV head, packed (adakv, kvcompose's unstructured variant).
METHODS = ("full", "snapkv", "pyramidkv", "adakv", "kvcompose:structured=false")
PER_HEAD = ("adakv", "kvcompose:structured=false")


def reference_dense(q, k, v, softmax_scale, causal, **options):
    """flash_attn_func's contract in plain torch: [batch, len, heads, dim]; GQA; a causal mask aligned to the
    bottom right when there are more keys than queries."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2]) if causal else None
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale)
    return out.transpose(1, 2)


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, **options):
    """flash_attn_varlen_func's contract: sequences packed along the first axis, bounded by cu_seqlens."""
    assert cu_q.dtype == cu_k.dtype == torch.int32 and int((cu_k[1:] - cu_k[:-1]).max()) == max_k
    return torch.cat([reference_dense(q[cu_q[i]:cu_q[i + 1]][None], k[cu_k[i]:cu_k[i + 1]][None],
                                      v[cu_k[i]:cu_k[i + 1]][None], softmax_scale, causal)[0]
                      for i in range(len(cu_q) - 1)])


def flash_and_sdpa_agree(device: str, dtype: torch.dtype, tolerance: float) -> dict[str, dict[str, int]]:
    """Compress the same prompt on two copies of a tiny model, one on sdpa, one on flash_attention_2; then feed a
    5-token chunk (several queries on a compressed cache) and decode. Returns, per method, the kernel calls made
    on the compressed cache (after the compressing prefill)."""
    sdpa, flashed = (tiny_model("llama").to(device, dtype) for _ in range(2))
    enable_compression(flashed, "flash_attention_2")
    prompt, chunk = random_prompt().to(device), random_prompt(5, seed=3).to(device)
    calls = {}
    for text in METHODS:
        counting = {"dense": 0, "varlen": 0}
        dense, varlen = flash.kernels()

        def counted(kind, kernel, counting=counting):
            def call(*args, **kwargs):
                counting[kind] += 1
                return kernel(*args, **kwargs)
            return call

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(flash, "kernels", lambda dense=dense, varlen=varlen, counting=counting: (
                counted("dense", dense), counted("varlen", varlen)))
            expected = compress(sdpa, parse_spec(text).method, 0.5, prompt)
            got = compress(flashed, parse_spec(text).method, 0.5, prompt)
            assert got.kv_bytes == expected.kv_bytes and got.cache.held_tokens() == expected.cache.held_tokens()
            torch.testing.assert_close(got.logits, expected.logits, atol=tolerance, rtol=tolerance)
            counting.update(dense=0, varlen=0)
            with torch.inference_mode():
                want = sdpa(chunk, **cache_arguments(sdpa, expected.cache)).logits
                have = flashed(chunk, **cache_arguments(flashed, got.cache)).logits
            torch.testing.assert_close(have, want, atol=tolerance, rtol=tolerance)
            if dtype == torch.float32:
                full_prompt = torch.cat([prompt, chunk], 1)
                assert greedy(flashed, full_prompt, got) == greedy(sdpa, full_prompt, expected), text
        calls[text] = dict(counting)
    return calls


def test_flash_path_matches_sdpa_with_reference_kernels(monkeypatch):
    monkeypatch.setattr(flash, "kernels", lambda: (reference_dense, reference_varlen))
    calls = flash_and_sdpa_agree("cpu", torch.float32, 1e-5)
    for text, counted in calls.items():  # packed per-head layers go through varlen, the others through dense
        assert (counted["varlen"] > 0 and counted["dense"] == 0) if text in PER_HEAD else (
            counted["varlen"] == 0 and counted["dense"] > 0), (text, counted)


def test_flash_refuses_padded_batches():
    query = torch.zeros(1, 4, 2, 8)
    with pytest.raises(NotImplementedError, match="padded batches"):
        flash.attend(None, query, query[:, :2], query[:, :2], torch.tensor([[0, 1]]), 1.0)


def test_flash_needs_half_precision(monkeypatch):
    monkeypatch.setattr(checks, "attention", lambda name: None)  # as if flash-attn were installed
    args = SimpleNamespace(model="random:llama-tiny", device="cpu", dtype="auto",
                           attn_implementation="flash_attention_2")
    with pytest.raises(checks.UsageError, match="float16 or bfloat16, not float32"):
        checks.placement(args)


def test_bfloat16_is_the_gpu_default():
    assert parse_dtype("auto", "cuda") == torch.bfloat16 and parse_dtype("auto", "cuda:3") == torch.bfloat16
    assert parse_dtype("auto", "cpu") == torch.float32


class FakeCuda:
    """Per-device allocator counters with torch.cuda's function names: allocated now, peak since the last reset."""

    def __init__(self) -> None:
        self.allocated = {0: 100, 1: 1000}
        self.peak = dict(self.allocated)

    def allocate(self, index: int, size: int) -> None:
        self.allocated[index] += size
        self.peak[index] = max(self.peak[index], self.allocated[index])

    def install(self, monkeypatch) -> None:
        index = lambda device: torch.device(device).index if not isinstance(device, int) else device  # noqa: E731
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                            lambda device: self.peak.__setitem__(index(device), self.allocated[index(device)]))
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: self.allocated[index(device)])
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: self.peak[index(device)])


def test_peak_memory_is_measured_per_device_then_summed(monkeypatch):
    cuda = FakeCuda()
    cuda.install(monkeypatch)
    cuda.allocate(0, 5000)  # before the block: not counted, and the reset forgets it
    with PeakMemory(["cuda:0", "cuda:1", "cuda:0"]) as peak:
        cuda.allocate(0, 300)
        cuda.allocate(0, -300)
        cuda.allocate(1, 70)
    assert peak.per_device == {"cuda:0": 300, "cuda:1": 70}
    assert (peak.peak_bytes, peak.max_device_bytes, peak.kind) == (370, 300, "cuda_peak_allocated_delta")
    assert peak.fields() == {"peak_mem_bytes": 370, "peak_mem_bytes_max_device": 300,
                             "peak_mem_bytes_per_device": {"cuda:0": 300, "cuda:1": 70},
                             "peak_mem_kind": "cuda_peak_allocated_delta"}
    with PeakMemory("cuda:1") as again:  # a new block starts from zero on every device
        cuda.allocate(1, 5)
    assert again.per_device == {"cuda:1": 5}


def test_model_devices_lists_each_device_once_in_order():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2, device="meta"), torch.nn.Linear(2, 2))
    assert model_devices(model) == [torch.device("cpu"), torch.device("meta")]


def test_device_map_on_a_cpu_machine_runs_and_records_memory_per_device(tmp_path):
    args = ["run", "--model", "random:llama-tiny", "--tasks", "perplexity", "--lengths", "256", "--max-samples", "1",
            "--methods", "adakv", "--budget", "0.5", "--device-map", "auto", "--results-dir", str(tmp_path),
            "--reports-dir", str(tmp_path / "reports"), "--run-id", "mapped"]
    assert cli.main(args) == 0
    rows = list(read_rows(tmp_path / "mapped" / "results.jsonl"))
    assert len(rows) == 4 and all(row["status"] == "ok" for row in rows)
    for row in rows:
        assert list(row["peak_mem_bytes_per_device"]) == ["cpu"]
        assert row["peak_mem_bytes"] == sum(row["peak_mem_bytes_per_device"].values())
        assert row["peak_mem_bytes_max_device"] == max(row["peak_mem_bytes_per_device"].values())
    assert "device map auto" in json.loads((tmp_path / "mapped" / "run.json").read_text())["device"]


def test_gpu_check_dry_run_exercises_every_step(tmp_path):
    out = tmp_path / "check"
    env = os.environ | {"DRY_RUN": "1", "GPU_TESTS": str(ROOT / "tests/core/test_gpu.py")}
    result = subprocess.run(["bash", str(ROOT / "scripts/gpu-check.sh"), str(out)], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = (out / "steps.log").read_text()
    for line in ("gpu tests: ok", "prepare methods: ok", "bench sdpa: ok", "summary: ok", "total: "):
        assert line in steps, steps
    assert "bench flash_attention_2: skipped, flash-attn is not installed" in steps
    assert "skipped" in (out / "gpu-tests.txt").read_text() and (out / "gpu-tests.xml").is_file()
    records = json.loads((out / "summary.json").read_text())
    found = {(r["tokens"], r["method"].split(":")[0], r["budget"]) for r in records}
    assert found == {(tokens, method, budget) for tokens in (128, 256) for method, budget in
                     [("full", 1.0)] + [(m, b) for m in ("snapkv", "palu", "dynakv") for b in (0.5, 0.1)]}
    for record in records:
        weights_free_limit = 1 / record["achieved_budget"]  # the limit can only be reached with no weights
        assert 1.0 <= record["limit"] <= weights_free_limit + 1e-9
        assert record["limit"] == pytest.approx(1.0) if record["method"] == "full" else record["limit"] > 1.0
    assert "| 256 | dynakv | 0.1 |" in (out / "summary.md").read_text()
    assert (out / "results" / "bench-sdpa" / "results.jsonl").is_file()
    assert (out / "reports" / "bench-sdpa" / "report.md").is_file()


@pytest.mark.gpu
def test_flash_attention_matches_sdpa_on_gpu():
    pytest.importorskip("flash_attn")
    calls = flash_and_sdpa_agree("cuda", torch.bfloat16, 5e-2)
    assert all(calls[text]["varlen"] > 0 and calls[text]["dense"] == 0 for text in PER_HEAD)


@pytest.mark.gpu
def test_cuda_peak_memory_is_reset_per_cell():
    device = torch.device("cuda")
    with PeakMemory(device) as big:
        block = torch.empty(64 << 20, dtype=torch.uint8, device=device)
        del block
    with PeakMemory(device) as small:
        block = torch.empty(1 << 20, dtype=torch.uint8, device=device)
        del block
    assert big.peak_bytes >= 64 << 20 and (1 << 20) <= small.peak_bytes < 64 << 20
    assert small.kind == "cuda_peak_allocated_delta" and list(small.per_device) == ["cuda:0"]


@pytest.mark.gpu
def test_gpu_run_defaults_to_bfloat16_and_measures_cuda_memory(tmp_path):
    args = ["run", "--model", "random:llama-tiny", "--tasks", "perplexity", "--lengths", "256", "--max-samples", "1",
            "--methods", "snapkv,adakv", "--budget", "0.5", "--device", "cuda", "--results-dir", str(tmp_path),
            "--reports-dir", str(tmp_path / "reports"), "--run-id", "gpu"]
    assert cli.main(args) == 0
    rows = list(read_rows(tmp_path / "gpu" / "results.jsonl"))
    assert rows and all(r["status"] == "ok" and r["dtype"] == "bfloat16" for r in rows)
    assert all(r["peak_mem_kind"] == "cuda_peak_allocated_delta" and r["peak_mem_bytes"] > 0 for r in rows)


@pytest.mark.gpu
def test_device_map_keeps_each_layers_cache_on_that_layers_device():
    from kvbench.models import resolve
    from kvbench.runner import load_prepared

    model, tokenizer = load_prepared(resolve("random:llama-tiny"), "cuda", torch.bfloat16, "sdpa",
                                     [parse_spec("adakv"), parse_spec("snapkv")], device_map="balanced")
    assert model_devices(model)[0].type == "cuda"
    prompt = random_prompt(300).to(model.device)
    for text in ("adakv", "snapkv"):
        compressed = compress(model, parse_spec(text).method, 0.5, prompt, tokenizer=tokenizer)
        for layer, decoder in zip(compressed.cache.layers, model.model.layers, strict=True):
            weight = decoder.self_attn.k_proj.weight.device
            assert all(t.device == weight for t in layer.tensors()), (text, weight)
