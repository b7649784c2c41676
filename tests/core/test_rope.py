"""Undoing RoPE recovers the model's own pre-RoPE keys exactly."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from kvbench.rope import apply_rope, cos_sin, rotary_module, undo_rope


def test_undo_rope_inverts_the_models_rotation(model, prompt):
    attention = model.model.layers[1].self_attn
    captured = {}
    hook = attention.k_proj.register_forward_hook(lambda m, i, out: captured.setdefault("k", out))
    post = {}

    def grab(module, args, kwargs, output):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # renamed in transformers 5.2x
        post["k"] = cache.layers[1].keys.clone()

    handle = attention.register_forward_hook(grab, with_kwargs=True)
    with torch.inference_mode():
        model(prompt, past_key_values=DynamicCache(config=model.config))
    hook.remove()
    handle.remove()
    kv_heads, head_dim = model.config.num_key_value_heads, attention.head_dim
    pre = captured["k"].view(1, -1, kv_heads, head_dim).transpose(1, 2)
    positions = torch.arange(prompt.shape[1])
    cos, sin = cos_sin(rotary_module(model), positions, torch.float32)
    assert cos.shape == (prompt.shape[1], head_dim)
    torch.testing.assert_close(apply_rope(pre, cos, sin), post["k"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(undo_rope(post["k"], cos, sin), pre, rtol=1e-4, atol=1e-5)
