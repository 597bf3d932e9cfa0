"""The embedded reasoning task: find the key whose value is the target, by trying keys.

A problem lists ``difficulty`` keys (letters); a key's value is the last digit of its place in
the alphabet (``b`` 2, ``k`` 11 -> 1, ``t`` 20 -> 0), and exactly one listed key has the
target value::

    Find the key whose value is 7.
    Keys: b, k, e, q, m, h.

A solution tries keys one at a time. Every attempt is one episode of three paragraphs (so the
episode splitter of DESIGN.md §2, which keeps at least three paragraphs per episode, cuts at
every attempt): a cue and the key, the key with its value, and the check::

    Wait, try e.

    e5.

    5 is not 7, so no.

Why this task. A tiny model learns it in minutes because every step is a local copy, a fact
about one token, or a pick from the prompt (pick a listed key, recall its value, compare two
digits, copy the key that said "yes"). DESIGN.md §5 records that a tiny model does not learn
multi-digit arithmetic or long modular chains in that time, and docs/data.md that it does not
learn an in-context lookup (values listed in the prompt, ``k1``) in 3000 steps either, while the
recalled value is learned in about 100. Progress is visible: an attempt on a new key either
finds the answer or removes one candidate, so forced termination after more productive
episodes succeeds more often, while re-checking a key already tried ("But let me double-check
e.") adds tokens and changes nothing.

Warm-start traces mix productive attempts with re-checks and sometimes give up early (they
then end with the termination text and a guess among the keys not yet tried), so a model
trained on them answers only part of the problems: RL has headroom in both directions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
import re

from .chat import PARAGRAPH_SEP, TERMINATION_TEXT, THINK_END, THINK_START

KEY_ALPHABET = "bcdefghjkmnpqrstuvwxyz"  # no a/i/l/o: they read as words or digits
DEFAULT_DIFFICULTY = 6
MIN_DIFFICULTY = 2
GRADER_KIND = "exact"

# Cues that open a new attempt, with sampling weights (all cues of DESIGN.md §2 appear).
NEW_ATTEMPT_CUES: tuple[tuple[str, float], ...] = (
    ("Wait", 0.35),
    ("Alternatively", 0.25),
    ("But wait", 0.15),
    ("But hold on", 0.15),
    ("Is there another way to think about this?", 0.10),
)
RECHECK_CUE = "But let me double-check"


@dataclass(frozen=True)
class Problem:
    """One task instance: the user prompt, the reference answer and the structured facts."""

    prompt: str
    answer: str
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TraceStyle:
    """How warm-start traces behave; the defaults give a warm start with RL headroom.

    Attributes:
        recheck_prob: chance that an attempt re-checks a key already tried (unproductive).
        give_up_prob: chance, after each failed attempt, of stopping early with a guess.
        give_up_first_prob: chance of giving up before any attempt (forced termination at the
            empty prefix is then in distribution: a guess among all keys).
        recheck_found_prob: chance of re-checking the found key before answering.
        terminate_found_prob: chance of ending a successful trace with the termination text
            (shows the model how to answer after a forced termination that follows a find).
    """

    recheck_prob: float = 0.25
    give_up_prob: float = 0.3
    give_up_first_prob: float = 0.05
    recheck_found_prob: float = 0.2
    terminate_found_prob: float = 0.15

    def __post_init__(self) -> None:
        for name in ("recheck_prob", "give_up_prob", "give_up_first_prob", "recheck_found_prob",
                     "terminate_found_prob"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"TraceStyle.{name} must be in [0, 1), got {value}")


def _check_difficulty(difficulty: int) -> None:
    if isinstance(difficulty, bool) or not isinstance(difficulty, int):
        raise TypeError(f"difficulty must be an int, got {type(difficulty).__name__}")
    if not MIN_DIFFICULTY <= difficulty <= MAX_DIFFICULTY:
        raise ValueError(
            f"difficulty (the number of keys) must be in [{MIN_DIFFICULTY}, {MAX_DIFFICULTY}], "
            f"got {difficulty}"
        )


def key_value(key: str) -> int:
    """The value of a key: the last digit of the letter's place in the alphabet (``k`` -> 11 -> 1)."""
    if len(key) != 1 or key not in KEY_ALPHABET:
        raise ValueError(f"key must be one of {KEY_ALPHABET!r}, got {key!r}")
    return (ord(key) - ord("a") + 1) % 10


# Every target digit has at least 19 keys of other values (3 letters share each of 3, 4 and 6).
MAX_DIFFICULTY = 1 + min(sum(key_value(k) != t for k in KEY_ALPHABET) for t in range(10))


def make_problem(rng: random.Random, difficulty: int = DEFAULT_DIFFICULTY) -> Problem:
    """Draw one problem with ``difficulty`` keys from ``rng``: exactly one key has the target value."""
    _check_difficulty(difficulty)
    target = rng.randrange(10)
    answer = rng.choice([k for k in KEY_ALPHABET if key_value(k) == target])
    others = rng.sample([k for k in KEY_ALPHABET if key_value(k) != target], difficulty - 1)
    keys = rng.sample([answer, *others], difficulty)
    values = {k: key_value(k) for k in keys}
    prompt = f"Find the key whose value is {target}.\nKeys: {', '.join(keys)}."
    meta = {"keys": keys, "values": values, "target": target, "difficulty": difficulty}
    return Problem(prompt=prompt, answer=answer, meta=meta)


