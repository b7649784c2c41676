"""Method specs and the plugin registry."""

from __future__ import annotations

import textwrap

import pytest

from kvbench import registry
from kvbench.spec import SpecError, parse_spec, split_spec_list


def test_list_separator_and_option_separator_do_not_clash():
    assert split_spec_list("snapkv:window=64,kernel=5,knorm") == ["snapkv:window=64,kernel=5", "knorm"]
    assert split_spec_list("full, snapkv ,streamingllm:sink_tokens=8") == [
        "full", "snapkv", "streamingllm:sink_tokens=8"
    ]
    assert split_spec_list("dynakv,snapkv,dynakv+snapkv") == ["dynakv", "snapkv", "dynakv+snapkv"]
    with pytest.raises(SpecError, match="does not follow a method"):
        split_spec_list("snapkv,kernel=5")


def test_options_are_typed_and_canonical_drops_defaults():
    spec = parse_spec("snapkv:kernel=5,window=32")
    assert spec.method.kernel == 5 and spec.method.window == 32
    assert spec.canonical == "snapkv:kernel=5"
    assert parse_spec("snapkv:window=32").canonical == "snapkv"
    assert spec.options == {"window": 32, "kernel": 5, "pooling": "max", "decoding": False, "interval": 16}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("snapk", "unknown method 'snapk'; valid methods: adakv, .*full, h2o, .*keydiff, knorm, .*snapkv, "
                  "streamingllm"),
        ("snapkv:windo=3", "unknown option 'windo'; valid options: decoding, interval, kernel, pooling, window"),
        ("snapkv:window=abc", "option window needs an int"),
        ("snapkv:kernel=4", "odd kernel"),
        ("snapkv:window", "must be key=value"),
        ("snapkv+knorm", "compositions need a dimension method"),
    ],
)
def test_bad_specs_say_what_is_valid(text, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace("+", r"\+")):
        parse_spec(text)


def test_entry_point_plugin_is_discovered(tmp_path, monkeypatch):
    """A third-party package registers a method under the 'kvbench.methods' entry-point group."""
    (tmp_path / "my_plugin.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from typing import ClassVar
        from kvbench.methods import TokenMethod

        @dataclass
        class Oldest(TokenMethod):
            """Keeps the oldest tokens (a deliberately bad method)."""
            name: ClassVar[str] = "oldest"
            summary: ClassVar[str] = "keep the first tokens"

            def score(self, inputs):
                return -inputs.keys.new_tensor(range(inputs.keys.shape[2])).expand(inputs.keys.shape[:3])
    '''))
    dist = tmp_path / "my_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[kvbench.methods]\noldest = my_plugin:Oldest\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.METHODS.refresh()
    try:
        spec = parse_spec("oldest")
        assert spec.method.family == "token" and "oldest" in registry.methods()
    finally:
        monkeypatch.undo()
        registry.METHODS.refresh()
