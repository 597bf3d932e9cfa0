"""Rollout engines with shared-prefix KV reuse.

    from mrt_fast.rollout import SamplingParams, HFEngine, branch_at_boundaries, make_engine

- `HFEngine` (backend "hf", always available): sampling loop with a reusable KV cache over any
  transformers causal LM; `fork` shares each prefix's cache across its branches and
  `branch_at_boundaries` serves all episode boundaries of a trace from one prefill.
- `VLLMEngine` (backend "vllm", optional): vLLM with automatic prefix caching, in-process weight
  sync and sleep/wake; imported lazily.
"""

from .branching import branch_at_boundaries
from .factory import make_engine
from .hf_engine import HFEngine, PrefixCache
from .params import Completion, FinishReason, SamplingParams
from .protocol import RolloutEngine

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


def __getattr__(name: str):
    if name == "VLLMEngine":  # lazy: importing it does not import vllm, but keep the package light
        from .vllm_engine import VLLMEngine

        return VLLMEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
