"""KVRows operations (copy with repeats, cut at a boundary, drop rows in place) against plain
tensor indexing of the same cache."""

import torch

from mrt_fast.rollout.kv_cache import BufferedLayer, KVRows


def make_rows(lengths, width, heads=2, dim=3, layers=2):
    """Left-padded rows of the given lengths inside `width` columns, random keys/values."""
    valid = torch.arange(width)[None, :] >= (width - torch.tensor(lengths))[:, None]
    kv_layers = []
    for _ in range(layers):
        keys = torch.randn(len(lengths), heads, width, dim)
        values = torch.randn(len(lengths), heads, width, dim)
        kv_layers.append(BufferedLayer(keys, values, width))
    return KVRows(kv_layers, valid, torch.tensor(lengths))


def real_tokens(kv, row, layer=0):
    """The keys of a row's real tokens, in order."""
    return kv.layers[layer].keys[row][:, kv.valid[row]]


def test_select_copies_rows_with_repeats_and_leaves_the_source_alone():
    kv = make_rows([3, 5, 1], width=5)
    before = kv.layers[0].keys.clone()
    out = kv.select(torch.tensor([2, 0, 0]), reserve=4)
    for r, src in enumerate([2, 0, 0]):
        assert torch.equal(real_tokens(out, r), real_tokens(kv, src))
    out.layers[0].update(torch.ones(3, 2, 1, 3), torch.ones(3, 2, 1, 3))  # appends in place ...
    assert torch.equal(kv.layers[0].keys, before)  # ... into the copy only
    assert out.next_pos.tolist() == [1, 3, 3]


def test_truncated_keeps_the_first_tokens_of_each_row_even_with_gaps():
    kv = make_rows([4, 6], width=6)
    kv.valid[1, 3] = False  # a gap inside row 1 (as a left-padded suffix block leaves)
    kv.next_pos[1] = 5
    out = kv.truncated(torch.tensor([1, 0, 1, 1]), torch.tensor([2, 4, 5, 0]))
    assert out.length == 5 and out.next_pos.tolist() == [2, 4, 5, 0]
    for r, (src, keep) in enumerate([(1, 2), (0, 4), (1, 5), (1, 0)]):
        for layer in range(2):
            got = real_tokens(out, r, layer)
            assert torch.equal(got, real_tokens(kv, src, layer)[:, :keep])
        assert out.valid[r].sum() == keep and bool(out.valid[r, 5 - keep :].all())


def test_keep_rows_moves_rows_down_in_place():
    kv = make_rows([2, 3, 4, 1], width=4)
    expected = [real_tokens(kv, r).clone() for r in (1, 3)]
    storage = kv.layers[0].keys.untyped_storage().data_ptr()
    kv.keep_rows_([1, 3])
    assert kv.rows == 2 and kv.next_pos.tolist() == [3, 1]
    assert kv.layers[0].keys.untyped_storage().data_ptr() == storage  # no new buffer
    for r in range(2):
        assert torch.equal(real_tokens(kv, r), expected[r])
