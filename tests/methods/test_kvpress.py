"""The kvpress adapter, and kvbench's methods against kvpress's presses (when kvpress is installed).

kvpress 0.5.5 pins transformers<5.3, so it lives in its own environment (README, "kvpress"):
``.venv-kvpress/bin/python -m pytest tests/test_kvpress.py``. In an environment without kvpress the
equivalence tests skip with that reason, and the spec error for ``kvpress:<Press>`` is tested instead.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvbench.cache import CompressedCache
from kvbench.methods.base import Full
from kvbench.spec import SpecError, parse_spec
from kvbench.testing import VOCAB, compress

HAVE_KVPRESS = importlib.util.find_spec("kvpress") is not None
needs_kvpress = pytest.mark.skipif(not HAVE_KVPRESS, reason="kvpress is not installed (it pins transformers<5.3; "
                                   "run in .venv-kvpress, see the README's kvpress section)")
N = 200

# kvbench spec <-> kvpress press with the same hyperparameters. SnapKV's window (32) stays below the kept count
# (50 at budget 0.25): when fewer tokens than the window are kept, kvbench keeps the window's latest tokens while
# kvpress gives the whole window one score and keeps whichever top-k's tie-breaking returns.
PAIRS = [
    ("snapkv:window=32,kernel=5,pooling=avg", "kvpress:SnapKVPress:window_size=32,kernel_size=5"),
    ("streamingllm:sink_tokens=4", "kvpress:StreamingLLMPress:n_sink=4"),
    ("knorm", "kvpress:KnormPress"),
    ("tova", "kvpress:TOVAPress"),
    ("keydiff", "kvpress:KeyDiffPress"),
    ("expected_attention", "kvpress:ExpectedAttentionPress"),
]


@pytest.mark.skipif(HAVE_KVPRESS, reason="kvpress is installed here")
def test_kvpress_spec_without_kvpress_says_how_to_install():
    with pytest.raises(SpecError, match="pip install kvpress"):
        parse_spec("kvpress:SnapKVPress")


def prefill(model, prompt, method, budget) -> CompressedCache:
    compressed = compress(model, method, budget, prompt)
    cache = compressed.cache
    return cache


def kept(cache: CompressedCache, full: CompressedCache) -> list[list[set[int]]]:
    """Per layer and KV head, the prompt positions whose keys the cache still holds."""
    found = []
    for layer, reference in zip(cache.layers, full.layers, strict=True):
        heads = []
        for head, ref in zip(layer.keys[0], reference.keys[0], strict=True):
            match = torch.cdist(head.float(), ref.float()).argmin(dim=-1)
            assert torch.equal(ref[match], head)
            heads.append(set(match.tolist()))
        found.append(heads)
    return found


@needs_kvpress
@pytest.mark.parametrize(("ours", "theirs"), PAIRS, ids=[p[0].split(":")[0] for p in PAIRS])
@pytest.mark.parametrize("budget", [0.5, 0.25])
def test_same_tokens_as_the_kvpress_press(model, ours, theirs, budget):
    prompt = torch.randint(0, VOCAB, (1, N), generator=torch.Generator().manual_seed(11))
    full = prefill(model, prompt, Full(), 1.0)
    mine = kept(prefill(model, prompt, parse_spec(ours).method, budget), full)
    press = kept(prefill(model, prompt, parse_spec(theirs).method, budget), full)
    assert [[len(h) for h in layer] for layer in mine] == [[len(h) for h in layer] for layer in press]
    if ours == "expected_attention":
        # kvpress recomputes the pre-RoPE queries from the hidden states; kvbench un-rotates the post-RoPE ones,
        # which differs by float rounding, so a near-tie at the cut-off may flip.
        same = sum(len(a & b) for la, lb in zip(mine, press, strict=True) for a, b in zip(la, lb, strict=True))
        assert same >= 0.98 * sum(len(a) for layer in mine for a in layer)
    else:
        assert mine == press


@needs_kvpress
def test_budget_0_1_kvpress_keeps_one_token_less_where_1_minus_ratio_rounds_down(llama):
    """kvpress keeps int(n x (1 - compression_ratio)); 1 - 0.9 = 0.0999... so at 200 tokens it keeps 19,
    kvbench floor(0.1 x 200) = 20. The 19 are kvbench's top 19."""
    prompt = torch.randint(0, VOCAB, (1, N), generator=torch.Generator().manual_seed(12))
    full = prefill(llama, prompt, Full(), 1.0)
    mine = kept(prefill(llama, prompt, parse_spec("knorm").method, 0.1), full)
    press = kept(prefill(llama, prompt, parse_spec("kvpress:KnormPress").method, 0.1), full)
    for la, lb in zip(mine, press, strict=True):
        for a, b in zip(la, lb, strict=True):
            assert len(a) == 20 and len(b) == 19 and b < a


@needs_kvpress
def test_evicting_press_is_measured_and_not_flagged_masked(llama):
    prompt = torch.randint(0, VOCAB, (1, N), generator=torch.Generator().manual_seed(13))
    method = parse_spec("kvpress:SnapKVPress:window_size=16").method
    cache = prefill(llama, prompt, method, 0.25)
    assert cache.nbytes() / cache.full_nbytes() == 0.25
    assert cache.held_tokens() == [50] * llama.config.num_hidden_layers
    assert method.row_fields(llama) == {"masked": False}
    assert cache.get_seq_length() == N  # logical length kept: later tokens get their true positions


@needs_kvpress
def test_masking_press_shows_achieved_budget_one_and_is_flagged(llama):
    prompt = torch.randint(0, VOCAB, (1, N), generator=torch.Generator().manual_seed(14))
    method = parse_spec("kvpress:AdaKVPress:press=SnapKVPress").method
    cache = prefill(llama, prompt, method, 0.25)
    assert cache.nbytes() == cache.full_nbytes()  # AdaKVPress hides keys from attention, keeps the tensors
    assert method.row_fields(llama) == {"masked": True}
    with torch.inference_mode():  # and the masking really applies while decoding
        masked = llama(prompt[:, -1:], past_key_values=cache, position_ids=torch.tensor([[N]])).logits
        plain = prefill(llama, prompt, Full(), 1.0)
        unmasked = llama(prompt[:, -1:], past_key_values=plain, position_ids=torch.tensor([[N]])).logits
    assert not torch.allclose(masked, unmasked)


@needs_kvpress
def test_press_options_and_errors():
    assert parse_spec("kvpress:SnapKVPress:window_size=32").canonical == "kvpress:SnapKVPress:window_size=32"
    with pytest.raises(SpecError, match="valid presses"):
        parse_spec("kvpress:NoSuchPress")
    with pytest.raises(SpecError, match="press=<PressName>"):
        parse_spec("kvpress:AdaKVPress")
    with pytest.raises(SpecError, match="unknown option"):
        parse_spec("kvpress:SnapKVPress:window=3")


def positions(cache, full) -> list[list[set[int]]]:
    """Per layer and KV head, the prompt positions held, matched to the nearest full-cache key (kvpress runs eager
    attention, kvbench sdpa: the keys of later layers agree to float rounding, not bit for bit)."""
    found = []
    for layer, reference in zip(cache.layers, full.layers, strict=True):
        heads = []
        for head, ref in zip(layer.keys[0], reference.keys[0], strict=True):
            exact = "donot_use_mm_for_euclid_dist"  # the matmul shortcut's rounding is larger than the difference
            distance, match = torch.cdist(head.float(), ref.float(), compute_mode=exact).min(dim=-1)
            assert float(distance.max()) < 1e-4 * float(ref.norm(dim=-1).min())
            heads.append(set(match.tolist()))
        found.append(heads)
    return found


KVCOMPOSE_SETTINGS = ["", "agg_task=mean", "agg_group=max", "agg_head=max", "add_mean_across_heads=false",
                      "keep_token_lower_bound=5"]


@needs_kvpress
@pytest.mark.parametrize("settings", KVCOMPOSE_SETTINGS, ids=lambda s: s or "defaults")
@pytest.mark.parametrize("budget", [0.5, 0.25])
def test_kvcompose_keeps_the_tokens_of_kvpress_kvcompose_press(model, settings, budget):
    """Same per-layer lengths and, in every layer and KV head, the same token positions as KVComposePress (kvpress
    0.5.5, called as its pipeline does: the press around a prefill of the context into a DynamicCache)."""
    from kvpress import KVComposePress
    from transformers import DynamicCache

    prompt = torch.randint(0, VOCAB, (1, N), generator=torch.Generator().manual_seed(15))
    full = prefill(model, prompt, Full(), 1.0)
    mine = prefill(model, prompt, parse_spec("kvcompose" + (":" + settings if settings else "")).method, budget)
    options = parse_spec("kvcompose" + (":" + settings if settings else "")).explicit
    press, theirs = KVComposePress(compression_ratio=1.0 - budget, **dict(options)), DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(prompt, past_key_values=theirs)
    assert [layer.keys.shape for layer in mine.layers] == [layer.keys.shape for layer in theirs.layers]
    assert positions(mine, full) == positions(theirs, full)


@needs_kvpress
def test_kvpress_kvcompose_bugs_that_kvbench_does_not_reproduce(llama):
    """What kvpress 0.5.5's KVComposePress does, run here: value-norm weighting fails (it multiplies n scores by the
    norms of the 2n-token cache); the unstructured variant leaves the re-fed copy of the context in the cache,
    unmasked (2n tokens per layer); with a batch of two it returns a cache of the first row only."""
    from kvpress import KVComposePress
    from transformers import DynamicCache

    prompt = torch.randint(0, VOCAB, (2, N), generator=torch.Generator().manual_seed(16))
    with pytest.raises(RuntimeError, match="size of tensor"), torch.no_grad(), \
            KVComposePress(compression_ratio=0.75, add_v_norm=True)(llama):
        llama(prompt[:1], past_key_values=DynamicCache(config=llama.config))
    cache = DynamicCache(config=llama.config)
    with torch.no_grad(), KVComposePress(compression_ratio=0.75, structured=False)(llama):
        llama(prompt[:1], past_key_values=cache)
    assert [layer.keys.shape[2] for layer in cache.layers] == [2 * N] * llama.config.num_hidden_layers
    for module in llama.model.layers:
        del module.self_attn.masked_key_indices  # kvpress's masking patch would apply to the next tests
    cache = DynamicCache(config=llama.config)
    with torch.no_grad(), KVComposePress(compression_ratio=0.75)(llama):
        llama(prompt, past_key_values=cache)
    assert cache.layers[0].keys.shape[0] == 1
    ours = prefill(llama, prompt[:1], parse_spec("kvcompose:add_v_norm=true").method, 0.25)
    assert ours.nbytes() <= 0.25 * ours.full_nbytes()
