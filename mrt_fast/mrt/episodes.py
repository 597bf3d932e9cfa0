"""Episodes: splitting a reasoning trace into the units MRT rewards.

The open-ended parameterisation of MRT (as in the authors' analysis code, docs/mrt.md):

1. The thinking text is split on ``"\\n\\n"`` into paragraphs.
2. A paragraph that *starts* with an exploration cue ("Wait", "Alternatively", ...) starts a new
   episode, unless the previous cut is ``0..min_gap`` paragraphs back; then the cue is skipped and
   the previous cut stays (so episodes are at least ``min_gap + 1`` paragraphs long). The start of the
   text counts as a cut, so a cue in paragraphs ``0..min_gap`` never cuts either.
3. After ``max_episodes`` cuts the rest of the text is one episode.
4. Consecutive episodes are merged in groups of ``group_size``.

Episodes are returned as character spans ``(start, end)`` that tile the text: the ``"\\n\\n"`` between
two episodes belongs to the earlier one, so every prefix ``text[:start_j]`` ends where a paragraph
ends and the forced-termination text can be appended to it directly.

Token mapping: :func:`token_episode_ids` turns spans plus per-token character offsets into one
episode id per token (a token that straddles a boundary belongs to the episode it starts in; the
boundary then falls on the next token). :func:`encode_with_offsets` gets those offsets from a fast
tokenizer for text it encodes, :func:`decode_with_offsets` for token ids a sampler produced.

:func:`episode_trace` does all of this for a sampled response: an :class:`EpisodeTrace` with every
token's episode, the token offset where each episode ends and where ``</think>`` starts.

The splitter is pluggable: anything matching :class:`EpisodeSplitter` (``text -> spans``) can replace
:func:`split_episodes`, e.g. the paper's second parameterisation ("Backtrack to Line N" episodes).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from mrt_fast.data.chat import CUES, PARAGRAPH_SEP, THINK_END, THINK_START

# The authors' cue list, shared with the task that writes the traces.
DEFAULT_CUES: tuple[str, ...] = CUES
DEFAULT_MIN_GAP = 2
# The authors used 45-99 cuts; 49 is the value of their published splitting notebook.
DEFAULT_MAX_EPISODES = 49

Span = tuple[int, int]


class EpisodeSplitter(Protocol):
    """Anything that splits thinking text into episode character spans tiling the text."""

    def __call__(self, text: str) -> list[Span]: ...


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def split_episodes(
    text: str,
    *,
    cues: Sequence[str] = DEFAULT_CUES,
    min_gap: int = DEFAULT_MIN_GAP,
    max_episodes: int = DEFAULT_MAX_EPISODES,
    group_size: int = 1,
) -> list[Span]:
    """Split thinking ``text`` into episodes; returns character spans that tile ``text``.

    ``max_episodes`` bounds the number of cuts (so there are at most ``max_episodes + 1`` episodes
    before grouping). The empty text is one empty episode ``[(0, 0)]``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if isinstance(cues, str):
        raise TypeError("cues must be a sequence of strings, not a single string")
    if not isinstance(cues, (list, tuple)):
        raise TypeError(f"cues must be a list or tuple of strings, got {type(cues).__name__}")
    cues = tuple(cues)
    if not all(isinstance(c, str) and c for c in cues):
        raise ValueError(f"cues must be non-empty strings, got {cues!r}")
    _check_int("min_gap", min_gap, 0)
    _check_int("max_episodes", max_episodes, 0)
    _check_int("group_size", group_size, 1)

    # Character start of every paragraph.
    starts = [0]
    pos = text.find(PARAGRAPH_SEP)
    while pos != -1:
        starts.append(pos + len(PARAGRAPH_SEP))
        pos = text.find(PARAGRAPH_SEP, pos + len(PARAGRAPH_SEP))

    cuts = [0]  # paragraph index where each episode starts
    for i, start in enumerate(starts):
        if len(cuts) - 1 >= max_episodes:
            break
        if not text.startswith(cues, start):
            continue
        if i - cuts[-1] <= min_gap:
            continue  # too close to the previous cut: keep the previous cut
        cuts.append(i)

    char_cuts = [starts[i] for i in cuts[::group_size]] + [len(text)]
    return list(zip(char_cuts[:-1], char_cuts[1:]))


