"""Appending to a cache without copying it on every decoding step.

``torch.cat([held, new])`` copies everything held, so a cache that grows one token a step copies its whole history
on every step (transformers' ``DynamicCache`` does; on SmolLM2-135M at 4K tokens that is about a fifth of a full
cache's decoding step, and 9 ms of a 70 ms Palu step). Here an append allocates room for some more tokens behind the
held ones: the held tensor is a view at the start of that memory, and the next appends write into the room in
place, until one more copy moves everything into a larger allocation. Every kvbench layer appends this way
(``CompressedLayer``, the latent layers), ``full`` included, so no method's speed-up comes from the baseline's copy.

The room is reserved only when something is appended (a tensor stored at compression is exact) and is at most
``ROOM`` appends of the size just made and at most ``1 / ROOM_SHARE`` of what is held (64 tokens at 4K tokens
held, decoding one at a time). It belongs to the held tensor's memory and is freed with it; ``nbytes`` counts the
held views, i.e. the tokens stored, and the room shows in bench's peak memory, like an allocator's slack.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch

ROOM = 64  # appends of the size just made that the reserved room holds, at most
ROOM_SHARE = 16  # and at most a sixteenth of what is held


class AppendBuffers:
    """``torch.cat`` along one dimension for tensors that grow, one per ``slot`` (e.g. ``("key", row)``).

    A slot remembers only where the tensor it last returned starts, its length and its capacity (no reference to
    the memory), so an append writes in place only into the room behind that very tensor.
    """

    def __init__(self) -> None:
        self.returned: dict[Hashable, tuple[int, int, int]] = {}  # slot -> (data_ptr, length, capacity)

    def append(self, slot: Hashable, held: torch.Tensor | None, new: torch.Tensor, dim: int) -> torch.Tensor:
        """``torch.cat([held, new], dim)`` (``new`` alone when ``held`` is None), in place when ``held`` is what
        this slot last returned and its room allows; the result views the same memory as ``held`` then."""
        if held is None or held.dim() != new.dim():  # nothing yet (transformers starts a layer at a 1-D empty)
            return new.contiguous()
        length, added = held.shape[dim], new.shape[dim]
        shape = list(held.shape)
        shape[dim] = length + added
        start, known, capacity = self.returned.get(slot, (None, 0, 0))
        fits = start == held.data_ptr() and known == length and length + added <= capacity
        if fits and self._ours(held, dim, capacity):
            grown = held.new_empty(0).set_(held.untyped_storage(), 0, shape, held.stride())
        else:
            capacity = length + added + min(ROOM * added, max(added, length // ROOM_SHARE))
            shape[dim] = capacity
            grown = held.new_empty(shape).narrow(dim, 0, length + added)
            grown.narrow(dim, 0, length).copy_(held)
        grown.narrow(dim, length, added).copy_(new)
        self.returned[slot] = grown.data_ptr(), length + added, capacity
        return grown

    @staticmethod
    def _ours(held: torch.Tensor, dim: int, capacity: int) -> bool:
        """Whether ``held`` starts an allocation of exactly ``capacity`` along ``dim`` (one this slot made) that
        torch lets us write into here (not an inference tensor outside inference mode)."""
        size = held.element_size() * held.numel() // max(1, held.shape[dim]) * capacity
        if held.storage_offset() != 0 or held.untyped_storage().nbytes() != size:
            return False
        return not held.is_inference() or torch.is_inference_mode_enabled()

    def clear(self) -> None:
        self.returned = {}
