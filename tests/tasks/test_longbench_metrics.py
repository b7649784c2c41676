"""LongBench's metrics on hand-checked examples, and the official per-dataset results of fixture predictions.

tests/fixtures/longbench/pred/ holds predictions in the official pred/<dataset>.jsonl format; the expected results
below were computed by hand from the published metric definitions (derivations in the comments).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kvbench.tasks import longbench_metrics as m
from kvbench.tasks.longbench import SPECS

PRED = Path(__file__).parents[1] / "fixtures" / "longbench" / "pred"


def test_qa_f1_normalises_and_counts_overlap():
    # "the eiffel tower in paris" -> articles dropped -> [eiffel, tower, in, paris]; gold [eiffel, tower]
    # P = 2/4, R = 2/2, F1 = 2 * 0.5 * 1 / 1.5 = 2/3
    assert m.qa_f1("The Eiffel Tower, in Paris!", "Eiffel Tower") == pytest.approx(2 / 3)
    assert m.normalize_answer("  An Apple,  the PIE. ") == "apple pie"
    assert m.qa_f1("", "x") == 0.0
    # repeated tokens count as a multiset: [a1, a1] vs [a1]: overlap 1, P = 1/2, R = 1
    assert m.qa_f1("a1 a1", "a1") == pytest.approx(2 / 3)


def test_rouge_l_is_the_official_library_on_distinct_words():
    # The rouge package counts distinct words: hyp {the, cat, sat, on, mat} (5), ref {the, cat, is, on, mat} (5),
    # LCS words {the, cat, on, mat} (4): P = R = 4/5, F = 0.8
    assert m.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8)
    # hyp 3 words, ref 5 distinct, LCS 3: P = 1, R = 3/5, F = 2 * 0.6 / 1.6 = 0.75
    assert m.rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(0.75)
    assert m.rouge_l("", "anything") == 0.0  # the library raises on an empty text; the official score is 0


def test_classification_reproduces_the_official_matching():
    classes = ["City", "Country", "State", "Other location", "location"]
    assert m.classification("City or Country", "City", classes) == 0.5
    assert m.classification("Other location", "Other location", classes) == 1.0  # "location" is dropped
    assert m.classification("Country", "City", classes) == 0.0
    # The official loop deletes while iterating and so skips the entry after a deleted one: matches
    # [ab, b, abc] for gold abc -> ab deleted, b skipped, abc kept -> 1/2 (a plain filter would give 1.0).
    assert m.classification("abc", "abc", ["ab", "b", "abc"]) == 0.5


def test_retrieval_count_and_code_similarity():
    assert m.retrieval("Paragraph 3 or Paragraph 15", "Paragraph 15") == 0.5
    assert m.retrieval("Paragraph 150", "Paragraph 15") == 0.0
    assert m.retrieval("no idea", "Paragraph 15") == 0.0
    assert m.count("There are 7 unique paragraphs out of 12", "7") == 0.5
    # first line without ` # // is the code line; Indel ratio 2 * 26 / (26 + 30) = 92.86 -> rounded to 93
    assert m.code_similarity("```python\n# note\n    return 2*(width+height)", "    return 2 * (width + height)") \
        == pytest.approx(0.93)
    assert m.code_similarity("\n\nx = 1\n", "x = 1") == 1.0
    assert m.code_similarity("// only comments", "x = 1") == 0.0


def test_score_takes_first_line_and_best_gold():
    assert m.score("trec", "classification", "\n\nCity\nCountry", ["City"], ["City", "Country"]) == 100.0
    assert m.score("hotpotqa", "qa_f1", "Miller", ["Miller v. California", "Miller"], []) == 100.0
    # not a first-line task: the second line counts too
    assert m.score("hotpotqa", "qa_f1", "x\nMiller", ["Miller"], []) == pytest.approx(100 * 2 / 3)


def test_chinese_metrics():
    pytest.importorskip("jieba")
    assert m.retrieval_zh("答案是段落3", "段落3") == 1.0
    assert m.qa_f1_zh("北京。", "北京") == 1.0
    assert m.normalize_zh_answer("Ａ，b c！") == "ａbc"


# dataset -> official result, computed by hand per sample (x 100, then the mean, rounded to 2 decimals)
EXPECTED = {
    # 1931 exact: 1 | [founder, was, edda, lindqvist] vs [edda, lindqvist]: 2/3 | best of 0.5 and 1: 1 | 0
    "hotpotqa": 66.67,
    # first line "Other location": 1 | City and Country match: 1/2 | "\n\nColor" -> "Color": 1 | 0  -> 2.5 / 4
    "trec": 62.5,
    # [15]: 1 | [3, 15]: 1/2 | no number: 0 | [150]: 0  -> 1.5 / 4
    "passage_retrieval_en": 37.5,
    # [2]: 1 | [2, 3]: 1/2
    "passage_count": 75.0,
    # identical line: 1 | 0.93 (see above)
    "lcc": 96.5,
    # first line only: 0.8 | 0.75 (see the ROUGE test)
    "samsum": 77.5,
}


@pytest.mark.parametrize("dataset", sorted(EXPECTED))
def test_official_results_of_fixture_predictions(dataset):
    rows = [json.loads(line) for line in (PRED / f"{dataset}.jsonl").read_text().splitlines()]
    scores = [m.score(dataset, SPECS[dataset].metric, r["pred"], r["answers"], r["all_classes"] or []) for r in rows]
    assert m.official_average(scores) == EXPECTED[dataset]


def test_longbench_e_buckets_of_fixture_predictions():
    rows = [json.loads(line) for line in (PRED / "gov_report_e.jsonl").read_text().splitlines()]
    scores = [m.score("gov_report", "rouge_l", r["pred"], r["answers"], []) for r in rows]
    result = m.official_average_e(scores, [r["length"] for r in rows])
    # length 3000: hyp 5 words all in the 9 distinct reference words: P = 1, R = 5/9, F = 10/14 -> 71.43
    # length 9500: empty prediction -> 0; no row in 4-8k
    assert result["0-4k"] == 71.43 and result["8k+"] == 0.0 and math.isnan(result["4-8k"])
    assert [m.length_bucket(n) for n in (0, 3999, 4000, 7999, 8000)] == ["0-4k", "0-4k", "4-8k", "4-8k", "8k+"]
