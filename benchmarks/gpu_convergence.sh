#!/usr/bin/env bash
# ReMaX vs. the kMaX-DeepLab objective from scratch on one GPU: remax_t on the synthetic data set at 641x641,
# 2 seeds each, equal schedules, several evaluation points; fits about 8 minutes on one H100/H200.
#
#   OUT=/path/to/results benchmarks/gpu_convergence.sh           # the GPU run (results, table and log in $OUT)
#   benchmarks/gpu_convergence.sh --smoke                         # the same pipeline on the CPU in ~1 minute
#
# The data set is generated on the host's CPUs first. Every setting can be overridden from the environment
# (STEPS, EVAL_EVERY, BATCH, TRAIN_IMAGES, VAL_IMAGES, SEEDS, BUDGET_S, PYTHON). When the time budget runs out
# the runs finished so far are still aggregated into the table.
set -euo pipefail

SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "gpu_convergence.sh: unknown argument $arg (use --smoke or nothing)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-runs/gpu_convergence}
mkdir -p "$OUT"
LOG="$OUT/log.txt"

if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu; AMP=none; SIZE=${SIZE:-64}; TRAIN_IMAGES=${TRAIN_IMAGES:-8}; VAL_IMAGES=${VAL_IMAGES:-2}
  STEPS=${STEPS:-4}; EVAL_EVERY=${EVAL_EVERY:-2}; BATCH=${BATCH:-2}; WORKERS=0; THREADS=${THREADS:-1}
  BUDGET_S=${BUDGET_S:-300}
else
  DEVICE=cuda; AMP=${AMP:-bf16}; SIZE=${SIZE:-640}; TRAIN_IMAGES=${TRAIN_IMAGES:-1000}; VAL_IMAGES=${VAL_IMAGES:-100}
  STEPS=${STEPS:-1000}; EVAL_EVERY=${EVAL_EVERY:-250}; BATCH=${BATCH:-16}; WORKERS=${WORKERS:-8}
  THREADS=${THREADS:-8}; BUDGET_S=${BUDGET_S:-420}
fi
SEEDS=${SEEDS:-"0 1"}
INPUT=$((SIZE + 1))
DATA="$OUT/synthetic$SIZE"

{
  echo "# gpu_convergence.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) smoke=$SMOKE device=$DEVICE"
  "$PYTHON" -c "import torch, platform; print('torch', torch.__version__, '| python', platform.python_version(), \
'| device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
  echo "# data: $TRAIN_IMAGES train / $VAL_IMAGES val synthetic images of ${SIZE}px -> $DATA"
} | tee "$LOG"
start=$(date +%s)
if [ ! -f "$DATA/annotations/panoptic_val.json" ]; then
  "$PYTHON" -m remax data synth --out "$DATA" --train "$TRAIN_IMAGES" --val "$VAL_IMAGES" --size "$SIZE" 2>&1 | tee -a "$LOG"
fi
echo "# data ready after $(( $(date +%s) - start )) s" | tee -a "$LOG"

COMMON=(--preset remax_t --steps "$STEPS" --eval-every "$EVAL_EVERY" --device "$DEVICE" --threads "$THREADS"
        --out "$OUT/runs" --reach 30 --dataset synthetic --probe
        --set "data.root=$DATA" --set "data.num_workers=$WORKERS"
        --set "model.input_size=[$INPUT,$INPUT]" --set "data.crop_size=[$INPUT,$INPUT]"
        --set "data.resize_longer_side=$SIZE" --set "train.batch_size=$BATCH" --set "train.base_batch_size=$BATCH"
        --set "train.amp=$AMP" --set "train.lr=0.002" --set "train.warmup_steps=$((STEPS / 10 + 1))"
        --set "train.backbone_lr_multiplier=1.0")

# One seed of both variants at a time, so that a cut-off leaves complete pairs.
remaining() { echo $(( BUDGET_S - ($(date +%s) - start) )); }
for seed in $SEEDS; do
  left=$(remaining)
  if [ "$left" -le 30 ]; then echo "# time budget spent before seed $seed" | tee -a "$LOG"; break; fi
  timeout -k 20 "$left" "$PYTHON" benchmarks/convergence.py "${COMMON[@]}" --variants remax kmax --seeds "$seed" \
    2>&1 | tee -a "$LOG" || echo "# seed $seed stopped by the time budget" | tee -a "$LOG"
done
# shellcheck disable=SC2086
"$PYTHON" benchmarks/convergence.py "${COMMON[@]}" --variants remax kmax --seeds $SEEDS --no-train \
  --doc "$OUT/convergence.md" 2>&1 | tee -a "$LOG"
echo "# total $(( $(date +%s) - start )) s; table in $OUT/runs/table.md, curves in $OUT/runs/pq_vs_step.png" | tee -a "$LOG"
