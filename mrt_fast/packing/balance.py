"""Balancing micro-batches over data-parallel ranks, and packing metrics."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mrt_fast.packing.batch import PackedBatch

# Default weight of the quadratic (attention) term relative to the linear (per-token) term.
# For a Qwen2-1.5B-sized model, attention FLOPs of a causal sequence of length L match its
# per-token matmul FLOPs around L ~ 32K, hence b = a / 32768. Pass your own for other shapes.
DEFAULT_QUADRATIC_COST = 1.0 / 32768


def segment_runs(batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stream's segments as runs: `(lengths, prefix_lengths, is_prefix)`, one entry per run.

    A run is a group's prefix or one continuation (contiguous in the layout); `prefix_lengths` is
    the length of the prefix of the run's group (0 without one). Computed with tensor ops (no
    per-token Python), on the CPU.
    """
    group_ids, segment_ids = batch.group_ids.cpu(), batch.segment_ids.cpu()
    change = torch.ones(group_ids.numel(), dtype=torch.bool)
    change[1:] = (group_ids[1:] != group_ids[:-1]) | (segment_ids[1:] != segment_ids[:-1])
    starts = torch.nonzero(change).flatten()
    lengths = torch.diff(starts, append=starts.new_tensor([group_ids.numel()]))
    groups, is_prefix = group_ids[starts], segment_ids[starts] == 0
    prefix_of_group = torch.zeros(int(groups.max()) + 1, dtype=torch.long)
    prefix_of_group[groups[is_prefix]] = lengths[is_prefix]
    return lengths, prefix_of_group[groups], is_prefix


def attention_square_sum(batch: PackedBatch) -> int:
    """`sum(L^2)` of a batch, counting what its attention actually spans.

    A group contributes `P^2` for its prefix once and `(P + R)^2 - P^2` per continuation (the
    continuation's rows of the `(P + R)`-long causal square its separate sequence would have), so a
    plain sequence contributes exactly `L^2` and a shared prefix is not counted per continuation.
    """
    lengths, prefix, is_prefix = segment_runs(batch)
    continuation = ~is_prefix
    full = (prefix[continuation] + lengths[continuation]) ** 2 - prefix[continuation] ** 2
    return int((lengths[is_prefix] ** 2).sum() + full.sum())


def micro_batch_cost(batch: PackedBatch, a: float = 1.0, b: float = DEFAULT_QUADRATIC_COST) -> float:
    """`a * sum(L) + b * sum(L^2)`: token-linear work plus attention work."""
    return a * batch.num_tokens + b * attention_square_sum(batch)


def balance_micro_batches(
    batches: Sequence[PackedBatch], world_size: int, a: float = 1.0, b: float = DEFAULT_QUADRATIC_COST
) -> list[list[PackedBatch]]:
    """Assign micro-batches to `world_size` ranks with equal counts and balanced cost.

    Greedy LPT (longest processing time first) under a cardinality limit: every rank gets
    `ceil(n / world_size)` micro-batches, since FSDP collectives need the same number of forward/
    backward passes per rank. Where `n` does not divide, the cheapest micro-batch is repeated as
    padding (`is_padding=True`, all loss masks 0): it runs the collectives but adds no loss.
    Returns one list per rank, micro-batches in descending cost.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if len(batches) == 0:
        raise ValueError("batches is empty: nothing to balance")
    if a < 0 or b < 0:
        raise ValueError(f"cost weights a and b must be >= 0, got a={a}, b={b}")
    batches = list(batches)
    costs = [micro_batch_cost(mb, a, b) for mb in batches]
    per_rank = -(-len(batches) // world_size)
    missing = per_rank * world_size - len(batches)
    if missing:
        cheapest = min(range(len(batches)), key=lambda i: (costs[i], i))
        batches += [batches[cheapest].as_padding() for _ in range(missing)]
        costs += [costs[cheapest]] * missing
    ranks: list[list[PackedBatch]] = [[] for _ in range(world_size)]
    loads = [0.0] * world_size
    for i in sorted(range(len(batches)), key=lambda i: (-costs[i], i)):
        r = min((r for r in range(world_size) if len(ranks[r]) < per_rank), key=lambda r: (loads[r], r))
        ranks[r].append(batches[i])
        loads[r] += costs[i]
    return ranks


def packing_metrics(batches: Sequence[PackedBatch] | Sequence[Sequence[PackedBatch]]) -> dict[str, float]:
    """Metrics of a packing (a list of micro-batches, or one list per rank).

    packing/efficiency: real tokens / token capacity (micro-batches x max_tokens; padding
        micro-batches count as capacity with no real tokens). 1.0 when packed without a budget.
    packing/prefix_dedup_ratio: tokens that separate packing would process / tokens we process.
    packing/tokens, packing/micro_batches: totals, padding micro-batches included.
    """
    flat = [mb for item in batches for mb in (item if isinstance(item, (list, tuple)) else [item])]
    if not flat:
        raise ValueError("batches is empty")
    real = [mb for mb in flat if not mb.is_padding]
    processed = sum(mb.num_tokens for mb in flat)
    real_tokens = sum(mb.num_tokens for mb in real)
    if all(mb.max_tokens is not None for mb in flat):
        efficiency = real_tokens / sum(mb.max_tokens for mb in flat)
    else:
        efficiency = real_tokens / processed
    return {
        "packing/efficiency": efficiency,
        "packing/prefix_dedup_ratio": sum(mb.unshared_tokens for mb in real) / processed,
        "packing/tokens": float(processed),
        "packing/micro_batches": float(len(flat)),
    }
