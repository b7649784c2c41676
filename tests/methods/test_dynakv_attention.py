"""DynaKV attends from its ragged coefficients (``ragged.py``) exactly as it would on the full-width reconstruction,
for both variants: a compressed prompt, a question chunk (causal inside it), greedy decoding, rows of a batch
that keep different ranks, and blocks of every rank class."""

from __future__ import annotations

import pytest
import torch
from dynakv_helpers import one_thread  # noqa: F401 - autouse fixture
from lowrank_helpers import ByteTokenizer, steps_in_place

from kvbench.layers import LAST_UPDATE
from kvbench.methods.dynakv import DynaKV, ragged
from kvbench.methods.dynakv.ragged import RaggedLayer
from kvbench.methods.lowrank import latent_attention as attention_module
from kvbench.prefill import cache_arguments, prefill, prepare
from kvbench.testing import calibration_file

CONTEXT, QUESTION, STEPS = 80, 12, 5
PAPER = dict(calibration_tokens=1536, steps=4, lr=0.05, alpha=2.0)
VARIANTS = {"paper": PAPER, "uniform": PAPER | {"adaptive": False},  # uniform: one rank class per layer and kind
            "ranker": dict(gate="ranker", calibration_tokens=768, ranker_steps=4, window=32)}


@pytest.fixture(scope="module")
def methods(tmp_path_factory):
    """One prepared DynaKV per variant on the tiny llama, and the model."""
    from kvbench.testing import tiny_model

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KVBENCH_CACHE", str(tmp_path_factory.mktemp("kvbench-cache")))
        text = str(calibration_file(tmp_path_factory.mktemp("text"), paragraphs=60))
        model = tiny_model("llama")
        prepared = {}
        for name, options in VARIANTS.items():
            method = DynaKV(**(options | {"data": text}))
            prepare(method, model, ByteTokenizer())
            prepared[name] = method
        yield model, prepared


def reconstructing(layout: type[RaggedLayer]) -> type[RaggedLayer]:
    """``layout`` attending the dense way: every held key and value rebuilt at full width from a plain record of
    what was appended (not from the buckets), through the model's kernel."""

    class Reconstructing(layout):
        def append(self, kind, row, kept, ranks):
            super().append(kind, row, kept, ranks)
            self.__dict__.setdefault("record", {}).setdefault((kind, row), []).append((kept, ranks.long()))

        def held_latents(self):
            width = self.codec.key_basis.shape[-1]
            latents = []
            for kind in ("key", "value"):
                rows = []
                for row in range(self.positions.shape[0]):
                    flat = torch.cat([kept for kept, _ in self.record[(kind, row)]])
                    ranks = torch.cat([r for _, r in self.record[(kind, row)]])
                    assert torch.equal(ranks, self.row_ranks(kind, row).long())
                    dense, start = flat.new_zeros(ranks.shape[0], width), 0
                    for token, rank in enumerate(ranks.tolist()):
                        dense[token, :rank] = flat[start:start + rank]
                        start += rank
                    rows.append(dense)
                latents.append(torch.stack(rows))
            return latents[0], latents[1], self.positions

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_latent:
                return super().update(key_states, value_states, *args, **kwargs)
            batch, _, new, _ = key_states.shape
            positions = torch.arange(self.seen_tokens, self.seen_tokens + new).expand(batch, new)
            self.store(key_states, value_states, positions)
            self.seen_tokens += new
            keys, values = self.codec.decode(*self.held_latents())
            LAST_UPDATE.set((self, keys))
            return keys, values

        def attend(self, query, scaling, attention_mask):
            return None

    return Reconstructing


def run(model, method, dense: bool, prompt: torch.Tensor, budget: float):
    """Compress the context, feed the question chunk, decode greedily: every logit and token, and the cache."""
    layout = method.layer_class()
    method.layer_class = (lambda: reconstructing(layout)) if dense else (lambda: layout)
    try:
        compressed = prefill(model, method, budget, prompt[:, :CONTEXT], logits_to_keep=0)
        cache, logits, tokens = compressed.cache, [compressed.logits], []
        with torch.inference_mode():
            logits.append(model(prompt[:, CONTEXT:], **cache_arguments(model, cache), logits_to_keep=0).logits)
            for _ in range(STEPS):
                tokens.append(logits[-1][:, -1:].argmax(-1))
                logits.append(model(tokens[-1], **cache_arguments(model, cache), logits_to_keep=1).logits)
    finally:
        del method.layer_class
    return logits, [t.tolist() for t in tokens], cache


@pytest.mark.parametrize(("variant", "batch"), [("paper", 1), ("paper", 2), ("uniform", 1), ("ranker", 1),
                                                ("ranker", 2)])
def test_attention_from_the_ragged_coefficients_equals_the_dense_reconstruction(methods, variant, batch, monkeypatch):
    model, prepared = methods
    if batch == 1 and variant != "uniform":  # small key chunks and score slices, classes [1, 2), [2, 4), [4, 8)...
        monkeypatch.setitem(attention_module.CHUNK_BYTES, "cpu", 5 * 32 * 4)
        monkeypatch.setitem(attention_module.SCORE_BYTES, "cpu", 4 * 100 * 4)
        monkeypatch.setattr(ragged, "RATIO", 2)
    prompt = torch.randint(0, 256, (batch, CONTEXT + QUESTION), generator=torch.Generator().manual_seed(3))
    budget = 0.3 if variant == "uniform" else 0.5  # uniform: ranks 9 and 10 of 32, one class [4, 16)
    fast_logits, fast_tokens, cache = run(model, prepared[variant], False, prompt, budget)
    slow_logits, slow_tokens, slow_cache = run(model, prepared[variant], True, prompt, budget)
    assert fast_tokens == slow_tokens
    for fast, slow in zip(fast_logits, slow_logits, strict=True):
        torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    assert cache.nbytes() == slow_cache.nbytes()
    classes = set()
    for layer in cache.layers:
        assert layer.keys is None and layer.values is None and layer.key_latents is None
        assert layer.held_tokens() == CONTEXT + QUESTION + STEPS
        for row in range(batch):
            for blocks in layer.row_blocks(row):
                classes.add(len(blocks))
                covered = [torch.arange(b.latents.shape[1]) if b.columns is None else b.columns for b in blocks]
                assert sorted(torch.cat(covered).tolist()) == list(range(layer.held_tokens()))  # each token once
    assert classes == {1} if variant == "uniform" else max(classes) > 1  # one class, or several, exercised
    if batch == 2:
        ranks = [torch.stack([layer.row_latents("value", b)[1] for b in range(2)]) for layer in cache.layers]
        assert any(not torch.equal(r[0], r[1]) for r in ranks)  # the rows keep different ranks


class Stub(RaggedLayer):
    """Buckets and blocks alone: ranks given, as a layout stores them."""

    def __init__(self) -> None:
        super().__init__()
        self.stored: list[torch.Tensor] = []

    def row_ranks(self, kind, row):
        return torch.cat(self.stored)


def blocks_of(*pieces: tuple[torch.Tensor, torch.Tensor]):
    """Append ``(flat, ranks)`` pieces in turn (a prompt, then arriving tokens) as keys and values; the key blocks."""
    layer = Stub()
    for flat, ranks in pieces:
        layer.stored.append(ranks)
        for kind in ("key", "value"):
            layer.append(kind, 0, flat, ranks)
    return layer, layer.row_blocks(0)[0]


