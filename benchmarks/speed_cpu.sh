#!/usr/bin/env bash
# Decode tokens/s, prefill ratios, KV bytes and the bandwidth-limit ratios per method at 4K and 8K tokens on the
# embedded SmolLM2-135M, CPU, side by side with full in one process (python -m kvbench bench).
# Run on a quiet machine: nothing else running. Writes results/speed-cpu-{latent,latent-prefill,token}/ and their
# reports.
# 8064 + 128 decoded tokens = SmolLM2's 8192-token context.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LENGTHS=${LENGTHS:-4096,8064}
REPEATS=${REPEATS:-2}
SUFFIX=${SUFFIX:-}

# Latent (dimension) methods and compositions at budget 0.5: the decode-speed target (>= 0.8x full's tokens/s).
# dynakv:adaptive=false keeps DynaKV's per-layer ranks but gives every token the same one: what per-token ranks cost.
$PY -m kvbench bench --model smollm2-135m --device cpu \
    --methods palu,dynakv,dynakv:adaptive=false,palu+snapkv,dynakv+snapkv \
    --budget 0.5 --lengths "$LENGTHS" --decode-tokens 128 --repeats "$REPEATS" --run-id "speed-cpu-latent$SUFFIX"

# Prefill alone for the latent methods at 8K, three repeats (their prefill ratios are the noisiest figures above).
$PY -m kvbench bench --model smollm2-135m --device cpu --methods palu,dynakv,dynakv+snapkv \
    --budget 0.5 --lengths 8064 --decode-tokens 1 --repeats 3 --run-id "speed-cpu-latent-prefill$SUFFIX"

# Token methods: prefill with compression vs full (target <= 1.05x at 8K) and decoding against the limit.
$PY -m kvbench bench --model smollm2-135m --device cpu \
    --methods snapkv,expected_attention,pyramidkv,adakv,h2o,tova,knorm,streamingllm,keydiff,random,headkv,kvcompose \
    --budget 0.1 --lengths "$LENGTHS" --decode-tokens 64 --repeats "$REPEATS" --run-id "speed-cpu-token$SUFFIX"