def make_splitter(
    *,
    cues: Sequence[str] = DEFAULT_CUES,
    min_gap: int = DEFAULT_MIN_GAP,
    max_episodes: int = DEFAULT_MAX_EPISODES,
    group_size: int = 1,
) -> EpisodeSplitter:
    """:func:`split_episodes` with its settings bound (e.g. from a run config), checked once here."""
    split_episodes("", cues=cues, min_gap=min_gap, max_episodes=max_episodes, group_size=group_size)

    def splitter(text: str) -> list[Span]:
        return split_episodes(text, cues=cues, min_gap=min_gap, max_episodes=max_episodes, group_size=group_size)

    return splitter


def thinking_span(text: str) -> Span:
    """Character span of the thinking part of an assistant response.

    Thinking starts after a leading ``<think>`` (and one newline after it) if present, and ends at
    the first ``</think>``; a response truncated at the budget (no ``</think>``) is all thinking.
    """
    start = 0
    stripped = text.lstrip()
    if stripped.startswith(THINK_START):
        start = len(text) - len(stripped) + len(THINK_START)
        if text.startswith("\n", start):
            start += 1
    end = text.find(THINK_END, start)
    return start, (len(text) if end == -1 else end)


def response_episodes(text: str, splitter: EpisodeSplitter | None = None) -> list[Span]:
    """Episode spans of a whole assistant response, in response coordinates.

    The thinking part is split with ``splitter`` (default :func:`split_episodes`); text before the
    thinking (``<think>``) joins the first episode and text after it (``</think>`` and the answer)
    joins the last, so the spans tile the whole response.
    """
    splitter = split_episodes if splitter is None else splitter
    t0, t1 = thinking_span(text)
    spans = [(s + t0, e + t0) for s, e in splitter(text[t0:t1])]
    _check_tiling(spans, t0, t1)
    spans[0] = (0, spans[0][1])
    spans[-1] = (spans[-1][0], len(text))
    return spans


def _check_tiling(spans: Sequence[Span], start: int, end: int) -> None:
    if not spans:
        raise ValueError("the episode splitter returned no spans; expected at least one")
    ok = spans[0][0] == start and spans[-1][1] == end
    ok = ok and all(a[1] == b[0] for a, b in zip(spans[:-1], spans[1:]))
    ok = ok and all(s <= e for s, e in spans)
    if not ok:
        raise ValueError(f"episode spans must tile the text [{start}, {end}) in order, got {list(spans)}")


def token_episode_ids(spans: Sequence[Span], offsets: Sequence[tuple[int, int]]) -> list[int]:
    """Episode id of every token, from episode spans and per-token ``(start, end)`` char offsets.

    A token belongs to the episode its first character lies in (tokens that straddle a boundary
    go to the earlier episode). Tokens before the first span go to episode 0, tokens at or after
    the end to the last episode (e.g. special tokens with offsets ``(0, 0)``).
    """
    if not spans:
        raise ValueError("spans must hold at least one episode span")
    span_starts = [s for s, _ in spans]
    last = len(spans) - 1
    ids = []
    for start, _ in offsets:
        ids.append(min(max(bisect_right(span_starts, start) - 1, 0), last))
    return ids


def episode_token_boundaries(episode_ids: Sequence[int], num_episodes: int) -> list[int]:
    """Token index at which each episode ends (exclusive), for ids as :func:`token_episode_ids` gives.

    ``result[j]`` is the number of tokens in episodes ``0..j``: the prefix after ``j + 1`` episodes.
    An episode with no token of its own (all its characters inside a straddling token) ends where
    the previous one does.
    """
    counts = [0] * num_episodes
    for e in episode_ids:
        if not 0 <= e < num_episodes:
            raise ValueError(f"episode id {e} out of range for {num_episodes} episodes")
        counts[e] += 1
    ends, total = [], 0
    for c in counts:
        total += c
        ends.append(total)
    return ends


def _require_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} does not provide character offsets "
            "(return_offsets_mapping needs a fast tokenizer); load it with use_fast=True or build "
            "it with the `tokenizers` library"
        )


