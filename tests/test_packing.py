"""Packing layout, token budget, rank balancing, metrics, masks and bad input (no model needed)."""

import pytest
import torch

from mrt_fast.packing import (
    PackedBatch,
    PrefixGroup,
    attention_square_sum,
    balance_micro_batches,
    dense_mask,
    micro_batch_cost,
    pack,
    packing_metrics,
    prefix_tree_mask,
    sequence_index,
)
from mrt_fast.packing.attention import PackedAttentionContext


def groups_of(prefix_lens, cont_lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        PrefixGroup(torch.randint(0, 50, (p,), generator=g).tolist(),
                    [torch.randint(0, 50, (r,), generator=g).tolist() for r in rs])
        for p, rs in zip(prefix_lens, cont_lens)
    ]


# --- layout -------------------------------------------------------------------------------------


def test_layout_positions_targets_and_ids():
    group = PrefixGroup([10, 11, 12], [[20, 21], [30]], loss_masks=[[1, 0], [1]], episode_ids=[[4, 5], [6]])
    plain = PrefixGroup([], [[40, 41, 42]])
    (b,) = pack([group, plain])
    assert b.input_ids.tolist() == [10, 11, 12, 20, 21, 30, 40, 41, 42]
    assert b.position_ids.tolist() == [0, 1, 2, 3, 4, 3, 0, 1, 2]  # continuations continue after the prefix
    assert b.group_ids.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert b.segment_ids.tolist() == [0, 0, 0, 1, 1, 2, 1, 1, 1]
    assert b.token_seq_ids.tolist() == [-1, -1, -1, 0, 0, 1, 2, 2, 2]
    assert b.token_loss_mask.tolist() == [0, 0, 0, 1, 0, 1, 1, 1, 1]
    # Continuation token 0 is predicted by the last prefix position (2), shared by both continuations;
    # the plain sequence's first token has no predictor.
    assert b.targets.tolist() == [20, 21, 30, 41, 42]
    assert b.target_positions.tolist() == [2, 3, 2, 6, 7]
    assert b.target_seq_ids.tolist() == [0, 0, 1, 2, 2]
    assert b.target_episode_ids.tolist() == [4, 5, 6, 0, 0]
    assert b.target_loss_mask.tolist() == [1, 0, 1, 1, 1]
    assert b.target_counts == [2, 1, 2]
    assert b.sequence_keys == [(0, 0), (0, 1), (1, 0)]
    assert b.seq_index == {(0, 0): 0, (0, 1): 1, (1, 0): 2}
    assert b.unshared_tokens == 12 and b.num_tokens == 9 and b.shares_prefix
    assert b.max_sequence_length == 5


def test_unshared_layout_copies_prefix():
    group = PrefixGroup([1, 2], [[3], [4, 5]])
    (b,) = pack([group], share_prefix=False)
    assert b.input_ids.tolist() == [1, 2, 3, 1, 2, 4, 5]
    assert b.group_ids.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert not b.shares_prefix and b.num_tokens == b.unshared_tokens == 7


def test_every_target_appears_exactly_once_under_budget():
    groups = groups_of([30, 5, 0, 12, 50], [[7, 9, 3], [40], [8], [1, 1, 1, 1], [20, 20, 20, 20, 20]])
    for share in (True, False):
        for budget in (None, 70, 95, 200):
            batches = pack(groups, max_tokens=budget, share_prefix=share)
            keys = [k for b in batches for k in b.sequence_keys]
            assert sorted(keys) == sorted(sequence_index(groups)), (share, budget)
            for b in batches:
                assert budget is None or b.num_tokens <= budget
                for key, seq, count in zip(b.sequence_keys, b.seq_ids, b.target_counts):
                    g, k = key
                    assert sequence_index(groups)[key] == seq
                    want = groups[g].continuations[k][0 if groups[g].prefix else 1:]
                    assert b.targets[b.target_seq_ids == seq].tolist() == want
                    assert count == len(want)
                # Targets are the continuation's tokens; each predicted from the token one position earlier.
                for seq in b.seq_ids:
                    stream = torch.nonzero(b.token_seq_ids == seq).flatten()
                    pred = b.target_positions[b.target_seq_ids == seq]
                    tgt_stream = stream[len(stream) - len(pred):]
                    assert torch.equal(b.input_ids[tgt_stream], b.targets[b.target_seq_ids == seq])
                    assert torch.equal(b.position_ids[pred] + 1, b.position_ids[tgt_stream])
                    assert torch.equal(pred[1:], tgt_stream[:-1])
                    assert (b.group_ids[pred] == b.group_ids[tgt_stream]).all()


