"""find_shared_prefixes: native (C++) and Python reference agree; the grouping is optimal; fallback works."""

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mrt_fast.packing.prefix_finder as pf
from mrt_fast.packing import PrefixGroup, find_shared_prefixes, group_by_prefix_reference

needs_native = pytest.mark.skipif(not pf.native_available(), reason="mrt_fast._native not built (python setup.py build_ext --inplace)")

# Small alphabets and lengths make shared prefixes, duplicates and prefix-of-another sequences common.
token_lists = st.lists(st.integers(0, 2), min_size=1, max_size=7)
sequence_sets = st.lists(token_lists, min_size=0, max_size=9)


@st.composite
def grouped_sequences(draw):
    """Several prefixes, each followed by several continuations (GRPO/MRT-like), shuffled."""
    prefixes = draw(st.lists(st.lists(st.integers(0, 3), min_size=0, max_size=6), min_size=1, max_size=4))
    seqs = [p + draw(token_lists) for p in prefixes for _ in range(draw(st.integers(1, 4)))]
    return draw(st.permutations(seqs))


def saved_tokens(sequences, grouping):
    return sum((len(indices) - 1) * shared for shared, indices in grouping)


def brute_force_best_saving(sequences):
    """Best total saving over sets of disjoint whole-trie-node groups (all sequences with a given prefix)."""
    candidates = {}
    for s in sequences:
        for depth in range(1, len(s) + 1):
            members = frozenset(i for i, t in enumerate(sequences) if t[:depth] == s[:depth])
            shared = min(depth, min(len(sequences[i]) for i in members) - 1)
            value = (len(members) - 1) * shared
            candidates[members] = max(candidates.get(members, 0), value)
    items = [(m, v) for m, v in candidates.items() if v > 0]
    best = 0
    for r in range(len(items) + 1):
        for combo in itertools.combinations(items, r):
            sets = [m for m, _ in combo]
            if sum(map(len, sets)) == len(frozenset().union(*sets)):
                best = max(best, sum(v for _, v in combo))
    return best


def check_grouping_valid(sequences, grouping):
    seen = sorted(i for _, indices in grouping for i in indices)
    assert seen == list(range(len(sequences)))  # a partition of the input
    assert [indices[0] for _, indices in grouping] == sorted(indices[0] for _, indices in grouping)
    for shared, indices in grouping:
        assert indices == sorted(indices)
        assert shared >= 0 and (shared > 0 or len(indices) == 1)
        first = sequences[indices[0]]
        for i in indices:
            assert sequences[i][:shared] == first[:shared] and len(sequences[i]) > shared  # keeps >= 1 token


@settings(max_examples=150, deadline=None)
@given(sequence_sets)
def test_reference_is_valid_and_optimal(sequences):
    grouping = group_by_prefix_reference(sequences)
    check_grouping_valid(sequences, grouping)
    if len(sequences) <= 6:
        assert saved_tokens(sequences, grouping) == brute_force_best_saving(sequences)


@needs_native
@settings(max_examples=300, deadline=None)
@given(st.one_of(sequence_sets, grouped_sequences()))
def test_native_equals_reference(sequences):
    assert pf._native.group_by_prefix(sequences) == group_by_prefix_reference(sequences)


def fresh_large_tokens(sequences):
    """Same structure with ids outside CPython's small-int cache (distinct objects of equal value),
    some past 2**30 (multi-digit ints), so the native value comparisons run, not just identity."""
    alphabet = [300, 70_000, 2**40, 2**40 + 1]
    return [[int(str(alphabet[t % 4])) for t in s] for s in sequences]


@needs_native
@settings(max_examples=150, deadline=None)
@given(st.one_of(sequence_sets, grouped_sequences()))
def test_native_equals_reference_on_distinct_int_objects(sequences):
    sequences = fresh_large_tokens(sequences)
    assert pf._native.group_by_prefix(sequences) == group_by_prefix_reference(sequences)


@needs_native
def test_native_rejects_bad_tokens():
    with pytest.raises(TypeError, match="token ids must be ints"):
        pf._native.group_by_prefix([[1, "a"], [1, "b"]])
    with pytest.raises(ValueError, match="non-negative"):
        pf._native.group_by_prefix([[1, -5], [1, 2]])
    with pytest.raises(TypeError):
        pf._native.group_by_prefix([[1], 5])


