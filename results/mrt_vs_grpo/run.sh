#!/usr/bin/env bash
# GRPO (alpha = 0, group baseline) vs MRT-RL (alpha = 1, termination baseline) on the embedded task:
# same shipped warm start, same steps, seeds 0..2; each run evaluated on the same 64 held-out
# problems. Two runs at a time, one thread each (the 2-core CPU machine). Writes runs/mrt_vs_grpo/
# and the table + plots in results/mrt_vs_grpo/.
#
#   bash results/mrt_vs_grpo/run.sh            # ~25 min on 2 quiet cores
#   STEPS=60 SEEDS="0 1 2 3 4" bash results/mrt_vs_grpo/run.sh
set -euo pipefail
RUNS=${RUNS:-runs/mrt_vs_grpo}
OUT=${OUT:-results/mrt_vs_grpo}
STEPS=${STEPS:-30}
SEEDS=${SEEDS:-"0 1 2"}
export OMP_NUM_THREADS=1

train() {  # algo seed extra-args...
  local algo=$1 seed=$2; shift 2
  python -m mrt_fast.train --algo.name "$algo" "$@" --train.seed "$seed" --train.steps "$STEPS" \
      --optim.lr 3e-4 --optim.scheduler constant --optim.warmup_ratio 0 \
      --eval.num_problems 0 --log.progress_bar false --checkpoint.keep_last 1 \
      --output-dir "$RUNS/$algo-$seed" > "$RUNS/$algo-$seed.log" 2>&1
  evaluate "$RUNS/$algo-$seed"
}

evaluate() {  # model-or-run-dir; writes <dir>/eval (run dirs) or $RUNS/warm-start/eval
  local model=$1 out=$1/eval
  [ "$model" = embedded ] && out=$RUNS/warm-start/eval
  python -m mrt_fast.eval --model "$model" --num-problems 64 --n 4 --meta-k 4 --max-new-tokens 256 \
      --budgets 64,128,192,256 --seed 0 --no-progress --out "$out" > "$out.log" 2>&1
}

mkdir -p "$RUNS/warm-start" "$OUT"
evaluate embedded
for seed in $SEEDS; do
  train grpo "$seed" &
  train mrt-rl "$seed" --algo.alpha 1.0 &
  wait
  echo "seed $seed done"
done
groups=()
for algo in grpo mrt-rl; do
  groups+=(--group "$algo"); for seed in $SEEDS; do groups+=("$RUNS/$algo-$seed/eval"); done
done
python -m mrt_fast.eval.compare --group warm-start "$RUNS/warm-start/eval" "${groups[@]}" --out "$OUT"