def test_group_kept_whole_unless_it_exceeds_budget():
    groups = groups_of([10, 10, 10], [[5, 5], [5, 5], [5, 5]])  # 20 tokens each
    batches = pack(groups, max_tokens=45)
    assert sorted(len(b.group_indices) for b in batches) == [1, 2]
    assert all(len(set(b.group_indices)) == len(b.group_indices) for b in batches)
    split = pack(groups_of([10], [[5, 5, 5, 5]]), max_tokens=21)  # 30 tokens: split, prefix carried
    assert len(split) == 2
    assert all(b.input_ids[:10].tolist() == split[0].input_ids[:10].tolist() for b in split)
    assert sorted(k for b in split for _, k in b.sequence_keys) == [0, 1, 2, 3]


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("native_check", [True, False], ids=["native_check", "python_check"])
def test_prefix_group_errors(native_check, monkeypatch):
    import mrt_fast.packing.groups as groups_module

    if not native_check:
        monkeypatch.setattr(groups_module, "_native", None)
    assert PrefixGroup([0, 5], [[7]]).prefix == [0, 5]
    import numpy as np

    assert PrefixGroup([np.int64(3), np.int64(4)], [[np.int64(7)]]).prefix == [3, 4]  # numpy ints become ints
    with pytest.raises(ValueError, match="continuations is empty"):
        PrefixGroup([1], [])
    with pytest.raises(ValueError, match=r"continuations\[1\] is empty"):
        PrefixGroup([1], [[2], []])
    with pytest.raises(ValueError, match=r"loss_masks\[0\] has length 1 but continuation 0 has 2"):
        PrefixGroup([1], [[2, 3]], loss_masks=[[1]])
    with pytest.raises(ValueError, match="episode_ids has 2 entries but there are 1 continuations"):
        PrefixGroup([1], [[2, 3]], episode_ids=[[0, 0], [1, 1]])
    with pytest.raises(ValueError, match=r"prefix\[1\] = -3"):
        PrefixGroup([1, -3], [[2]])
    with pytest.raises(TypeError, match=r"continuations\[0\]\[0\] must be an int"):
        PrefixGroup([1], [[2.0]])
    with pytest.raises(TypeError, match=r"prefix\[0\] must be an int"):
        PrefixGroup([True], [[2]])
    with pytest.raises(TypeError, match="prefix must be a list"):
        PrefixGroup("abc", [[2]])


def test_pack_errors():
    with pytest.raises(ValueError, match="groups is empty"):
        pack([])
    with pytest.raises(TypeError, match=r"groups\[0\] must be a PrefixGroup"):
        pack([[1, 2, 3]])
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        pack(groups_of([1], [[1]]), max_tokens=0)
    with pytest.raises(ValueError, match=r"max_tokens=10 is smaller than prefix \+ continuation .* \(8 \+ 3 = 11 tokens\)"):
        pack([PrefixGroup([1] * 8, [[1, 2], [1, 2, 3]])], max_tokens=10)


# --- masks -------------------------------------------------------------------------------------


