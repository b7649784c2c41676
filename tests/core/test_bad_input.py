"""Bad input through the command line: one line on stderr, exit status 2, no model loaded, nothing written.

Every case runs ``kvbench.cli.main`` in-process inside a scratch folder holding broken data files, model folders and
run folders; the folder's files must be the same afterwards. A subprocess test checks which heavy modules a bad
input imports (none for anything but a method spec, which may import torch and never transformers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvbench import cli, models, runner

FIXTURES = Path(__file__).parents[1] / "fixtures" / "longbench"
HOTPOT = json.loads((FIXTURES / "hotpotqa.jsonl").read_text().splitlines()[0])
GOV_E = json.loads((FIXTURES / "gov_report_e.jsonl").read_text().splitlines()[0])
LONG = "x" * 100_000


def _jsonl(*rows: object) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


# Broken copies of LongBench's official files: folder -> (file name, content).
LONGBENCH_FILES = {
    "lb-json": ("hotpotqa.jsonl", _jsonl(HOTPOT, b'{"input": "q", "context": ')),
    "lb-utf8": ("hotpotqa.jsonl", _jsonl(HOTPOT, b'{"input": "caf\xe9", "context": "x", "answers": ["a"]}')),
    "lb-context": ("hotpotqa.jsonl", _jsonl({k: v for k, v in HOTPOT.items() if k != "context"})),
    "lb-context-type": ("hotpotqa.jsonl", _jsonl(HOTPOT | {"context": 42})),
    "lb-input": ("hotpotqa.jsonl", _jsonl({k: v for k, v in HOTPOT.items() if k != "input"})),
    "lb-answers": ("hotpotqa.jsonl", _jsonl(HOTPOT | {"answers": []})),
    "lb-classes": ("hotpotqa.jsonl", _jsonl(HOTPOT | {"all_classes": "City"})),
    "lb-list": ("hotpotqa.jsonl", _jsonl(list(HOTPOT.values()))),
    "lb-empty": ("hotpotqa.jsonl", b""),
    "lb-blank": ("hotpotqa.jsonl", b"\n  \n"),
    "lb-length": ("gov_report_e.jsonl", _jsonl({k: v for k, v in GOV_E.items() if k != "length"})),
}
MODEL_CONFIGS = {"model-json": "{not json", "model-list": "[1, 2]",
                 "model-context": '{"max_position_embeddings": "8k"}'}

RUN = ["run", "--results-dir", "res", "--reports-dir", "rep"]
SNAPKV = [*RUN, "--methods", "snapkv"]


def longbench(folder: str, dataset: str = "hotpotqa") -> list[str]:
    return [*SNAPKV, "--tasks", f"longbench:{dataset}", "--data-dir", folder]


CASES = [
    # LongBench files: checked before the model loads, named by file and line
    ("lb-json", longbench("lb-json"), "lb-json/hotpotqa.jsonl line 2 is not valid JSON"),
    ("lb-utf8", longbench("lb-utf8"), "lb-utf8/hotpotqa.jsonl line 2 is not UTF-8 text"),
    ("lb-context", longbench("lb-context"), "hotpotqa.jsonl line 1 has no 'context' text"),
    ("lb-context-type", longbench("lb-context-type"), "line 1 has a 'context' that is not text"),
    ("lb-input", longbench("lb-input"), "line 1 has no 'input' text"),
    ("lb-answers", longbench("lb-answers"), "line 1 has no 'answers'"),
    ("lb-classes", longbench("lb-classes"), "line 1 has an 'all_classes' that is neither null nor a list"),
    ("lb-list", longbench("lb-list"), "line 1 is a JSON list, not an object"),
    ("lb-empty", longbench("lb-empty"), "lb-empty/hotpotqa.jsonl has no rows"),
    ("lb-blank", longbench("lb-blank"), "lb-blank/hotpotqa.jsonl has no rows"),
    ("lb-length", longbench("lb-length", "gov_report_e"), "line 1 has no whole-number 'length'"),
    ("lb-missing", longbench("lb-empty", "trec"), "LongBench data for trec not found"),
    # paths
    ("results-dir-file", [*SNAPKV, "--results-dir", "a-file"], "--results-dir a-file exists and is not a folder"),
    ("results-dir-proc", [*SNAPKV, "--results-dir", "/proc/kvbench"], "is inside a virtual file system"),
    ("reports-dir-file", [*SNAPKV, "--reports-dir", "a-file"], "--reports-dir a-file exists and is not a folder"),
    ("report-out-file", ["report", "done", "--out", "a-file"], "--out a-file exists and is not a folder"),
    ("report-no-results", ["report", "a-file"], "no results files in: a-file"),
    ("data-dir-file", [*SNAPKV, "--data-dir", "a-file"], "--data-dir a-file is not a folder"),
    ("data-dir-missing", [*SNAPKV, "--data-dir", "nowhere"], "--data-dir nowhere does not exist"),
    ("list-data-dir-file", ["list", "--data-dir", "a-file"], "--data-dir a-file is not a folder"),
    ("model-config-json", [*SNAPKV, "--model", "model-json"], "model-json/config.json is not a readable model config"),
    ("model-config-list", [*SNAPKV, "--model", "model-list"], "holds a JSON list, not an object"),
    ("model-config-context", [*SNAPKV, "--model", "model-context"], "max_position_embeddings must be a positive"),
    ("model-no-config", [*SNAPKV, "--model", "lb-json"], "'lb-json' is a path but has no config.json"),
    ("run-json-list", [*SNAPKV, "--run-id", "listed"], "listed/run.json is not a kvbench run description"),
    ("run-id-escape", [*SNAPKV, "--run-id", "../x"], "--run-id '../x' is not a plain name"),
    ("calibration-dir", [*RUN, "--methods", "palu", "--calibration-data", "lb-json"], "lb-json: no such file"),
    # devices and dtypes
    ("device-spelling", [*SNAPKV, "--device", "cpuzzz"], "--device must be cpu or cuda[:N], got 'cpuzzz'"),
    ("device-index", [*SNAPKV, "--device", "cuda:7"], "--device cuda:7:"),
    ("dtype", [*SNAPKV, "--dtype", "int3"], "unknown dtype 'int3'; valid: auto, float32"),
    # method options out of range, nan and inf included
    ("sink-tokens", [*RUN, "--methods", "streamingllm:sink_tokens=-5"], "needs sink_tokens >= 0, got -5"),
    ("epsilon-nan", [*RUN, "--methods", "expected_attention:epsilon=nan"], "epsilon needs a finite float, got 'nan'"),
    ("epsilon-negative", [*RUN, "--methods", "expected_attention:epsilon=-1"], "needs a finite epsilon >= 0"),
    ("n-sink", [*RUN, "--methods", "expected_attention:n_sink=-1"], "n_sink >= 0"),
    ("future", [*RUN, "--methods", "expected_attention:n_future_positions=0"], "n_future_positions >= 1"),
    ("window", [*RUN, "--methods", "snapkv:window=-1"], "needs window >= 1 and an odd kernel >= 1, got window=-1,"),
    ("kernel-even", [*RUN, "--methods", "snapkv:kernel=4"], "an odd kernel >= 1, got window=32, kernel=4"),
    ("window-inf", [*RUN, "--methods", "snapkv:window=inf"], "option window needs an int, got 'inf'"),
    ("recent-nan", [*RUN, "--methods", "h2o:recent_ratio=nan"], "recent_ratio needs a finite float, got 'nan'"),
    ("recent-range", [*RUN, "--methods", "h2o:recent_ratio=1.5"], "h2o needs 0 <= recent_ratio <= 1"),
    ("chunk", [*RUN, "--methods", "h2o:chunk=0"], "chunk >= 1, got recent_ratio=0.5, chunk=0"),
    ("alpha-range", [*RUN, "--methods", "adakv:alpha=-0.1"], "adakv needs 0 <= alpha <= 1, got -0.1"),
    ("alpha-inf", [*RUN, "--methods", "adakv:alpha=inf"], "alpha needs a finite float, got 'inf'"),
    ("beta", [*RUN, "--methods", "pyramidkv:beta=0"], "pyramidkv needs beta >= 1, got 0"),
    ("palu-rank", [*RUN, "--methods", "palu:rank=-1"], "palu needs group_size >= 1, multiple >= 1 and rank >= 0"),
    ("palu-group", [*RUN, "--methods", "palu:group_size=0"], "got group_size=0"),
    ("interval", [*RUN, "--methods", "knorm:interval=0"], "interval must be >= 1"),
    ("decoding", [*RUN, "--methods", "tova:decoding=maybe"], "option decoding needs a bool (true or false)"),
    ("tokens-nan", [*RUN, "--methods", "dynakv+snapkv:tokens=nan"], "option tokens needs a finite float"),
    ("dynakv-basis", [*RUN, "--methods", "dynakv:basis=mean"], "dynakv basis must be centred or uncentred"),
    # run settings
    ("seed-huge", [*SNAPKV, "--seed", "99999999999999999999999"], "--seed must be in [0, 2**32)"),
    ("seed-negative", [*SNAPKV, "--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
    ("bench-seed", ["bench", "--methods", "snapkv", "--lengths", "100", "--results-dir", "res", "--seed", str(2**32)],
     "--seed must be in [0, 2**32)"),
    ("max-samples", [*SNAPKV, "--max-samples", "0"], "--max-samples must be at least 1, got 0"),
    ("max-prompt-tokens", [*SNAPKV, "--max-prompt-tokens", "1"], "--max-prompt-tokens must be at least 2, got 1"),
    # collisions and silent adjustments
    ("depth-collision", [*SNAPKV, "--depths", "0.5,0.504"], "--depths 0.5 and 0.504 are the same depth in whole"),
    ("niah-length", [*SNAPKV, "--lengths", "1"], "niah needs --lengths of at least 100 tokens"),
    ("ruler-length", [*SNAPKV, "--tasks", "ruler:vt", "--lengths", "500"], "ruler vt need --lengths of at least 600"),
    ("ruler-all-length", [*SNAPKV, "--tasks", "ruler", "--lengths", "900,2000"], "at least 950 tokens"),
    ("perplexity-context", [*SNAPKV, "--tasks", "perplexity", "--lengths", "8000"],
     "--lengths 8000 plus the 512 tokens perplexity adds after it is longer than smollm2-135m's context"),
    ("no-command", [], "the following arguments are required: command (see: python -m kvbench --help)"),
    ("hub-offline", [*SNAPKV, "--model", "nobody/no-such-model"], "'nobody/no-such-model' is not in the local"),
    ("hub-bad-id", [*SNAPKV, "--model", "no body/x y"], "'no body/x y' not found: not an alias"),
    ("calibrate-two", ["calibrate", "palu,dynakv"], "calibrate takes one method spec"),
    # user strings of 100 KB are quoted shortened
    ("long-method", [*RUN, "--methods", LONG], "unknown method 'xxxxxxxx"),
    ("long-task", [*SNAPKV, "--tasks", LONG], "unknown task 'xxxxxxxx"),
    ("long-subtask", [*SNAPKV, "--tasks", "ruler:" + LONG], "unknown ruler subtask 'xxxxxxxx"),
    ("long-option", [*RUN, "--methods", f"snapkv:{LONG}=1"], "unknown option 'xxxxxxxx"),
    ("long-value", [*RUN, "--methods", f"snapkv:window={LONG}"], "option window needs an int"),
    ("long-model", [*SNAPKV, "--model", LONG], "model 'xxxxxxxx"),
    ("long-run-id", [*SNAPKV, "--run-id", LONG], "is not a plain name"),
    ("long-results-dir", [*SNAPKV, "--results-dir", LONG], "is not a usable path (File name too long)"),
    ("long-calibration", [*RUN, "--methods", "palu", "--calibration-data", LONG], "is not a usable path"),
    ("long-seed", [*SNAPKV, "--seed", "9" * 5000], "argument --seed: invalid int value"),
    ("long-argument", [*SNAPKV, LONG], "unrecognized arguments: xxxxxxxx"),
    ("long-command", [LONG], "argument command: invalid choice: 'xxxxxxxx"),
]


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A scratch current folder with broken inputs; loading a model (or its tokenizer) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded for bad input")

    monkeypatch.setattr(models, "load", refuse)
    monkeypatch.setattr(runner, "load", refuse)
    monkeypatch.setattr(runner, "load_tokenizer", refuse, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a folder\n")
    for folder, (name, content) in LONGBENCH_FILES.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes(content)
    for folder, config in MODEL_CONFIGS.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text(config)
    (tmp_path / "res" / "listed").mkdir(parents=True)
    (tmp_path / "res" / "listed" / "run.json").write_text("[1, 2]")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "results.jsonl").write_text(json.dumps(
        {"model": "m", "method": "full", "budget": 1.0, "task": "niah", "sample_id": "s", "query_aware": True}) + "\n")
    return tmp_path


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize(("argv", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(workdir, capsys, argv, message):
    before = tree(workdir)
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("kvbench: error: "), err[:500]
    assert message in err
    assert len(err) < 700  # user strings are quoted shortened
    assert out == ""
    assert tree(workdir) == before


def test_unreachable_hub_fails_at_once_without_retries(workdir, capsys, monkeypatch):
    """One refused connection, no huggingface_hub download (whose retries print lines for ~30 s)."""
    import huggingface_hub

    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("HF_HUB_CACHE", str(workdir / "empty-hf-cache"))

    def download(*args, **kwargs):
        raise AssertionError("the hub was asked although it cannot be reached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert cli.main([*SNAPKV, "--model", "nobody/no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the hub cannot be reached (127.0.0.1:9:" in err


PROBE = """\
import json, sys
from kvbench.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print(json.dumps([code, [m for m in ("torch", "transformers") if m in sys.modules]]))
"""


@pytest.mark.parametrize(("argv", "code", "heavy"), [
    (["--help"], 0, []),
    (["run", "--methods", "nope"], 2, []),
    (["run", "--methods", "snapkv", "--budget", "0"], 2, []),
    (["run", "--methods", "snapkv", "--device", "cpuzzz"], 2, []),
    (["run", "--methods", "snapkv", "--tasks", "ruler:vt", "--lengths", "500"], 2, []),
    (["run", "--methods", "snapkv", "--tasks", "longbench:hotpotqa", "--data-dir", "lb-json"], 2, []),
    (["run", "--methods", "snapkv", "--model", "model-list"], 2, []),
    (["run", "--methods", "snapkv:window=-1"], 2, ["torch"]),
    (["run", "--methods", "streamingllm:sink_tokens=-5", "--seed", "3"], 2, ["torch"]),
], ids=["help", "method-name", "budget", "device", "ruler-length", "longbench-file", "model-config", "method-option",
        "method-range"])
def test_bad_input_imports_no_torch_and_a_method_spec_no_transformers(workdir, argv, code, heavy):
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=workdir, capture_output=True, text=True,
                          timeout=120, env=env)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [code, heavy], done.stderr


WRAPPER = """\
import sys, time
import kvbench.runner as runner
from kvbench.cli import main

