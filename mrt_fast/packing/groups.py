"""`PrefixGroup`: one shared prefix followed by the continuations sampled from it.

This is the unit of packing. GRPO groups share the prompt; MRT branches share prompt + partial
trace. Loss is only ever on continuation tokens: the prefix is context.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

from mrt_fast.packing.native import load_native

_native = load_native()


def _check_token_list(tokens: object, name: str, *, copy: bool = True) -> list[int]:
    """Return `tokens` as a list of non-negative Python ints, or raise naming `name`.

    A valid list of ints is returned as a copy, or as is with `copy=False` (no per-token work
    beyond the check: copying a list touches every int object, which is what costs at 1M tokens).
    """
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
        raise TypeError(f"{name} must be a list of token ids (ints), got {type(tokens).__name__}")
    if type(tokens) is list:
        # Fast paths for a plain list: one native pass, or C-speed builtins without the extension.
        if _native is not None:
            valid = _native.first_invalid_token(tokens) < 0
        else:
            valid = set(map(type, tokens)) <= {int} and (not tokens or min(tokens) >= 0)
        if valid:
            return list(tokens) if copy else tokens
    out = []  # the reference check: finds the first offending item and names it
    for i, t in enumerate(tokens):
        # bool is an int subclass but never a token id: reject it to catch mask/id mix-ups.
        # operator.index accepts Python and numpy integers and nothing lossy (no floats).
        try:
            if isinstance(t, bool):
                raise TypeError
            t = operator.index(t)
        except TypeError:
            raise TypeError(f"{name}[{i}] must be an int token id, got {type(t).__name__}") from None
        if t < 0:
            raise ValueError(f"{name}[{i}] = {t} is not a valid token id (expected >= 0)")
        out.append(t)
    return out


def _check_per_token(values: object, name: str, lengths: list[int], kind: type) -> list[list]:
    """Validate a per-continuation, per-token list (loss masks or episode ids) against `lengths`."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list with one list per continuation, got {type(values).__name__}")
    if len(values) != len(lengths):
        raise ValueError(
            f"{name} has {len(values)} entries but there are {len(lengths)} continuations "
            "(expected one list per continuation)"
        )
    out = []
    for k, (row, n) in enumerate(zip(values, lengths)):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise TypeError(f"{name}[{k}] must be a list, got {type(row).__name__}")
        if len(row) != n:
            raise ValueError(
                f"{name}[{k}] has length {len(row)} but continuation {k} has {n} tokens (expected equal lengths)"
            )
        out.append([kind(v) for v in row])
    return out


@dataclass
class PrefixGroup:
    """A prefix shared by several continuations.

    Args:
        prefix: token ids of the shared context (may be empty: then the group is a set of plain
            sequences and each continuation's first token has no predictor, exactly as the first
            token of a standalone sequence).
        continuations: one non-empty token list per continuation (at least one).
        loss_masks: per continuation, one 0/1 per token (None = all 1).
        episode_ids: per continuation, one int per token (None = all 0).
        sequence_ids: optional caller ids of the continuations (e.g. the input indices that
            `find_shared_prefixes` grouped); carried through unchanged.
    """

    prefix: list[int]
    continuations: list[list[int]]
    loss_masks: list[list[float]] | None = None
    episode_ids: list[list[int]] | None = None
    sequence_ids: list[int] | None = field(default=None)

    def __post_init__(self) -> None:
        self.prefix = _check_token_list(self.prefix, "prefix")
        if isinstance(self.continuations, (str, bytes)) or not isinstance(self.continuations, Sequence):
            raise TypeError(
                f"continuations must be a list of token lists, got {type(self.continuations).__name__}"
            )
        if len(self.continuations) == 0:
            raise ValueError("continuations is empty: a PrefixGroup needs at least one continuation")
        self.continuations = [_check_token_list(c, f"continuations[{k}]") for k, c in enumerate(self.continuations)]
        for k, c in enumerate(self.continuations):
            if len(c) == 0:
                raise ValueError(f"continuations[{k}] is empty: every continuation needs at least one token")
        lengths = [len(c) for c in self.continuations]
        if self.loss_masks is not None:
            self.loss_masks = _check_per_token(self.loss_masks, "loss_masks", lengths, float)
        if self.episode_ids is not None:
            self.episode_ids = _check_per_token(self.episode_ids, "episode_ids", lengths, int)
        if self.sequence_ids is not None:
            if len(self.sequence_ids) != len(lengths):
                raise ValueError(
                    f"sequence_ids has {len(self.sequence_ids)} entries but there are {len(lengths)} continuations"
                )
            self.sequence_ids = [int(s) for s in self.sequence_ids]

    @classmethod
    def _trusted(cls, prefix: list[int], continuations: list[list[int]], sequence_ids: list[int]) -> "PrefixGroup":
        """Build from lists already validated and owned by the caller (skips the per-token checks)."""
        group = object.__new__(cls)
        group.prefix, group.continuations = prefix, continuations
        group.loss_masks = group.episode_ids = None
        group.sequence_ids = sequence_ids
        return group

    @property
    def num_tokens(self) -> int:
        """Tokens when packed with the prefix shared: P + sum(R)."""
        return len(self.prefix) + sum(len(c) for c in self.continuations)

    @property
    def unshared_tokens(self) -> int:
        """Tokens when every continuation carries its own copy of the prefix: sum(P + R)."""
        return sum(len(self.prefix) + len(c) for c in self.continuations)

    def loss_mask(self, k: int) -> list[float]:
        return self.loss_masks[k] if self.loss_masks is not None else [1.0] * len(self.continuations[k])

    def episode_id(self, k: int) -> list[int]:
        return self.episode_ids[k] if self.episode_ids is not None else [0] * len(self.continuations[k])
