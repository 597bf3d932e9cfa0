"""Packing groups into flat token streams under a token budget.

Layout of one micro-batch (a `PackedBatch`): groups one after another; inside a group the
prefix first, then each continuation. A continuation's position ids continue after its prefix,
so every token sits at the position it would have in `prefix + continuation` alone.

Targets are the continuation tokens that have a predecessor. Token j of a continuation is
predicted from continuation token j-1, and token 0 from the *last prefix token*, a position
shared by all continuations of the group. `target_positions` lists, per target, the stream index
whose hidden state predicts it; the shared prefix position appears once per continuation, so
gathering `hidden[target_positions]` sums its gradient over the continuations, exactly as the
separate sequences would. With an empty prefix (plain sequences) the first continuation token
has no predictor and is context, as the first token of a standalone sequence is.
"""

from __future__ import annotations

import array
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import torch

from mrt_fast.packing.groups import PrefixGroup

# Per-token (stream) and per-target tensor fields, moved together by `PackedBatch.to`.
_STREAM_FIELDS = (
    "input_ids",
    "position_ids",
    "group_ids",
    "segment_ids",
    "token_seq_ids",
    "token_loss_mask",
    "token_episode_ids",
)
_TARGET_FIELDS = (
    "targets",
    "target_positions",
    "target_seq_ids",
    "target_episode_ids",
    "target_loss_mask",
)
_TENSOR_FIELDS = _STREAM_FIELDS + _TARGET_FIELDS


@dataclass
class PackedBatch:
    """One micro-batch: a flat stream of `L` tokens and its `T` loss targets.

    Stream tensors `[L]` (int64 unless noted):
        input_ids, position_ids,
        group_ids: index of the group inside this batch (attention never crosses groups),
        segment_ids: 0 for prefix tokens, k+1 for the k-th continuation of the group in this batch,
        token_seq_ids: global sequence id of the continuation a token belongs to, -1 for prefix,
        token_loss_mask (float32): 0 for prefix tokens, the continuation's loss mask otherwise,
        token_episode_ids: -1 for prefix tokens, the continuation's episode ids otherwise.
    Target tensors `[T]`, in continuation order:
        targets, target_positions (stream index whose hidden state predicts the target),
        target_seq_ids, target_episode_ids, target_loss_mask (float32).
    Bookkeeping:
        sequence_keys: `(group_index, continuation_index)` of each continuation in this batch, in
            order (indices into the list given to `pack`); seq_ids: their global sequence ids;
        target_counts: number of targets per continuation (to split per-target outputs);
        group_indices: index (into `pack`'s input) of each group in this batch;
        unshared_tokens: tokens that packing every continuation with its own prefix would take;
        shares_prefix: some group here has a non-empty prefix and several continuations;
        max_tokens: the budget the batch was packed under (None = unbounded);
        is_padding: a filler micro-batch added by rank balancing (all loss masks 0).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    group_ids: torch.Tensor
    segment_ids: torch.Tensor
    token_seq_ids: torch.Tensor
    token_loss_mask: torch.Tensor
    token_episode_ids: torch.Tensor
    targets: torch.Tensor
    target_positions: torch.Tensor
    target_seq_ids: torch.Tensor
    target_episode_ids: torch.Tensor
    target_loss_mask: torch.Tensor
    sequence_keys: list[tuple[int, int]]
    seq_ids: list[int]
    target_counts: list[int]
    group_indices: list[int]
    unshared_tokens: int
    shares_prefix: bool
    max_tokens: int | None = None
    is_padding: bool = False
    # Longest prefix + continuation, i.e. the largest position id + 1 (checked against the model).
    max_sequence_length: int = field(default=0)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_targets(self) -> int:
        return int(self.targets.numel())

    @property
    def seq_index(self) -> dict[tuple[int, int], int]:
        """`(group_index, continuation_index) -> global sequence id` for this batch's continuations."""
        return dict(zip(self.sequence_keys, self.seq_ids))

    def check_consistent(self) -> None:
        """Raise a ValueError naming the fields when the batch's arrays disagree (a batch edited or
        assembled by hand rather than built by `pack`)."""
        stream = {name: getattr(self, name) for name in _STREAM_FIELDS}
        target = {name: getattr(self, name) for name in _TARGET_FIELDS}
        for part, tensors in (("stream", stream), ("target", target)):
            for name, t in tensors.items():
                if not isinstance(t, torch.Tensor) or t.dim() != 1:
                    raise ValueError(f"batch.{name} must be a 1-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
            sizes = {name: int(t.numel()) for name, t in tensors.items()}
            if len(set(sizes.values())) > 1:
                raise ValueError(f"the batch's {part} tensors disagree in length: {sizes}")
        lengths = {"sequence_keys": len(self.sequence_keys), "seq_ids": len(self.seq_ids),
                   "target_counts": len(self.target_counts)}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"the batch's per-continuation lists disagree in length: {lengths}")
        if sum(self.target_counts) != self.num_targets:
            raise ValueError(f"batch.target_counts sum to {sum(self.target_counts)} but the batch has "
                             f"{self.num_targets} targets")
        positions = self.target_positions
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= self.num_tokens):
            raise ValueError(f"batch.target_positions must lie in [0, {self.num_tokens}) (the stream), got values "
                             f"in [{int(positions.min())}, {int(positions.max())}]")

    def to(self, device: torch.device | str) -> "PackedBatch":
        """A copy with every tensor on `device`."""
        return replace(self, **{name: getattr(self, name).to(device) for name in _TENSOR_FIELDS})

    def as_padding(self) -> "PackedBatch":
        """A copy that runs the same compute but contributes no loss (for rank balancing)."""
        return replace(
            self,
            token_loss_mask=torch.zeros_like(self.token_loss_mask),
            target_loss_mask=torch.zeros_like(self.target_loss_mask),
            unshared_tokens=0,
            is_padding=True,
        )


