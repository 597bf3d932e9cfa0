"""The vLLM backend (optional: `pip install mrt-fast[vllm]`, needs a GPU).

Written against vLLM's public Python API: `LLM(..., enable_prefix_caching=True)`,
`LLM.generate` with token-id prompts and `SamplingParams(n=..., logprobs=0)`,
`LLM.reset_prefix_cache()`, `LLM.sleep()` / `LLM.wake_up()`. vLLM is imported lazily, so this
module (and mrt_fast) imports without it.

Prefix sharing: every request with the same token prefix reuses its KV blocks (automatic prefix
caching), and the `n` samples of one request share the prompt. So `fork` is `generate`, and
meta-prover branching is one `fork` over all boundary contexts.

Weight sync (colocated, in-process): the trainer's tensors go straight into the vLLM model's
`load_weights` in buckets, then the prefix cache is reset -- cached KV computed with the old
weights would otherwise be reused silently. In-process access needs vLLM's engine core in this
process, so the engine sets VLLM_ENABLE_V1_MULTIPROCESSING=0 unless the caller set it.

Log-probs: the engine asks for `logprobs_mode="processed_logprobs"` (vLLM >= 0.10.2), the
log-probs of the distribution vLLM samples from: with temperature applied and, unlike the HF
engine, *after* top-k/top-p renormalisation when those are set. With top_k=0, top_p=1 both
engines report `log_softmax(logits / T)`.

Seeds: vLLM seeds each request with `seed`; its random streams differ from the HF engine's, so
the same seed gives reproducible but different samples on the two backends.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from .params import Completion, SamplingParams
from .protocol import check_n, check_params, check_token_lists


def _import_vllm():
    try:
        import vllm
    except ImportError as exc:  # pragma: no cover - exercised where vllm is absent
        raise ImportError("the vllm backend needs the optional vllm package: pip install 'mrt-fast[vllm]'") from exc
    return vllm


class VLLMEngine:
    """Rollout engine over `vllm.LLM`.

    Args:
        model_path: local checkpoint directory (or hub id where the user has access).
        tokenizer: tokenizer path; defaults to `model_path`.
        gpu_memory_utilization: fraction of GPU memory vLLM may take (leave room for training
            when colocated).
        enable_sleep_mode: allow `sleep()` / `wake_up()` to hand the GPU to the trainer.
        **llm_kwargs: passed to `vllm.LLM` (dtype, max_model_len, seed, tensor_parallel_size, ...).
    """

    def __init__(
        self,
        model_path: str,
        tokenizer: str | None = None,
        *,
        gpu_memory_utilization: float = 0.5,
        enable_sleep_mode: bool = False,
        **llm_kwargs: Any,
    ):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        vllm = _import_vllm()
        self._vllm = vllm
        self.model_path = model_path
        if _engine_arg_exists(vllm, "logprobs_mode"):  # vLLM >= 0.10.2; older ones report raw log-probs
            llm_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        self.llm = vllm.LLM(
            model=model_path,
            tokenizer=tokenizer or model_path,
            enable_prefix_caching=True,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=enable_sleep_mode,
            **llm_kwargs,
        )
        model_config = self.llm.llm_engine.model_config
        self.vocab_size: int = model_config.get_vocab_size()
        self.max_context_len: int = model_config.max_model_len
        self.tokenizer = self.llm.get_tokenizer()

    # ----------------------------------------------------------------------------------- API

    def generate(self, prompts: list[list[int]], params: SamplingParams, n: int = 1) -> list[list[Completion]]:
        prompts = check_token_lists(prompts, "prompts", vocab_size=self.vocab_size, max_len=self.max_context_len)
        return self._run(prompts, params, check_n(n))

    def fork(self, prefixes: list[list[int]], params: SamplingParams, n: int) -> list[list[Completion]]:
        """Same as `generate`: prefix caching computes each prefix's KV once for its n samples."""
        prefixes = check_token_lists(prefixes, "prefixes", vocab_size=self.vocab_size, max_len=self.max_context_len)
        return self._run(prefixes, params, check_n(n))

    def update_weights(self, weights: Any = None, *, bucket_bytes: int = 1 << 29) -> None:
        """Load the trainer's weights (a module, a state dict, or (name, tensor) pairs) into the
        vLLM model in buckets of about `bucket_bytes`, then reset the prefix cache."""
        if weights is not None:
            if isinstance(weights, torch.nn.Module):
                weights = weights.state_dict()
            items = weights.items() if isinstance(weights, Mapping) else weights
            model = self._inner_model()
            for bucket in _buckets(items, bucket_bytes):
                model.load_weights(weights=bucket)
        # Always: KV blocks cached under the old weights must not be reused.
        self.llm.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        """Free the GPU for training (level 1 keeps weights in CPU memory, level 2 drops them)."""
        self.llm.sleep(level=level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Take the GPU back; `tags=["weights"]` first, sync, then `["kv_cache"]` saves memory."""
        if tags is None:
            self.llm.wake_up()
        else:
            self.llm.wake_up(tags=tags)

    # ------------------------------------------------------------------------------ internals

    def _inner_model(self) -> torch.nn.Module:
        engine = self.llm.llm_engine
        paths = (
            ("model_executor", "driver_worker", "worker", "model_runner", "model"),  # V1, in-process
            ("engine_core", "engine_core", "model_executor", "driver_worker", "worker", "model_runner", "model"),
            ("model_executor", "driver_worker", "model_runner", "model"),  # V0
        )
        for path in paths:
            obj: Any = engine
            try:
                for attr in path:
                    obj = getattr(obj, attr)
            except AttributeError:
                continue
            return obj
        raise RuntimeError(
            "cannot reach the vLLM model in this process: colocated weight sync needs "
            "VLLM_ENABLE_V1_MULTIPROCESSING=0 set before vllm is imported"
        )

    def _to_vllm(self, params: SamplingParams, n: int):
        return self._vllm.SamplingParams(
            n=n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,
            max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None,
            stop_token_ids=list(params.stop_token_ids) or None,
            seed=params.seed,
            ignore_eos=params.ignore_eos,
            skip_special_tokens=params.skip_special_tokens,
            logprobs=0,  # the sampled token's log-prob only
        )

    def _run(self, prompts: list[list[int]], params: SamplingParams, n: int) -> list[list[Completion]]:
        check_params(params, vocab_size=self.vocab_size, has_tokenizer=True)
        requests = [{"prompt_token_ids": p} for p in prompts]
        outputs = self.llm.generate(requests, self._to_vllm(params, n), use_tqdm=False)
        return [[_completion(o, len(p)) for o in out.outputs] for p, out in zip(prompts, outputs)]


def _engine_arg_exists(vllm: Any, name: str) -> bool:
    try:
        from vllm.engine.arg_utils import EngineArgs
    except ImportError:
        return False
    return name in getattr(EngineArgs, "__dataclass_fields__", {})


def _completion(output: Any, prompt_len: int) -> Completion:
    token_ids = list(output.token_ids)
    logprobs = [float(step[t].logprob) for t, step in zip(token_ids, output.logprobs or [])]
    reason = output.finish_reason
    stop_reason = getattr(output, "stop_reason", None)
    if reason == "stop" and stop_reason is None:
        reason = "eos"  # vLLM reports EOS as "stop" with no stop_reason
    elif reason not in ("stop", "length"):
        reason = "length"  # "abort": cut short by the engine
    return Completion(token_ids, output.text, logprobs, reason, prompt_len, stop_reason)


def _buckets(items: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in items:
        tensor = tensor.detach()
        if hasattr(tensor, "full_tensor"):  # FSDP2 DTensor: gather the shards
            tensor = tensor.full_tensor()
        bucket.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket
