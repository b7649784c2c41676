"""Methods and tasks by name: the built-ins plus plugins from Python entry points, loaded lazily and checked.

Third-party packages add a method by declaring, in their pyproject::

    [project.entry-points."kvbench.methods"]
    mymethod = "mypackage.mymodule:MyMethod"

(the lm-eval / pytest plugin pattern); tasks likewise under ``kvbench.tasks``. Nothing is imported until a
name is looked up, so the command line answers quickly. The registry is strict: a plugin named like a
built-in or like another plugin, a class that is not a ``Method`` (``Task``), a class whose ``name`` is not
its entry-point name, or an entry point that fails to import is a one-line ``RegistryError`` naming the
distribution. A *prefix* names a family of methods made on demand (``kvpress:<Press>``): its factory turns
the part after the colon into a class.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any


class RegistryError(ValueError):
    """A name that is not registered, or a plugin that cannot be used; the message is one line."""


def load_object(reference: str) -> Any:
    """The object named by ``"package.module:Attribute"``."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class _Entry:
    name: str
    reference: str  # "module:Attribute"
    origin: str  # "built-in" or "plugin from distribution X"


class Registry:
    """Names -> classes of one kind (``kind`` "method" or "task"), subclasses of ``base`` ("module:Class")."""

    def __init__(self, kind: str, base: str, group: str, builtins: dict[str, str],
                 prefixes: dict[str, str] | None = None) -> None:
        self.kind = kind
        self._base = base
        self.group = group
        self._builtins = builtins
        self._prefixes = dict(prefixes or {})
        self._loaded: dict[str, type] = {}
        self._registered: dict[str, type] = {}  # classes registered in-process (notebooks, tests)

    def register(self, cls: type) -> type:
        """Register a class defined in this process under its ``name`` (usable as a decorator); same checks."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise RegistryError(f"{cls.__name__} has no name to register it under")
        if name in self.entries() or name in self._registered:
            raise RegistryError(f"{self.kind} {name!r} is already registered")
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise RegistryError(f"{cls.__name__} is not a subclass of {self._base.replace(':', '.')}")
        self._registered[name] = cls
        return cls

    def unregister(self, name: str) -> None:
        self._registered.pop(name, None)

    def register_prefix(self, prefix: str, factory: str) -> None:
        """``prefix:<name>`` specs are made by ``factory(name)`` ("module:function"), which raises ValueError."""
        if prefix in self._prefixes or prefix in self.entries():
            raise RegistryError(f"{self.kind} prefix {prefix!r} is already registered")
        self._prefixes[prefix] = factory

    def prefixes(self) -> tuple[str, ...]:
        return tuple(self._prefixes)

    @property
    def base(self) -> type:
        return load_object(self._base)

    def entries(self) -> dict[str, _Entry]:
        """Every registered name and where it comes from, without importing anything."""
        return _entries(self.group, tuple(self._builtins.items()), self.kind)

    def names(self) -> list[str]:
        return sorted([*self.entries(), *self._registered])

    def get(self, name: str) -> type:
        """The class registered as ``name`` (or made by a prefix), imported and checked on first use."""
        prefix, colon, rest = name.partition(":")
        if colon and prefix in self._prefixes:
            try:
                return load_object(self._prefixes[prefix])(rest)
            except ValueError as error:
                raise RegistryError(str(error)) from None
        if name in self._registered:
            return self._registered[name]
        if name in self._loaded:
            return self._loaded[name]
        entry = self.entries().get(name)
        if entry is None:
            valid = ", ".join(self.names() + [f"{p}:<name>" for p in self._prefixes])
            raise RegistryError(f"unknown {self.kind} {_short(name)!r}; valid {self.kind}s: {valid}")
        cls = self._load(entry)
        self._loaded[name] = cls
        return cls

    def refresh(self) -> None:
        """Forget what was loaded and read the entry points again (after installing a plugin, and in tests)."""
        self._loaded.clear()
        _entries.cache_clear()

    def all(self) -> dict[str, type]:
        """Every registered class, loaded (``list``)."""
        return {name: self.get(name) for name in self.names()}

    def _load(self, entry: _Entry) -> type:
        try:
            cls = load_object(entry.reference)
        except Exception as error:  # noqa: BLE001 - any failing plugin gets the same one line
            raise RegistryError(f"{self.kind} {entry.name!r} ({entry.origin}, {entry.reference}) failed to import: "
                                f"{type(error).__name__}: {_short(str(error))}") from None
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise RegistryError(f"{self.kind} {entry.name!r} ({entry.origin}) is {entry.reference}, which is not a "
                                f"subclass of {self._base.replace(':', '.')}")
        if getattr(cls, "name", None) != entry.name:
            raise RegistryError(f"{self.kind} {entry.name!r} ({entry.origin}): its class says name = "
                                f"{getattr(cls, 'name', None)!r}; the entry point and the class must use one name")
        return cls


@cache
def _entries(group: str, builtins: tuple[tuple[str, str], ...], kind: str) -> dict[str, _Entry]:
    found = {name: _Entry(name, reference, "built-in") for name, reference in builtins}
    for point in entry_points(group=group):
        entry = _Entry(point.name, point.value, f"plugin from distribution {_distribution(point)}")
        if point.name in found:
            raise RegistryError(f"{kind} {point.name!r}: the {entry.origin} collides with the "
                                f"{found[point.name].origin} one; uninstall or rename one of them")
        found[point.name] = entry
    return found


def _distribution(point: EntryPoint) -> str:
    dist = getattr(point, "dist", None)
    return getattr(dist, "name", None) or "unknown"


def _short(text: str, limit: int = 80) -> str:
    """A user-supplied string shortened for a one-line message."""
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


METHODS = Registry(
    "method", "kvbench.methods.base:Method", "kvbench.methods",
    builtins={
        "full": "kvbench.methods.base:Full",
        "random": "kvbench.methods.random:RandomEviction",
        "streamingllm": "kvbench.methods.streamingllm:StreamingLLM",
        "snapkv": "kvbench.methods.snapkv:SnapKV",
        "knorm": "kvbench.methods.knorm:KNorm",
        "h2o": "kvbench.methods.h2o:H2O",
        "tova": "kvbench.methods.tova:TOVA",
        "pyramidkv": "kvbench.methods.pyramidkv:PyramidKV",
        "adakv": "kvbench.methods.adakv:AdaKV",
        "keydiff": "kvbench.methods.keydiff:KeyDiff",
        "expected_attention": "kvbench.methods.expected_attention:ExpectedAttention",
        "palu": "kvbench.methods.palu:Palu",
        "dynakv": "kvbench.methods.dynakv:DynaKV",
        "kvcompose": "kvbench.methods.kvcompose:KVCompose",
        "headkv": "kvbench.methods.headkv:HeadKV",
        "mixeddimkv": "kvbench.methods.mixeddim:MixedDimKV",
        "mixeddimkv-h": "kvbench.methods.mixeddim:MixedDimKVH",
    },
    prefixes={"kvpress": "kvbench.methods.kvpress_adapter:press_method"},
)

TASKS = Registry(
    "task", "kvbench.tasks.base:Task", "kvbench.tasks",
    builtins={
        "niah": "kvbench.tasks.niah:NeedleInAHaystack",
        "longbench": "kvbench.tasks.longbench:LongBench",
        "ruler": "kvbench.tasks.ruler:Ruler",
        "perplexity": "kvbench.tasks.perplexity:Perplexity",
    },
    prefixes={"lm-eval": "kvbench.tasks.lm_eval_tasks:lm_eval_task"},
)


def method_class(name: str) -> type:
    return METHODS.get(name)


def task_class(name: str) -> type:
    return TASKS.get(name)


def methods() -> dict[str, type]:
    return METHODS.all()


def tasks() -> dict[str, type]:
    return TASKS.all()