@needs_native
def test_native_equals_reference_large_random():
    rng = random.Random(0)
    seqs = []
    for _ in range(60):
        prefix = [rng.randrange(1000) for _ in range(rng.randrange(0, 80))]
        for _ in range(rng.randrange(1, 9)):
            seqs.append(prefix + [rng.randrange(3) for _ in range(rng.randrange(1, 40))])
    seqs += [list(s) for s in seqs[:10]]  # exact duplicates
    rng.shuffle(seqs)
    assert pf._native.group_by_prefix(seqs) == group_by_prefix_reference(seqs)


def test_grpo_groups_share_prompt_not_template():
    header = [7, 7, 7]  # a chat-template header every prompt starts with
    prompt_a, prompt_b = header + [1] * 20, header + [2] * 20
    seqs = [prompt_a + [3, 4], prompt_b + [5], prompt_a + [6], prompt_b + [5, 5], prompt_a + [3, 9]]
    groups = find_shared_prefixes(seqs)
    assert [g.sequence_ids for g in groups] == [[0, 2, 4], [1, 3]]
    assert groups[0].prefix == prompt_a and groups[0].continuations == [[3, 4], [6], [3, 9]]
    # prompt_b + [5] is a whole sequence: the prefix stops one token short so it keeps a target.
    assert groups[1].prefix == prompt_b and groups[1].continuations == [[5], [5, 5]]
    for g in groups:
        for cont, i in zip(g.continuations, g.sequence_ids):
            assert g.prefix + cont == seqs[i]


def test_sequence_that_is_a_prefix_of_another_keeps_a_token():
    groups = find_shared_prefixes([[1, 2, 3], [1, 2, 3, 4, 5], [1, 2, 3, 4]])
    assert len(groups) == 1 and groups[0].prefix == [1, 2] and groups[0].continuations == [[3], [3, 4, 5], [3, 4]]


def test_unshared_sequences_are_plain_groups():
    groups = find_shared_prefixes([[1, 2], [3, 4]])
    assert [(g.prefix, g.continuations, g.sequence_ids) for g in groups] == [([], [[1, 2]], [0]), ([], [[3, 4]], [1])]
    assert all(isinstance(g, PrefixGroup) for g in groups)


def test_python_fallback_when_native_missing(monkeypatch):
    seqs = [[1, 2, 3], [1, 2, 4], [5]]
    expected = [(g.prefix, g.continuations) for g in find_shared_prefixes(seqs)]
    monkeypatch.setattr(pf, "_native", None)
    assert pf.prefix_finder_backend() == "python" and not pf.native_available()
    assert [(g.prefix, g.continuations) for g in find_shared_prefixes(seqs)] == expected


def test_import_without_extension_falls_back(monkeypatch):
    """The package imports and works when mrt_fast._native cannot be imported at all."""
    import importlib
    import sys

    seqs = [[1, 2, 3], [1, 2, 4], [5]]
    expected = group_by_prefix_reference(seqs)
    import mrt_fast

    monkeypatch.setitem(sys.modules, "mrt_fast._native", None)  # makes the import raise ImportError
    monkeypatch.delattr(mrt_fast, "_native", raising=False)
    try:
        importlib.reload(pf)
        assert pf.prefix_finder_backend() == "python"
        assert pf.group_by_prefix(seqs) == expected
    finally:
        monkeypatch.undo()
        importlib.reload(pf)


def test_bad_input():
    with pytest.raises(ValueError, match=r"sequences\[1\] is empty"):
        find_shared_prefixes([[1], []])
    with pytest.raises(ValueError, match=r"sequences\[0\]\[1\] = -1"):
        find_shared_prefixes([[1, -1]])
    with pytest.raises(TypeError, match=r"sequences\[0\]\[0\] must be an int"):
        find_shared_prefixes([["a"]])
    with pytest.raises(TypeError, match="sequences must be a list"):
        find_shared_prefixes("abc")


@needs_native
@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(-5, 2**70), st.booleans(), st.floats(0, 10), st.just("7")), max_size=12))
def test_native_token_check_matches_definition(items):
    """first_invalid_token: index of the first item that is not a non-negative exact int (< 2**63)."""
    expected = next((i for i, t in enumerate(items) if not (type(t) is int and 0 <= t < 2**63)), -1)
    assert pf._native.first_invalid_token(items) == expected
