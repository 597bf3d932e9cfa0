"""The vLLM backend (optional: `pip install mrt-fast[vllm]`, needs a GPU).

Supported vLLM versions: `SUPPORTED_VLLM` (>= 0.20, < 0.34); building an engine with another
version is an ImportError that names the range. vLLM is imported lazily, so this module (and
mrt_fast) imports without it.

The calls used are vLLM's public offline API: `vllm.LLM(..., enable_prefix_caching=True)`,
`LLM.generate` with token-id prompts and `SamplingParams(n=..., logprobs=0)`,
`LLM.collective_rpc("reload_weights", ...)`, `LLM.reset_prefix_cache()`, `LLM.apply_model`,
`LLM.sleep()` / `LLM.wake_up()`.

* **Prefix sharing.** Requests with the same token prefix reuse its KV blocks (automatic prefix
  caching) and the `n` samples of one request share the prompt, so `fork` is `generate`.
* **Greedy with n > 1.** vLLM refuses `temperature=0` with `n>1`; greedy samples are identical,
  so one request per prompt is decoded and its completion repeated `n` times.
* **Weight sync** hands all weights to the workers' `reload_weights` in one call: vLLM's loader
  skips a tied alias (`lm_head.weight` of a tied-embedding model) and checks, per call, that the
  weight it is tied to (`model.embed_tokens.weight`) was loaded too, so the weights must not be
  split over several calls. The prefix cache is then reset: KV blocks computed with the old
  weights would otherwise be reused silently. The tensors cross to the workers in-process, so
  the engine core must run in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set here).
* **Under torchrun** (WORLD_SIZE > 1) each rank runs its own engine on its own GPU with vLLM's
  `external_launcher` executor, which takes the device from LOCAL_RANK; without it every rank's
  engine would land on `cuda:0`. Give each rank its own `seed`.
* **Random state.** Building a `vllm.LLM` reseeds Python's, NumPy's and torch's global generators;
  the engine restores the caller's state afterwards. Requests without a seed get one drawn from
  torch's global generator (as the HF engine does), so `torch.manual_seed` makes a call
  reproducible. Each request gets its own seed, derived from the call's seed and the request's
  context (as the HF engine keys its streams), so no two prompts share random numbers.
* **Text.** vLLM loads its own tokenizer (AutoTokenizer), which can decode some tokens
  differently from the project's tokenizer. `Completion.text` (what the graders read) is decoded
  with the tokenizer given to the engine, and stop strings are matched on that text, so the
  two backends agree on text, stop strings and `finish_reason`.
* **Log-probs** are vLLM's `processed_logprobs`: temperature applied and, unlike the HF engine,
  *after* top-k/top-p renormalisation when those are set. With top_k=0, top_p=1 both engines
  report `log_softmax(logits / T)`; greedy reports temperature-1 log-probs.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .params import Completion, SamplingParams
from .protocol import check_n, check_params, check_token_lists
from .stopping import StopStrings
from .sampling import context_keys, stream_seed

SUPPORTED_VLLM = (">=0.20", "<0.34")
_MIN_VLLM, _MAX_VLLM = (0, 20), (0, 34)
_MIN_TEMPERATURE = 0.01  # vLLM silently raises 0 < T < 0.01 to 0.01 (and reports those log-probs)
_MAX_TEMPERATURE = 2.0  # vLLM rejects T > 2
# vLLM's SamplingParams names -> ours, for its validation errors.
_OUR_NAMES = {"max_tokens": "max_new_tokens", "n": "n"}


def _import_vllm():
    try:
        import vllm
    except ImportError as exc:  # pragma: no cover - exercised where vllm is absent
        raise ImportError(
            "the vllm backend needs the optional vllm package (supported: vllm"
            f"{','.join(SUPPORTED_VLLM)}): pip install 'mrt-fast[vllm]'"
        ) from exc
    check_vllm_version(getattr(vllm, "__version__", "unknown"))
    return vllm


def check_vllm_version(version: str) -> None:
    """Raise ImportError naming the supported range when `version` is outside it."""
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else -1)
    key = tuple(parts)
    if len(key) != 2 or -1 in key or not _MIN_VLLM <= key < _MAX_VLLM:
        raise ImportError(
            f"vllm {version} is installed; mrt_fast's vllm backend supports vllm{','.join(SUPPORTED_VLLM)} "
            "(pip install 'vllm>=0.20,<0.34'), or use rollout.engine: hf"
        )


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's (CPU and CUDA) global random state on exit."""
    py_state = random.getstate()
    torch_state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy comes with torch
        np, np_state = None, None
    try:
        yield
    finally:
        random.setstate(py_state)
        torch.random.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        if np is not None:
            np.random.set_state(np_state)