def test_a_block_holds_less_than_ratio_times_its_stored_coefficients():
    ranks = torch.tensor([1, 3, 4, 15, 16, 63, 64, 100, 192, 2])
    flat = torch.arange(float(ranks.sum()))
    split = int(ranks[:5].sum())
    layer, blocks = blocks_of((flat[:split], ranks[:5]), (flat[split:], ranks[5:]))  # a prompt, then arriving tokens
    widths = sorted(b.latents.shape[-1] for b in blocks)
    assert widths == [3, 15, 63, 192]  # classes [1, 4), [4, 16), [16, 64), [64, 256): padded to their largest rank
    starts = ranks.cumsum(0) - ranks
    for b in blocks:
        stored = int(ranks[b.columns].sum())
        assert b.latents.numel() < ragged.RATIO * stored
        for row, column in enumerate(b.columns.tolist()):  # each token's prefix in its row, zeros beyond
            own = flat[int(starts[column]):int(starts[column]) + int(ranks[column])]
            assert torch.equal(b.latents[0, row], torch.cat([own, own.new_zeros(b.latents.shape[-1] - own.numel())]))
    assert sum(t.numel() for t in layer.stored_buckets()) == 2 * int(ranks.sum())  # K and V: no padding stored
    flat_again, ranks_again = layer.row_latents("key", 0)
    assert torch.equal(flat_again, flat) and torch.equal(ranks_again, ranks)
    _, two = blocks_of((torch.ones(12), torch.tensor([4, 5, 3])))
    assert len(two) == 2 and all(b.columns is not None for b in two)
    _, one = blocks_of((torch.ones(9), torch.tensor([4, 5])))
    assert len(one) == 1 and one[0].columns is None and one[0].latents.shape == (1, 2, 5)
    same = torch.arange(12.0)
    _, view = blocks_of((same, torch.tensor([3, 3, 3, 3])))  # one rank: the stored tensor itself, no copy
    assert len(view) == 1 and view[0].latents.data_ptr() == same.data_ptr() and view[0].latents.shape == (1, 4, 3)


def test_the_compiled_padding_equals_torch_padding(monkeypatch):
    """``kernel.pad_rows`` (compiled C) gives what ``masked_scatter_`` gives, rank 0 and the widest rank included;
    where it cannot apply (no compiler, disabled, a dtype it does not take) ``dense`` pads with torch."""
    from kvbench.methods.dynakv import kernel

    if kernel.library() is None:
        pytest.skip("no C compiler here: dense pads with torch (the fallback is what the other tests run)")
    ranks = torch.tensor([0, 1, 7, 192, 64, 0, 3], dtype=torch.uint8)
    flat = torch.randn(int(ranks.sum()))
    reference = flat.new_zeros(7, 192).masked_scatter_(ragged.prefix_mask(ranks.long(), 192), flat)
    assert torch.equal(kernel.pad_rows(flat, ranks, 192), reference)
    assert torch.equal(ragged.dense(flat, ranks.long(), 192), reference)
    assert kernel.pad_rows(flat.double(), ranks, 192) is None  # float32 only: dense pads with torch
    assert torch.equal(ragged.dense(flat.double(), ranks.long(), 192), reference.double())
    with pytest.raises(ValueError, match="do not fit"):
        kernel.pad_rows(flat, ranks, 100)  # never a write past the row
    with pytest.raises(ValueError, match="do not fit"):
        kernel.pad_rows(flat[:-1], ranks, 192)  # never a read past the coefficients
    with pytest.raises(ValueError, match="do not fit"):
        kernel.pad_rows(flat, torch.tensor([-1, *ranks[1:].tolist(), 1]), 192)  # nor a negative length
    monkeypatch.setattr(kernel, "_tried", False)
    monkeypatch.setattr(kernel, "_library", None)
    monkeypatch.setenv("KVBENCH_RAGGED_KERNEL", "0")
    assert kernel.pad_rows(flat, ranks, 192) is None
    assert torch.equal(ragged.dense(flat, ranks.long(), 192), reference)


def test_decoding_appends_in_place(methods):
    """Decoding writes each new token's coefficients, rank and position into the room behind the held ones."""
    model, prepared = methods
    prompt = torch.randint(0, 256, (1, CONTEXT + QUESTION), generator=torch.Generator().manual_seed(8))
    _, tokens, cache = run(model, prepared["paper"], False, prompt, 0.5)
    token = torch.tensor(tokens[-1]).view(1, 1)
    for tensor_of in (lambda layer: layer.positions, lambda layer: layer.ranks["value"]):
        assert steps_in_place(model, cache, token, tensor_of).count(False) >= 6
