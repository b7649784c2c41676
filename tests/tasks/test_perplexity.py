"""Perplexity under compression: windows of held-out text, the runner's perplexity path, and result rows."""

from __future__ import annotations

import math

import pytest
import torch

from kvbench import cli
from kvbench.evaluate import Cell, evaluate_perplexity
from kvbench.models import load, resolve
from kvbench.prefill import prepare
from kvbench.results import ROW_FIELDS, read_rows
from kvbench.spec import parse_spec
from kvbench.tasks.base import TaskConfig
from kvbench.tasks.perplexity import CHUNK_TOKENS, Perplexity


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load(resolve("random:llama-tiny"), "cpu", torch.float32)


def test_windows_hold_the_prefix_length_then_the_chunk(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    samples = Perplexity().samples(tokenizer, TaskConfig((300, 600), (), 2, 0))
    assert [s.sample_id for s in samples][:2] == ["essays-L300-000", "essays-L300-001"] and len(samples) == 8
    for s in samples:
        n_prefix = len(tokenizer(s.context, add_special_tokens=False).input_ids)
        n_chunk = len(tokenizer(s.question, add_special_tokens=False).input_ids)
        assert abs(n_prefix - s.metadata["length"]) <= 3 and abs(n_chunk - CHUNK_TOKENS) <= 3
        assert s.task == f"perplexity/{s.metadata['source']}"
    assert len({s.context[:50] for s in samples if s.metadata["length"] == 300}) == 4  # distinct windows


def prepared(text, model):
    spec = parse_spec(text)
    prepare(spec.method, model, None)
    return spec


def test_full_cache_perplexity_equals_the_plain_forward_and_compression_changes_it(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    sample = Perplexity().samples(tokenizer, TaskConfig((200,), (), 1, 0, subtasks={"perplexity": ("wiki",)}))[0]
    task = Perplexity()
    full = evaluate_perplexity(model, tokenizer, Cell(prepared("full", model), 1.0, task, sample, False), 0)
    prefix = tokenizer(sample.context).input_ids
    chunk = tokenizer(sample.question, add_special_tokens=False).input_ids
    with torch.inference_mode():
        logits = model(torch.tensor([prefix + chunk])).logits[0, len(prefix) - 1:-1]
    expected = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(chunk)).item()
    assert full["nll"] == pytest.approx(expected, rel=1e-4) and full["score"] == pytest.approx(math.exp(expected))
    assert full["scored_tokens"] == len(chunk) and full["achieved_budget"] == 1.0 and full["prediction"] is None
    knorm = evaluate_perplexity(model, tokenizer, Cell(prepared("knorm", model), 0.25, task, sample, False), 0)
    assert knorm["kv_bytes"] < 0.26 * knorm["full_kv_bytes"] and knorm["score"] != pytest.approx(full["score"])


def test_rows_say_lower_is_better(tmp_path):
    args = ["run", "--model", "random:llama-tiny", "--methods", "knorm", "--budget", "0.5", "--tasks",
            "perplexity:essays", "--lengths", "200", "--max-samples", "1", "--results-dir", str(tmp_path / "results"),
            "--reports-dir", str(tmp_path / "reports"), "--run-id", "p"]
    assert cli.main(args) == 0
    rows = list(read_rows(tmp_path / "results" / "p" / "results.jsonl"))
    assert len(rows) == 2 and {r["method"] for r in rows} == {"full", "knorm"}
    for row in rows:
        assert set(ROW_FIELDS) <= set(row) and row["status"] == "ok", row.get("error")
        assert row["metric"] == "perplexity" and row["higher_is_better"] is False and row["score"] > 1
        assert row["task"] == "perplexity/essays" and row["decode_tokens"] == row["scored_tokens"] > 500
