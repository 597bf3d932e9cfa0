"""The engine arguments the fake `vllm.LLM` accepts (a subset of vLLM 0.33's EngineArgs)."""

from dataclasses import dataclass
from typing import Optional


@dataclass
class EngineArgs:
    model: str
    tokenizer: Optional[str] = None
    seed: int = 0
    dtype: str = "auto"
    gpu_memory_utilization: float = 0.92
    tensor_parallel_size: int = 1
    max_model_len: Optional[int] = None
    enforce_eager: bool = False
    enable_prefix_caching: Optional[bool] = None
    enable_sleep_mode: bool = False
    distributed_executor_backend: Optional[str] = None
    logprobs_mode: str = "raw_logprobs"
    trust_remote_code: bool = False
    disable_log_stats: bool = True
