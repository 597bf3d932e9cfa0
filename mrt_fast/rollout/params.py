"""What a caller asks a rollout engine for (`SamplingParams`) and what it gets back (`Completion`).

The names follow vLLM's `SamplingParams` where the meaning is the same (`temperature`, `top_p`,
`top_k`, `stop`, `stop_token_ids`, `seed`, `ignore_eos`, `skip_special_tokens`); `max_new_tokens`
is vLLM's `max_tokens`. Everything is validated on construction so that a bad value fails where it
was written, not deep inside a sampling loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from mrt_fast._checks import MIN_TEMPERATURE

FinishReason = Literal["stop", "length", "eos"]


MAX_ID = 2**63 - 1  # token ids travel as int64


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):  # "no" or 0.5 would read as truthy / falsy without a word
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} ({value!r})")


@dataclass
class SamplingParams:
    """How to sample continuations.

    Args:
        temperature: softmax temperature; 0 means greedy decoding (argmax). Otherwise at least
            1e-5 (smaller temperatures overflow the tempered logits; use 0 for greedy).
        top_p: nucleus sampling: keep the smallest set of most likely tokens whose probability
            (after top-k) reaches `top_p`; 1.0 keeps everything. Must be in (0, 1].
        top_k: keep only the `top_k` most likely tokens; 0 (or -1, vLLM's spelling) keeps all.
        max_new_tokens: the most tokens to generate per sample (>= 1). Generation also stops at
            the model's context length (finish reason "length").
        stop: strings that end a sample when they appear in its generated text, also when they
            span several tokens. The text returned stops before the stop string; `token_ids`
            keep every token up to and including the one that completed it. Needs a tokenizer.
        stop_token_ids: token ids that end a sample (finish reason "stop"); the token is kept.
        seed: makes sampling reproducible. Sample `j` of a prompt draws from a random stream
            named by `(seed, the prompt's token ids, its occurrence in the call, j)` (the vLLM
            engine derives one seed per request the same way), so results do not depend on what
            else is in the batch, and no two prompts, nor two copies of one prompt in a call,
            share random numbers. None
            draws a fresh base seed from torch's global generator per call (so
            `torch.manual_seed` also makes a call reproducible).
        ignore_eos: keep generating after the model's EOS token (benchmarks use this).
        skip_special_tokens: drop special tokens from `Completion.text` and from the text that
            stop strings are matched against (vLLM's default).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise TypeError(f"temperature must be a float, got {type(self.temperature).__name__}")
        if not (self.temperature == 0.0 or MIN_TEMPERATURE <= self.temperature < math.inf):  # also rejects NaN
            raise ValueError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, "
                             f"got {self.temperature}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)):
            raise TypeError(f"top_p must be a float, got {type(self.top_p).__name__}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k):
            raise TypeError(f"top_k must be an int, got {type(self.top_k).__name__}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be >= 0 (0 or -1 disables it), got {self.top_k}")
        if self.top_k == -1:
            self.top_k = 0
        if not _is_int(self.max_new_tokens):
            raise TypeError(f"max_new_tokens must be an int, got {type(self.max_new_tokens).__name__}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)):
            raise TypeError(f"stop must be a string or a list of strings ([] for none), got {type(self.stop).__name__}")
        self.stop = list(self.stop)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise TypeError(f"stop_token_ids must be a list of ints ([] for none), "
                            f"got {type(self.stop_token_ids).__name__}")
        self.stop_token_ids = list(self.stop_token_ids)
        for t in self.stop_token_ids:
            if not _is_int(t) or not 0 <= t <= MAX_ID:
                raise ValueError(f"stop_token_ids must be non-negative ints below 2**63, got {self.stop_token_ids!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise TypeError(f"seed must be an int or None, got {type(self.seed).__name__}")
        _check_bool("ignore_eos", self.ignore_eos)
        _check_bool("skip_special_tokens", self.skip_special_tokens)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Completion:
    """One sampled continuation.

    Attributes:
        token_ids: the generated tokens (not the prompt), including a final EOS / stop token.
        text: `token_ids` decoded (cut before a matched stop string); "" when the engine has no
            tokenizer.
        logprobs: per generated token, its log-probability under the sampling distribution
            *with temperature applied but before top-k/top-p renormalisation*, i.e.
            `log_softmax(logits / temperature)[token]` -- exactly what the trainer's log-prob
            provider computes with the same temperature. Greedy decoding (temperature 0) reports
            `log_softmax(logits)[token]` (temperature 1).
        finish_reason: "eos" (the model's EOS token), "stop" (a stop string or stop token id),
            or "length" (max_new_tokens or the context length reached).
        prompt_len: number of tokens in the prompt / prefix this continues.
        stop_reason: the stop string or stop token id that ended the sample, else None.
    """

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: FinishReason
    prompt_len: int
    stop_reason: str | int | None = None
