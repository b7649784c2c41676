"""Methods and tasks by name: the built-ins plus plugins from Python entry points.

Third-party packages add a method by declaring, in their pyproject::

    [project.entry-points."kvbench.methods"]
    mymethod = "mypackage.mymodule:MyMethod"

(the lm-eval / pytest plugin pattern); tasks likewise under ``kvbench.tasks``.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points

from kvbench.methods import BUILTIN_METHODS, Method
from kvbench.tasks import BUILTIN_TASKS
from kvbench.tasks.base import Task


class RegistryError(ValueError):
    """A name that is not registered; the message lists the valid ones."""


def _plugins(group: str) -> dict[str, type]:
    return {ep.name: ep.load() for ep in entry_points(group=group)}


@cache
def methods() -> dict[str, type[Method]]:
    found: dict[str, type[Method]] = {m.name: m for m in BUILTIN_METHODS}
    for name, cls in _plugins("kvbench.methods").items():
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise RegistryError(f"entry point kvbench.methods:{name} is not a kvbench Method subclass")
        found.setdefault(name, cls)
    return found


@cache
def tasks() -> dict[str, type[Task]]:
    found: dict[str, type[Task]] = {t.name: t for t in BUILTIN_TASKS}
    for name, cls in _plugins("kvbench.tasks").items():
        found.setdefault(name, cls)
    return found


def method_class(name: str) -> type[Method]:
    if name.startswith("kvpress:"):  # any press of the optional kvpress package
        from kvbench.methods.kvpress_adapter import press_method

        try:
            return press_method(name.removeprefix("kvpress:"))
        except ValueError as error:
            raise RegistryError(str(error)) from None
    registered = methods()
    if name in registered:
        return registered[name]
    raise RegistryError(f"unknown method {name!r}; valid methods: {', '.join(sorted(registered))}")


def task_class(name: str) -> type[Task]:
    registered = tasks()
    if name not in registered:
        raise RegistryError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(registered))}")
    return registered[name]
