"""Built-in compression methods, one module (or subpackage) per family; ``kvbench.registry`` names them.

Nothing is imported here but the base classes, so that naming a method loads only that method's module.
"""

from kvbench.methods.base import LayerInputs, Method, TokenMethod

__all__ = ["LayerInputs", "Method", "TokenMethod"]
