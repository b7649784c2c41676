"""Any press of NVIDIA's kvpress as a kvbench method: ``kvpress:<PressName>[:option=value,...]``.

The press runs inside kvbench's runner, so kvbench's tasks, measurement and reports apply to it:
kvbench's budget becomes the press's ``compression_ratio = 1 - budget``, the press's own
dataclass fields become the method's options (a nested press, e.g. AdaKVPress's ``press``, is
given by class name), and the press's forward hooks are installed around the compressing prefill
forward only (``prefill_context``), exactly as kvpress's own pipeline does.

What the press holds is measured, never assumed: kvpress replaces each layer's tensors in kvbench's
cache, whose layers keep the logical length, so positions stay true. Presses that *mask* keys
instead of removing them (they set ``masked_key_indices`` on the attention modules, e.g. AdaKVPress,
DuoAttentionPress) save no memory: their achieved budget is measured as 1.0 and their rows carry
``masked: true``.

kvpress is optional (``pip install kvpress``, the ``kvpress`` extra). kvpress 0.5.5 pins
``transformers<5.3``: install it in its own environment (README).
"""

from __future__ import annotations

import dataclasses
import inspect
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar

import torch

from kvbench.methods.base import Method

PREFIX = "kvpress:"
INSTALL_HINT = ("pip install kvpress (kvpress 0.5.5 pins transformers<5.3: use a separate environment, "
                "see the README's kvpress section)")
_SIMPLE = ("bool", "int", "float", "str")  # option types a spec string can set


def _kvpress() -> Any:
    try:
        import kvpress
    except ImportError as error:
        raise ValueError(f"kvpress is not installed ({error.msg}); {INSTALL_HINT}") from None
    return kvpress


def press_names() -> list[str]:
    """Every press class kvpress exports."""
    kvpress = _kvpress()
    return sorted(n for n in dir(kvpress) if n.endswith("Press") and inspect.isclass(getattr(kvpress, n))
                  and issubclass(getattr(kvpress, n), kvpress.BasePress) and n != "BasePress")


def _press_class(name: str) -> type:
    kvpress = _kvpress()
    if name not in press_names():
        raise ValueError(f"unknown kvpress press {name!r}; valid presses: {', '.join(press_names())}")
    return getattr(kvpress, name)


def _type_name(annotation: Any) -> str:
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


@dataclass
class KVPressMethod(Method):
    """Base of the generated ``kvpress:<PressName>`` methods; the fields are the press's options."""

    family: ClassVar[str] = "kvpress"
    press_class: ClassVar[type]
    nested: ClassVar[tuple[str, ...]] = ()  # options naming a press class (AdaKVPress's ``press``)

    def __post_init__(self) -> None:
        for name in self.nested:
            value = getattr(self, name)
            if not value:
                raise ValueError(f"{self.name} needs {name}=<PressName>, e.g. {self.name}:{name}=SnapKVPress")
            _press_class(value)

    def make_press(self, budget: float) -> Any:
        """The press for one cell, with ``compression_ratio = 1 - budget``."""
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in self.nested:
            options[name] = _press_class(options[name])()
        press = self.press_class(**options)
        press.compression_ratio = 1.0 - budget
        return press

    def prefill_context(self, model: torch.nn.Module, budget: float) -> AbstractContextManager:
        return nullcontext() if budget >= 1.0 else self.make_press(budget)(model)

    def row_fields(self, model: torch.nn.Module) -> dict[str, Any]:
        masked = any(getattr(m, "masked_key_indices", None) is not None for m in model.modules())
        return {"masked": masked}


@cache
def press_method(press_name: str) -> type[KVPressMethod]:
    """The kvbench method class for one kvpress press (ValueError with the valid names otherwise)."""
    press_cls = _press_class(press_name)
    if not hasattr(press_cls, "compression_ratio"):
        raise ValueError(f"kvpress press {press_name} has no compression_ratio, so a kvbench budget cannot drive it")
    kvpress = _kvpress()
    fields, nested = [], []
    for f in dataclasses.fields(press_cls):
        kind = _type_name(f.type)
        is_press = (inspect.isclass(f.type) and issubclass(f.type, kvpress.BasePress)) or kind.endswith("Press")
        if f.name == "compression_ratio" or not (is_press or kind in _SIMPLE):
            continue  # set from the budget, or not settable from a spec string: the press's default applies
        if is_press:
            default = type(f.default).__name__ if f.default is not dataclasses.MISSING else ""
            fields.append((f.name, "str", dataclasses.field(default=default)))
            nested.append(f.name)
        elif f.default is not dataclasses.MISSING:
            fields.append((f.name, kind, dataclasses.field(default=f.default)))
    summary = (inspect.getdoc(press_cls) or press_name).strip().splitlines()[0]
    return dataclasses.make_dataclass(
        f"KVPress_{press_name}", fields, bases=(KVPressMethod,),
        namespace={"name": PREFIX + press_name, "summary": f"kvpress {press_name}: {summary}",
                   "press_class": press_cls, "nested": tuple(nested)},
    )
