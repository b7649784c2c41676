#!/usr/bin/env bash
# kvbench's SnapKV and Expected Attention beside kvpress's presses of the same name, in one process, on the same
# prompts (kvpress 0.5.5 pins transformers<5.3, so this runs in .venv-kvpress; see the README's kvpress section).
# The report's "kvbench beside kvpress" table pairs them: per-sample time (prefill + decoding) and KV bytes held.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv-kvpress/bin/python}
LENGTHS=${LENGTHS:-4096,8064}
REPEATS=${REPEATS:-2}
SUFFIX=${SUFFIX:-}
$PY -m kvbench bench --model smollm2-135m --device cpu \
    --methods "snapkv:window=64,kernel=5,pooling=avg,kvpress:SnapKVPress,expected_attention,kvpress:ExpectedAttentionPress" \
    --budget 0.1 --lengths "$LENGTHS" --decode-tokens 64 --repeats "$REPEATS" --run-id "speed-kvpress$SUFFIX"
