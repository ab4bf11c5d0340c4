#!/usr/bin/env bash
# The Duo-LLM experiment of docs/DUO.md on the 12-layer default (configs/duo_12l.yaml), resumable: every step
# is skipped when its output exists, and training resumes from its last checkpoint.
#   per seed: stage 1 (random routing), routers (every kind and variant), the held-out report (bs oracles, the
#   variable-budget oracle), the with-skip report; then the findings over seeds ($OUT/findings/findings.md).
# The full run: scripts/duo_12layer.sh (about 2 CPU hours on 2 cores). The shortened check of docs/DUO.md:
#   OUT=runs/duo12_check SEEDS=0 STEPS=300 ROUTER_STEPS=60 VAL=16 SELECT=16 LABELS=16 TRIALS=20 BOOT=200 \
#   THREADS=1 scripts/duo_12layer.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin
OUT=${OUT:-runs/duo12}
SEEDS=${SEEDS:-"0 1 2"}
STEPS=${STEPS:-1500}          # stage-1 steps of 32 x 64 tokens (3.1M tokens)
ROUTER_STEPS=${ROUTER_STEPS:-400}
BUDGETS=${BUDGETS:-1,3,6,9}  # big layers of 12
VAL=${VAL:-64}               # validation windows scored
SELECT=${SELECT:-64}         # training windows on which fixed patterns are chosen
LABELS=${LABELS:-64}         # training windows labelled by the oracle for the supervised routers
TRIALS=${TRIALS:-100}        # best of N random patterns
BOOT=${BOOT:-1000}
THREADS=${THREADS:-2}
export OMP_NUM_THREADS=$THREADS

[ -f "$OUT/data/meta.json" ] || $PY/dualpath prepare ../shared/data/tinyshakespeare.txt --out "$OUT/data" \
  --vocab-size 512 --val-fraction 0.03 --quiet

for seed in $SEEDS; do
  run=$OUT/seed$seed
  common=(--data "$OUT/data" --max-sequences "$VAL")
  # 1. stage 1: random routing (big 0.5, small 0.4, skip 0.1)
  [ -f "$run/stage1.done" ] || { $PY/dualpath train configs/duo_12l.yaml --steps "$STEPS" --out "$run" --resume auto \
    data.path="$OUT/data" train.seed="$seed" && touch "$run/stage1.done"; }
  # 2. routers: every kind and variant at half the layers big, the two plain ones at a quarter and three quarters
  routers=()
  train_router() {  # name budget args...
    local dir=$run/routers/$1 budget=$2 skip=""
    shift 2
    [[ " $* " == *" bsx "* ]] && skip=_bsx
    # oracle routers of one budget share their labels (kept under labels/)
    [ -f "$dir/router.json" ] || $PY/dualpath duo train-router "$run" --budget "$budget" --steps "$ROUTER_STEPS" \
      --label-sequences "$LABELS" --labels "$run/labels/budget$budget$skip.pt" --seed "$seed" "${common[@]}" \
      --out "$dir" "$@" >/dev/null
    routers+=(--router "$dir")
  }
  train_router budget_pre_bs 0.5
  train_router budget_post_bs 0.5 --input post
  train_router budget_pre_bsx 0.5 --choices bsx
  train_router budget_pre_bs_mlp 0.5 --hidden 64
  train_router oracle_pre_bs 0.5 --kind oracle
  train_router oracle_post_bs_mlp 0.5 --kind oracle --input post --hidden 64
  train_router oracle_pre_bsx 0.5 --kind oracle --choices bsx
  for b in 0.25 0.75; do
    train_router "budget_pre_bs_$b" "$b"
    train_router "oracle_pre_bs_$b" "$b" --kind oracle
  done
  # 3. the comparison: fixed patterns chosen on training windows, scored on validation windows
  [ -f "$run/report/report.json" ] || $PY/dualpath duo report "$run" --budgets "$BUDGETS" "${common[@]}" \
    --select-sequences "$SELECT" --random-trials "$TRIALS" --bootstrap "$BOOT" --seed "$seed" "${routers[@]}" \
    --out "$run/report" >/dev/null
  # 4. the same budgets when the non-big layers may also skip (beam search beyond 4096 patterns)
  [ -f "$run/report_skip/report.json" ] || $PY/dualpath duo report "$run" --budgets "$BUDGETS" "${common[@]}" \
    --with-skip --no-variable-budget --select-sequences "$SELECT" --random-trials "$TRIALS" --bootstrap "$BOOT" \
    --seed "$seed" "${routers[@]}" --out "$run/report_skip" >/dev/null
done

# 5. the findings over seeds
reports=()
for seed in $SEEDS; do reports+=("$OUT/seed$seed/report"); done
skips=()
for seed in $SEEDS; do skips+=(--skip-report "$OUT/seed$seed/report_skip"); done
$PY/dualpath duo findings "${reports[@]}" "${skips[@]}" --out "$OUT/findings"
