"""Packed batches with shared prefixes (prefix-tree attention) for any HF causal LM.

One forward/backward over `P + G*R` tokens gives the outputs and gradients of `G` separate
`prefix + continuation` sequences (`G*(P+R)` tokens).

    groups = find_shared_prefixes(sequences)          # or build PrefixGroup(prefix, continuations)
    for batch in pack(groups, max_tokens=16384):
        hidden = packed_hidden(model, batch)           # [T, H] at the positions predicting targets
        loss, metrics = fused_policy_loss(hidden, model.lm_head.weight, batch.targets, adv,
                                          seq_ids=batch.target_seq_ids, loss_mask=batch.target_loss_mask)

See docs/packing.md.
"""

from mrt_fast.packing.attention import ATTENTION_NAME, BACKENDS, PackedAttentionContext, packed_attention
from mrt_fast.packing.balance import attention_square_sum, balance_micro_batches, micro_batch_cost, packing_metrics
from mrt_fast.packing.batch import PackedBatch, pack, sequence_index
from mrt_fast.packing.forward import check_model, packed_hidden, packed_logprobs
from mrt_fast.packing.groups import PrefixGroup
from mrt_fast.packing.masks import dense_mask, prefix_tree_mask
from mrt_fast.packing.prefix_finder import (
    find_shared_prefixes,
    group_by_prefix,
    group_by_prefix_reference,
    native_available,
    prefix_finder_backend,
)

__all__ = [
    "ATTENTION_NAME",
    "BACKENDS",
    "PackedAttentionContext",
    "PackedBatch",
    "PrefixGroup",
    "attention_square_sum",
    "balance_micro_batches",
    "check_model",
    "dense_mask",
    "find_shared_prefixes",
    "group_by_prefix",
    "group_by_prefix_reference",
    "micro_batch_cost",
    "native_available",
    "pack",
    "packed_attention",
    "packed_hidden",
    "packed_logprobs",
    "packing_metrics",
    "prefix_finder_backend",
    "prefix_tree_mask",
    "sequence_index",
]
