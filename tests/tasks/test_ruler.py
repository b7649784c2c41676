"""RULER-style tasks on the embedded tokenizer: lengths, answers in the context, determinism, scoring, data split."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pytest

from kvbench import cli
from kvbench.results import read_rows
from kvbench.tasks import ruler, ruler_sources
from kvbench.tasks.base import Sample, TaskConfig
from kvbench.tasks.ruler import Ruler

LENGTHS = (900, 1500)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from kvbench.models import EMBEDDED, _converted

    return AutoTokenizer.from_pretrained(_converted(EMBEDDED["smollm2-135m"]))


@pytest.fixture(scope="module")
def samples(tokenizer) -> list[Sample]:
    return list(Ruler().samples(tokenizer, TaskConfig(LENGTHS, (), 2, 0)))


def tokens(tokenizer, s: Sample) -> int:
    return len(tokenizer(s.context + s.question + s.answer_prefix, add_special_tokens=False).input_ids)


def test_every_subtask_fills_each_length_without_exceeding_it(tokenizer, samples):
    assert Counter(s.metadata["subtask"] for s in samples) == dict.fromkeys(ruler.SUBTASKS, 2 * len(LENGTHS))
    for s in samples:
        budget = s.metadata["length"] - s.max_new_tokens
        n = tokens(tokenizer, s)
        assert n == s.metadata["prompt_tokens"] <= budget, s.sample_id
        # grown to (about) the largest haystack that fits: within a unit or two (line, paragraph) of the budget
        slack = {"qa_1": 400, "qa_2": 400, "niah_multikey_3": 150}.get(s.metadata["subtask"], 80)
        assert n > budget - slack, s.sample_id
        assert s.task == f"ruler/{s.metadata['subtask']}" and s.verbatim and s.answer_prefix


def test_gold_answers_are_in_the_context(samples):
    for s in samples:
        sub = s.metadata["subtask"]
        if sub == "fwe":
            words = Counter(s.context.split())
            top = [w for w, _ in words.most_common() if w not in ("...",) and re.fullmatch(r"[a-z]{6}", w)][:3]
            assert top == list(s.answers)
            assert words["..."] > words[s.answers[0]]  # the noise word is the most frequent
        elif sub == "cwe":
            listed = Counter(re.findall(r"\d+\. (\S+)", s.context.split(ruler.CWE_PREFIX)[-1]))
            assert {w for w, _ in listed.most_common(10)} == set(s.answers) and len(s.answers) == 10
        else:
            for answer in s.answers:
                assert answer in s.context, (s.sample_id, answer)


def test_niah_variants_follow_ruler_definitions(samples):
    first = {s.metadata["subtask"]: s for s in samples}
    assert first["niah_single_1"].context.count(ruler.NOISE) > 10
    assert first["niah_single_1"].question.startswith("\nWhat is the special magic number for")
    assert re.fullmatch(r"[0-9a-f-]{36}", first["niah_single_3"].answers[0])
    multikey = first["niah_multikey_1"]
    assert multikey.context.count("One of the special magic numbers for") == 4 and len(multikey.answers) == 1
    assert first["niah_multikey_2"].context.count("One of the special magic numbers") > 20  # haystack of needles
    assert len(first["niah_multivalue"].answers) == 4 and "What are all" in first["niah_multivalue"].question
    query = first["niah_multiquery"].question
    assert len(first["niah_multiquery"].answers) == 4 and query.count(", ") == 3 and ", and " in query
    vt = first["vt"]
    value = re.search(r"assigned the value (\d+)", vt.question).group(1)
    chain = vt.context.split(ruler.VT_INTRO)[-1]
    assert f"VAR {vt.answers[0]} = {value}" in chain
    positions = [chain.index(f"VAR {b} = VAR {a}") for a, b in zip(vt.answers, vt.answers[1:], strict=False)]
    assert positions == sorted(positions) and vt.context.count(ruler.VT_INTRO) == 2  # one worked example


def test_same_config_same_samples_and_seed_changes_them(tokenizer, samples):
    config = TaskConfig(LENGTHS, (), 2, 0, subtasks={"ruler": ("niah_single_2", "qa_2")})
    again = Ruler().samples(tokenizer, config)
    assert list(again) == [s for s in samples if s.metadata["subtask"] in ("niah_single_2", "qa_2")]
    other = Ruler().samples(tokenizer, TaskConfig(LENGTHS, (), 2, 1, subtasks={"ruler": ("niah_single_2",)}))
    assert [s.answers for s in other] != [s.answers for s in again if s.metadata["subtask"] == "niah_single_2"]
    qa = [s for s in samples if s.metadata["subtask"] == "qa_1"]
    assert qa[0].metadata["question_index"] == qa[2].metadata["question_index"]  # same question at every length


def test_scoring_is_rulers_string_match():
    assert ruler.string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(200 / 3)
    assert ruler.string_match_all("ABC-def", ["abc-DEF"]) == 100.0
    assert ruler.string_match_part("It was Paris, I think", ["London", "paris"]) == 100.0
    assert ruler.string_match_part("no", ["London", "Paris"]) == 0.0
    s = Sample("x", "", "", ("a1", "b2"), 8, metric="string_match_all")
    assert Ruler().score("a1", s) == 50.0


def test_qa_1_never_reads_calibration_articles(samples):
    evaluation, calibration = ruler_sources.evaluation_squad_titles(), ruler_sources.calibration_squad_titles()
    assert len(calibration) == 6 and len(evaluation) == 29 and not evaluation & calibration
    articles = ruler_sources.squad_articles()
    held_out = {p["context"] for a in articles if a["title"] in calibration for p in a["paragraphs"]}
    for s in samples:
        if s.metadata["subtask"] == "qa_1":
            assert not any(p in s.context for p in held_out)


def test_cli_runs_ruler_subtasks(tmp_path, capsys):
    args = ["run", "--model", "random:llama-tiny", "--methods", "snapkv", "--budget", "0.5", "--no-reference",
            "--tasks", "ruler:niah_single_1,vt", "--lengths", "600", "--max-samples", "1",
            "--results-dir", str(tmp_path / "results"), "--reports-dir", str(tmp_path / "reports"), "--run-id", "r"]
    assert cli.main(args) == 0
    rows = list(read_rows(tmp_path / "results" / "r" / "results.jsonl"))
    assert sorted(r["task"] for r in rows) == ["ruler/niah_single_1", "ruler/vt"]
    assert all(r["status"] == "ok" and r["metric"] == "string_match_all" for r in rows)
    assert cli.main([*args[:-2], "--run-id", "r2", "--tasks", "ruler:nope"]) == 2
    assert "unknown ruler subtask 'nope'" in capsys.readouterr().err
