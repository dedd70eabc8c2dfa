#!/bin/sh
# The learning check (BENCHMARKS.md): the base model, the reference-reward (RLVR) run and self-play at the same
# wall-clock budget, evaluated on 200 held-out generated items and compared item by item (selfplay eval --compare).
#   OUT=/tmp/learning-check BUDGET=1500 sh bench/learning_check.sh            # PHASES="rlvr selfplay" by default
set -eu
OUT=${OUT:-/tmp/learning-check}
BUDGET=${BUDGET:-1500}
PHASES=${PHASES:-"rlvr selfplay"}
PY=${PY:-.venv/bin/python}
CFG=configs/learning_check.yaml
mkdir -p "$OUT"
# 200 held-out items: level-1 arithmetic and algebra of seed 0 (the training split is seed 1, minus these)
$PY -c "
from selfplay.evaluation.benchmarks import generate_benchmark, save_jsonl
save_jsonl(generate_benchmark(200, seed=0, kinds=['arithmetic', 'algebra'], levels=[1]), '$OUT/held_out.jsonl')"
EVAL="$PY -m selfplay eval --model embedded --benchmark $OUT/held_out.jsonl --no-tools --config $CFG"
echo "base eval $(date -u)"
[ -f "$OUT/eval-base/results.json" ] || $EVAL --out "$OUT/eval-base"
for phase in $PHASES; do
  mode=$([ "$phase" = rlvr ] && echo reference || echo selfplay)
  echo "$phase run $(date -u)"
  $PY -m selfplay run $CFG run_dir="$OUT/$phase" eval.benchmark="$OUT/held_out.jsonl" loop.mode=$mode \
      loop.time_budget_s="$BUDGET"
  echo "$phase eval $(date -u)"
  $EVAL --adapter "$OUT/$phase/checkpoints" --out "$OUT/eval-$phase"
  $PY -m selfplay eval --compare "$OUT/eval-base" "$OUT/eval-$phase" | tee "$OUT/compare-$phase.txt"
done
echo "done $(date -u)"
