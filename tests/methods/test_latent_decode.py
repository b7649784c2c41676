"""Latent attention (``LatentLayer.attend``) equals attention on fully reconstructed K/V, and stores only latents.

The reference is how a latent cache used to attend: every step, rebuild every held key and value at full width
(``codec.decode``) and hand them to the model's own kernel. Compared over a compressed prompt, a multi-token
question chunk (causal inside the chunk) and greedy decoding, on tiny GQA models.
"""

from __future__ import annotations

import pytest
import torch
from lowrank_helpers import TINY, ByteTokenizer, steps_in_place

from kvbench.layers import LAST_UPDATE
from kvbench.methods.lowrank import latent_attention as attention_module
from kvbench.methods.lowrank.codec import LatentBlock, LatentLayer
from kvbench.prefill import cache_arguments, prefill, prepare
from kvbench.spec import parse_spec

CONTEXT, QUESTION, STEPS = 80, 12, 6


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))


def reconstructing(layout: type[LatentLayer]) -> type[LatentLayer]:
    """``layout`` attending the old way: full-width K/V of every held token, every step, through the kernel."""

    class Reconstructing(layout):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_latent:
                return super().update(key_states, value_states, *args, **kwargs)
            batch, _, new, _ = key_states.shape
            positions = torch.arange(self.seen_tokens, self.seen_tokens + new).expand(batch, new)
            self.store_latents(*self.codec.encode(key_states, value_states, positions), positions)
            self.seen_tokens += new
            keys, values = self.codec.decode(*self.held_latents())
            LAST_UPDATE.set((self, keys))
            return keys, values

        def attend(self, query, scaling, attention_mask):
            return None

    return Reconstructing


class RaggedLayer(LatentLayer):
    """A variable-rank stand-in (DynaKV's case): odd-numbered held tokens keep only the first ``KEPT`` key and value
    coefficients (zeros beyond, in the dense form), and attention gets them as a narrower block with columns."""

    KEPT = 3

    def store_latents(self, key_latents, value_latents, positions):
        odd = (positions % 2 == 1).unsqueeze(-1)
        super().store_latents(*(x.masked_fill(odd & (torch.arange(x.shape[-1]) >= self.KEPT), 0)
                                for x in (key_latents, value_latents)), positions)

    def latent_blocks(self):
        odd = (self.positions[0] % 2 == 1).nonzero().squeeze(1)
        even = (self.positions[0] % 2 == 0).nonzero().squeeze(1)
        blocks = []
        for latents in (self.key_latents, self.value_latents):
            blocks.append([LatentBlock(latents[:, even], even), LatentBlock(latents[:, odd, :self.KEPT], odd)])
        return blocks[0], blocks[1]


def run(model, spec_text: str, layout: type[LatentLayer] | None, prompt: torch.Tensor) -> tuple[list, list, object]:
    """Compress the context, feed the question chunk, decode greedily: every logit and token, and the cache."""
    method = parse_spec(spec_text).method
    if layout is not None:
        method.layer_class = lambda: layout
    prepare(method, model, ByteTokenizer())
    context, question = prompt[:, :CONTEXT], prompt[:, CONTEXT:]
    compressed = prefill(model, method, 0.5, context, logits_to_keep=0)
    cache, logits, tokens = compressed.cache, [compressed.logits], []
    with torch.inference_mode():
        logits.append(model(question, **cache_arguments(model, cache), logits_to_keep=0).logits)
        for _ in range(STEPS):
            tokens.append(logits[-1][:, -1:].argmax(-1))
            logits.append(model(tokens[-1], **cache_arguments(model, cache), logits_to_keep=1).logits)
    return logits, [t.tolist() for t in tokens], cache


def spec_of(name: str) -> str:
    dimension, _, token = name.partition("+")
    options = ",".join(f"{k}={v}" for k, v in TINY.items())
    head, _, own = dimension.partition(":")
    return f"{head}:{options}{',' + own if own else ''}{'+' + token if token else ''}"


