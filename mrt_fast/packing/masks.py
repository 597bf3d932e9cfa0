"""Attention masks as tiny pure functions (attention-gym style `mask_mod`s).

A mask_mod maps index tensors `(batch, head, q_idx, kv_idx)` to a boolean "may attend". The
same function serves every backend: evaluated on broadcast index grids it gives the dense
boolean mask of the SDPA path; handed to `create_block_mask` it gives FlexAttention's BlockMask.
Because both come from one function, the backends cannot disagree about who sees whom.

Layout assumption of the packed stream (see `batch.py`): inside a group the prefix comes first,
then its continuations one after another. Segment id 0 is the prefix, k+1 is continuation k.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def and_masks(*mods: MaskMod) -> MaskMod:
    """Intersection of mask_mods."""

    def mod(b, h, q, kv):
        out = mods[0](b, h, q, kv)
        for m in mods[1:]:
            out = out & m(b, h, q, kv)
        return out

    return mod


def or_masks(*mods: MaskMod) -> MaskMod:
    """Union of mask_mods."""

    def mod(b, h, q, kv):
        out = mods[0](b, h, q, kv)
        for m in mods[1:]:
            out = out | m(b, h, q, kv)
        return out

    return mod


def causal(b, h, q, kv):
    """Stream-order causality: a query sees keys at or before it."""
    return q >= kv


def same_group(group_ids: torch.Tensor) -> MaskMod:
    """Nothing crosses groups."""
    return lambda b, h, q, kv: group_ids[q] == group_ids[kv]


def same_segment(segment_ids: torch.Tensor) -> MaskMod:
    """Query and key in the same segment (the prefix, or the same continuation)."""
    return lambda b, h, q, kv: segment_ids[q] == segment_ids[kv]


def key_in_prefix(segment_ids: torch.Tensor) -> MaskMod:
    """The key is a prefix token (segment 0): every continuation of the group may see it."""
    return lambda b, h, q, kv: segment_ids[kv] == 0


def sliding_window(position_ids: torch.Tensor, window: int) -> MaskMod:
    """HF semantics in *model positions*: keep keys with `pos[q] - pos[kv] < window`."""
    return lambda b, h, q, kv: position_ids[q] - position_ids[kv] < window


def prefix_tree_mask(
    group_ids: torch.Tensor,
    segment_ids: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    window: int | None = None,
) -> MaskMod:
    """Prefix-tree attention: causal within the own segment, plus the whole prefix of the group.

    Because the prefix precedes its continuations in the stream, "causal in stream order AND
    (same segment OR key in prefix)" is exactly: prefix tokens causal among themselves, each
    continuation causal within itself and seeing all of its prefix, nothing across groups or
    between sibling continuations. With `window`, a sliding window over model positions is
    intersected on top (what the model would apply to each `prefix + continuation` alone).
    """
    mods = [same_group(group_ids), causal, or_masks(same_segment(segment_ids), key_in_prefix(segment_ids))]
    if window is not None:
        if position_ids is None:
            raise ValueError("position_ids is required when window is set")
        mods.append(sliding_window(position_ids, window))
    return and_masks(*mods)


def dense_mask(
    mask_mod: MaskMod, length: int, device: torch.device | str | None = None, *, start: int = 0
) -> torch.Tensor:
    """Materialise a mask_mod as a boolean `[length, length]` tensor (query rows, key columns)
    over stream indices `start .. start + length - 1`."""
    idx = torch.arange(start, start + length, device=device)
    zero = torch.zeros((), dtype=torch.long, device=device)
    return mask_mod(zero, zero, idx[:, None], idx[None, :])
