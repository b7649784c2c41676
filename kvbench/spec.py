"""Method spec strings: ``name[:opt=value,...]``, joined with ``+`` for compositions.

A composition joins one dimension method and one token method in either order (``dynakv+snapkv`` or
``snapkv+dynakv``); it is recorded dimension first. Its own option, ``tokens`` (the fraction of tokens
kept), may follow either element: ``palu+snapkv:window=64,tokens=0.25``.

On the command line a list of specs is comma-separated, and so are a spec's options. The
two never clash: a comma-separated piece of the form ``key=value`` (no ``:`` and no ``+``)
continues the options of the spec before it, anything else starts a new spec, e.g.
``snapkv:window=64,kernel=5,knorm`` is ``snapkv:window=64,kernel=5`` and ``knorm``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvbench.checks import short
from kvbench.registry import METHODS, RegistryError, method_class

if TYPE_CHECKING:  # a method's module (and torch) is imported only when its name is looked up
    from kvbench.methods import Method


class SpecError(ValueError):
    """A malformed or invalid method spec; the message says which and what is valid."""


@dataclass(frozen=True)
class MethodSpec:
    """A parsed, validated spec: one method, or a composition with its two ``parts`` (dimension, token)."""

    method: Method
    explicit: tuple[tuple[str, Any], ...]
    parts: tuple[MethodSpec, ...] = ()

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def canonical(self) -> str:
        """The spec with only non-default options, sorted: the key results are stored under."""
        defaults = {f.name: f.default for f in dataclasses.fields(self.method)}
        changed = sorted((k, v) for k, v in self.explicit if defaults.get(k) != v)
        if self.parts:
            dimension, token = self.parts
            token_options = token.canonical.partition(":")[2]
            options = ",".join(filter(None, [token_options, *(f"{k}={v}" for k, v in changed)]))
            return f"{dimension.canonical}+{token.name}" + (f":{options}" if options else "")
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
                raise SpecError(f"option {short(piece)!r} does not follow a method (write method:{short(piece)})")
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    return specs


def _convert(value: str, field: dataclasses.Field, method: str) -> Any:
    """The option's value as its field's type; a float must be finite (nan or inf would make every score nan)."""
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    try:
        if kind == "bool":
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return value.lower() in ("true", "1", "yes")
        if kind == "int":
            return int(value)
        if kind == "float":
            return finite(float(value))
    except ValueError:
        wanted = {"float": "a finite float", "int": "an int", "bool": "a bool (true or false)"}.get(kind, kind)
        raise SpecError(f"{short(method)}: option {field.name} needs {wanted}, got {short(value)!r}") from None
    return value


def finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{value} is not finite")
    return value


def parse_spec(text: str, calibration_data: str | None = None) -> MethodSpec:
    """Parse one spec; ``calibration_data`` (``--calibration-data``) becomes the ``data`` option of every
    dimension method that does not set it."""
    parts = text.split("+")
    if len(parts) == 1:
        return _parse_single(text, calibration_data)
    return _parse_composition(text, parts, calibration_data)


def _parse_composition(text: str, parts: list[str], calibration_data: str | None) -> MethodSpec:
    from kvbench.methods.composition import Composition

    composition_options: dict[str, Any] = {}
    elements = []
    for part in parts:
        name, colon, option_text = part.strip().partition(":")
        kept = []
        for item in filter(None, (o.strip() for o in option_text.split(","))):
            key, _, value = item.partition("=")
            if key.strip() == "tokens":
                try:
                    composition_options["tokens"] = finite(float(value))
                except ValueError:
                    raise SpecError(f"{short(text)}: option tokens needs a finite float, "
                                    f"got {short(value)!r}") from None
            else:
                kept.append(item)
        elements.append(_parse_single(name + (":" + ",".join(kept) if kept else ""), calibration_data))
    families = sorted(e.method.family for e in elements)
    if len(elements) != 2 or families != ["dimension", "token"]:
        from kvbench.registry import methods

        valid = {family: ", ".join(sorted(n for n, c in methods().items()
                                          if c.family == family and getattr(c, "uniform", True)))
                 for family in ("dimension", "token")}
        raise SpecError(f"composition {short(text)!r}: compositions need a dimension method ({valid['dimension']}) "
                        f"and a token method ({valid['token']}), one of each")
    dimension, token = sorted(elements, key=lambda e: e.method.family)
    try:
        method = Composition(dimension.method, token.method, **composition_options)
    except ValueError as error:
        raise SpecError(f"{short(text)}: {error}") from None
    return MethodSpec(method, tuple(sorted(composition_options.items())), (dimension, token))


def _parse_single(text: str, calibration_data: str | None = None) -> MethodSpec:
    name, _, option_text = text.strip().partition(":")
    if name in METHODS.prefixes():  # e.g. kvpress:<PressName>[:options]: the part after the prefix names the method
        member, _, option_text = option_text.partition(":")
        name = f"{name}:{member}"
    try:
        cls = method_class(name.strip())
    except RegistryError as error:
        raise SpecError(str(error)) from None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    explicit: dict[str, Any] = {}
    for item in filter(None, (o.strip() for o in option_text.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise SpecError(f"{short(name)}: option {short(item)!r} must be key=value")
        if key not in fields:
            valid = ", ".join(sorted(fields)) or "none"
            raise SpecError(f"{short(name)}: unknown option {short(key)!r}; valid options: {valid}")
        explicit[key] = _convert(value, fields[key], name)
    if calibration_data and "data" in fields and cls.family == "dimension":
        explicit.setdefault("data", calibration_data)
    try:
        method = cls(**explicit)
    except ValueError as error:
        raise SpecError(f"{short(name)}: {error}") from None
    return MethodSpec(method=method, explicit=tuple(sorted(explicit.items())))
