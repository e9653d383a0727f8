#!/usr/bin/env bash
# The GPU speed suite in one run (about 8 minutes on one H100/H200): every ReMaX preset (T/S/M/B) and kmax_r50 at
# batch 1 in bf16, eager and torch.compile, network alone and end to end with a trained-shape merge load, the
# Mask2Former-R50 peer under the same protocol, training images/s and peak memory for remax_t and remax_m.
#
#   OUT=/path/to/results benchmarks/gpu_suite.sh     # the GPU run: $OUT/suite.md (table), suite.json, log.txt
#   benchmarks/gpu_suite.sh --smoke                   # the same code on the CPU at a tiny size (CI runs this)
#
# Overrides from the environment: PRESETS, TRAIN_PRESETS, TRAIN_BATCH, COMPILE (off,on), ITERS, WARMUP, SIZE,
# BUDGET_S (no new measurement starts after it; the rest is listed as skipped), PYTHON.
set -euo pipefail

SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument $arg (use --smoke or nothing)" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON=${PYTHON:-$( [ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3 )}
OUT=${OUT:-runs/gpu_suite}
mkdir -p "$OUT"

if [ "$SMOKE" = 1 ]; then
  ARGS=(--device cpu --precision fp32 --presets "${PRESETS:-remax_t,kmax_r50}" --train-presets "${TRAIN_PRESETS:-remax_t}"
        --train-batch "${TRAIN_BATCH:-2}" --compile "${COMPILE:-off}" --size "${SIZE:-65}" --iters "${ITERS:-1}"
        --warmup "${WARMUP:-0}" --threads 1 --budget-s "${BUDGET_S:-300}")
else
  ARGS=(--device cuda --precision bf16 --presets "${PRESETS:-remax_t,remax_s,remax_m,remax_b,kmax_r50}"
        --train-presets "${TRAIN_PRESETS:-remax_t,remax_m}" --train-batch "${TRAIN_BATCH:-8}"
        --compile "${COMPILE:-off,on}" --iters "${ITERS:-50}" --warmup "${WARMUP:-10}" --budget-s "${BUDGET_S:-420}")
  [ -n "${SIZE:-}" ] && ARGS+=(--size "$SIZE")
fi

echo "# gpu_suite.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) smoke=$SMOKE" | tee "$OUT/log.txt"
"$PYTHON" "$REPO/benchmarks/gpu_suite.py" --out "$OUT" "${ARGS[@]}" 2>&1 | tee -a "$OUT/log.txt"
