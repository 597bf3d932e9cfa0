"""A CPU stand-in for vLLM 0.33's offline API, backed by a real transformers model.

Only for tests: `tests/fake_vllm` is put on `sys.path` by the tests that use it. It keeps vLLM
0.33's call contract and the behaviours the rollout engine must cope with:

* `SamplingParams` validation raises `VLLMValidationError` (not a ValueError): temperature
  outside [0, 2], greedy (temperature 0) with `n > 1`; 0 < T < 0.01 is raised to 0.01.
* `LLM(...)` reseeds Python's, NumPy's and torch's global generators with `seed`; the
  `external_launcher` executor reads RANK / LOCAL_RANK (and needs
  VLLM_ENABLE_V1_MULTIPROCESSING=0); any other executor puts the engine on device index 0, which
  under torchrun (WORLD_SIZE > 1) the fake turns into an error (real vLLM shares cuda:0 silently).
* Prompts: empty, longer than `max_model_len` or exactly `max_model_len` tokens are rejected.
* Decoding checks EOS, then `stop_token_ids` (and the generation config's extra EOS ids, reported
  as stop tokens), then the length, then stop strings on the text of vLLM's own tokenizer
  (`AutoTokenizer`), and returns the `processed_logprobs` or `raw_logprobs` of each sample; child
  `j` of a request with seed `s` samples with seed `s + j`.
* Weight loading skips a tied alias (`lm_head.weight`) and, after loading the rest of the call,
  raises when the weight it is tied to was not in the same call.
* Automatic prefix caching: next-token logits are cached by context and reused until
  `reset_prefix_cache()` (which returns a bool), so stale entries after a weight update show.
* `sleep(level)` / `wake_up(tags)`: generating or loading weights while asleep is an error;
  level 2 discards the weights.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .engine.arg_utils import EngineArgs
from .exceptions import VLLMValidationError

__version__ = "0.33.0"

_SAMPLING_EPS = 1e-5
_MAX_TEMP = 1e-2
_LOGPROBS_MODES = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")
_WAKE_TAGS = ("weights", "kv_cache", "scheduling")


@dataclass(kw_only=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if 0 < self.temperature < _MAX_TEMP:
            self.temperature = _MAX_TEMP  # vLLM logs a warning and raises it
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids or []))
        if self.n < 1:
            raise VLLMValidationError(f"n must be at least 1, got {self.n}.")
        if not math.isfinite(self.temperature) or not 0.0 <= self.temperature <= 2.0:
            raise VLLMValidationError(f"temperature must be in [0, 2], got {self.temperature}.",
                                      parameter="temperature", value=self.temperature)
        if not 0.0 < self.top_p <= 1.0:
            raise VLLMValidationError(f"top_p must be in (0, 1], got {self.top_p}.", parameter="top_p", value=self.top_p)
        if self.top_k < -1:
            raise VLLMValidationError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise VLLMValidationError(f"max_tokens must be at least 1, got {self.max_tokens}.",
                                      parameter="max_tokens", value=self.max_tokens)
        if any(not s for s in self.stop):
            raise VLLMValidationError("stop cannot contain an empty string.")
        if self.temperature < _SAMPLING_EPS:
            self.top_p, self.top_k = 1.0, 0
            if self.n > 1:
                raise VLLMValidationError(f"n must be 1 when using greedy sampling, got {self.n}.")


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


def set_random_seed(seed: int | None) -> None:
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


def load_weights(model: torch.nn.Module, weights) -> set[str]:
    """vLLM's AutoWeightsLoader semantics for a tied-embedding model."""
    params = dict(model.named_parameters(remove_duplicate=False))
    canonical: dict[int, str] = {}
    aliased = {}
    for name, param in params.items():
        first = canonical.setdefault(id(param), name)
        if first != name:
            aliased[name] = first
    loaded, skipped = set(), {}
    for name, tensor in weights:
        if name in aliased:
            skipped[name] = aliased[name]
            continue
        if name not in params:
            raise ValueError(f"There is no module or parameter named {name!r} in {type(model).__name__}")
        with torch.no_grad():
            params[name].copy_(tensor)
        loaded.add(name)
    for alias, canon in skipped.items():
        if canon not in loaded:
            raise ValueError(
                f"{alias!r} was skipped because it is tied to {canon!r} in {type(model).__name__}, but "
                f"{canon!r} was not found in the checkpoint, so the tied weight is uninitialized."
            )
    return loaded


