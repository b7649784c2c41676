"""The registry is lazy and strict: plugins are checked, collisions and mismatches are one-line errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from kvbench.registry import METHODS, TASKS, RegistryError


def install_plugin(tmp_path, monkeypatch, group: str, entries: str, module: str = "") -> None:
    """A fake installed distribution 'my-plugin' with the given entry points (and module source)."""
    if module:
        (tmp_path / "my_plugin.py").write_text(textwrap.dedent(module))
    dist = tmp_path / "my_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{group}]\n{entries}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    METHODS.refresh()
    TASKS.refresh()


@pytest.fixture(autouse=True)
def fresh_registries():
    yield
    METHODS.refresh()
    TASKS.refresh()


PLUGIN = """
    from dataclasses import dataclass
    from typing import ClassVar
    from kvbench.methods import TokenMethod

    @dataclass
    class Oldest(TokenMethod):
        name: ClassVar[str] = "oldest"
        summary: ClassVar[str] = "keep the first tokens"

        def score(self, inputs):
            return -inputs.keys.new_tensor(range(inputs.keys.shape[2])).expand(inputs.keys.shape[:3])

    class NotAMethod:
        name = "notamethod"
"""


@pytest.mark.parametrize(("entries", "message"), [
    ("snapkv = my_plugin:Oldest", "'snapkv': the plugin from distribution my-plugin collides with the built-in"),
    ("notamethod = my_plugin:NotAMethod", "is my_plugin:NotAMethod, which is not a subclass of kvbench.methods.base"),
    ("other = my_plugin:Oldest", "its class says name = 'oldest'"),
    ("broken = my_plugin_missing:Thing", "'broken' (plugin from distribution my-plugin, my_plugin_missing:Thing) "
                                         "failed to import: ModuleNotFoundError"),
])
def test_bad_plugins_are_one_line_errors_naming_the_distribution(tmp_path, monkeypatch, entries, message):
    install_plugin(tmp_path, monkeypatch, "kvbench.methods", entries, PLUGIN)
    name = entries.split(" = ")[0]
    with pytest.raises(RegistryError) as error:
        METHODS.get(name)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_task_plugin_that_is_not_a_task_is_refused(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "kvbench.tasks", "mytask = my_plugin:Oldest", PLUGIN)
    with pytest.raises(RegistryError, match="not a subclass of kvbench.tasks.base.Task"):
        TASKS.get("mytask")


def test_cli_answers_a_broken_plugin_with_one_line(tmp_path):
    (tmp_path / "my_plugin-1.0.dist-info").mkdir()
    (tmp_path / "my_plugin-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\n"
                                                                    "Version: 1.0\n")
    (tmp_path / "my_plugin-1.0.dist-info" / "entry_points.txt").write_text("[kvbench.methods]\nsnapkv = x:Y\n")
    done = subprocess.run([sys.executable, "-m", "kvbench", "list"], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "my-plugin collides" in done.stderr


def test_names_are_listed_without_importing_method_modules():
    code = ("import sys; from kvbench.registry import METHODS; names = METHODS.names(); "
            "print(len(names), any(m.startswith('kvbench.methods.') and m != 'kvbench.methods' for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.split()
    assert int(out[0]) >= 13 and out[1] == "False"


def test_an_in_process_class_registers_once():
    from kvbench.methods.snapkv import SnapKV

    with pytest.raises(RegistryError, match="already registered"):
        METHODS.register(SnapKV)
