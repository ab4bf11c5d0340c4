#!/usr/bin/env bash
# Regenerates every table and figure of docs/REPRODUCTION.md on a 2-core CPU machine.
# SEEDS and TOKENS default to the full sweep of configs/sweeps/cpu_paper_table.yaml (see docs/REPRODUCTION.md for
# its measured time; results/ keeps finished runs in git, so it resumes across sessions and machines);
# the reduced run recorded in docs/REPRODUCTION.md used: TOKENS="[300000,150000]" OUT=runs/cpu_reduced
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin
SEEDS=${SEEDS:-"[0,1,2]"}
TOKENS=${TOKENS:-"[2000000,1000000]"}
OUT=${OUT:-results/cpu_paper_table}
SPACY=../shared/models/spacy-en_core_web_sm-3.6.0

# 1. data: the real-text mix for training, the synthetic corpus as a second eval (same tokenizer)
[ -f data/cpu_mix/meta.json ] || $PY/dualpath prepare ../shared/data/wikitext-2/valid.txt@2::doc_split=heading \
  ../shared/data/tinyshakespeare.txt@1 ../shared/data/grimm/tales.txt@1 \
  "../shared/data/gsm8k/train.jsonl@1::template={question}\nAnswer: {answer}" \
  --out data/cpu_mix --vocab-size 8192 --val-fraction 0.02 --doc-split chunk --mix-until all --quiet
[ -f data/synthetic/meta.json ] || $PY/dualpath prepare synthetic --out data/synthetic \
  --tokenizer data/cpu_mix/tokenizer.json --max-tokens 200000 --synthetic-eval 100 --quiet

# 2. the iso-FLOP sweep -> $OUT/results.md, results.csv, bpb_vs_params.png, loss_vs_flops.png
# two one-thread jobs, as the runs in results/ are trained: the thread count changes float rounding
$PY/dualpath sweep configs/sweeps/cpu_paper_table.yaml "seeds=$SEEDS" "tokens=$TOKENS" out_dir=$OUT --jobs 2

# 3. ablations of the best Dual arm of each budget (lowest mean val BPB over seeds; its first seed's model):
#    forced K and gate overrides
for budget in $(cd "$OUT" && ls -d F*/ | tr -d /); do
  best=$($PY/python - "$OUT" "$budget" <<'PY'
import csv, statistics, sys
rows = [r for r in csv.DictReader(open(f"{sys.argv[1]}/results.csv")) if r["arch"] == "dual"
        and f"F{float(r['budget']):.3g}" == sys.argv[2]]
arms = {}
for r in rows:
    arms.setdefault((r["K"], r["alpha"]), []).append(r)
(K, alpha), runs = min(arms.items(), key=lambda kv: statistics.mean(float(r["val_bpb"]) for r in kv[1]))
seed = min(runs, key=lambda r: int(r["seed"]))["seed"]
print(f"{sys.argv[1]}/{sys.argv[2]}/dual_K{K}_a{alpha}/seed{seed}")
PY
)
  [ -n "$best" ] || continue
  # results/ keeps no checkpoints: on another machine, train the best run again from its own config
  if [ ! -d "$best/checkpoints" ]; then
    OMP_NUM_THREADS=1 $PY/dualpath train "$best/run.yaml" train.out_dir="$OUT/$budget/best_model" > "$OUT/$budget/best_model.log"
    best="$OUT/$budget/best_model"
  fi
  $PY/dualpath eval "$best" --data data/cpu_mix ../shared/data/wikitext-2/test.txt ../shared/data/gsm8k/test.jsonl \
    --force-K 1,2,3,5,8,10 --gates deep-only,wide-only,both=0.5,both=1,shuffled --limit 32 --no-exact-match \
    --out "$OUT/$budget/ablations.json" > "$OUT/$budget/ablations.md"
  # 4. UPOS routing table and token-class overrides (arithmetic forced wide / deep) on GSM8K
  $PY/dualpath analyze "$best" --jsonl ../shared/data/gsm8k/test.jsonl --field question,answer --out "$OUT/$budget/analysis" \
    --pos-model "$SPACY" --max-tokens 12000 --repeats 10 --compare ../shared/data/wikitext-2/test.txt > "$OUT/$budget/analysis.txt"
done
