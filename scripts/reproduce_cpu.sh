#!/usr/bin/env bash
# Regenerates every table and figure of docs/REPRODUCTION.md on a 2-core CPU machine.
# The paper's protocol (configs/sweeps/cpu_paper_table.yaml: equal tokens for every arm) and the gate-mode
# ablation (configs/sweeps/gate_modes.yaml); results/ keeps finished runs in git, so it resumes across sessions and
# machines. The appendix's equal-FLOP table: CONFIG=configs/sweeps/cpu_paper_table_equal_flops.yaml
# OUT=results/cpu_paper_table TOKENS="[2000000,1000000]" GATE_MODES=0 (its reduced run: TOKENS="[300000,150000]").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin
SEEDS=${SEEDS:-"[0,1,2]"}
CONFIG=${CONFIG:-configs/sweeps/cpu_paper_table.yaml}
TOKENS=${TOKENS:-"[2000000]"}
OUT=${OUT:-results/paper_table_tokens}
GATE_MODES=${GATE_MODES:-1}
SPACY=../shared/models/spacy-en_core_web_sm-3.6.0

# 1. data: the real-text mix for training, the synthetic corpus as a second eval (same tokenizer)
[ -f data/cpu_mix/meta.json ] || $PY/dualpath prepare ../shared/data/wikitext-2/valid.txt@2::doc_split=heading \
  ../shared/data/tinyshakespeare.txt@1 ../shared/data/grimm/tales.txt@1 \
  "../shared/data/gsm8k/train.jsonl@1::template={question}\nAnswer: {answer}" \
  --out data/cpu_mix --vocab-size 8192 --val-fraction 0.02 --doc-split chunk --mix-until all --quiet
[ -f data/synthetic/meta.json ] || $PY/dualpath prepare synthetic --out data/synthetic \
  --tokenizer data/cpu_mix/tokenizer.json --max-tokens 200000 --synthetic-eval 100 --quiet

# 2. the iso-FLOP sweep -> $OUT/results.md, results.csv, bpb_vs_params.png, loss_vs_flops.png
# one thread per run, as the runs in results/ are trained: the thread count changes float rounding
$PY/dualpath sweep "$CONFIG" "seeds=$SEEDS" "tokens=$TOKENS" out_dir=$OUT --jobs 2 --threads 1
[ "$GATE_MODES" = 0 ] || $PY/dualpath sweep configs/sweeps/gate_modes.yaml "seeds=$SEEDS" --jobs 2 --threads 1

# 3. ablations of the best Dual arm of each budget (lowest mean val BPB over seeds), on every seed's model:
#    forced K (steps beyond the trained K reuse the last trained gain) and the gate overrides, those that hold
#    g_d + g_w per token and the raw ones that rescale the residual
for budget in $(cd "$OUT" && ls -d F*/ | tr -d /); do
  runs=$($PY/python - "$OUT" "$budget" <<'PY'
import csv, statistics, sys
rows = [r for r in csv.DictReader(open(f"{sys.argv[1]}/results.csv")) if r["arch"] == "dual"
        and f"F{float(r['budget']):.3g}" == sys.argv[2]]
arms = {}
for r in rows:
    arms.setdefault((r["K"], r["alpha"]), []).append(r)
if arms:
    (K, alpha), runs = min(arms.items(), key=lambda kv: statistics.mean(float(r["val_bpb"]) for r in kv[1]))
    print(" ".join(f"{sys.argv[1]}/{sys.argv[2]}/dual_K{K}_a{alpha}/seed{r['seed']}"
                   for r in sorted(runs, key=lambda r: int(r["seed"]))))
PY
)
  for run in $runs; do
    seed=${run##*/}
    model=$run
    # results/ keeps no checkpoints: on another machine, train the run again from its own config
    if [ ! -d "$run/checkpoints" ]; then
      model="$OUT/$budget/best_model_$seed"
      if [ ! -f "$model.done" ]; then  # the run's config has resume: auto, so this resumes too
        OMP_NUM_THREADS=1 $PY/dualpath train "$run/run.yaml" train.out_dir="$model" > "$model.log"
        touch "$model.done"
      fi
    fi
    $PY/dualpath eval "$model" --data data/cpu_mix ../shared/data/wikitext-2/test.txt ../shared/data/gsm8k/test.jsonl \
      --K 1,2,3,5,8 --extra-steps-gain last \
      --gates deep-favoured,wide-favoured,swapped,share-shuffled,share-shuffled-seq,shuffled,deep-only,wide-only,both=0.5 \
      --limit 32 --no-exact-match --out "$OUT/$budget/ablations_$seed.json" > "$OUT/$budget/ablations_$seed.md"
  done
  # 4. UPOS routing table and token-class overrides (arithmetic forced wide / deep) on GSM8K, first seed's model
  first=$(echo $runs | cut -d' ' -f1)
  [ -n "$first" ] || continue
  [ -d "$first/checkpoints" ] || first="$OUT/$budget/best_model_${first##*/}"
  $PY/dualpath analyze "$first" --jsonl ../shared/data/gsm8k/test.jsonl --field question,answer --out "$OUT/$budget/analysis" \
    --pos-model "$SPACY" --max-tokens 12000 --repeats 10 --compare ../shared/data/wikitext-2/test.txt > "$OUT/$budget/analysis.txt"
done