def _torchrun_world_size() -> int:
    """WORLD_SIZE from torchrun's environment; 1 outside it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class VLLMEngine:
    """Rollout engine over `vllm.LLM`.

    Args:
        model_path: local checkpoint directory (or hub id where the user has access).
        tokenizer: the tokenizer that decodes `Completion.text` and matches stop strings (a
            tokenizer object, or a path); defaults to the one saved in `model_path`, loaded with
            `mrt_fast.data.tokenizer.load_tokenizer`. vLLM itself reads the tokenizer files in
            `model_path` (or in the path given).
        seed: vLLM's engine seed; under torchrun give each rank its own.
        gpu_memory_utilization: fraction of this GPU's memory vLLM may take for weights and KV
            cache (leave room for training when colocated).
        enable_sleep_mode: allow `sleep()` / `wake_up()` to hand the GPU to the trainer.
        tensor_parallel_size: GPUs per engine. Under torchrun every rank of a tensor-parallel
            group must issue the same requests.
        max_model_len: context length (prompt + generation); None uses the model's.
        enforce_eager: skip CUDA-graph capture (faster start, slower decoding).
        dtype: "auto", "bfloat16", "float16" or "float32".
        **llm_kwargs: passed on to `vllm.LLM`.
    """

    def __init__(
        self,
        model_path: str,
        tokenizer: Any = None,
        *,
        seed: int = 0,
        gpu_memory_utilization: float = 0.5,
        enable_sleep_mode: bool = False,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        dtype: str = "auto",
        **llm_kwargs: Any,
    ):
        _check_engine_args(gpu_memory_utilization, tensor_parallel_size, max_model_len, seed)
        if os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0") not in ("0", "false", "False"):
            raise ValueError(
                "VLLM_ENABLE_V1_MULTIPROCESSING must be 0 for the vllm backend: weight sync hands the "
                "trainer's tensors to the engine in this process"
            )
        vllm = _import_vllm()
        self._vllm = vllm
        self.model_path = model_path
        # vLLM reads tokenizer files from a path; our text comes from `self.tokenizer`.
        tokenizer_path = str(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else model_path
        self.tokenizer = None if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        if _torchrun_world_size() > 1:  # one engine per rank, on the rank's LOCAL_RANK GPU
            llm_kwargs.setdefault("distributed_executor_backend", "external_launcher")
        if _engine_arg_exists("logprobs_mode"):
            llm_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        if max_model_len is not None:
            llm_kwargs["max_model_len"] = max_model_len
        with _preserved_rng():
            self.llm = vllm.LLM(
                model=model_path,
                tokenizer=tokenizer_path,
                seed=seed,
                enable_prefix_caching=True,
                gpu_memory_utilization=gpu_memory_utilization,
                enable_sleep_mode=enable_sleep_mode,
                tensor_parallel_size=tensor_parallel_size,
                enforce_eager=enforce_eager,
                dtype=dtype,
                **llm_kwargs,
            )
        model_config = self.llm.llm_engine.model_config
        self.vocab_size: int = model_config.get_vocab_size()
        self.max_context_len: int = model_config.max_model_len
        if self.tokenizer is None:
            from ..data.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(tokenizer_path)

    # ----------------------------------------------------------------------------------- API

    def generate(self, prompts: list[list[int]], params: SamplingParams, n: int = 1) -> list[list[Completion]]:
        prompts = self._check_prompts(prompts, "prompts")
        return self._run(prompts, params, check_n(n))

    def fork(self, prefixes: list[list[int]], params: SamplingParams, n: int) -> list[list[Completion]]:
        """Same as `generate`: prefix caching computes each prefix's KV once for its n samples."""
        prefixes = self._check_prompts(prefixes, "prefixes")
        return self._run(prefixes, params, check_n(n))

    def update_weights(self, weights: Any = None) -> None:
        """Load the trainer's weights (a module, a state dict, or (name, tensor) pairs; HF names)
        into every vLLM worker in one `reload_weights` call, then reset the prefix cache.
        FSDP2 DTensors are gathered first. `None` only resets the prefix cache."""
        if weights is not None:
            if isinstance(weights, torch.nn.Module):
                weights = weights.state_dict()
            items = weights.items() if isinstance(weights, Mapping) else weights
            pairs = [(name, _full(tensor)) for name, tensor in items]
            if not pairs:
                raise ValueError("update_weights: weights is empty")
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": pairs, "is_checkpoint_format": True}
            )
        # Always: KV blocks cached under the old weights must not be reused.
        if self.llm.reset_prefix_cache() is False:
            raise RuntimeError(
                "vLLM did not reset its prefix cache (requests still running?): KV cached under the "
                "old weights could be reused"
            )

    def apply_model(self, func: Any) -> list:
        """`func(model)` on the model each vLLM worker samples from (e.g. a weights digest)."""
        return self.llm.apply_model(func)

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

    def _check_prompts(self, prompts: Any, name: str) -> list[list[int]]:
        prompts = check_token_lists(prompts, name, vocab_size=self.vocab_size, max_len=self.max_context_len)
        for i, prompt in enumerate(prompts):
            if len(prompt) == self.max_context_len:
                raise ValueError(
                    f"{name}[{i}] has {len(prompt)} tokens, the model's whole context length "
                    f"{self.max_context_len}: vLLM needs room for at least one new token"
                )
        return prompts

    def _request_seeds(self, prompts: list[list[int]], params: SamplingParams) -> list[int | None]:
        """One seed per request, keyed by (seed, context, occurrence) as the HF engine keys its
        streams: with one seed for all requests, sample j of every prompt would share its random
        numbers (vLLM seeds sample j of a request with seed s from s + j)."""
        if params.greedy:
            return [None] * len(prompts)
        seed = params.seed
        if seed is None:  # as the HF engine: torch.manual_seed makes it reproducible
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        return [stream_seed(seed, *key) for key in context_keys(prompts)]

    def _to_vllm(self, params: SamplingParams, n: int, seed: int | None):
        return self._vllm.SamplingParams(
            n=n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,
            max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None,
            stop_token_ids=list(params.stop_token_ids) or None,
            include_stop_str_in_output=True,  # the text is cut with our tokenizer's decoding
            seed=seed,
            ignore_eos=params.ignore_eos,
            skip_special_tokens=params.skip_special_tokens,
            logprobs=0,  # the sampled token's log-prob only
        )

    def _run(self, prompts: list[list[int]], params: SamplingParams, n: int) -> list[list[Completion]]:
        check_params(params, vocab_size=self.vocab_size, has_tokenizer=True)
        if params.temperature > _MAX_TEMPERATURE or 0 < params.temperature < _MIN_TEMPERATURE:
            raise ValueError(
                f"params.temperature must be 0 (greedy) or in [{_MIN_TEMPERATURE}, {_MAX_TEMPERATURE}] for "
                f"the vllm backend, got {params.temperature}"
            )
        # vLLM refuses greedy with n > 1; greedy samples are all the same.
        per_request = 1 if params.greedy else n
        requests = [{"prompt_token_ids": p} for p in prompts]
        try:
            per_prompt = [self._to_vllm(params, per_request, seed) for seed in self._request_seeds(prompts, params)]
            outputs = self.llm.generate(requests, per_prompt, use_tqdm=False)
        except Exception as exc:
            raise _as_value_error(exc) from exc
        stops = StopStrings(self.tokenizer, params.stop, skip_special_tokens=params.skip_special_tokens) if params.stop else None
        results = []
        for prompt, out in zip(prompts, outputs):
            row = [self._completion(o, len(prompt), params, stops) for o in out.outputs]
            if per_request != n:
                row = [copy.deepcopy(row[0]) for _ in range(n)]
            results.append(row)
        return results

    def _completion(self, output: Any, prompt_len: int, params: SamplingParams, stops: StopStrings | None) -> Completion:
        token_ids = list(output.token_ids)
        logprobs = [float(step[t].logprob) for t, step in zip(token_ids, output.logprobs or [])]
        if len(logprobs) != len(token_ids):
            raise RuntimeError(f"vLLM returned {len(logprobs)} log-probs for {len(token_ids)} tokens")
        reason, stop_reason = output.finish_reason, getattr(output, "stop_reason", None)
        if reason not in ("stop", "length"):
            reason = "length"  # "abort": cut short by the engine
        elif reason == "stop" and not isinstance(stop_reason, str):
            # vLLM checks EOS before stop_token_ids and reports the model's extra EOS ids as stop
            # tokens: the HF engine's order is stop_token_ids first, then EOS.
            last = token_ids[-1] if token_ids else None
            if last in params.stop_token_ids:
                stop_reason = last
            else:
                reason, stop_reason = "eos", None
        if stops is not None:
            # Stop strings are matched on our tokenizer's text, in the HF engine's order: a stop
            # token or EOS on the same token wins; otherwise the sample ends at the first token
            # that completes a stop string. (If only vLLM's decoding shows one, its stop stays.)
            end = _first_stop(token_ids, stops)
            string_stop = end is not None and (end < len(token_ids) or reason == "length" or isinstance(stop_reason, str))
            if string_stop:
                token_ids, logprobs, reason = token_ids[:end], logprobs[:end], "stop"
            text = stops.decode(token_ids)
            if string_stop:
                text, stop_reason = stops.cut(text)
        else:
            text = self.tokenizer.decode(
                token_ids, skip_special_tokens=params.skip_special_tokens, clean_up_tokenization_spaces=False
            )
        return Completion(token_ids, text, logprobs, reason, prompt_len, stop_reason)