def encode_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of ``text`` (no special tokens added)."""
    _require_fast(tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def decode_with_offsets(tokenizer: Any, token_ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """Decode sampled ``token_ids`` and give each token its character span in the decoded text.

    Sampled ids need not be the canonical tokenization of their text, so offsets come from
    decoding token by token. A token that is only part of a character (byte-level BPE splits
    multi-byte UTF-8 characters) is decoded together with the following ones; the first token of
    such a run carries the character and the others get empty spans. If the pieces still do not
    reproduce the text, the text is re-encoded with a fast tokenizer's offsets when that gives the
    same ids, and otherwise (invalid byte sequences) offsets come from decoding growing prefixes.
    """
    ids = list(token_ids)
    text = tokenizer.decode(ids)
    pieces = tokenizer.batch_decode([[t] for t in ids]) if ids else []
    i = 0
    while i < len(pieces):
        if "\ufffd" in pieces[i]:
            # Grow the run while the next token changes how the run decodes (completes a character).
            j = i + 1
            while j < min(i + 4, len(ids)) and tokenizer.decode(ids[i : j + 1]) != tokenizer.decode(ids[i:j]) + pieces[j]:
                j += 1
            pieces[i:j] = [tokenizer.decode(ids[i:j])] + [""] * (j - i - 1)
            i = j
        else:
            i += 1
    if "".join(pieces) == text:
        offsets, pos = [], 0
        for p in pieces:
            offsets.append((pos, pos + len(p)))
            pos += len(p)
        return text, offsets
    if getattr(tokenizer, "is_fast", False):
        enc_ids, offsets = encode_with_offsets(tokenizer, text)
        if enc_ids == ids:
            return text, offsets
    return text, _offsets_by_prefix_decoding(tokenizer, ids, text)


def _offsets_by_prefix_decoding(tokenizer: Any, ids: list[int], text: str) -> list[tuple[int, int]]:
    """Exact but quadratic fallback (invalid byte sequences a sampler may emit): a character
    belongs to the first token whose prefix decodes to it as it appears in the full text."""
    offsets, end = [], 0
    for i in range(len(ids)):
        prefix = tokenizer.decode(ids[: i + 1])
        agree = end
        while agree < min(len(prefix), len(text)) and prefix[agree] == text[agree]:
            agree += 1
        offsets.append((end, agree))
        end = agree
    if end != len(text):
        raise ValueError("cannot map sampled token ids to character offsets: prefix decodes do not rebuild the text")
    return offsets


def tokenize_episodes(
    tokenizer: Any, text: str, spans: Sequence[Span] | None = None
) -> tuple[list[int], list[int]]:
    """Tokenize ``text`` and give every token its episode id: ``(input_ids, episode_ids)``.

    ``spans`` defaults to :func:`response_episodes` of the text. Needs a fast tokenizer (offsets).
    """
    ids, offsets = encode_with_offsets(tokenizer, text)
    spans = response_episodes(text) if spans is None else spans
    return ids, token_episode_ids(spans, offsets)


@dataclass
class EpisodeTrace:
    """A response's tokens with their episodes.

    ``episode_ids[t]`` is the (trace-local) episode of token ``t``; ``episode_ends[j]`` the number of
    tokens in episodes ``0..j``; ``think_end`` the number of tokens before ``</think>`` (all of them
    for a trace truncated at the budget).
    """

    token_ids: list[int]
    text: str
    episode_ids: list[int]
    episode_ends: list[int]
    think_end: int

    @property
    def num_episodes(self) -> int:
        return len(self.episode_ends)

    def meta_boundaries(self) -> list[int]:
        """Token offsets where ``J`` is measured: the empty prefix and after each thinking episode.

        The last episode holds the answer too; its boundary is where thinking ends (``</think>``).
        """
        inner = [0] + self.episode_ends[:-1]
        return inner + [max(self.think_end, inner[-1])]


def episode_trace(tokenizer: Any, token_ids: Sequence[int], splitter: EpisodeSplitter | None = None) -> EpisodeTrace:
    """Split a sampled response (token ids after the prompt) into episodes at token granularity."""
    text, offsets = decode_with_offsets(tokenizer, token_ids)
    spans = response_episodes(text, splitter)
    ids = token_episode_ids(spans, offsets)
    ends = episode_token_boundaries(ids, len(spans))
    think_end_char = thinking_span(text)[1]
    think_end = bisect_left([s for s, _ in offsets], think_end_char)
    return EpisodeTrace(list(token_ids), text, ids, ends, think_end)