def {name}(*args, **kwargs):
    {body}

for loader in ("load", "load_tokenizer"):
    if hasattr(runner, loader):
        setattr(runner, loader, {name})
sys.exit(main(sys.argv[1:]))
"""


def tiny_run(tmp_path: Path, run_id: str) -> list[str]:
    return ["run", "--model", "random:llama-tiny", "--methods", "knorm", "--budget", "0.5", "--tasks", "niah",
            "--lengths", "300", "--depths", "0.5", "--results-dir", str(tmp_path / "results"),
            "--reports-dir", str(tmp_path / "reports"), "--run-id", run_id]


def test_a_second_process_on_one_run_is_refused_before_loading(tmp_path):
    """Two real processes: the first holds the run (it is loading its model); the second gets one line naming it."""
    holder_code = WRAPPER.format(name="hold", body="print('holding', flush=True); time.sleep(120)")
    refused_code = WRAPPER.format(name="refuse", body="raise AssertionError('the refused process loaded a model')")
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    holder = subprocess.Popen([sys.executable, "-c", holder_code, *tiny_run(tmp_path, "shared")],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "holding"
        second = subprocess.run([sys.executable, "-c", refused_code, *tiny_run(tmp_path, "shared")],
                                capture_output=True, text=True, timeout=120, env=env)
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvbench: error: ")
    assert f"results.jsonl is being written by kvbench pid {holder.pid} on " in lines[0]
    assert not (tmp_path / "results" / "shared" / "results.jsonl").exists()


def test_report_and_resume_survive_a_corrupted_results_file(tmp_path, capsys):
    """Malformed lines are skipped with a counted warning, a torn last line is run again, nothing is rewritten."""
    from kvbench.results import CELL_KEY, read_rows

    args = tiny_run(tmp_path, "torn")
    assert cli.main(args) == 0
    path = tmp_path / "results" / "torn" / "results.jsonl"
    first, second = path.read_bytes().splitlines(keepends=True)
    corrupted = first + b"[1, 2]\nnull\n{}\n\xff\xfe not utf-8\n" + second[: len(second) // 2]
    path.write_bytes(corrupted)
    capsys.readouterr()
    assert cli.main(["report", str(path.parent), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert f"skipped 5 line(s) of {path} that are not result rows (line 2, 3, 4, 5, 6)" in err
    assert "full" in (tmp_path / "out" / "report.md").read_text()
    assert cli.main(args) == 0
    assert "2 cells, 1 already done, 1 to run" in capsys.readouterr().out
    assert path.read_bytes().startswith(corrupted + b"\n")  # appended on a fresh line, nothing rewritten
    keys = [tuple(row[k] for k in CELL_KEY) for row in read_rows(path, warn=False)]
    assert len(keys) == 2 == len(set(keys))


def test_no_registered_method_imports_transformers():
    """Naming any method on the command line (``list`` loads them all) stays cheap: torch at most."""
    code = ("import sys; from kvbench.registry import METHODS; METHODS.all(); "
            "print([m for m in ('transformers', 'kvbench.layers', 'kvbench.cache') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stderr
