#!/usr/bin/env bash
# The pre-registered GRPO vs MRT experiment on the chain task (README.md in this folder).
# Two runs at a time, one thread each (sized for 2 CPU cores).
#
#   bash results/chain_grpo_vs_mrt/run.sh            # lr sweep, grid, evaluation, J over training, table, plots
#   LR=3e-4 bash results/chain_grpo_vs_mrt/run.sh    # skip the sweep with a known lr
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
RUNS=${RUNS:-runs/chain_grpo_vs_mrt}
OUT=${OUT:-$HERE}
STEPS=${STEPS:-60}
SEEDS=${SEEDS:-"0 1 2"}
BATCH=${BATCH:-8}
EVAL_PROBLEMS=${EVAL_PROBLEMS:-128}   # smaller only for a smoke test of this script
PROBE_PROBLEMS=${PROBE_PROBLEMS:-32}
export OMP_NUM_THREADS=1

COMMON=(--train.global_batch_size "$BATCH" --train.mini_batch_size "$BATCH"
        --optim.scheduler constant --optim.warmup_ratio 0
        --algo.beta 0.02 --model.reference_model true --algo.normalize_std batch --algo.loss_agg token-mean
        --rollout.max_new_tokens 512 --rollout.n 4 --rollout.meta_k 8
        --eval.num_problems 0 --log.progress_bar false --checkpoint.keep_last 1
        --checkpoint.export_every $((STEPS / 2)))

declare -A ARM=(
  [grpo]="--algo.name grpo --algo.alpha 0"
  [mrt-rl]="--algo.name mrt-rl --algo.alpha 1 --algo.progress paper"
  [mrt-online]="--algo.name mrt-online --algo.alpha 1"
  [grpo-lp]="--algo.name grpo --algo.alpha 0 --algo.length_penalty 0.3"
)

train() {  # dir seed lr steps arm
  local dir=$1 seed=$2 lr=$3 steps=$4 arm=$5
  # shellcheck disable=SC2086
  python -m mrt_fast.train ${ARM[$arm]} "${COMMON[@]}" --train.seed "$seed" --train.steps "$steps" \
      --optim.lr "$lr" --output-dir "$dir" > "$dir.log" 2>&1
}

evaluate() {  # model-or-run-dir out-dir
  python -m mrt_fast.eval --model "$1" --num-problems "$EVAL_PROBLEMS" --n 4 --meta-k 8 --temperature 1.0 \
      --max-new-tokens 512 --budgets 192,256,320,384,448,512 --regret-tokens authors \
      --forcing-budget 1024 --forcing-step 128 --seed 0 --no-progress --out "$2" > "$2.log" 2>&1
}

probe() {  # model-dir (empty: the warm start) out-json: J along thinking, for the J table over training
  python -m mrt_fast.data.task_probe ${1:+--model "$1"} --only-progress --problems "$PROBE_PROBLEMS" --k 8 --out "$2" > "${2%.json}.log" 2>&1
}

mkdir -p "$RUNS/sweep" "$OUT"
if [ -z "${LR:-}" ]; then
  for pair in "1e-4 3e-4" "1e-3 3e-3"; do
    pids=()
    for lr in $pair; do train "$RUNS/sweep/grpo-lr$lr" 0 "$lr" 30 grpo & pids+=($!); done
    for pid in "${pids[@]}"; do wait "$pid"; done  # a failed run stops the script
  done
  LR=$(python "$HERE/pick_lr.py" "$RUNS"/sweep/grpo-lr*/metrics.jsonl)
fi
echo "lr: $LR" | tee "$OUT/lr.txt"

( evaluate embedded "$RUNS/warm-start-eval" && probe "" "$RUNS/warm-start-progress.json" ) & start_pid=$!
for seed in $SEEDS; do
  for pair in "grpo mrt-rl" "mrt-online grpo-lp"; do
    pids=()
    for arm in $pair; do
      run=$RUNS/$arm-$seed
      ( train "$run" "$seed" "$LR" "$STEPS" "$arm" && evaluate "$run" "$run/eval" &&
        probe "$run/hf-step_$((STEPS / 2))" "$run/progress-step$((STEPS / 2)).json" &&
        probe "$run/hf" "$run/progress-step$STEPS.json" ) & pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
  done
  echo "seed $seed done"
done
wait "$start_pid"

groups=(--group warm-start "$RUNS/warm-start-eval")
for arm in grpo mrt-rl mrt-online grpo-lp; do
  groups+=(--group "$arm"); for seed in $SEEDS; do groups+=("$RUNS/$arm-$seed/eval"); done
done
python -m mrt_fast.eval.compare "${groups[@]}" --out "$OUT" --baseline grpo
python "$HERE/training_curves.py" "$RUNS" "$OUT" grpo mrt-rl mrt-online grpo-lp
python "$HERE/j_over_training.py" "$RUNS" "$OUT" grpo mrt-rl mrt-online grpo-lp