class _ModelConfig:
    def __init__(self, hf_config: Any, max_model_len: int | None) -> None:
        self.hf_config = hf_config
        limit = hf_config.max_position_embeddings
        if max_model_len is not None and max_model_len > limit:
            raise ValueError(f"max_model_len ({max_model_len}) is greater than the model's {limit}")
        self.max_model_len = max_model_len or limit

    def get_vocab_size(self) -> int:
        return self.hf_config.vocab_size


class _Worker:
    def __init__(self, llm: "LLM", model: torch.nn.Module, path: str) -> None:
        self.llm, self.model, self.path = llm, model, path

    def reload_weights(self, weights_iterator=None, weights_path=None, is_checkpoint_format: bool = True) -> None:
        if "weights" in self.llm._asleep:
            raise RuntimeError("reload_weights while the weights are asleep")
        if not is_checkpoint_format:
            raise NotImplementedError("the fake loads checkpoint-format weights only")
        if weights_iterator is None:
            from safetensors.torch import load_file

            weights_iterator = load_file(os.path.join(weights_path or self.path, "model.safetensors")).items()
        load_weights(self.model, weights_iterator)

    def apply_model(self, func: Callable) -> Any:
        return func(self.model)


class _Engine:
    def __init__(self, llm: "LLM", model_config: _ModelConfig) -> None:
        self.llm, self.model_config = llm, model_config

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None) -> list:
        worker = self.llm._worker
        fn = getattr(worker, method) if isinstance(method, str) else (lambda *a, **k: method(worker, *a, **k))
        return [fn(*args, **(kwargs or {}))]

    def apply_model(self, func: Callable) -> list:
        return self.collective_rpc("apply_model", args=(func,))


