"""Rollout engines with shared-prefix KV reuse.

    from mrt_fast.rollout import SamplingParams, HFEngine, branch_at_boundaries, make_engine

- `HFEngine` (backend "hf", always available): sampling loop with a reusable KV cache over any
  transformers causal LM; `fork` shares each prefix's cache across its branches and
  `branch_at_boundaries` serves all episode boundaries of a trace from one prefill.
- `VLLMEngine` (backend "vllm", optional, vllm >= 0.20, < 0.34): vLLM with automatic prefix
  caching, one-call in-process weight sync and sleep/wake; imported lazily.
"""

from .branching import branch_at_boundaries
from .factory import make_engine
from .hf_engine import HFEngine, PrefixCache
from .params import Completion, FinishReason, SamplingParams
from .protocol import RolloutEngine
from .vllm_engine import VLLMEngine  # imports vllm only when an engine is built

__all__ = [
    "Completion",
    "FinishReason",
    "HFEngine",
    "PrefixCache",
    "RolloutEngine",
    "SamplingParams",
    "VLLMEngine",
    "branch_at_boundaries",
    "make_engine",
]