@pytest.mark.parametrize("name", ["palu", "palu:group_size=1,multiple=4", "palu+snapkv"])
@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "small-chunks"])
def test_latent_attention_equals_full_width_reconstruction(model, name, chunked, monkeypatch):
    if chunked:  # 5-token key chunks, one query per slice (over 60 held tokens): boundaries everywhere
        kv_dim = model.config.num_key_value_heads * model.config.hidden_size // model.config.num_attention_heads
        monkeypatch.setitem(attention_module.CHUNK_BYTES, "cpu", 5 * kv_dim * 4)
        monkeypatch.setitem(attention_module.SCORE_BYTES, "cpu", model.config.num_attention_heads * 120 * 4)
    prompt = torch.randint(0, 256, (1, CONTEXT + QUESTION), generator=torch.Generator().manual_seed(3))
    spec = spec_of(name)
    fast_logits, fast_tokens, fast_cache = run(model, spec, None, prompt)
    layout = parse_spec(spec).method.layer_class()
    slow_logits, slow_tokens, slow_cache = run(model, spec, reconstructing(layout), prompt)
    assert fast_tokens == slow_tokens
    for fast, slow in zip(fast_logits, slow_logits, strict=True):
        torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    assert fast_cache.nbytes() == slow_cache.nbytes()
    for layer in fast_cache.layers:  # only latents and positions are held
        assert layer.keys is None and layer.values is None
        assert {id(t) for t in layer.tensors()} == {id(layer.key_latents), id(layer.value_latents), id(layer.positions)}
        assert layer.held_tokens() == layer.positions.shape[1] and layer.key_latents.shape[1] == layer.held_tokens()


def test_a_batch_of_rows_that_kept_different_tokens(llama):
    prompt = torch.randint(0, 256, (2, CONTEXT + QUESTION), generator=torch.Generator().manual_seed(6))
    fast_logits, fast_tokens, cache = run(llama, spec_of("palu+snapkv"), None, prompt)
    slow_logits, slow_tokens, _ = run(llama, spec_of("palu+snapkv"), reconstructing(LatentLayer), prompt)
    assert not torch.equal(cache.layers[1].positions[0], cache.layers[1].positions[1])
    assert fast_tokens == slow_tokens
    for fast, slow in zip(fast_logits, slow_logits, strict=True):
        torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


def test_blocks_of_several_widths_in_any_order_equal_the_dense_form(llama):
    prompt = torch.randint(0, 256, (1, CONTEXT + QUESTION), generator=torch.Generator().manual_seed(4))
    fast_logits, fast_tokens, _ = run(llama, spec_of("palu"), RaggedLayer, prompt)
    slow_logits, slow_tokens, _ = run(llama, spec_of("palu"), reconstructing(RaggedLayer), prompt)
    assert fast_tokens == slow_tokens
    for fast, slow in zip(fast_logits, slow_logits, strict=True):
        torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


def test_update_hands_attention_nothing_to_attend_to_without_the_layer(llama):
    """A latent layer's update returns zero keys: an attention function that ignored ``attend`` fails loudly."""
    prompt = torch.randint(0, 256, (1, CONTEXT), generator=torch.Generator().manual_seed(5))
    _, _, cache = run(llama, spec_of("palu"), None, torch.cat([prompt, prompt[:, :QUESTION]], 1))
    layer = cache.layers[0]
    keys, values = layer.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), 0)
    assert keys.shape == values.shape == (1, 2, 0, 16)
    assert layer.held_tokens() == CONTEXT + QUESTION + STEPS + 1


def test_the_rope_table_is_the_models_rotation_and_follows_inv_freq(llama):
    from kvbench.methods.lowrank.latent_attention import RopeTable
    from kvbench.rope import cos_sin, rotary_module

    rotary = rotary_module(llama)
    table = RopeTable.of(rotary).get(300, torch.device("cpu"))
    assert table.shape[0] >= 300 and RopeTable.of(rotary) is RopeTable.of(rotary)
    cos, sin = cos_sin(rotary, torch.arange(300), torch.float32)
    half = cos.shape[-1] // 2
    torch.testing.assert_close(table[:300], torch.complex(cos[:, :half], sin[:, :half]), atol=0, rtol=0)
    original = rotary.inv_freq.clone()
    try:
        rotary.inv_freq.mul_(0.5)  # what dynamic RoPE does in place
        cos, sin = cos_sin(rotary, torch.arange(300), torch.float32)
        torch.testing.assert_close(RopeTable.of(rotary).get(300, torch.device("cpu"))[:300],
                                   torch.complex(cos[:, :half], sin[:, :half]), atol=0, rtol=0)
    finally:
        rotary.inv_freq.copy_(original)


@pytest.mark.parametrize("name", ["palu", "full", "snapkv"])
def test_decoding_appends_in_place(llama, name):
    """A step writes the new token into the room behind the held latents (or keys and values: the full cache and
    eviction too), without copying the history."""
    prompt = torch.randint(0, 256, (1, CONTEXT + QUESTION), generator=torch.Generator().manual_seed(8))
    _, tokens, cache = run(llama, spec_of("palu") if name == "palu" else name, None, prompt)
    token = torch.tensor(tokens[-1]).view(1, 1)
    if name == "palu":
        moves = steps_in_place(llama, cache, token, lambda layer: layer.positions)
    else:
        moves = steps_in_place(llama, cache, token, lambda layer: layer.values, slot="values")
    assert moves.count(False) >= 6