assert set(_TENSOR_FIELDS) <= {f.name for f in fields(PackedBatch)}


@dataclass
class _Piece:
    """A group, or the part of a group, that goes into one micro-batch: its prefix + some continuations."""

    group_index: int
    continuation_indices: list[int]
    num_tokens: int


def sequence_index(groups: Sequence[PrefixGroup]) -> dict[tuple[int, int], int]:
    """Global sequence ids: continuations numbered in group order, then continuation order."""
    index, next_id = {}, 0
    for g, group in enumerate(groups):
        for k in range(len(group.continuations)):
            index[(g, k)] = next_id
            next_id += 1
    return index


def _first_fit_decreasing(sizes: list[int], capacity: int | None) -> list[list[int]]:
    """Bin packing: item indices per bin, bins in creation order, items in index order inside a bin."""
    if capacity is None:
        return [list(range(len(sizes)))]
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        for b, load in enumerate(loads):
            if load + sizes[i] <= capacity:
                bins[b].append(i)
                loads[b] += sizes[i]
                break
        else:
            bins.append([i])
            loads.append(sizes[i])
    return [sorted(b) for b in bins]


def _split(g: int, group: PrefixGroup, ks: list[int], max_tokens: int) -> list[_Piece]:
    """Spread continuations `ks` of a group that exceeds the budget over pieces that each carry the prefix."""
    prefix_len = len(group.prefix)
    for k in ks:
        n = len(group.continuations[k])
        if prefix_len + n > max_tokens:
            raise ValueError(
                f"max_tokens={max_tokens} is smaller than prefix + continuation of groups[{g}] continuation {k} "
                f"({prefix_len} + {n} = {prefix_len + n} tokens); a continuation cannot be split, "
                f"so max_tokens must be at least {prefix_len + n}"
            )
    lengths = [len(group.continuations[k]) for k in ks]
    chunks = _first_fit_decreasing(lengths, max_tokens - prefix_len)
    return [_Piece(g, [ks[i] for i in chunk], prefix_len + sum(lengths[i] for i in chunk)) for chunk in chunks]


def _pieces(groups: Sequence[PrefixGroup], max_tokens: int | None, share_prefix: bool) -> list[_Piece]:
    pieces = []
    for g, group in enumerate(groups):
        n = len(group.continuations)
        # Unshared packing: every continuation is its own piece with its own copy of the prefix.
        subsets = [list(range(n))] if share_prefix else [[k] for k in range(n)]
        for ks in subsets:
            tokens = len(group.prefix) + sum(len(group.continuations[k]) for k in ks)
            if max_tokens is None or tokens <= max_tokens:
                pieces.append(_Piece(g, ks, tokens))
            else:
                pieces.extend(_split(g, group, ks, max_tokens))
    return pieces


