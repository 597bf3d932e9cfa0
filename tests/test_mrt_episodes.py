"""Episode splitting against hand-made R1-style traces, and the episode -> token mapping."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mrt_fast.mrt.episodes import (
    episode_token_boundaries,
    make_splitter,
    response_episodes,
    split_episodes,
    thinking_span,
    token_episode_ids,
    decode_with_offsets,
    episode_trace,
    tokenize_episodes,
)


def pieces(text, spans):
    return [text[s:e] for s, e in spans]


def paragraphs(*ps):
    return "\n\n".join(ps)


# P0..P11; cues at 2 (too close to the start), 4 (cut), 6 (2 back: skipped), 8 (cut), 9 (1 back: skipped),
# 11 (cut). "Waited" in P5 is mid-text, and "Hmm, wait" in P10 does not *start* with a cue.
TRACE = paragraphs(
    "Let me add 17 and 25.",
    "17 + 25 = 42.",
    "Wait, let me re-add the ones.",
    "7 + 5 = 12, carry 1.",
    "Alternatively, round 17 to 20.",
    "20 + 25 = 45. I Waited.",
    "But wait, I added 3.",
    "45 - 3 = 42.",
    "But let me double-check with 25 + 17.",
    "Wait, 25 + 17 = 42.",
    "Hmm, wait.",
    "But hold on, all agree.",
)


def test_authors_rules_on_a_hand_made_trace():
    spans = split_episodes(TRACE)
    assert pieces(TRACE, spans) == [
        "Let me add 17 and 25.\n\n17 + 25 = 42.\n\nWait, let me re-add the ones.\n\n7 + 5 = 12, carry 1.\n\n",
        "Alternatively, round 17 to 20.\n\n20 + 25 = 45. I Waited.\n\nBut wait, I added 3.\n\n45 - 3 = 42.\n\n",
        "But let me double-check with 25 + 17.\n\nWait, 25 + 17 = 42.\n\nHmm, wait.\n\n",
        "But hold on, all agree.",
    ]
    assert spans[0][0] == 0 and spans[-1][1] == len(TRACE)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_no_cue_is_one_episode_and_empty_text_is_one_empty_episode():
    text = paragraphs("one", "two", "three", "four")
    assert split_episodes(text) == [(0, len(text))]
    assert split_episodes("") == [(0, 0)]


def test_cue_within_min_gap_is_skipped_and_previous_cut_stays():
    # Cut at 3; cues at 4, 5 (1 and 2 back) skipped; 6 is 3 back from the cut at 3: cut.
    text = paragraphs("a", "b", "c", "Wait 3", "Wait 4", "Wait 5", "Wait 6")
    assert pieces(text, split_episodes(text)) == ["a\n\nb\n\nc\n\n", "Wait 3\n\nWait 4\n\nWait 5\n\n", "Wait 6"]
    # min_gap=0: every cue paragraph after the first cuts (a cue in paragraph 0 never does).
    text0 = paragraphs("Wait 0", "Wait 1", "x", "Wait 3")
    assert pieces(text0, split_episodes(text0, min_gap=0)) == ["Wait 0\n\n", "Wait 1\n\nx\n\n", "Wait 3"]


def test_max_episodes_leaves_the_rest_as_one_episode():
    text = paragraphs("a", "b", "c", "Wait 1", "x", "y", "Wait 2", "x", "y", "Wait 3")
    assert len(split_episodes(text)) == 4
    spans = split_episodes(text, max_episodes=1)
    assert pieces(text, spans) == ["a\n\nb\n\nc\n\n", "Wait 1\n\nx\n\ny\n\nWait 2\n\nx\n\ny\n\nWait 3"]
    assert split_episodes(text, max_episodes=0) == [(0, len(text))]


def test_group_size_merges_consecutive_episodes():
    text = paragraphs("a", "b", "c", "Wait 1", "x", "y", "Wait 2", "x", "y", "Wait 3")
    base = split_episodes(text)
    assert split_episodes(text, group_size=2) == [(base[0][0], base[1][1]), (base[2][0], base[3][1])]
    assert split_episodes(text, group_size=3) == [(base[0][0], base[2][1]), (base[3][0], base[3][1])]
    assert split_episodes(text, group_size=10) == [(0, len(text))]


def test_make_splitter_binds_and_checks_settings():
    text = paragraphs("a", "b", "c", "Wait 1", "x", "y", "Wait 2", "x", "y", "Wait 3")
    assert make_splitter(group_size=2, max_episodes=2)(text) == split_episodes(text, group_size=2, max_episodes=2)
    with pytest.raises(ValueError, match="min_gap"):
        make_splitter(min_gap=-1)


def test_custom_cues_and_triple_newlines_follow_str_split():
    text = "a\n\nb\n\nc\n\n\nRetry\n\nRetry"  # "\nRetry" does not start with the cue
    assert pieces(text, split_episodes(text, cues=["Retry"])) == ["a\n\nb\n\nc\n\n\nRetry\n\n", "Retry"]


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"min_gap": -1}, ValueError),
        ({"max_episodes": -1}, ValueError),
        ({"group_size": 0}, ValueError),
        ({"group_size": 1.5}, TypeError),
        ({"cues": "Wait"}, TypeError),
        ({"cues": None}, TypeError),
        ({"cues": [""]}, ValueError),
    ],
)
def test_bad_arguments_are_named(kwargs, exc):
    with pytest.raises(exc, match=next(iter(kwargs))):
        split_episodes("a", **kwargs)


def test_thinking_span_with_and_without_think_end():
    full = "<think>\n" + TRACE + "\n</think>\n\nThe answer is \\boxed{42}."
    t0, t1 = thinking_span(full)
    assert full[t0:t1] == TRACE + "\n"
    truncated = "<think>\n" + TRACE[:50]
    assert thinking_span(truncated) == (8, len(truncated))
    assert thinking_span("no tags") == (0, 7)


def test_response_episodes_tile_the_whole_response():
    full = "<think>\n" + TRACE + "\n</think>\n\nThe answer is \\boxed{42}."
    spans = response_episodes(full)
    assert len(spans) == 4 and spans[0][0] == 0 and spans[-1][1] == len(full)
    assert full[spans[1][0]:].startswith("Alternatively") and full[spans[3][0]:].startswith("But hold on")
    assert full[spans[3][0]:spans[3][1]].endswith("\\boxed{42}.")
    # A splitter that does not tile the text is rejected with a clear error.
    with pytest.raises(ValueError, match="tile"):
        response_episodes(full, splitter=lambda text: [(0, 3)])


def test_token_episode_ids_by_hand():
    spans = [(0, 5), (5, 9), (9, 12)]
    # tokens: [0,3) [3,6) straddles -> episode 0; [6,9) -> 1; [9,10) -> 2; [10,12) -> 2; special (0,0) -> 0
    offsets = [(0, 3), (3, 6), (6, 9), (9, 10), (10, 12), (0, 0)]
    ids = token_episode_ids(spans, offsets)
    assert ids == [0, 0, 1, 2, 2, 0]
    assert episode_token_boundaries([0, 0, 1, 2, 2], 3) == [2, 3, 5]
    assert episode_token_boundaries([0, 0, 2], 3) == [2, 2, 3]  # an episode with no token of its own


@pytest.fixture(scope="module")
def bpe_tokenizer():
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TRACE] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_tokenize_episodes_gives_every_token_its_episode(bpe_tokenizer):
    full = "<think>\n" + TRACE + "\n</think>\n\n\\boxed{42}"
    ids, episode_ids = tokenize_episodes(bpe_tokenizer, full)
    assert len(ids) == len(episode_ids) and episode_ids == sorted(episode_ids)
    assert set(episode_ids) == {0, 1, 2, 3}
    # The decoded tokens of each episode are exactly that episode's text.
    spans = response_episodes(full)
    for e, (s, t) in enumerate(spans):
        text = bpe_tokenizer.decode([i for i, ep in zip(ids, episode_ids) if ep == e])
        assert text == full[s:t]
    # Offsets of sampled ids agree with the tokenizer's own offsets.
    enc = bpe_tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    assert decode_with_offsets(bpe_tokenizer, ids) == (full, [tuple(o) for o in enc["offset_mapping"]])


def test_decode_with_offsets_keeps_split_multibyte_characters_whole(bpe_tokenizer):
    ids = bpe_tokenizer("a é b", add_special_tokens=False)["input_ids"]
    assert len(ids) > 3  # "é" is two byte-level tokens that decode to U+FFFD one at a time
    text, offsets = decode_with_offsets(bpe_tokenizer, ids)
    assert text == "a é b" and offsets[-1][1] == len(text)
    assert "".join(text[s:e] for s, e in offsets) == text


def test_episode_trace_of_sampled_ids(bpe_tokenizer):
    full = "<think>\n" + TRACE + "\n</think>\n\n\\boxed{42}"
    ids, episode_ids = tokenize_episodes(bpe_tokenizer, full)
    tr = episode_trace(bpe_tokenizer, ids)
    assert tr.episode_ids == episode_ids and tr.text == full
    assert tr.episode_ends == [episode_ids.count(e) + sum(episode_ids.count(f) for f in range(e)) for e in range(4)]
    assert bpe_tokenizer.decode(ids[tr.think_end:]).startswith("</think>")
    assert bpe_tokenizer.decode(ids[: tr.think_end]).endswith("all agree.\n")
    assert tr.meta_boundaries() == [0] + tr.episode_ends[:3] + [tr.think_end]
    truncated = episode_trace(bpe_tokenizer, ids[: tr.episode_ends[1] + 2])  # no </think>: all thinking
    assert truncated.think_end == len(truncated.token_ids) and truncated.num_episodes == 2


def test_tokenizer_without_offsets_is_a_clear_error(bpe_tokenizer):
    class SlowTokenizer:
        is_fast = False

    with pytest.raises(ValueError, match="offsets"):
        tokenize_episodes(SlowTokenizer(), "abc")


@pytest.mark.parametrize(
    "byte_tokens, expected_offsets",
    [
        # The tiny tokenizer is byte-level: "Ã" is the token of byte 0xC3, "©" of byte 0xA9.
        (["Ã", "a", "©", "b"], [(0, 1), (1, 2), (2, 3), (3, 4)]),  # invalid bytes: one U+FFFD each
        (["Ã", "©", "x"], [(0, 1), (1, 1), (1, 2)]),  # "é" split over two byte tokens
    ],
)
def test_decode_with_offsets_on_byte_fallback_tokens(byte_tokens, expected_offsets):
    from mrt_fast.data import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    ids = [tok.get_vocab()[t] for t in byte_tokens]
    text, offsets = decode_with_offsets(tok, ids)
    assert text == tok.decode(ids) and offsets == expected_offsets


def reference_episode_texts(text, cues, min_gap, max_episodes, group_size):
    """The authors' list-of-paragraphs formulation, written independently: episode texts (with their
    trailing separators, so they concatenate back to the text)."""
    paras = text.split("\n\n")
    cuts = [0]
    for i, p in enumerate(paras):
        if len(cuts) - 1 == max_episodes:
            break
        if any(p.startswith(c) for c in cues) and i - cuts[-1] > min_gap:
            cuts.append(i)
    cuts = cuts[::group_size] + [len(paras)]
    episodes = ["\n\n".join(paras[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    return [e + "\n\n" for e in episodes[:-1]] + episodes[-1:]


PARAGRAPH = st.sampled_from(["Wait.", "Waiting", "But wait, no", "x", "", "\nWait", "Alternatively y", "z w"])


@settings(max_examples=150, deadline=None)
@given(
    paras=st.lists(PARAGRAPH, min_size=1, max_size=14),
    min_gap=st.integers(0, 3),
    max_episodes=st.integers(0, 5),
    group_size=st.integers(1, 3),
)
def test_split_matches_the_paragraph_list_reference(paras, min_gap, max_episodes, group_size):
    text = "\n\n".join(paras)
    spans = split_episodes(text, min_gap=min_gap, max_episodes=max_episodes, group_size=group_size)
    assert pieces(text, spans) == reference_episode_texts(
        text, ("Wait", "But wait", "Alternatively"), min_gap, max_episodes, group_size
    )