def brute_force_mask(b: PackedBatch, window=None) -> torch.Tensor:
    """Who sees whom, from the definition: same group, and kv is in q's prefix or earlier in q's segment."""
    n = b.num_tokens
    m = torch.zeros(n, n, dtype=torch.bool)
    g, s, p = b.group_ids.tolist(), b.segment_ids.tolist(), b.position_ids.tolist()
    for q in range(n):
        for kv in range(n):
            visible = g[q] == g[kv] and ((s[kv] == 0 and (s[q] != 0 or kv <= q)) or (s[kv] == s[q] and kv <= q))
            if window is not None:
                visible &= p[q] - p[kv] < window
            m[q, kv] = visible
    return m


@pytest.mark.parametrize("window", [None, 3])
def test_dense_mask_matches_definition(window):
    (b,) = pack(groups_of([4, 0, 2], [[3, 2, 1], [3, 2], [2]]))
    got = dense_mask(prefix_tree_mask(b.group_ids, b.segment_ids, b.position_ids, window), b.num_tokens)
    want = brute_force_mask(b, window)
    assert torch.equal(got, want)
    # The SDPA path attends group by group: the per-group masks tile the diagonal of the same mask.
    ctx = PackedAttentionContext.from_batch(b, "sdpa")
    tiled = torch.zeros_like(want)
    blocks = ctx.group_masks(window)
    assert [(s, e) for s, e, _ in blocks] == [(0, 10), (10, 15), (15, 19)]
    for start, end, mask in blocks:
        tiled[start:end, start:end] = mask[0, 0]
    assert torch.equal(tiled, want)