def _check_engine_args(gpu_memory_utilization: Any, tensor_parallel_size: Any, max_model_len: Any, seed: Any) -> None:
    if isinstance(gpu_memory_utilization, bool) or not isinstance(gpu_memory_utilization, (int, float)) \
            or not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
    for name, value, low in (("tensor_parallel_size", tensor_parallel_size, 1), ("max_model_len", max_model_len, 2)):
        if value is None and name == "max_model_len":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")


def _as_value_error(exc: Exception) -> Exception:
    """vLLM's request validation errors (VLLMValidationError, not a ValueError since 0.2x) as a
    ValueError naming our argument; anything else unchanged."""
    if type(exc).__name__ != "VLLMValidationError" and not isinstance(exc, ValueError):
        return exc
    parameter = getattr(exc, "parameter", None)
    ours = f"params.{_OUR_NAMES.get(parameter, parameter)}: " if parameter else ""
    return ValueError(f"{ours}vLLM rejected the request: {exc}")


def _first_stop(token_ids: list[int], stops: StopStrings) -> int | None:
    """The length of the shortest prefix of `token_ids` whose text holds a stop string."""
    if not any(s in stops.decode(token_ids) for s in stops.stops):
        return None
    for end in range(1, len(token_ids) + 1):
        if stops.hit(token_ids[:end]):
            return end
    return None  # pragma: no cover - the whole text holds one, so some prefix does


def _full(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    if hasattr(tensor, "full_tensor"):  # FSDP2 DTensor: gather the shards
        tensor = tensor.full_tensor()
    return tensor


def _engine_arg_exists(name: str) -> bool:
    try:
        from vllm.engine.arg_utils import EngineArgs
    except ImportError:
        return False
    return name in getattr(EngineArgs, "__dataclass_fields__", {})
