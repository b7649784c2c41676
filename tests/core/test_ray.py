"""The Ray executor on a local cluster of 2 CPUs with the tiny random model: the same rows as a serial run, Ctrl-C
keeps what finished, and a worker killed with SIGKILL mid-run loses nothing."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from kvbench import cli
from kvbench.results import CELL_KEY, ResultsStore, read_rows

ray = pytest.importorskip("ray")

# 2 samples x (full + 2 methods) = 6 cells; perplexity cells need no decoding, so are quick.
COMPARED = ("score", "kv_bytes", "full_kv_bytes", "achieved_budget", "final_kv_bytes", "context_tokens", "status",
            "prediction", "scored_tokens")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=100 << 20)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def run_args(tmp_path, run_id: str, *extra: str) -> list[str]:
    return ["run", "--model", "random:llama-tiny", "--tasks", "perplexity", "--lengths", "256", "--max-samples", "1",
            "--methods", "knorm,snapkv", "--budget", "0.5", "--results-dir", str(tmp_path / "results"),
            "--reports-dir", str(tmp_path / "reports"), "--run-id", run_id, *extra]


def by_cell(path) -> dict[tuple, dict]:
    rows = list(read_rows(path))
    keys = [tuple(row[k] for k in CELL_KEY) for row in rows]
    assert len(keys) == len(set(keys)), "a cell was written twice"
    return dict(zip(keys, rows, strict=True))


def test_ray_run_equals_serial_after_ctrl_c_and_a_killed_worker(tmp_path, cluster, monkeypatch, capsys):
    """One story, to start Ray actors as few times as possible: a Ray run is interrupted (Ctrl-C on the driver) after
    its second row and keeps its rows; it is resumed by a driver that joins the cluster (--ray-address), one of whose
    two workers is frozen (SIGSTOP) as soon as it is ready and SIGKILLed once the other has run every other cell. Its
    cell goes to another worker and the run completes: every cell once, with the serial run's scores and bytes."""
    assert cli.main(run_args(tmp_path, "serial")) == 0
    serial = by_cell(tmp_path / "results" / "serial" / "results.jsonl")
    assert len(serial) == 6

    append = ResultsStore.append

    def interrupted(store, row):
        append(store, row)
        if len(list(read_rows(store.results_path))) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ResultsStore, "append", interrupted)
    assert cli.main(run_args(tmp_path, "ray", "--executor", "ray", "--workers", "2")) == 130
    monkeypatch.setattr(ResultsStore, "append", append)
    results = tmp_path / "results" / "ray" / "results.jsonl"
    assert len(by_cell(results)) == 2
    assert "interrupted; finished cells are saved" in capsys.readouterr().err

    args = run_args(tmp_path, "ray", "--executor", "ray", "--workers", "2", "--ray-address", cluster)
    driver = subprocess.Popen([sys.executable, "-m", "kvbench", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    seen: list[str] = []
    for line in driver.stdout:  # the first worker ready is frozen at once, before it can finish the cells it is given
        seen.append(line)
        if ready := re.search(r"Ray worker \d+ ready: pid (\d+)", line):
            frozen = int(ready.group(1))
            os.kill(frozen, signal.SIGSTOP)
            break
    deadline = time.monotonic() + 120  # the other worker runs every cell but the frozen one's
    while time.monotonic() < deadline and len(list(read_rows(results, warn=False))) < 5:
        time.sleep(0.05)
    assert len(list(read_rows(results, warn=False))) == 5, "the frozen worker should hold the one cell left"
    os.kill(frozen, signal.SIGKILL)
    rest = "".join(seen) + driver.stdout.read()
    assert driver.wait(timeout=180) == 0, rest
    assert "6 cells, 2 already done, 4 to run" in rest
    assert re.search(r"Ray worker \d died", rest), rest
    distributed = by_cell(results)
    assert distributed.keys() == serial.keys()
    for key, row in serial.items():
        assert {f: distributed[key].get(f) for f in COMPARED} == {f: row.get(f) for f in COMPARED}, key