def iter_problems(*, seed: int, difficulty: int = DEFAULT_DIFFICULTY):
    """An endless, seeded stream of problems (problem i depends only on seed and difficulty)."""
    _check_difficulty(difficulty)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    rng = random.Random(f"mrt-fast/keys/{seed}/{difficulty}")
    while True:
        yield make_problem(rng, difficulty)


def generate_problems(n: int, *, seed: int, difficulty: int = DEFAULT_DIFFICULTY) -> list[Problem]:
    """The first ``n`` problems of the seeded stream."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    stream = iter_problems(seed=seed, difficulty=difficulty)
    return [next(stream) for _ in range(n)]


# ---- traces ---------------------------------------------------------------------------------


def attempt_paragraphs(opening: str, key: str, value: int, target: int) -> list[str]:
    """The three paragraphs of one attempt: the opening, the lookup, the check."""
    verdict = f"{value} is {target}, so yes." if value == target else f"{value} is not {target}, so no."
    return [opening, f"{key}{value}.", verdict]


def answer_text(key: str) -> str:
    """The text after ``</think>``: the final answer, boxed for the grader."""
    return f"The answer is \\boxed{{{key}}}."


def _opening(rng: random.Random, key: str, *, first: bool, recheck: bool) -> str:
    if first:
        return f"Let me try {key}."
    if recheck and rng.random() < 0.7:
        return f"{RECHECK_CUE} {key}."
    cues, weights = zip(*NEW_ATTEMPT_CUES)
    cue = rng.choices(cues, weights)[0]
    return f"{cue} Let me try {key}." if cue.endswith("?") else f"{cue}, try {key}."


def sft_trace(problem: Problem, rng: random.Random, style: TraceStyle = TraceStyle()) -> str:
    """A full assistant turn for ``problem``: ``<think>`` attempts ``</think>`` and the answer.

    Attempts try the keys in a random order, sometimes re-check a key already tried, and may
    give up early (``style``); see the module docstring.
    """
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")
    keys, values, target = problem.meta["keys"], problem.meta["values"], problem.meta["target"]
    order = rng.sample(keys, len(keys))
    tried: list[str] = []
    paragraphs: list[str] = []
    found = None
    gave_up_first = rng.random() < style.give_up_first_prob
    while found is None and not gave_up_first:
        recheck = bool(tried) and rng.random() < style.recheck_prob
        key = rng.choice(tried) if recheck else order[len(tried)]
        paragraphs += attempt_paragraphs(
            _opening(rng, key, first=not paragraphs, recheck=recheck), key, values[key], target
        )
        if not recheck:
            tried.append(key)
        if values[key] == target:
            found = key
        elif rng.random() < style.give_up_prob:
            break
    thinking = THINK_START + "\n" + PARAGRAPH_SEP.join(paragraphs)
    if found is None:
        guess = rng.choice([k for k in keys if k not in tried])
        separator = PARAGRAPH_SEP if paragraphs else ""
        return thinking + separator + TERMINATION_TEXT + answer_text(guess)
    if rng.random() < style.recheck_found_prob:
        opening = _opening(rng, found, first=False, recheck=True)
        thinking += PARAGRAPH_SEP + PARAGRAPH_SEP.join(
            attempt_paragraphs(opening, found, values[found], target)
        )
    if rng.random() < style.terminate_found_prob:
        return thinking + PARAGRAPH_SEP + TERMINATION_TEXT + answer_text(found)
    return thinking + "\n" + THINK_END + "\n\n" + answer_text(found)


# ---- reading traces back ---------------------------------------------------------------------

# An attempt opens with a line ending "try k." or "double-check k."; each paragraph is one line.
_ATTEMPT_RE = re.compile(r"^[^\n]*\b(?:try|double-check) ([a-z])\.$", re.MULTILINE)


@dataclass(frozen=True)
class Attempt:
    """One attempt read back from a trace: where it ends and whether it was productive."""

    key: str
    end: int  # character offset just after the attempt's verdict paragraph (an episode boundary)
    productive: bool  # a key not tried before (finds the answer or removes a candidate)
    found: bool  # this attempt checked the answer key


def read_attempts(problem: Problem, thinking: str) -> list[Attempt]:
    """The attempts of a (possibly model-written) thinking text, in order.

    An attempt ends with the line of its verdict, two lines after its opening (or where the
    text or the next attempt starts, if cut short). Used to measure progress per episode.
    """
    keys = set(problem.meta["keys"])
    matches = list(_ATTEMPT_RE.finditer(thinking))
    attempts: list[Attempt] = []
    tried: set[str] = set()
    for i, m in enumerate(matches):
        key = m.group(1)
        stop = matches[i + 1].start() if i + 1 < len(matches) else len(thinking)
        end = min(_line_end(thinking, m.start(), lines_after=2), stop)
        productive = key in keys and key not in tried
        tried.add(key)
        attempts.append(Attempt(key, end, productive, key == problem.answer))
    return attempts


def _line_end(text: str, start: int, lines_after: int) -> int:
    """Offset of the end of the non-empty line ``lines_after`` lines after the one at ``start``."""
    pos = text.find("\n", start)
    for _ in range(lines_after):
        if pos < 0:
            return len(text)
        nxt = pos
        while nxt < len(text) and text[nxt] == "\n":
            nxt += 1
        pos = text.find("\n", nxt)
    return len(text) if pos < 0 else pos
