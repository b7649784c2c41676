"""LongBench: loading the official jsonl format, prompts, middle truncation, chat-template rules, CLI and rows.

The fixture rows in tests/fixtures/longbench/ are hand-written in the official format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvbench import cli
from kvbench.evaluate import encode
from kvbench.results import ROW_FIELDS, read_rows
from kvbench.tasks import longbench, longbench_metrics
from kvbench.tasks.base import DataUnavailable, TaskConfig
from kvbench.tasks.longbench import LongBench

FIXTURES = Path(__file__).parents[1] / "fixtures" / "longbench"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from kvbench.models import EMBEDDED, _converted

    return AutoTokenizer.from_pretrained(_converted(EMBEDDED["smollm2-135m"]))


def config(*subtasks: str, max_prompt_tokens: int | None = None, data_dir: Path = FIXTURES) -> TaskConfig:
    return TaskConfig((), (), None, 0, subtasks={"longbench": subtasks}, data_dir=str(data_dir),
                      max_prompt_tokens=max_prompt_tokens)


def test_prompt_is_the_official_template_split_after_the_context(tokenizer):
    samples = LongBench().samples(tokenizer, config("hotpotqa"))
    row = json.loads((FIXTURES / "hotpotqa.jsonl").read_text().splitlines()[0])
    s = samples[0]
    assert s.context + s.question == longbench.SPECS["hotpotqa"].prompt.format(context=row["context"],
                                                                                input=row["input"])
    assert s.context.endswith(row["context"]) and s.question.endswith(f"Question: {row['input']}\nAnswer:")
    assert (s.task, s.metric, s.max_new_tokens, s.answers) == ("longbench/hotpotqa", "qa_f1", 32, ("1931",))
    assert s.chat_template and s.verbatim and not s.metadata["truncated"]


def test_middle_truncation_keeps_first_and_last_halves(tokenizer):
    full = LongBench().samples(tokenizer, config("hotpotqa"))[0]
    prompt = full.context + full.question
    ids = tokenizer(prompt).input_ids
    short = LongBench().samples(tokenizer, config("hotpotqa", max_prompt_tokens=100))[0]
    expected = tokenizer.decode(ids[:50], skip_special_tokens=True) + tokenizer.decode(ids[-50:],
                                                                                      skip_special_tokens=True)
    assert short.context + short.question == expected
    assert short.metadata["truncated"] and short.metadata["prompt_tokens"] == len(ids) > 100
    assert short.question == full.question  # the question survives, in the last half
    assert len(tokenizer(short.context + short.question).input_ids) <= 102


def test_few_shot_and_code_tasks_skip_the_chat_template(tokenizer):
    trec, lcc = LongBench().samples(tokenizer, config("trec", "lcc"))[::2]
    assert not trec.chat_template and not lcc.chat_template and not lcc.strip_prediction
    head, tail = encode(tokenizer, trec)
    text = tokenizer.decode(head[0]) + tokenizer.decode(tail[0])
    assert text == tokenizer.decode(tokenizer(trec.context + trec.question).input_ids)  # the plain prompt
    assert "<|im_start|>" not in text
    hotpot = LongBench().samples(tokenizer, config("hotpotqa"))[0]
    head, tail = encode(tokenizer, hotpot)
    assert "<|im_start|>user" in tokenizer.decode(head[0])
    assert tokenizer.decode(tail[0]).startswith(hotpot.question)  # no separator or "Answer:" added


def test_longbench_e_rows_carry_their_length_bucket(tokenizer):
    samples = LongBench().samples(tokenizer, config("gov_report_e"))
    assert [s.metadata["length_bucket"] for s in samples] == ["0-4k", "8k+"]
    assert samples[0].task == "longbench/gov_report_e" and samples[0].metric == "rouge_l"
    assert samples[0].max_new_tokens == 512


def test_groups_and_missing_files():
    assert longbench.expand(()) == longbench.ENGLISH and len(longbench.ENGLISH) == 16
    assert longbench.expand(("e",)) == longbench.LONGBENCH_E and len(longbench.LONGBENCH_E) == 13
    assert longbench.expand(("trec", "en"))[0] == "trec"
    with pytest.raises(DataUnavailable, match="not found.*--data-dir"):
        longbench.locate(("hotpotqa", "narrativeqa"), str(FIXTURES))


def test_hub_archive_is_read_from_the_hf_cache(tmp_path, monkeypatch):
    import zipfile

    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("data/trec.jsonl", (FIXTURES / "trec.jsonl").read_text())
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache",
                        lambda repo, name, repo_type: str(archive) if repo == "THUDM/LongBench" else None)
    sources = longbench.locate(("trec",), None, download=False)
    assert sources == {"trec": f"zip:{archive}"}
    assert longbench.read_rows(sources["trec"], "trec")[0]["answers"] == ["Other location"]


def run_args(tmp_path, tasks: str, *extra: str) -> list[str]:
    return ["run", "--model", "random:llama-tiny", "--methods", "knorm", "--budget", "0.5", "--tasks", tasks,
            "--results-dir", str(tmp_path / "results"), "--reports-dir", str(tmp_path / "reports"), "--run-id", "lb",
            *extra]


def test_offline_without_data_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    assert cli.main(run_args(tmp_path, "longbench")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--data-dir" in err and "LongBench" in err
    assert not (tmp_path / "results").exists()  # nothing ran, no model loaded
    assert cli.main(run_args(tmp_path, "longbench:hotpotqa,nosuchtask", "--data-dir", str(FIXTURES))) == 2
    assert "unknown longbench subtask 'nosuchtask'" in capsys.readouterr().err
    assert cli.main(run_args(tmp_path, "longbench", "--data-dir", str(tmp_path / "nowhere"))) == 2


def test_run_writes_one_row_per_sample_with_its_dataset_and_metric(tmp_path):
    tasks = "longbench:hotpotqa,trec,lcc,passage_count,niah"
    args = run_args(tmp_path, tasks, "--data-dir", str(FIXTURES), "--max-prompt-tokens", "120", "--lengths", "300",
                    "--depths", "0.5", "--no-reference")
    assert cli.main(args) == 0
    rows = list(read_rows(tmp_path / "results" / "lb" / "results.jsonl"))
    by_task = {}
    for row in rows:
        assert set(ROW_FIELDS) <= set(row) and row["status"] == "ok", row.get("error")
        assert row["higher_is_better"] is True
        by_task.setdefault(row["task"], []).append(row)
    assert {t: len(r) for t, r in by_task.items()} == {
        "longbench/hotpotqa": 2, "longbench/trec": 2, "longbench/lcc": 1, "longbench/passage_count": 1, "niah": 1}
    assert {r["metric"] for r in by_task["longbench/trec"]} == {"classification"}
    hotpot = by_task["longbench/hotpotqa"][0]
    assert hotpot["sample_meta"]["truncated"] and hotpot["context_tokens"] <= 120 + 40  # + the chat template
    assert not by_task["longbench/lcc"][0]["sample_meta"]["truncated"]
    for row in by_task["longbench/trec"] + by_task["longbench/lcc"]:  # stored score = metric of stored prediction
        dataset = row["sample_meta"]["dataset"]
        answer = json.loads((FIXTURES / f"{dataset}.jsonl").read_text().splitlines()[row["sample_meta"]["row_index"]])
        assert row["score"] == longbench_metrics.score(dataset, row["metric"], row["prediction"], answer["answers"],
                                                       answer["all_classes"] or [])
    meta = json.loads((tmp_path / "results" / "lb" / "run.json").read_text())
    info = meta["task_info"]["longbench"]
    assert info["data_source"]["trec"].endswith("trec.jsonl") and info["max_prompt_tokens"] == 120
    assert info["datasets"]["lcc"] == {"metric": "code_sim", "max_new_tokens": 64, "chat_template": False}
    assert info["deviations"] and meta["task_config"]["subtasks"] == {"longbench": ["hotpotqa", "trec", "lcc",
                                                                                    "passage_count"]}
