#!/usr/bin/env bash
# Create a virtual environment and install mrt-fast into it, from a clone of the repository.
#
#   bash scripts/setup.sh cpu          # a machine without an NVIDIA GPU: the CPU build of torch (~200 MB)
#   bash scripts/setup.sh gpu          # an NVIDIA GPU machine: PyPI's CUDA build of torch (brings triton)
#   VENV=~/venvs/mrt EXTRAS=dev,tensorboard bash scripts/setup.sh cpu
#
# Then: source .venv/bin/activate && python -m mrt_fast.train
#
# VENV    where the environment goes (default .venv)
# EXTRAS  optional parts, comma-separated (default dev): dev = tests + triton (to run the Triton
#         kernels in the interpreter on a CPU; about 1 GB), tensorboard, vllm, flash-attn, triton.
#         EXTRAS= (empty) installs only what training and evaluation need.
# PYTHON  the interpreter to build the environment from (default python3; 3.10 or newer)
# TORCH_INDEX  (cpu only) where the CPU build of torch comes from (default: PyTorch's CPU index);
#         set it to a mirror, or to nothing to use pip's configured index.
set -euo pipefail
TARGET=${1:-}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS-dev}
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."

case "$TARGET" in
  cpu) TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}
       TORCH=(torch ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}) ;;
  gpu) TORCH=(torch) ;;
  *) echo "usage: bash scripts/setup.sh cpu|gpu   (see the comments at the top of this file)" >&2; exit 2 ;;
esac

"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install --upgrade pip
# torch first, from the right index: installing the project first would let pip resolve `torch`
# from PyPI, which on Linux is the multi-GB CUDA build even on a machine without a GPU.
"${PIP[@]}" install "${TORCH[@]}"
"${PIP[@]}" install -e ".${EXTRAS:+[$EXTRAS]}"
"$VENV/bin/python" - <<'PY'
import torch, mrt_fast
print(f"mrt-fast installed: torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
PY
echo "activate with: source $VENV/bin/activate"