def _build_batch(
    pieces: list[_Piece], groups: Sequence[PrefixGroup], seq_index: dict, max_tokens: int | None
) -> PackedBatch:
    cols: dict[str, list] = {name: [] for name in _TENSOR_FIELDS}
    sequence_keys, seq_ids, target_counts, group_indices = [], [], [], []
    unshared, shares_prefix, max_len = 0, False, 0
    for local_group, piece in enumerate(pieces):
        group = groups[piece.group_index]
        prefix = group.prefix
        prefix_len = len(prefix)
        group_indices.append(piece.group_index)
        shares_prefix |= prefix_len > 0 and len(piece.continuation_indices) > 1
        start = len(cols["input_ids"])
        cols["input_ids"] += prefix
        cols["position_ids"] += range(prefix_len)
        cols["group_ids"] += [local_group] * prefix_len
        cols["segment_ids"] += [0] * prefix_len
        cols["token_seq_ids"] += [-1] * prefix_len
        cols["token_loss_mask"] += [0.0] * prefix_len
        cols["token_episode_ids"] += [-1] * prefix_len
        for segment, k in enumerate(piece.continuation_indices, start=1):
            cont = group.continuations[k]
            seq = seq_index[(piece.group_index, k)]
            mask, episodes = group.loss_mask(k), group.episode_id(k)
            cont_start = len(cols["input_ids"])
            cols["input_ids"] += cont
            cols["position_ids"] += range(prefix_len, prefix_len + len(cont))
            cols["group_ids"] += [local_group] * len(cont)
            cols["segment_ids"] += [segment] * len(cont)
            cols["token_seq_ids"] += [seq] * len(cont)
            cols["token_loss_mask"] += mask
            cols["token_episode_ids"] += episodes
            # Predictor of continuation token j: token j-1, or the last prefix token for j = 0.
            first = 0 if prefix_len > 0 else 1
            predictors = [cont_start + j - 1 for j in range(first, len(cont))]
            if prefix_len > 0:
                predictors[0] = start + prefix_len - 1
            cols["targets"] += cont[first:]
            cols["target_positions"] += predictors
            cols["target_seq_ids"] += [seq] * len(predictors)
            cols["target_episode_ids"] += episodes[first:]
            cols["target_loss_mask"] += mask[first:]
            sequence_keys.append((piece.group_index, k))
            seq_ids.append(seq)
            target_counts.append(len(predictors))
            unshared += prefix_len + len(cont)
            max_len = max(max_len, prefix_len + len(cont))
    float_fields = {"token_loss_mask", "target_loss_mask"}
    tensors = {name: _tensor(values, name in float_fields) for name, values in cols.items()}
    return PackedBatch(
        **tensors,
        sequence_keys=sequence_keys,
        seq_ids=seq_ids,
        target_counts=target_counts,
        group_indices=group_indices,
        unshared_tokens=unshared,
        shares_prefix=shares_prefix,
        max_tokens=max_tokens,
        max_sequence_length=max_len,
    )


def _tensor(values: list, is_float: bool) -> torch.Tensor:
    """A 1-D int64 (float32) tensor of a list, through a typed C array: about 4x faster than
    `torch.tensor(list)`, which inspects every element (a second per million tokens)."""
    if not values:
        return torch.empty(0, dtype=torch.float32 if is_float else torch.long)
    return torch.frombuffer(array.array("f" if is_float else "q", values), dtype=torch.float32 if is_float else torch.long)


def pack(
    groups: Sequence[PrefixGroup], *, max_tokens: int | None = None, share_prefix: bool = True
) -> list[PackedBatch]:
    """Pack groups into micro-batches of at most `max_tokens` tokens.

    A group is kept whole unless it alone exceeds the budget; then its continuations are spread
    (first-fit decreasing) over several micro-batches, each carrying the prefix. No target is
    lost or duplicated, so summing per-target losses (or gradients) over the micro-batches gives
    exactly the loss of the unsplit group. Groups are bin-packed first-fit decreasing.

    Args:
        groups: the groups to pack (their indices are the `group_index` in `sequence_keys`).
        max_tokens: token budget per micro-batch (None = everything in one micro-batch).
        share_prefix: False packs each continuation with its own copy of the prefix (the
            "packed-unshared" baseline, and the layout flash-attn varlen can run).
    """
    if isinstance(groups, PrefixGroup) or not isinstance(groups, Sequence):
        raise TypeError(f"groups must be a list of PrefixGroup, got {type(groups).__name__}")
    if len(groups) == 0:
        raise ValueError("groups is empty: nothing to pack")
    for g, group in enumerate(groups):
        if not isinstance(group, PrefixGroup):
            raise TypeError(f"groups[{g}] must be a PrefixGroup, got {type(group).__name__}")
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
    pieces = _pieces(groups, max_tokens, share_prefix)
    seq_index = sequence_index(groups)
    bins = _first_fit_decreasing([p.num_tokens for p in pieces], max_tokens)
    return [_build_batch([pieces[i] for i in b], groups, seq_index, max_tokens) for b in bins]
