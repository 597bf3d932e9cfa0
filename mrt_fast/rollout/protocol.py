"""The rollout engine protocol and the input checks every backend shares.

A backend turns token-id prompts into `Completion`s. `fork` is the MRT-specific entry point: it
promises that each prefix is computed once and shared by its `n` branches (the embedded engine
shares the KV cache explicitly; vLLM does it with automatic prefix caching).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from .params import Completion, SamplingParams


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer, the progress estimator and the evaluator need from a sampler."""

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, n: int = 1
    ) -> list[list[Completion]]:
        """`n` samples per prompt; result indexed [prompt][sample]."""
        ...

    def fork(self, prefixes: Any, params: SamplingParams, n: int) -> list[list[Completion]]:
        """`n` branches per prefix, each prefix computed once; result indexed [prefix][branch]."""
        ...

    def update_weights(self, weights: Any = None) -> None:
        """Make the engine sample from the trainer's current weights."""
        ...


def check_n(n: object, name: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return n


def check_token_lists(
    seqs: object,
    name: str,
    *,
    vocab_size: int | None,
    max_len: int | None,
    allow_empty_items: bool = False,
) -> list[list[int]]:
    """Validate a list of token-id lists and return it as plain Python lists.

    Raises a ValueError/TypeError naming `name` (and the offending index) for an empty batch,
    an empty sequence, a non-integer or out-of-vocabulary id, or a sequence longer than the
    model's context (`max_len`). Strings are rejected: engines take token ids, tokenize first.
    """
    if isinstance(seqs, (str, bytes)) or not isinstance(seqs, Sequence):
        raise TypeError(f"{name} must be a list of token-id lists, got {type(seqs).__name__}")
    if len(seqs) == 0:
        raise ValueError(f"{name} must not be empty")
    out: list[list[int]] = []
    for i, seq in enumerate(seqs):
        if hasattr(seq, "tolist") and not isinstance(seq, (list, tuple)):
            seq = seq.tolist()  # a 1-D tensor / array of ids
        if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
            raise TypeError(
                f"{name}[{i}] must be a list of token ids, got {type(seq).__name__} (tokenize text first)"
            )
        seq = list(seq)
        if not seq and not allow_empty_items:
            raise ValueError(f"{name}[{i}] is empty: every prompt needs at least one token")
        for t in seq:
            if isinstance(t, bool) or not isinstance(t, int):
                raise TypeError(f"{name}[{i}] must contain ints, found {type(t).__name__}")
            if t < 0 or (vocab_size is not None and t >= vocab_size):
                raise ValueError(f"{name}[{i}] contains token id {t}, outside the vocabulary [0, {vocab_size})")
        if max_len is not None and len(seq) > max_len:
            raise ValueError(
                f"{name}[{i}] has {len(seq)} tokens, more than the model's context length {max_len}"
            )
        out.append(seq)
    return out


def check_params(params: object, *, vocab_size: int | None, has_tokenizer: bool) -> SamplingParams:
    """Check the parts of SamplingParams that depend on the engine (vocabulary, tokenizer)."""
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a mrt_fast.rollout.SamplingParams, got {type(params).__name__}")
    if vocab_size is not None:
        unknown = [t for t in params.stop_token_ids if t >= vocab_size]
        if unknown:
            raise ValueError(f"stop_token_ids {unknown} are not in the vocabulary (size {vocab_size})")
    if params.stop and not has_tokenizer:
        raise ValueError("stop strings need a tokenizer: pass tokenizer= to the engine, or use stop_token_ids")
    return params
