"""In-place appends: the same tensors as ``torch.cat``, no copy per step, bounded room."""

import torch

from kvbench.appending import ROOM, ROOM_SHARE, AppendBuffers


def test_appends_equal_cat_and_write_in_place_until_the_room_is_used():
    buffers, generator = AppendBuffers(), torch.Generator().manual_seed(0)
    held = torch.randn(2, 640, 3, generator=generator)
    expected = held.clone()
    moves = 0
    for _ in range(100):
        new = torch.randn(2, 1, 3, generator=generator)
        before = held.data_ptr()
        held = buffers.append("slot", held, new, 1)
        expected = torch.cat([expected, new], 1)
        moves += held.data_ptr() != before
        assert torch.equal(held, expected)
    # the first append reserves room for 640 / 16 = 40 tokens: a copy at appends 1, 42 and 85 (the room grows)
    assert moves == 3
    _, length, capacity = buffers.returned["slot"]
    assert length == held.shape[1] and capacity - length <= max(1, length // ROOM_SHARE)
    assert held.untyped_storage().nbytes() == 2 * capacity * 3 * 4  # the room belongs to the held tensor


def test_room_is_at_most_room_appends_of_the_size_just_made():
    buffers = AppendBuffers()
    held = buffers.append("flat", torch.zeros(100_000), torch.ones(3), 0)
    assert buffers.returned["flat"][2] == 100_003 + ROOM * 3 and held.numel() == 100_003
    assert held.untyped_storage().nbytes() == (100_003 + ROOM * 3) * 4


def test_a_stale_prefix_is_copied_not_written_over():
    buffers = AppendBuffers()
    base = buffers.append("slot", torch.arange(64.0), torch.tensor([64.0]), 0)
    first = buffers.append("slot", base, torch.tensor([65.0]), 0)
    second = buffers.append("slot", base, torch.tensor([-1.0]), 0)  # base again: another branch of the same prefix
    assert first.tolist() == [*range(66)] and second.tolist() == [*range(65), -1.0]
    assert buffers.append("slot", None, torch.tensor([7.0]), 0).tolist() == [7.0]


def test_inference_tensors_are_copied_outside_inference_mode():
    buffers = AppendBuffers()
    with torch.inference_mode():
        held = buffers.append("slot", torch.zeros(1, 32, 2), torch.ones(1, 1, 2), 1)
    held = buffers.append("slot", held, torch.full((1, 1, 2), 2.0), 1)  # torch forbids writing into it here
    assert held[0, -2:].tolist() == [[1.0, 1.0], [2.0, 2.0]] and held.shape == (1, 34, 2)


def test_a_tensor_that_only_looks_like_the_last_one_is_copied():
    """Same start and length as what the slot returned, but not its allocation (a view into other memory): the
    append must not write past it."""
    buffers = AppendBuffers()
    first = buffers.append("slot", torch.zeros(32), torch.ones(1), 0)
    other = torch.full((100,), 5.0)
    start, length, capacity = buffers.returned["slot"]
    buffers.returned["slot"] = other.data_ptr(), 33, capacity  # as if ``other`` had landed at the same address
    grown = buffers.append("slot", other[:33], torch.tensor([9.0]), 0)
    assert other[33] == 5.0 and grown[33] == 9.0 and first.shape == (33,)
