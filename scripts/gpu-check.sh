#!/usr/bin/env bash
# The GPU check: kvbench's GPU tests and a speed/memory bench, in one go, within 8 minutes on one H100/H200.
#
#   scripts/gpu-check.sh [OUT]              on a CUDA machine (flash-attn optional: pip install 'kvbench[gpu]')
#   DRY_RUN=1 scripts/gpu-check.sh [OUT]    on a CPU: every step on a tiny random model and short prompts
#
# Everything it measures or prints goes under OUT (default gpu-check/<UTC time>):
#   environment.txt            GPU, driver, versions
#   gpu-tests.txt, .xml        pytest -m gpu (flash-attn against sdpa, CUDA peak memory per cell, bf16 default)
#   prepare.log                palu's and dynakv's artifacts for the model (dynakv: gates per budget), before
#                              the timed bench, which loads them from the cache
#   bench-<attn>.log           python -m kvbench bench with sdpa, then flash_attention_2
#   results/, reports/         the bench rows and reports (python -m kvbench report can remake them)
#   summary.md, summary.json   decode speed-up against full, next to the memory-bound limit (W + KV) / (W + b KV)
#   steps.log                  each step's exit status and seconds
#
# Each step has its own time limit, so a slow step cannot push the whole past 8 minutes; a step that fails or
# runs out of time is logged and the next one runs. Rows are flushed as measured, so a cut bench still counts.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${1:-gpu-check/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
GPU_TESTS=${GPU_TESTS:-tests}

if [ "${DRY_RUN:-0}" = 1 ]; then
    MODEL=random:llama-tiny DEVICE=cpu DTYPE=float32 LENGTHS=128,256 DECODE=4 REPEATS=1 WARMUP=0
    PALU="palu:calibration_tokens=128,multiple=1" DYNAKV="dynakv:calibration_tokens=128,steps=1,alpha=1"
    LIMIT_TESTS=120 LIMIT_PREPARE=240 LIMIT_BENCH=240
else
    MODEL=random:llama-3.1-8b DEVICE=cuda DTYPE=bfloat16 LENGTHS=8000,32000 DECODE=32 REPEATS=2 WARMUP=1
    PALU=palu DYNAKV=dynakv
    LIMIT_TESTS=60 LIMIT_PREPARE=150 LIMIT_BENCH=115
fi
BUDGETS=0.5,0.1
ATTENTIONS="sdpa flash_attention_2"

START=$SECONDS
step() {  # step NAME LIMIT_S LOG COMMAND...: run it with a time limit, log its status and seconds
    local name=$1 limit=$2 log=$3 begin=$SECONDS status
    shift 3
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    status=$?
    case $status in
        0) echo "$name: ok ($((SECONDS - begin)) s)" ;;
        124|137) echo "$name: cut at its limit of $limit s (partial results kept)" ;;
        *) echo "$name: failed with status $status ($((SECONDS - begin)) s); see $log" ;;
    esac | tee -a "$OUT/steps.log"
    return "$status"
}

{
    date -u
    echo "dry run: ${DRY_RUN:-0}; model $MODEL on $DEVICE ($DTYPE); lengths $LENGTHS; budgets $BUDGETS"
    command -v nvidia-smi >/dev/null && nvidia-smi
    "$PY" -c 'import platform, torch, transformers
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__)
print("devices:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or "cpu only")
try:
    import flash_attn
    print("flash-attn", flash_attn.__version__)
except ImportError:
    print("flash-attn not installed")'
} >"$OUT/environment.txt" 2>&1

step "gpu tests" "$LIMIT_TESTS" "$OUT/gpu-tests.txt" \
    "$PY" -m pytest -q -m gpu -p no:cacheprovider "$GPU_TESTS" --junitxml "$OUT/gpu-tests.xml"

# palu and dynakv fit artifacts for the model (dynakv trains its gates for each budget at the first prefill at
# that budget); they are cached, so a short prefill at each budget now keeps that work out of the timed bench.
# A method not ready within the limit is left out of the bench (steps.log says so).
step "prepare methods" "$LIMIT_PREPARE" "$OUT/prepare.log" "$PY" - "$OUT/prepared.txt" "$MODEL" "$DEVICE" "$DTYPE" \
    "$BUDGETS" "$PALU" "$DYNAKV" <<'PYTHON'
import sys
import time

import torch

from kvbench.models import load, parse_dtype, resolve
from kvbench.prefill import prefill, prepare
from kvbench.spec import parse_spec

