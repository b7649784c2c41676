"""lm-eval both ways, offline, over two task YAMLs of kvbench's own (tests/fixtures/lm_eval: a multiple-choice and
a generation task over local jsonl files): ``full`` through either bridge gives what lm-eval's own ``hf`` model
gives; a compressed method gives the same answers through ``lm_eval --model kvbench`` and ``kvbench run``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from kvbench import cli, models, runner  # noqa: E402
from kvbench.lmeval import __main__ as lmeval_cli  # noqa: E402
from kvbench.lmeval import tasks as bridge  # noqa: E402
from kvbench.lmeval.model import KVBenchLM  # noqa: E402
from kvbench.results import read_rows  # noqa: E402
from kvbench.tasks.lm_eval_tasks import lm_eval_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = str(ROOT / "tests" / "fixtures" / "lm_eval")
TASKS = ("kvbench_local_mc", "kvbench_local_gen")
DOCS = 2


@pytest.fixture(autouse=True)
def repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the YAMLs name their data files relative to the working directory, as lm-eval does


def evaluate(lm, limit: int = DOCS) -> dict:
    """``lm_eval.simple_evaluate`` on both local tasks, with every document's responses logged."""
    return lm_eval.simple_evaluate(model=lm, tasks=["kvbench_local"], limit=limit, log_samples=True,
                                   bootstrap_iters=0, task_manager=bridge.manager(FIXTURES))


def answers(result: dict, task: str) -> dict[int, object]:
    """Per document: the log-likelihoods (multiple choice) or the generated text."""
    out = {}
    for sample in result["samples"][task]:
        responses = [r[0] for r in sample["resps"]]
        out[sample["doc_id"]] = [ll for ll, _ in responses] if task.endswith("_mc") else responses[0]
    return out


def assert_same_answers(ours: dict[int, object], reference: dict[int, object]) -> None:
    assert ours.keys() == reference.keys()
    for doc, value in reference.items():
        if isinstance(value, list):
            assert ours[doc] == pytest.approx(value, abs=1e-4), doc
        else:
            assert ours[doc] == value, doc


def hf_reference(name: str, tmp_path: Path) -> HFLM:
    """lm-eval's own ``hf`` model, loading the same weights from a folder with plain sdpa attention."""
    model, tokenizer = models.load(models.resolve(name), "cpu", models.parse_dtype("float32", "cpu"))
    model.set_attn_implementation("sdpa")
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return HFLM(pretrained=str(folder), device="cpu", dtype="float32")


def kvbench_run(tmp_path: Path, model: str, methods: str, docs: int = DOCS) -> list[dict]:
    args = ["run", "--model", model, "--methods", methods, "--budget", "0.25", "--tasks", "lm-eval:kvbench_local",
            "--include-path", FIXTURES, "--max-samples", str(docs), "--device", "cpu", "--run-id", "lm-eval",
            "--results-dir", str(tmp_path / "results"), "--reports-dir", str(tmp_path / "reports")]
    assert cli.main(args) == 0
    return list(read_rows(tmp_path / "results" / "lm-eval" / "results.jsonl"))


def row_answers(rows: list[dict], method: str, task: str) -> dict[int, object]:
    chosen = [r for r in rows if r["method"] == method and r["task"] == f"lm-eval:{task}"]
    return {r["sample_meta"]["doc_id"]: r["loglikelihoods"] if task.endswith("_mc") else r["prediction"]
            for r in chosen}


@pytest.mark.parametrize("name", ["random:llama-tiny", "random:qwen2-tiny"])
def test_full_through_kvbench_equals_lm_eval_hf(name, tmp_path):
    reference = evaluate(hf_reference(name, tmp_path))
    ours = evaluate(KVBenchLM(pretrained=name, device="cpu"))
    for task in TASKS:
        assert_same_answers(answers(ours, task), answers(reference, task))
        assert ours["results"][task] == reference["results"][task]
    measured = ours["config"]["kvbench"]
    assert measured["method"] == "full" and measured["requests"] == DOCS * 4 + DOCS
    assert measured["mean_achieved_budget"] == 1.0 and measured["mean_kv_bytes"] > 0


