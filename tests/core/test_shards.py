"""Shards: the partition (complete, disjoint, balanced, stable), where the shard comes from, and sharded runs on a tiny
random model (one file per shard, read as one run; a killed shard resumes without loss or duplicates)."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from kvbench import cli
from kvbench.results import CELL_KEY, ResultsStore, StoreError, load_results, read_rows, result_files
from kvbench.shards import Shard, assign, from_environment, local_device, parse, resolve, select


def grid(samples: int, methods: int, budgets: int, modes: int = 1) -> list[tuple]:
    keys = [("m", "full", 1.0, "niah", f"s{s}", True) for s in range(samples)]
    keys += [("m", f"method{m}", b / 10, "niah", f"s{s}", q == 0)
             for s, m, b, q in itertools.product(range(samples), range(methods), range(1, budgets + 1), range(modes))]
    return keys


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 4, 3, 2), (7, 2, 5), (40, 12, 5, 2)])
@pytest.mark.parametrize("count", [2, 3, 8, 64])
def test_partition_is_complete_disjoint_and_balanced(shape, count):
    keys = grid(*shape)
    owners = assign(keys, count)
    parts = [[k for k in keys if owners[k] == i] for i in range(count)]
    assert parts[1] == [k for k, mine in zip(keys, select(keys, Shard(1, count)), strict=True) if mine]
    assert sorted(k for part in parts for k in part) == sorted(keys)  # every cell once: complete and disjoint
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1
    per_sample = Counter((k[4], i) for i, part in enumerate(parts) for k in part)
    cells_per_sample = len(keys) // shape[0]
    for (sample, _), n in per_sample.items():  # each shard gets its like share of every sample (of its length)
        assert n <= -(-cells_per_sample // count) + 1, (sample, n)


def test_partition_depends_on_the_set_of_cells_only_and_is_pinned():
    keys = grid(5, 3, 2)
    shuffled = keys[:]
    random.Random(1).shuffle(shuffled)
    assert assign(keys, 4) == assign(shuffled, 4) == assign(keys + keys[:3], 4)
    # Pinned: a new kvbench must put the cells of a half-finished run in the same shards as the old one did.
    assert [assign(keys, 4)[k] for k in keys[:8]] == [3, 3, 1, 1, 1, 0, 1, 0]
    # no method is tied to a shard: over many samples, each shard runs a like share of every method
    many = grid(40, 3, 2)
    owners = assign(many, 2)
    for method in ("full", "method0", "method1", "method2"):
        shares = Counter(owners[k] for k in many if k[1] == method)
        assert 0.3 < shares[0] / (shares[0] + shares[1]) < 0.7, (method, shares)


@pytest.mark.parametrize("text, message", [
    ("3/2", "does not exist: the index runs from 0 to 1"), ("2/2", "runs from 0 to 1"), ("1/0", "at least 1"),
    ("x", "--shard must be i/n"), ("-1/2", "--shard must be i/n"), ("1/2/3", "--shard must be i/n"),
])
def test_bad_shard_is_one_line(text, message):
    with pytest.raises(ValueError, match=message):
        parse(text)


def test_shard_from_slurm_array_torchrun_or_both():
    assert parse(" 1/4 ") == Shard(1, 4)
    assert resolve(None, {}) is None and resolve("0/1", {}) is None  # one part is no sharding
    slurm = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "5"}
    assert from_environment(slurm) == Shard(2, 4, "SLURM array")  # --array=5-8 counts from its first task
    stepped = {"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0",
               "SLURM_ARRAY_TASK_STEP": "2"}
    assert from_environment(stepped) == Shard(3, 4, "SLURM array")
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}
    assert from_environment(torchrun) == Shard(3, 8, "torchrun")
    assert from_environment(slurm | torchrun) == Shard(2 * 8 + 3, 32, "SLURM array x torchrun")
    assert from_environment({"RANK": "0", "WORLD_SIZE": "1"}) is None
    assert resolve("1/2", torchrun) == Shard(1, 2)  # --shard wins over the environment
    with pytest.raises(ValueError, match="WORLD_SIZE='eight' is not a whole number"):
        from_environment({"RANK": "0", "WORLD_SIZE": "eight"})
    with pytest.raises(ValueError, match="puts this process at 9 of 4 parts"):
        from_environment({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "4"})


def test_local_rank_picks_the_gpu():
    assert local_device("cuda", {"LOCAL_RANK": "5"}) == "cuda:5"
    assert local_device("cuda:1", {"LOCAL_RANK": "5"}) == "cuda:1"  # an explicit index is kept
    assert local_device("cpu", {"LOCAL_RANK": "5"}) == "cpu"
    assert local_device(None, {}) is None


def test_two_writers_of_one_shard_are_refused_and_shards_do_not_share_files(tmp_path):
    with ResultsStore(tmp_path, shard="0-of-2") as first, ResultsStore(tmp_path, shard="1-of-2") as second:
        first.open({"settings": {"seed": 0}})
        second.open({"settings": {"seed": 0}})  # another shard: its own file and lock
        assert first.results_path != second.results_path
        with pytest.raises(StoreError, match=r"results-0-of-2\.jsonl is being written by kvbench pid"):
            ResultsStore(tmp_path, shard="0-of-2").open({"settings": {"seed": 0}})
    assert json.loads((tmp_path / "run.json").read_text()) == {"settings": {"seed": 0}}


# A grid of 2 samples x (full + 2 methods x 2 budgets) = 10 cells; perplexity cells need no decoding, so are quick.
def run_args(tmp_path, *extra: str, run_id: str = "sharded") -> list[str]:
    return ["run", "--model", "random:llama-tiny", "--tasks", "perplexity", "--lengths", "256", "--max-samples", "1",
            "--methods", "knorm,streamingllm", "--budget", "0.5,0.25", "--results-dir", str(tmp_path / "results"),
            "--reports-dir", str(tmp_path / "reports"), "--run-id", run_id, *extra]


def keys_of(rows) -> list[tuple]:
    return [tuple(row[k] for k in CELL_KEY) for row in rows]


def test_a_shard_a_serial_resume_and_a_torchrun_shard_make_one_consistent_run(tmp_path, monkeypatch, capsys):
    assert cli.main(run_args(tmp_path, "--shard", "0/2")) == 0
    out = capsys.readouterr().out
    assert "10 cells | shard 0/2 (--shard): 5 of them, 0 already done, 5 to run" in out
    assert "when every shard has finished: python -m kvbench report" in out
    assert not (tmp_path / "reports" / "sharded").exists()  # no report from one shard
    assert cli.main(run_args(tmp_path)) == 0  # a serial resume runs the other half only
    assert "10 cells, 5 already done, 5 to run" in capsys.readouterr().out
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(run_args(tmp_path)) == 0  # shard 1 of a torchrun launch: its cells are done already
    assert "shard 1/2 (torchrun): 5 of them, 5 already done, 0 to run" in capsys.readouterr().out
    run = tmp_path / "results" / "sharded"
    assert [p.name for p in result_files(run)] == ["results-0-of-2.jsonl", "results.jsonl"]
    parts = [keys_of(read_rows(p)) for p in result_files(run)]
    assert len(parts[0]) == len(parts[1]) == 5 and not set(parts[0]) & set(parts[1])
    assert len(load_results(run)) == 10
    assert cli.main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    invocations = [json.loads(line) for line in (run / "invocations.jsonl").read_text().splitlines()]
    assert [i["writer"] for i in invocations] == ["results-0-of-2.jsonl", "results.jsonl", "results-1-of-2.jsonl"]


def test_bad_shard_on_the_command_line_is_one_line(tmp_path, capsys):
    assert cli.main(run_args(tmp_path, "--shard", "2/2")) == 2
    assert capsys.readouterr().err == "kvbench: error: shard 2/2 does not exist: the index runs from 0 to 1\n"
    args = run_args(tmp_path, "--shard", "0/2")
    del args[args.index("--run-id"):args.index("--run-id") + 2]
    assert cli.main(args) == 2
    assert "give every shard the same --run-id" in capsys.readouterr().err


def test_killed_shard_resumes_without_loss_or_duplicates_beside_a_running_one(tmp_path):
    """Two shards start together (run.json written once), one is SIGKILLed mid-run and resumed; then a serial run
    over the same run finds nothing left: every cell exactly once, finished rows never rewritten."""
    args = run_args(tmp_path, "--lengths", "256,384", "--budget", "0.5")  # 12 cells, 6 per shard
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    shards = [subprocess.Popen([sys.executable, "-m", "kvbench", *args, "--shard", f"{i}/2"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(2)]
    victim = tmp_path / "results" / "sharded" / "results-0-of-2.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(read_rows(victim, warn=False))) < 2:
        time.sleep(0.05)
    shards[0].send_signal(signal.SIGKILL)
    shards[0].wait()
    saved = victim.read_bytes()
    assert 2 <= len(list(read_rows(victim))) < 6
    assert shards[1].wait(timeout=240) == 0
    assert cli.main([*args, "--shard", "0/2"]) == 0
    assert victim.read_bytes().startswith(saved.rpartition(b"\n")[0])  # appended to, never rewritten
    assert cli.main(args) == 0
    rows = list(load_results(tmp_path / "results" / "sharded").to_dict("records"))
    keys = keys_of(rows)
    assert len(keys) == len(set(keys)) == 12 and all(r["status"] == "ok" for r in rows)
    assert not (tmp_path / "results" / "sharded" / "results.jsonl").exists()  # the serial resume had nothing to do
    assert len(list((tmp_path / "results" / "sharded").glob(".run.json*"))) == 0  # no file left aside