ready, model_name, device, dtype, budgets, *specs = sys.argv[1:]
model, tokenizer = load(resolve(model_name), device, parse_dtype(dtype, device))
prompt = torch.randint(1000, 2000, (1, 256), generator=torch.Generator().manual_seed(0)).to(model.device)
for text in specs:
    start = time.perf_counter()
    method = parse_spec(text).method
    prepare(method, model, tokenizer)
    for budget in map(float, budgets.split(",")):
        try:
            prefill(model, method, budget, prompt)
        except Exception as error:  # the bench records it as an error row; the other budgets still count
            print(f"{text} @ {budget:g}: {type(error).__name__}: {error}", flush=True)
    print(f"{text}: ready in {time.perf_counter() - start:.1f} s", flush=True)
    with open(ready, "a") as out:
        out.write(text + "\n")
PYTHON
METHODS=snapkv
for spec in "$PALU" "$DYNAKV"; do
    if grep -qxF "$spec" "$OUT/prepared.txt" 2>/dev/null; then
        METHODS="$METHODS,$spec"
    else
        echo "bench: ${spec%%:*} left out (not prepared in time; see prepare.log)" | tee -a "$OUT/steps.log"
    fi
done

for attention in $ATTENTIONS; do
    if [ "$attention" = flash_attention_2 ] && ! "$PY" -c 'import flash_attn' 2>/dev/null; then
        echo "bench $attention: skipped, flash-attn is not installed (pip install 'kvbench[gpu]')" \
            | tee -a "$OUT/steps.log"
        continue
    fi
    step "bench $attention" "$LIMIT_BENCH" "$OUT/bench-$attention.log" \
        "$PY" -m kvbench bench --model "$MODEL" --methods "$METHODS" --budget "$BUDGETS" --lengths "$LENGTHS" \
        --decode-tokens "$DECODE" --repeats "$REPEATS" --warmup "$WARMUP" --device "$DEVICE" --dtype "$DTYPE" \
        --attn-implementation "$attention" --results-dir "$OUT/results" --reports-dir "$OUT/reports" \
        --run-id "bench-$attention"
done

step "summary" 30 "$OUT/summary.log" "$PY" - "$OUT" <<'PYTHON'
"""Decode speed-up of each method against full (same attention kernel, same length), next to the memory-bound
limit (W + KV) / (W + b KV): W = bytes of weights a step reads, KV = full cache bytes, b = achieved budget."""
import json
import sys
from pathlib import Path

from kvbench.report.tables import bandwidth_limit
from kvbench.results import load_results

out = Path(sys.argv[1])
lines = ["# GPU check: decode speed-up against the memory-bound limit", "",
         "Medians over repeats. `x full`: decode tokens/s over full's at the same length and kernel. `limit`: "
         "(W + KV) / (W + b KV) with b the achieved budget. `of limit`: x full / limit.", ""]
records = []
for run in sorted((out / "results").glob("bench-*")):
    rows = load_results(run)
    rows = rows[rows["status"] == "ok"]
    if rows.empty:
        continue
    rows = rows.assign(tok_s=rows["decode_tokens"] / rows["decode_s"])
    table = rows.groupby(["context_tokens", "method", "budget"], sort=False).agg(
        tok_s=("tok_s", "median"), prefill_s=("prefill_s", "median"), achieved=("achieved_budget", "median"),
        kv_bytes=("kv_bytes", "median"), full_kv_bytes=("full_kv_bytes", "median"),
        weights_bytes=("weights_bytes", "median"), peak=("peak_mem_bytes", "median")).reset_index()
    attention = run.name.removeprefix("bench-")
    lines += [f"## {attention}", "",
              "| tokens | method | budget | achieved | KV MiB | decode tok/s | x full | limit | of limit | "
              "prefill s | peak MiB |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for length, group in table.groupby("context_tokens", sort=True):
        full = group[group["method"] == "full"]
        for row in group.itertuples():
            speedup = row.tok_s / float(full["tok_s"].iloc[0]) if len(full) else float("nan")
            limit = bandwidth_limit(row.weights_bytes, row.full_kv_bytes, row.achieved)
            records.append({"attention": attention, "tokens": int(length), "method": row.method,
                            "budget": row.budget, "achieved_budget": row.achieved, "decode_tok_s": row.tok_s,
                            "speedup": speedup, "limit": limit, "of_limit": speedup / limit,
                            "prefill_s": row.prefill_s, "kv_bytes": row.kv_bytes, "peak_mem_bytes": row.peak})
            lines.append(f"| {length} | {row.method.split(':')[0]} | {row.budget:g} | {row.achieved:.3f} | "
                         f"{row.kv_bytes / 2**20:.1f} | {row.tok_s:.1f} | {speedup:.2f} | {limit:.2f} | "
                         f"{speedup / limit:.2f} | {row.prefill_s:.3f} | {row.peak / 2**20:.0f} |")
    lines.append("")
if not records:
    lines.append("No bench rows: see steps.log and the bench logs.")
(out / "summary.md").write_text("\n".join(lines) + "\n")
(out / "summary.json").write_text(json.dumps(records, indent=1) + "\n")
print("\n".join(lines))
PYTHON

echo "total: $((SECONDS - START)) s; everything is in $OUT" | tee -a "$OUT/steps.log"
