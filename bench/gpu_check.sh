#!/usr/bin/env bash
# First contact with a GPU: checks and headline figures in at most 8 minutes, no network, no pip.
#
#   bash bench/gpu_check.sh                    # on one H100/H200, from the source tree
#   bash bench/gpu_check.sh --cpu-dry-run      # small shapes on the CPU: checks the script itself
#   bash bench/gpu_check.sh --out report.md    # where the markdown report goes
#   bash bench/gpu_check.sh --parts env,loss   # only these parts
#
# Needs torch, triton, transformers and pytest; vllm, flash-attn, liger-kernel, datasets and
# math-verify are optional (a part that needs one says so). Each part runs in its own process
# under `timeout`; a failure or a timeout is reported and the next part still runs. The report
# (stdout and --out) is markdown meant to be pasted into bench/RESULTS.md.
set -u

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false

dry_run=""
out="gpu_check_report.md"
only=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-dry-run) dry_run="--cpu-dry-run" ;;
        --out) out="$2"; shift ;;
        --parts) only=",$2,"; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ -n "$dry_run" ]; then
    # The kernels part runs Triton through the interpreter; everything else takes the PyTorch path.
    export TRITON_INTERPRET=1 MRT_FAST_KERNEL_BACKEND=torch CUDA_VISIBLE_DEVICES=""
elif ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device visible; use --cpu-dry-run to check the script on a CPU" >&2
    exit 2
fi

# part:seconds. The GPU time boxes sum to 475 s, inside 8 minutes.
if [ -n "$dry_run" ]; then
    parts="env:120 kernels:300 loss:300 attention:300 train:300 gpu_train:300 vllm:60"
else
    parts="env:20 kernels:80 loss:70 attention:85 train:70 gpu_train:90 vllm:60"
fi
if [ -n "$only" ]; then
    selected=""
    for entry in $parts; do
        case "$only" in *",${entry%%:*},"*) selected="$selected $entry" ;; esac
    done
    [ -z "$selected" ] && { echo "gpu_check.sh: --parts names none of: $parts" >&2; exit 2; }
    parts="$selected"
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
summary=""
failed=0
for entry in $parts; do
    part="${entry%%:*}"
    limit="${entry##*:}"
    t0=$(date +%s)
    if [ "$part" = gpu_train ]; then
        if [ ! -f bench/gpu_train_check.py ]; then
            summary+="| $part | skipped (no bench/gpu_train_check.py) | 0 |"$'\n'
            continue
        fi
        cmd=(python bench/gpu_train_check.py ${dry_run:+--cpu})
    else
        cmd=(python bench/gpu_check.py "$part" $dry_run)
    fi
    echo "[gpu_check] $part (time box ${limit} s) ..." >&2
    timeout --kill-after=10 "$limit" "${cmd[@]}" >"$work/$part.md" 2>"$work/$part.err"
    rc=$?
    seconds=$(( $(date +%s) - t0 ))
    case $rc in
        0) status="ok" ;;
        124|137) status="TIMEOUT after ${limit} s"; failed=1 ;;
        *) status="FAILED (exit $rc)"; failed=1 ;;
    esac
    summary+="| $part | $status | $seconds |"$'\n'
    if [ $rc -ne 0 ]; then
        { echo; echo "<details><summary>$part: last lines of stderr</summary>"; echo; echo '```';
          tail -n 25 "$work/$part.err"; echo '```'; echo "</details>"; } >>"$work/$part.md"
    fi
    echo "[gpu_check] $part: $status (${seconds} s)" >&2
done

{
    echo "## GPU first-contact check ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "Command: \`bash bench/gpu_check.sh${dry_run:+ $dry_run}\`, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown),"
    echo "$(( $(date +%s) - start )) s in all.${dry_run:+ CPU dry run: small shapes, the figures only show that the script works.}"
    echo
    echo "| part | status | s |"
    echo "|---|---|---|"
    printf "%s" "$summary"
    for entry in $parts; do
        part="${entry%%:*}"
        [ -s "$work/$part.md" ] && { echo; cat "$work/$part.md"; }
    done
} >"$work/report.md"
cp "$work/report.md" "$out"
cat "$out"
echo "[gpu_check] report written to $out" >&2
exit $failed