def test_flex_block_mask_equals_dense_mask():
    from torch.nn.attention.flex_attention import create_mask

    (b,) = pack(groups_of([150, 7, 0], [[40, 90, 3], [200], [60, 5]]))  # several 128-blocks, partial blocks
    ctx = PackedAttentionContext.from_batch(b, "flex")
    for window in (None, 100):
        dense = ctx.dense_mask(window)[0, 0]
        block = ctx.block_mask(window)
        # Element-wise materialisation of the same mask_mod == the SDPA mask.
        materialised = create_mask(ctx.mask_mod(window), None, None, b.num_tokens, b.num_tokens,
                                   device=ctx.group_ids.device)  # the default device would be CUDA on a GPU machine
        assert torch.equal(materialised[0, 0], dense)
        # Block sparsity: every visible pair lies in a computed block, and "full" blocks are all visible.
        size = block.BLOCK_SIZE[0]
        blocks = block.to_dense()[0, 0].bool()
        nq = -(-b.num_tokens // size)
        padded = torch.zeros(nq * size, nq * size, dtype=torch.bool)
        padded[: b.num_tokens, : b.num_tokens] = dense
        any_visible = padded.view(nq, size, nq, size).any(3).any(1)
        assert torch.equal(blocks, any_visible)
        full = torch.zeros(nq, nq, dtype=torch.bool)
        if block.full_kv_num_blocks is not None:
            for qb in range(nq):
                for j in range(int(block.full_kv_num_blocks[0, 0, qb])):
                    full[qb, int(block.full_kv_indices[0, 0, qb, j])] = True
        all_visible = torch.ones(nq * size, nq * size, dtype=torch.bool)
        all_visible[: b.num_tokens, : b.num_tokens] = dense
        assert not (full & ~all_visible.view(nq, size, nq, size).all(3).all(1)).any()


def test_padding_group_is_isolated():
    """The padded stream's mask: real tokens see exactly what they saw, padding sees only padding."""
    (b,) = pack(groups_of([5, 0], [[3, 2], [4]]))
    plain = PackedAttentionContext.from_batch(b, "sdpa")
    padded = PackedAttentionContext.from_batch(b, "sdpa", length=b.num_tokens + 6)
    n = b.num_tokens
    dense = padded.dense_mask(None)[0, 0]
    assert torch.equal(dense[:n, :n], plain.dense_mask(None)[0, 0])
    assert not dense[:n, n:].any() and not dense[n:, :n].any()
    assert torch.equal(dense[n:, n:], torch.ones(6, 6, dtype=torch.bool).tril())
    assert padded.group_masks(None)[-1][:2] == (n, n + 6)
    with pytest.raises(ValueError, match="shorter than the batch"):
        PackedAttentionContext.from_batch(b, "sdpa", length=n - 1)


def test_flash_varlen_boundaries():
    (b,) = pack([PrefixGroup([1, 2], [[3, 4]]), PrefixGroup([], [[5, 6], [7]])], share_prefix=False)
    ctx = PackedAttentionContext(backend="flash_varlen", group_ids=b.group_ids, segment_ids=b.segment_ids,
                                 position_ids=b.position_ids, shares_prefix=False, max_sequence_length=4)
    cu, max_len = ctx.cu_seqlens()
    assert cu.tolist() == [0, 4, 6, 7] and max_len == 4


# --- rank balancing and metrics ---------------------------------------------------------------


def test_attention_square_sum():
    (b,) = pack([PrefixGroup([1] * 4, [[2] * 2, [3] * 3]), PrefixGroup([], [[5] * 5])])
    assert attention_square_sum(b) == 16 + (36 - 16) + (49 - 16) + 25
    assert micro_batch_cost(b, a=2.0, b=0.5) == 2.0 * 14 + 0.5 * 94


def test_balance_equal_counts_and_lpt_quality():
    lens = [5, 9, 17, 33, 2, 60, 8, 8, 41, 13, 27]
    batches = [pack([PrefixGroup([], [[1] * n])])[0] for n in lens]
    for world in (1, 2, 3, 4):
        ranks = balance_micro_batches(batches, world, a=1.0, b=0.0)
        counts = {len(r) for r in ranks}
        assert len(counts) == 1  # same number of micro-batches on every rank
        real = [mb for r in ranks for mb in r if not mb.is_padding]
        assert sorted(mb.num_tokens for mb in real) == sorted(lens)
        padding = [mb for r in ranks for mb in r if mb.is_padding]
        assert len(padding) == len(ranks[0]) * world - len(lens)
        assert all(float(mb.target_loss_mask.sum()) == 0 for mb in padding)
        loads = [sum(mb.num_tokens for mb in r) for r in ranks]
        # LPT bound: max load <= optimal + largest item; optimal >= total / world.
        assert max(loads) <= (sum(lens) + len(padding) * min(lens)) / world + max(lens)
    ranks = balance_micro_batches(batches, 2, a=1.0, b=0.0)
    assert sorted(sum(mb.num_tokens for mb in r) for r in ranks) == [110, 115]  # LPT by hand: 223 tokens + a padding copy of 2


def test_balance_errors():
    (b,) = pack(groups_of([1], [[1]]))
    with pytest.raises(ValueError, match="world_size must be a positive int"):
        balance_micro_batches([b], 0)
    with pytest.raises(ValueError, match="batches is empty"):
        balance_micro_batches([], 2)


def test_packing_metrics():
    groups = groups_of([100, 100], [[10] * 8, [10] * 8])
    batches = pack(groups, max_tokens=200)
    m = packing_metrics(batches)
    assert m["packing/prefix_dedup_ratio"] == pytest.approx((2 * 8 * 110) / (2 * 180))
    assert m["packing/efficiency"] == pytest.approx(360 / (len(batches) * 200))
    assert m["packing/tokens"] == 360
    unshared = packing_metrics(pack(groups, share_prefix=False))
    assert unshared["packing/prefix_dedup_ratio"] == 1.0 and unshared["packing/efficiency"] == 1.0
    padded = packing_metrics(balance_micro_batches(batches, 4))  # two padding copies of 180 tokens
    assert padded["packing/micro_batches"] == 4 and padded["packing/tokens"] == 720
    assert padded["packing/prefix_dedup_ratio"] == pytest.approx(2 * 8 * 110 / 720)
    assert padded["packing/efficiency"] == pytest.approx(360 / 800)
