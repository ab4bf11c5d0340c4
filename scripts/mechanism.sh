#!/usr/bin/env bash
# Regenerates everything of docs/MECHANISM.md on a 2-core CPU machine (about 2 hours), resumable: finished runs
# are reused, unfinished ones resume from their last checkpoint.
#   lane 1: `dualpath mechanism` -- routing by category over 3 seeds, the gate study, the other synthetic world
#   lane 2: the dose-response sweep -- 3 recall_facts values x 3 arms x 3 seeds, then dose_response.png
# One thread per lane, side by side. OUT: where the study goes (default results/mechanism).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin
OUT=${OUT:-results/mechanism}
export OMP_NUM_THREADS=1
start=$(date +%s)
$PY/dualpath mechanism "$OUT" --seeds 0,1,2 --world-seed 1 &
lane1=$!
$PY/dualpath sweep configs/sweeps/mechanism_dose_response.yaml --jobs 1 --threads 1 &
lane2=$!
status=0
wait $lane1 || status=$?
wait $lane2 || status=$?
echo "mechanism study: $(( ($(date +%s) - start) / 60 )) min; $OUT/{routing,gate_study,world1}.md," \
  "results/mechanism_dose_response/{results.md,dose_response.png}"
exit $status
