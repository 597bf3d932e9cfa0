"""Group plain sequences by shared token prefixes (`find_shared_prefixes`).

Which grouping? Sort the sequences; adjacent longest common prefixes (LCPs) then describe the
prefix trie, whose internal nodes are "LCP intervals": a run of sorted sequences sharing
`depth` tokens. Packing such a run as one group saves `(size - 1) * depth` tokens. We choose
the set of non-nested intervals that saves the most tokens (a bottom-up choice on the trie:
take a node if it saves at least as much as the best choice inside it). GRPO groups thus share
their prompt rather than merging with other prompts over a common chat-template header, and
MRT branches share prompt + partial trace.

Every continuation must keep at least one token (something to predict), so an interval whose
shortest member has `m` tokens shares at most `m - 1`. Sequences not in any chosen interval
become plain one-sequence groups with an empty prefix.

The core (`group_by_prefix`) runs natively (`mrt_fast._native`, C++ from csrc/) when the
extension is built and falls back to the pure-Python reference below with identical output.
"""

from __future__ import annotations

from collections.abc import Sequence

from mrt_fast.packing.groups import PrefixGroup, _check_token_list
from mrt_fast.packing.native import load_native

_native = load_native()

Grouping = list[tuple[int, list[int]]]  # (shared prefix length, input indices) per group


def group_by_prefix_reference(sequences: Sequence[Sequence[int]]) -> Grouping:
    """Pure-Python reference: groups as (prefix length, sorted input indices), ordered by first index."""
    n = len(sequences)
    order = sorted(range(n), key=lambda i: sequences[i])  # stable: equal sequences keep input order
    # lcp[i] = longest common prefix of sorted neighbours i-1 and i.
    lcp = [0] * n
    for i in range(1, n):
        a, b = sequences[order[i - 1]], sequences[order[i]]
        limit = min(len(a), len(b))
        j = 0
        while j < limit and a[j] == b[j]:
            j += 1
        lcp[i] = j

    # LCP-interval tree by a stack sweep; nodes are finished children-first (post-order).
    # Stack entry: [depth, left bound, min member length, sum of children's best savings].
    finished = []  # (left, right, shared length, take) in post-order
    stack = [[0, 0, len(sequences[order[0]]) if n else 0, 0]]

    def finish(node, right):
        depth, left, min_len, children_best = node
        shared = min(depth, min_len - 1)
        take_value = (right - left) * shared
        take = shared > 0 and take_value >= children_best
        finished.append((left, right, shared, take))
        return max(take_value, children_best)

    for i in range(1, n + 1):
        h = lcp[i] if i < n else 0
        left = i - 1
        popped = None  # (best, min_len) of the last interval closed at this step
        while h < stack[-1][0]:
            node = stack.pop()
            best = finish(node, i - 1)
            left = node[1]
            popped = (best, node[2])
            if h <= stack[-1][0]:
                stack[-1][3] += best
                stack[-1][2] = min(stack[-1][2], node[2])
                popped = None
        if h > stack[-1][0]:
            min_len = len(sequences[order[i - 1]])
            children_best = 0
            if popped is not None:
                children_best, min_len = popped[0], min(min_len, popped[1])
            stack.append([h, left, min_len, children_best])
        if i < n:  # sequence i belongs to the deepest open interval
            stack[-1][2] = min(stack[-1][2], len(sequences[order[i]]))

    # Top-down: an interval is a group if chosen and not inside a chosen ancestor. Reverse
    # post-order visits ancestors before descendants; intervals nest, so checking one member
    # tells whether the whole interval is already covered.
    covered = [False] * n
    groups: Grouping = []
    for left, right, shared, take in reversed(finished):
        if take and not covered[left]:
            for i in range(left, right + 1):
                covered[i] = True
            groups.append((shared, sorted(order[left : right + 1])))
    groups.extend((0, [order[i]]) for i in range(n) if not covered[i])
    groups.sort(key=lambda group: group[1][0])
    return groups


def native_available() -> bool:
    """Whether the C++ prefix finder (`mrt_fast._native`) is built and importable."""
    return _native is not None


def prefix_finder_backend() -> str:
    """"native" or "python": which implementation `find_shared_prefixes` uses."""
    return "native" if _native is not None else "python"


def group_by_prefix(sequences: Sequence[Sequence[int]]) -> Grouping:
    """The grouping of `find_shared_prefixes`, native when available (identical output)."""
    if _native is not None:
        return _native.group_by_prefix(sequences)
    return group_by_prefix_reference(sequences)


def find_shared_prefixes(sequences: Sequence[Sequence[int]]) -> list[PrefixGroup]:
    """Build `PrefixGroup`s from plain sequences by their longest common token prefixes.

    Returns groups ordered by their first input index; each group's `sequence_ids` are the input
    indices of its continuations (ascending), so per-sequence data (rewards, masks) can be mapped.
    A sequence that shares nothing worth sharing is a group with an empty prefix.

    Args:
        sequences: non-empty lists of non-negative int token ids.
    """
    if isinstance(sequences, (str, bytes)) or not isinstance(sequences, Sequence):
        raise TypeError(f"sequences must be a list of token lists, got {type(sequences).__name__}")
    sequences = [_check_token_list(s, f"sequences[{i}]", copy=False) for i, s in enumerate(sequences)]
    for i, s in enumerate(sequences):
        if len(s) == 0:
            raise ValueError(f"sequences[{i}] is empty: every sequence needs at least one token")
    # The slices are fresh lists of validated tokens, and every continuation keeps >= 1 token:
    # build the groups without re-checking every token.
    return [
        PrefixGroup._trusted(
            list(sequences[indices[0]][:shared]), [list(sequences[i][shared:]) for i in indices], indices
        )
        for shared, indices in group_by_prefix(sequences)
    ]
