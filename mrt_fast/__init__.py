"""mrt-fast: a fast trainer for MRT (Meta Reinforcement Fine-Tuning) of reasoning LLMs.

Subpackages, in the order data flows through a training step:
  rollout  - sampling engines with shared-prefix KV reuse (embedded HF engine, vLLM)
  mrt      - episodes, meta-prover progress, advantages, MRT-RL / MRT-STaR plans
  packing  - prefix-tree packed batches and attention backends
  kernels  - Triton kernels and their PyTorch references (imports nothing from the trainer)
  loss     - the public drop-in loss API over the kernels
"""

__version__ = "0.1.0"