def test_compressed_method_gives_the_same_answers_through_both_bridges(tmp_path, capsys):
    lm = KVBenchLM(pretrained="random:llama-tiny", method="snapkv", budget=0.25, device="cpu")
    through_lm_eval = evaluate(lm)
    rows = kvbench_run(tmp_path, "random:llama-tiny", "snapkv")
    assert len(rows) == 2 * len(TASKS) * DOCS and all(r["status"] == "ok" for r in rows)
    for task in TASKS:
        compressed, full = row_answers(rows, "snapkv", task), row_answers(rows, "full", task)
        assert_same_answers(compressed, answers(through_lm_eval, task))
        if task.endswith("_mc"):  # compression changed the log-likelihoods: the test can fail
            assert any(compressed[d] != pytest.approx(full[d], abs=1e-4) for d in full)
        metric = "acc,none" if task.endswith("_mc") else "exact_match,number"
        scores = [r["score"] for r in rows if r["method"] == "snapkv" and r["task"] == f"lm-eval:{task}"]
        assert sum(scores) / len(scores) == pytest.approx(100 * through_lm_eval["results"][task][metric])
    for row in rows:
        assert row["lm_eval_task"] in TASKS and row["lm_eval_task_version"] == 1.0
        assert row["metric"] == ("acc" if row["lm_eval_task"].endswith("_mc") else "exact_match")
        assert row["task_version"].startswith("1/lm-eval 0.4.")
        if row["method"] == "snapkv":
            assert 0.2 < row["achieved_budget"] <= 0.26 and row["kv_bytes"] < row["full_kv_bytes"]
    measured = through_lm_eval["config"]["kvbench"]
    assert measured["method"] == "snapkv" and measured["budget"] == 0.25
    assert 0.2 < measured["mean_achieved_budget"] <= measured["max_achieved_budget"] <= 0.26
    fresh = lm_eval_task("kvbench_local")()  # a Ray actor's instance: it builds the requests it is sent
    row = next(r for r in rows if r["method"] == "snapkv" and r["task"] == "lm-eval:kvbench_local_gen")
    sample = SimpleNamespace(task=row["task"], sample_id=row["sample_id"])
    cell = SimpleNamespace(sample=sample, query_aware=True, spec=lm.spec, budget=0.25)
    assert fresh.evaluate(lm.model, lm.tokenizer, cell, 0)["prediction"] == row["prediction"]
    capsys.readouterr()
    kvbench_run(tmp_path, "random:llama-tiny", "snapkv")  # resumed: nothing runs again
    assert f"{2 * len(TASKS) * DOCS} already done, 0 to run" in capsys.readouterr().out


def test_task_names_and_prefix_parsing():
    from kvbench import checks

    assert checks.tasks("lm-eval:kvbench_local_mc,kvbench_local_gen,niah") == {
        "lm-eval:kvbench_local_mc": (), "lm-eval:kvbench_local_gen": (), "niah": ()}
    assert lm_eval_task("arc_easy") is lm_eval_task("arc_easy")
    assert lm_eval_task("arc_easy").name == "lm-eval:arc_easy"
    with pytest.raises(ValueError, match="name a task or group"):
        lm_eval_task(" ")


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ("lm-eval:kvbench_local_mcq", "unknown lm-eval task or group 'kvbench_local_mcq'; did you mean "
                                      "kvbench_local_mc"),
        ("lm-eval:kvbench_hub_only", "lm-eval:kvbench_hub_only: its data is not on this machine (Couldn't reach "
                                     "'kvbench-tests/absent-dataset' on the Hub"),
        ("lm-eval:kvbench_corpus_metric", "lm-eval task kvbench_corpus_metric: its metrics (bleu) are aggregated over "
                                          "the corpus"),
    ],
)
def test_bad_tasks_are_one_line_before_any_model_loads(tasks, message, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded for bad input")

    monkeypatch.setattr(runner, "load", refuse)
    monkeypatch.setattr(models, "load", refuse)
    monkeypatch.setattr(bridge, "hub_reachable", lambda: False)
    args = ["run", "--methods", "snapkv", "--tasks", tasks, "--include-path", FIXTURES, "--model", "random:llama-tiny",
            "--results-dir", "unused-results", "--reports-dir", "unused-reports"]
    assert cli.main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"kvbench: error: {message}") and "\n" not in error, error


