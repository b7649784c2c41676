"""The results store: one writer per file, reading that survives any content, resume that refuses mixtures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvbench.results import ResultsStore, StoreError, load_results, read_rows

ROW = {"model": "m", "method": "snapkv", "budget": 0.5, "task": "niah", "sample_id": "s1", "query_aware": True,
       "status": "ok", "score": 100.0}


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    with ResultsStore(tmp_path / "run") as first:
        first.open({"settings": {"seed": 0}})
        with pytest.raises(StoreError, match=r"results.jsonl is being written by kvbench pid \d+"):
            ResultsStore(tmp_path / "run").open({"settings": {"seed": 0}})
        ResultsStore(tmp_path / "run", shard="1-of-2").open({"settings": {"seed": 0}})  # a shard has its own file
    with ResultsStore(tmp_path / "run") as again:  # released on close
        again.open({"settings": {"seed": 0}})


def test_the_lock_is_released_when_the_holder_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from kvbench.results import ResultsStore; "
        f"s = ResultsStore(__import__('pathlib').Path({str(tmp_path / 'run')!r})); s.open({{}}); "
        "print('locked', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(StoreError):
        ResultsStore(tmp_path / "run").open({})
    holder.kill()
    holder.wait()
    with ResultsStore(tmp_path / "run") as store:
        store.open({})


@pytest.mark.parametrize("bad", [b"[1,2]", b"null", b"{}", b'{"model": "m"}', b"\xff\xfe not utf-8",
                                 json.dumps(ROW | {"budget": True}).encode(), '{"model": "caf\u00e9'.encode()[:-1]])
def test_malformed_lines_are_skipped_with_one_warning_and_rerun(tmp_path, capsys, bad):
    path = tmp_path / "results.jsonl"
    path.write_bytes(json.dumps(ROW).encode() + b"\n" + bad + b"\n" + json.dumps(ROW | {"sample_id": "s2"}).encode())
    rows = list(read_rows(path))
    assert [r["sample_id"] for r in rows] == ["s1", "s2"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "skipped 1 line(s)" in err and "line 2" in err
    assert len(load_results(tmp_path)) == 2


def test_resume_with_other_settings_is_refused_and_grid_growth_is_recorded(tmp_path):
    meta = {"command": "first", "settings": {"seed": 0, "dtype": "float32", "task_versions": {"niah": "1"}}}
    with ResultsStore(tmp_path) as store:
        store.open(meta | {"methods": ["snapkv"]}, {"methods": ["snapkv"], "budgets": [0.5]})
    for changed, word in [({"dtype": "bfloat16"}, "dtype 'float32', not 'bfloat16'"),
                          ({"task_versions": {"niah": "2"}}, "task version '1'")]:
        with ResultsStore(tmp_path) as store, pytest.raises(StoreError, match=word):
            store.open(meta | {"settings": meta["settings"] | changed}, {})
    with ResultsStore(tmp_path) as store:
        store.open(meta, {"methods": ["snapkv", "knorm"], "budgets": [0.5, 0.1]})
    last = json.loads((tmp_path / "invocations.jsonl").read_text().splitlines()[-1])
    assert last["added"] == {"methods": ["knorm"], "budgets": [0.1]}


def test_run_json_that_is_not_an_object_is_one_line(tmp_path):
    (tmp_path / "run.json").write_text("[1, 2]")
    with ResultsStore(tmp_path) as store, pytest.raises(StoreError, match="run.json is not a kvbench run"):
        store.open({})
