"""`PrefixGroup`: one shared prefix followed by the continuations sampled from it.

This is the unit of packing. GRPO groups share the prompt; MRT branches share prompt + partial
trace. Loss is only ever on continuation tokens: the prefix is context.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

from mrt_fast.packing.native import load_native

_native = load_native()
MAX_ID = 2**63 - 1  # ids travel as int64


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
            valid = set(map(type, tokens)) <= {int} and (not tokens or (min(tokens) >= 0 and max(tokens) <= MAX_ID))
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
        if not 0 <= t <= MAX_ID:
            raise ValueError(f"{name}[{i}] = {t} is not a valid token id (expected 0 <= id < 2**63)")
        out.append(t)
    return out


def _mask_value(v: object, where: str) -> float:
    """A loss-mask entry: 0 or 1 (bool, int or float); strings, NaN, -1 or 2 are errors."""
    if isinstance(v, (str, bytes)) or not isinstance(v, (bool, int, float)) and not hasattr(v, "__float__"):
        raise TypeError(f"{where} must be 0 or 1, got {type(v).__name__} ({v!r})")
    value = float(v)
    if value not in (0.0, 1.0):
        raise ValueError(f"{where} must be 0 or 1, got {v!r}")
    return value


def _id_value(v: object, where: str) -> int:
    """An id: a non-negative int < 2**63; an integral float (3.0) is accepted, 1.7 is an error."""
    if isinstance(v, bool) or isinstance(v, (str, bytes)):
        raise TypeError(f"{where} must be an int id, got {type(v).__name__} ({v!r})")
    try:
        value = operator.index(v)
    except TypeError:
        if not isinstance(v, float) and not hasattr(v, "is_integer"):
            raise TypeError(f"{where} must be an int id, got {type(v).__name__} ({v!r})") from None
        if not (math.isfinite(v) and float(v).is_integer()):
            raise ValueError(f"{where} must be a whole number, got {v!r} (ids are never rounded)") from None
        value = int(v)
    if not 0 <= value <= MAX_ID:
        raise ValueError(f"{where} must be in [0, 2**63), got {value}")
    return value


def _check_per_token(values: object, name: str, lengths: list[int], convert) -> list[list]:
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
        fast = _fast_masks(row) if convert is _mask_value else _fast_ids(row)
        out.append(fast if fast is not None else [convert(v, f"{name}[{k}][{j}]") for j, v in enumerate(row)])
    return out


def _fast_masks(row: Sequence) -> list[float] | None:
    """C-speed check of a valid 0/1 list (the common case); None sends it to the per-item check."""
    if type(row) is list and set(map(type, row)) <= {int, float, bool} and set(row) <= {0, 1}:
        return list(map(float, row))
    return None


def _fast_ids(row: Sequence) -> list[int] | None:
    if type(row) is list and set(map(type, row)) <= {int} and (not row or 0 <= min(row) and max(row) <= MAX_ID):
        return list(row)
    return None


@dataclass
class PrefixGroup:
    """A prefix shared by several continuations.

    Args:
        prefix: token ids of the shared context (may be empty: then the group is a set of plain
            sequences and each continuation's first token has no predictor, exactly as the first
            token of a standalone sequence).
        continuations: one non-empty token list per continuation (at least one).
        loss_masks: per continuation, one 0/1 per token (None = all 1).
        episode_ids: per continuation, one int >= 0 per token (None = all 0).
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
            self.loss_masks = _check_per_token(self.loss_masks, "loss_masks", lengths, _mask_value)
        if self.episode_ids is not None:
            self.episode_ids = _check_per_token(self.episode_ids, "episode_ids", lengths, _id_value)
        if self.sequence_ids is not None:
            if isinstance(self.sequence_ids, (str, bytes)) or not isinstance(self.sequence_ids, Sequence):
                raise TypeError(f"sequence_ids must be a list of ints, got {type(self.sequence_ids).__name__}")
            if len(self.sequence_ids) != len(lengths):
                raise ValueError(
                    f"sequence_ids has {len(self.sequence_ids)} entries but there are {len(lengths)} continuations"
                )
            self.sequence_ids = [_id_value(s, f"sequence_ids[{k}]") for k, s in enumerate(self.sequence_ids)]

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