def test_include_path_must_be_a_folder(capsys):
    assert cli.main(["run", "--methods", "snapkv", "--tasks", "lm-eval:x", "--include-path", "no/such/folder"]) == 2
    assert "--include-path no/such/folder does not exist" in capsys.readouterr().err


def test_lm_eval_command_line_with_model_kvbench(tmp_path, monkeypatch):
    """The documented command: lm-eval's own command line, a method spec with several options quoted inside
    --model_args, and kvbench's measurement in the results file's config section."""
    monkeypatch.setattr(sys, "argv", [
        "python -m kvbench.lmeval", "run", "--model", "kvbench", "--model_args",
        'pretrained=random:llama-tiny,method="snapkv:window=8,kernel=3",budget=0.25,query_aware=true',
        "--tasks", "kvbench_local_mc", "--include_path", FIXTURES, "--limit", "1", "--device", "cpu",
        "--output_path", str(tmp_path)])
    lmeval_cli.main()
    (written,) = tmp_path.glob("*/results_*.json")
    result = json.loads(written.read_text())
    measured = result["config"]["kvbench"]
    assert measured["method"] == "snapkv:kernel=3,window=8" and measured["budget"] == 0.25
    assert measured["requests"] == 4 and 0.2 < measured["mean_achieved_budget"] <= 0.26
    assert measured["mean_kv_bytes"] < measured["mean_full_kv_bytes"]
    assert result["results"]["kvbench_local_mc"]["acc,none"] in (0.0, 1.0)


def test_model_arguments_and_requests_kvbench_cannot_honour():
    with pytest.raises(ValueError, match="unknown model argument.s. kernel.*method=\"snapkv:window=64,kernel=5\""):
        KVBenchLM(pretrained="random:llama-tiny", method="snapkv:window=64", kernel=5)
    with pytest.raises(ValueError, match="query_aware=false is not available"):
        KVBenchLM(pretrained="random:llama-tiny", query_aware=False)
    with pytest.raises(ValueError, match="unknown method 'snapk'"):
        KVBenchLM(pretrained="random:llama-tiny", method="snapk")
    with pytest.raises(ValueError, match=r"budget must be a number in \(0, 1\], got 1.5"):
        KVBenchLM(pretrained="random:llama-tiny", method="snapkv", budget=1.5)
    with pytest.raises(ValueError, match="query_aware=false is not available"):
        lm_eval_task("kvbench_local_mc")().evaluate(None, None, SimpleNamespace(query_aware=False), 0)
    lm = KVBenchLM(pretrained="random:llama-tiny", device="cpu")
    sampling = Instance("generate_until", {}, ("Hello", {"do_sample": True, "temperature": 0.7}), 0, ("t", 0, 1))
    with pytest.raises(ValueError, match="kvbench decodes greedily"):
        lm.generate_until([sampling])


@pytest.mark.e2e
def test_embedded_model_full_equals_lm_eval_hf(tmp_path):
    try:
        ref = models.resolve("smollm2-135m")
    except models.ModelUnavailable as missing:
        pytest.skip(str(missing))
    models.load(ref, "cpu", models.parse_dtype("float32", "cpu"))  # converts the GGUF once, if not cached yet
    folder = next((models.cache_dir() / "models").glob("smollm2-135m-*"))
    reference = evaluate(HFLM(pretrained=str(folder), device="cpu", dtype="float32"), limit=1)
    rows = kvbench_run(tmp_path, "smollm2-135m", "snapkv", docs=1)
    assert all(r["status"] == "ok" for r in rows) and len(rows) == 2 * len(TASKS)
    for task in TASKS:
        assert_same_answers(row_answers(rows, "full", task), answers(reference, task))
    for row in rows:
        if row["method"] == "snapkv":
            assert 0.2 < row["achieved_budget"] <= 0.26 and row["kv_bytes"] % 46_080 == 0  # whole tokens held
