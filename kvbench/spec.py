"""Method spec strings: ``name[:opt=value,...]``, joined with ``+`` for compositions.

On the command line a list of specs is comma-separated, and so are a spec's options. The
two never clash: a comma-separated piece of the form ``key=value`` (no ``:`` and no ``+``)
continues the options of the spec before it, anything else starts a new spec, e.g.
``snapkv:window=64,kernel=5,knorm`` is ``snapkv:window=64,kernel=5`` and ``knorm``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from kvbench.methods import Method
from kvbench.registry import NotAvailableYet, RegistryError, method_class


class SpecError(ValueError):
    """A malformed or invalid method spec; the message says which and what is valid."""


class MethodUnavailable(SpecError):
    """A valid spec naming a method that has not shipped yet."""


@dataclass(frozen=True)
class MethodSpec:
    """A parsed, validated spec: one method (compositions arrive with the dimension methods)."""

    method: Method
    explicit: tuple[tuple[str, Any], ...]

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def canonical(self) -> str:
        """The spec with only non-default options, sorted: the key results are stored under."""
        defaults = {f.name: f.default for f in dataclasses.fields(self.method)}
        changed = sorted((k, v) for k, v in self.explicit if defaults.get(k) != v)
        return self.name + (":" + ",".join(f"{k}={v}" for k, v in changed) if changed else "")

    @property
    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self.method)


def split_spec_list(text: str) -> list[str]:
    specs: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        continues_options = "=" in piece and ":" not in piece and "+" not in piece
        if continues_options:
            if not specs or ":" not in specs[-1]:
                raise SpecError(f"option {piece!r} does not follow a method (write method:{piece})")
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    return specs


def _convert(value: str, field: dataclasses.Field, method: str) -> Any:
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    try:
        if kind == "bool":
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return value.lower() in ("true", "1", "yes")
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
    except ValueError:
        raise SpecError(f"{method}: option {field.name} needs a {kind}, got {value!r}") from None
    return value


def parse_spec(text: str) -> MethodSpec:
    parts = text.split("+")
    if len(parts) > 1:
        for part in parts:  # an unknown or planned element is the more useful message
            _parse_single(part)
        raise SpecError(f"composition {text!r}: compositions need a dimension method (dynakv, palu; issue #3)")
    return _parse_single(text)


def _parse_single(text: str) -> MethodSpec:
    name, _, option_text = text.strip().partition(":")
    try:
        cls = method_class(name.strip())
    except NotAvailableYet as error:
        raise MethodUnavailable(str(error)) from None
    except RegistryError as error:
        raise SpecError(str(error)) from None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    explicit: dict[str, Any] = {}
    for item in filter(None, (o.strip() for o in option_text.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise SpecError(f"{name}: option {item!r} must be key=value")
        if key not in fields:
            valid = ", ".join(sorted(fields)) or "none"
            raise SpecError(f"{name}: unknown option {key!r}; valid options: {valid}")
        explicit[key] = _convert(value, fields[key], name)
    try:
        method = cls(**explicit)
    except ValueError as error:
        raise SpecError(f"{name}: {error}") from None
    return MethodSpec(method=method, explicit=tuple(sorted(explicit.items())))
