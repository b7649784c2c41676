"""The runner on a tiny random model: rows, resume, failures, kills. The tokenizer is the embedded model's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import ClassVar

import pytest

from kvbench import cli
from kvbench.methods import TokenMethod
from kvbench.registry import METHODS
from kvbench.results import CELL_KEY, ROW_FIELDS, read_rows


def run_args(tmp_path, *extra: str, run_id: str = "r1") -> list[str]:
    return ["run", "--model", "random:llama-tiny", "--tasks", "niah", "--lengths", "300", "--depths", "0.5",
            "--results-dir", str(tmp_path / "results"), "--reports-dir", str(tmp_path / "reports"),
            "--run-id", run_id, *extra]


def rows(tmp_path, run_id="r1") -> list[dict]:
    return list(read_rows(tmp_path / "results" / run_id / "results.jsonl"))


def test_rows_have_every_field_and_real_bytes(tmp_path):
    args = run_args(tmp_path, "--methods", "snapkv,knorm", "--budget", "0.5,0.25", "--query-aware", "--query-agnostic")
    assert cli.main(args) == 0
    found = rows(tmp_path)
    assert len(found) == 2 * (1 + 2 * 2)  # modes x (full + methods x budgets)
    for row in found:
        assert set(ROW_FIELDS) <= set(row) and row["status"] == "ok", row.get("error")
        assert row["quality_meaningful"] is False
        assert 0 < row["kv_bytes"] <= row["full_kv_bytes"]
        assert row["achieved_budget"] == pytest.approx(row["kv_bytes"] / row["full_kv_bytes"])
        assert row["achieved_budget"] <= row["budget"] + 0.01
        assert row["achieved_budget"] >= row["budget"] - 0.01  # within one token per head at ~300 tokens
        assert row["context_tokens"] > 250 and row["decode_tokens"] >= 0 and row["prefill_s"] > 0
        assert row["peak_mem_kind"] in ("cpu_peak_rss_delta", "unavailable")
    aware = [r for r in found if r["query_aware"] and r["method"] != "full"]
    agnostic = [r for r in found if not r["query_aware"] and r["method"] != "full"]
    assert min(r["full_kv_bytes"] for r in aware) > max(r["full_kv_bytes"] for r in agnostic)  # question compressed too
    meta = json.loads((tmp_path / "results" / "r1" / "run.json").read_text())
    assert {"command", "git_commit", "versions", "device", "seed", "started"} <= set(meta)
    report = (tmp_path / "reports" / "r1" / "report.md").read_text()
    assert "snapkv" in report and "random weights" in report.lower()


def test_resume_skips_done_cells_and_never_rewrites(tmp_path, capsys):
    assert cli.main(run_args(tmp_path, "--methods", "knorm", "--budget", "0.5")) == 0
    before = (tmp_path / "results" / "r1" / "results.jsonl").read_bytes()
    assert cli.main(run_args(tmp_path, "--methods", "knorm", "--budget", "0.5")) == 0
    assert (tmp_path / "results" / "r1" / "results.jsonl").read_bytes() == before
    assert "2 cells, 2 already done, 0 to run" in capsys.readouterr().out
    assert cli.main(run_args(tmp_path, "--methods", "knorm", "--budget", "0.5,0.25")) == 0
    after = (tmp_path / "results" / "r1" / "results.jsonl").read_bytes()
    assert after.startswith(before) and len(rows(tmp_path)) == 3


def test_torn_last_line_is_skipped_and_its_cell_rerun(tmp_path):
    assert cli.main(run_args(tmp_path, "--methods", "knorm", "--budget", "0.5")) == 0
    path = tmp_path / "results" / "r1" / "results.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + lines[1][: len(lines[1]) // 2])  # a kill in the middle of a write
    assert len(rows(tmp_path)) == 1
    assert cli.main(run_args(tmp_path, "--methods", "knorm", "--budget", "0.5")) == 0
    keys = [tuple(str(r[k]) for k in CELL_KEY) for r in rows(tmp_path)]
    assert len(keys) == 2 == len(set(keys))


@dataclass
class Exploding(TokenMethod):
    name: ClassVar[str] = "exploding"
    summary: ClassVar[str] = "fails at budgets below 0.5, for tests"

    def score(self, inputs):
        raise RuntimeError("boom")


def test_failing_cell_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(METHODS, "_registered", {})
    METHODS.register(Exploding)
    assert cli.main(run_args(tmp_path, "--methods", "exploding,knorm", "--budget", "0.25")) == 0
    by_method = {r["method"]: r for r in rows(tmp_path)}
    assert by_method["exploding"]["status"] == "error"
    assert by_method["exploding"]["error"] == "RuntimeError: boom"
    assert by_method["knorm"]["status"] == "ok"
    assert "RuntimeError: boom" in (tmp_path / "reports" / "r1" / "report.md").read_text()
    assert cli.main(run_args(tmp_path, "--methods", "exploding,knorm", "--budget", "0.25")) == 0
    assert len(rows(tmp_path)) == 3  # errors are not retried unless asked
    assert cli.main(run_args(tmp_path, "--methods", "exploding,knorm", "--budget", "0.25", "--retry-errors")) == 0
    assert [r["method"] for r in rows(tmp_path)][3:] == ["exploding"]


def test_resume_with_another_seed_is_refused(tmp_path, capsys):
    assert cli.main(run_args(tmp_path, "--methods", "knorm", "--budget", "0.5")) == 0
    assert cli.main(run_args(tmp_path, "--methods", "knorm", "--budget", "0.5", "--seed", "7")) == 2
    assert "made with seed 0, not 7" in capsys.readouterr().err


def test_sigkill_loses_at_most_the_cell_in_flight(tmp_path):
    args = run_args(tmp_path, "--methods", "snapkv,knorm,streamingllm,random", "--budget", "0.5,0.25,0.1")
    args[args.index("--lengths") + 1] = "600,800"
    args[args.index("--depths") + 1] = "0,0.5,1"
    results = tmp_path / "results" / "r1" / "results.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "kvbench", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(rows(tmp_path)) < 5:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = results.read_bytes()
    assert 5 <= len(rows(tmp_path)) < 6 * 13
    assert cli.main(args) == 0
    assert results.read_bytes().startswith(saved.rpartition(b"\n")[0])
    keys = [tuple(str(r[k]) for k in CELL_KEY) for r in rows(tmp_path)]
    assert len(keys) == len(set(keys)) == 6 * 13  # samples x (full + 4 methods x 3 budgets)


def test_local_hugging_face_model_path(tmp_path):
    """A saved Hugging Face model directory loads through AutoModelForCausalLM, like a hub id would."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kvbench.models import EMBEDDED, _converted

    tokenizer = AutoTokenizer.from_pretrained(_converted(EMBEDDED["smollm2-135m"]))
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    model.save_pretrained(tmp_path / "my-model")
    tokenizer.save_pretrained(tmp_path / "my-model")
    args = run_args(tmp_path, "--methods", "snapkv", "--budget", "0.5")
    args[args.index("random:llama-tiny")] = str(tmp_path / "my-model")
    assert cli.main(args) == 0
    found = rows(tmp_path)
    assert [r["status"] for r in found] == ["ok", "ok"] and found[0]["model"] == str(tmp_path / "my-model")
    assert found[1]["achieved_budget"] == pytest.approx(0.5, abs=0.01)