class LLM:
    def __init__(self, model: str, *, tokenizer: str | None = None, seed: int = 0, **kwargs: Any) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._args = args = EngineArgs(model=model, tokenizer=tokenizer, seed=seed, **kwargs)
        if args.logprobs_mode not in _LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {_LOGPROBS_MODES}")
        if args.distributed_executor_backend == "external_launcher":
            if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
                raise AssertionError("To get deterministic execution, please set VLLM_ENABLE_V1_MULTIPROCESSING=0")
            self.rank, self.device_index = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Real vLLM silently puts every rank's engine on cuda:0 here; the fake makes that visible.
            raise RuntimeError("under torchrun without distributed_executor_backend='external_launcher' every "
                               "rank's engine lands on cuda:0")
        else:
            self.rank, self.device_index = 0, 0  # the single-process executor's device "cuda" is cuda:0
        dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
        hf_model = AutoModelForCausalLM.from_pretrained(model, **({"dtype": dtype} if dtype else {})).eval()
        self._tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        extra = getattr(hf_model.generation_config, "eos_token_id", None)
        extra = {extra} if isinstance(extra, int) else set(extra or [])
        self._eos = self._tokenizer.eos_token_id
        self._extra_eos = extra - {self._eos}
        self.llm_engine = _Engine(self, _ModelConfig(hf_model.config, args.max_model_len))
        self._worker = _Worker(self, hf_model, model)
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}
        self._asleep: set[str] = set()
        set_random_seed(seed)

    # -- public API ------------------------------------------------------------------------

    def get_tokenizer(self):
        return self._tokenizer

    def collective_rpc(self, method, timeout: float | None = None, args: tuple = (), kwargs: dict | None = None) -> list:
        return self.llm_engine.collective_rpc(method, timeout, args, kwargs)

    def apply_model(self, func: Callable) -> list:
        return self.llm_engine.apply_model(func)

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self._cache.clear()
        return True

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        if not self._args.enable_sleep_mode:
            raise ValueError("Sleep mode is not enabled (enable_sleep_mode=True)")
        self._cache.clear()
        if level == 2:
            with torch.no_grad():
                for p in self._worker.model.parameters():
                    p.fill_(float("nan"))
        self._asleep = {"weights", "kv_cache"}

    def wake_up(self, tags: list[str] | None = None) -> bool:
        tags = list(_WAKE_TAGS) if tags is None else tags
        if any(t not in _WAKE_TAGS for t in tags):
            raise ValueError(f"wake_up tags must be in {_WAKE_TAGS}, got {tags}")
        self._asleep -= set(tags)
        return not self._asleep

    def generate(self, prompts, sampling_params: SamplingParams | None = None, *, use_tqdm: bool = True,
                 lora_request=None, priority=None, tokenization_kwargs=None, mm_processor_kwargs=None) -> list[RequestOutput]:
        if self._asleep:
            raise RuntimeError(f"the engine is asleep ({sorted(self._asleep)}): call wake_up() first")
        prompts = prompts if isinstance(prompts, list) else [prompts]
        # vLLM takes one SamplingParams for all prompts or a list of one per prompt.
        per_prompt = (list(sampling_params) if isinstance(sampling_params, (list, tuple))
                      else [sampling_params or SamplingParams()] * len(prompts))
        if len(per_prompt) != len(prompts):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        limit = self.llm_engine.model_config.max_model_len
        for p in prompts:
            n_tokens = len(p["prompt_token_ids"])
            if n_tokens == 0:
                raise VLLMValidationError("The decoder prompt cannot be empty")
            if n_tokens >= limit:
                raise VLLMValidationError(
                    f"The decoder prompt (length {n_tokens}) plus the number of requested output tokens "
                    f"(at least 1) is longer than the maximum model length of {limit}.")
        outputs = []
        for i, (p, params) in enumerate(zip(prompts, per_prompt)):
            ids = list(p["prompt_token_ids"])
            children = [self._sample(ids, params, None if params.seed is None else params.seed + j, j)
                        for j in range(params.n)]
            outputs.append(RequestOutput(str(i), ids, children))
        return outputs

    # -- decoding --------------------------------------------------------------------------

    def _logits(self, context: list[int]) -> torch.Tensor:
        key = tuple(context)
        if key not in self._cache:  # automatic prefix caching: reused until reset_prefix_cache()
            with torch.no_grad():
                out = self._worker.model(input_ids=torch.tensor([context]))
            self._cache[key] = out.logits[0, -1].float()
        return self._cache[key]

    def _sample(self, prompt: list[int], params: SamplingParams, seed: int | None, index: int) -> CompletionOutput:
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        processed = self._args.logprobs_mode.startswith("processed")
        limit = self.llm_engine.model_config.max_model_len
        stop_ids = list(params.stop_token_ids) + ([] if params.ignore_eos else sorted(self._extra_eos))
        tokens: list[int] = []
        logprobs: list[dict[int, Logprob]] = []
        finish, stop_reason, text = None, None, ""
        while finish is None:
            logits = self._logits(prompt + tokens)
            if params.temperature < _SAMPLING_EPS:
                dist = torch.log_softmax(logits, -1)
                token = int(dist.argmax())
            else:
                dist = torch.log_softmax(_top_k_top_p(logits / params.temperature, params.top_k, params.top_p), -1)
                token = int(torch.multinomial(dist.exp(), 1, generator=generator))
            reported = dist if processed else torch.log_softmax(logits, -1)
            tokens.append(token)
            logprobs.append({token: Logprob(float(reported[token]), 1)})
            if not params.ignore_eos and token == self._eos:
                finish = "stop"
            elif token in stop_ids:
                finish, stop_reason = "stop", token
            elif len(prompt) + len(tokens) >= limit or len(tokens) >= (params.max_tokens or limit):
                finish = "length"
            text = self._tokenizer.decode(tokens, skip_special_tokens=params.skip_special_tokens)
            hits = [(text.find(s), s) for s in params.stop if s in text]
            if hits and not (finish == "stop"):
                pos, stop = min(hits)
                finish, stop_reason = "stop", stop
                text = text[: pos + len(stop)] if params.include_stop_str_in_output else text[:pos]
        cumulative = sum(step[t].logprob for t, step in zip(tokens, logprobs))
        return CompletionOutput(index, text, tokens, cumulative, logprobs if params.logprobs is not None else None,
                                finish, stop_reason)


def _top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    logits = logits.clone()
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits[logits < kth] = -math.inf
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs > top_p
        logits[order[drop]] = -math.inf
    return logits
