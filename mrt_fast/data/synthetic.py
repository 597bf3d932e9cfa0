"""The embedded reasoning tasks: find the one listed key that passes a check, by trying keys.

Two variants share the trace format (``task=``):

``"chain"`` (the default): chained key search over a random map drawn per problem. The prompt
lists links (``BK`` means "B goes to K"; several letters may go to the same one) and asks which
of ``difficulty`` keys reaches the target, the one node named by a digit, in 2 or 3 steps;
exactly one does::

    Links: YH, VP, NK, HN, KT, WK, TD, P7, 7S, BS, RJ, ZR, EB, DH.
    Which of D, Y, V, K, E, Z reaches 7 in two steps?

``"recall"``: a key's value is a fixed fact (the last digit of its place in the alphabet, ``b`` 2,
``k`` 11 -> 1) and the question asks for the key whose value is the target::

    Find the key whose value is 7.
    Keys: b, k, e, q, m, h.

A solution tries keys one at a time. Every attempt is one episode: a cue paragraph naming the
key, one paragraph per step (chain: the link followed; recall: the recalled value) and a
verdict, each paragraph one line, so the default episode splitter (a new episode at a paragraph
that starts with a cue, at least three paragraphs per episode) cuts at every attempt::

    Wait, try E.

    EB.

    BS.

    S is not 7, so no.

Why the chain task is the default. In the recall task the answer is a fixed function of the
question, so a model learns to answer it without thinking (docs/data.md gives the measurement),
and then no method can change how it thinks. In the chain task the map is new in every problem:
the answer can only be found by following links read from the prompt, one lookup per step, and
a small model cannot compose several lookups for six keys in one forward pass. Progress is
visible: an attempt on a new key either finds the answer or removes one candidate, so forced
termination after more productive attempts succeeds more often, while re-checking a key
already tried adds tokens and changes nothing.

Warm-start traces (:func:`sft_trace`) mix productive attempts with re-checks and sometimes give
up early (they then end with the termination text and a guess among the keys not yet tried), so
a model trained on them answers only part of the problems: RL has headroom in both directions.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from .chat import PARAGRAPH_SEP, TERMINATION_TEXT, THINK_END, THINK_START

TASKS = ("chain", "recall")
DEFAULT_TASK = "chain"
KEY_ALPHABET = "bcdefghjkmnpqrstuvwxyz"  # no a/i/l/o: they read as words or digits
# The chain task's letters are capitals: no word of the fixed text ends up as a token made of two
# capitals or of a space and a capital (tokenizer.py), so a link is always the same two tokens.
CHAIN_ALPHABET = KEY_ALPHABET.upper()
DEFAULT_DIFFICULTY = 6
MIN_DIFFICULTY = 2
GRADER_KIND = "exact"

# Chain task: steps per problem (drawn uniformly, written as a word) and links listed in the
# prompt (at least).
CHAIN_HOPS = (2, 3)
HOP_WORDS = {2: "two", 3: "three"}
CHAIN_LINKS = 14
# The target is the one node named by a digit (drawn per problem). Whether the letter an attempt
# reached is the target is then visible in that letter's own token, so the verdict needs no
# second retrieval: with a capital for a target, a 2-layer model got 19% of its verdicts wrong
# (docs/data.md). The digit carries no information about which key reaches it.
CHAIN_GOALS = "123456789"

# Cues that open a new attempt, with sampling weights (all cues of the splitter appear).
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
    """One task instance: the user prompt, the reference answer and the structured facts.

    ``meta["task"]`` names the variant; ``meta["keys"]`` the keys to try, in prompt order.
    """

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
        list_untried: try the keys in the question's order and, after each failed attempt, write
            the keys not tried yet (``Keys not tried: U, Z, N.``, :func:`untried_text`), whose first
            is tried next and among which a give-up guesses. Every step is then a copy from the
            text, so a forced guess can rule out the failed keys (off: the task's default format).
    """

    recheck_prob: float = 0.25
    give_up_prob: float = 0.3
    give_up_first_prob: float = 0.05
    recheck_found_prob: float = 0.2
    terminate_found_prob: float = 0.5
    list_untried: bool = False

    def __post_init__(self) -> None:
        for name in ("recheck_prob", "give_up_prob", "give_up_first_prob", "recheck_found_prob",
                     "terminate_found_prob"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"TraceStyle.{name} must be in [0, 1), got {value}")


# ---- problems --------------------------------------------------------------------------------


def key_value(key: str) -> int:
    """Recall task: a key's value, the last digit of its place in the alphabet (``k`` -> 11 -> 1)."""
    if len(key) != 1 or key not in KEY_ALPHABET:
        raise ValueError(f"key must be one of {KEY_ALPHABET!r}, got {key!r}")
    return (ord(key) - ord("a") + 1) % 10


# Every target digit has at least 19 keys of other values (3 letters share each of 3, 4 and 6).
_MAX_RECALL_KEYS = 1 + min(sum(key_value(k) != t for k in KEY_ALPHABET) for t in range(10))
# The chain task needs letters for the keys, the target and the answer's intermediate steps.
_MAX_CHAIN_KEYS = len(CHAIN_ALPHABET) - max(CHAIN_HOPS)
MAX_DIFFICULTY = {"chain": _MAX_CHAIN_KEYS, "recall": _MAX_RECALL_KEYS}


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def _check_difficulty(difficulty: int, task: str) -> None:
    _check_task(task)
    if isinstance(difficulty, bool) or not isinstance(difficulty, int):
        raise TypeError(f"difficulty must be an int, got {type(difficulty).__name__}")
    if not MIN_DIFFICULTY <= difficulty <= MAX_DIFFICULTY[task]:
        raise ValueError(
            f"difficulty (the number of keys) must be in [{MIN_DIFFICULTY}, {MAX_DIFFICULTY[task]}] "
            f"for task {task!r}, got {difficulty}"
        )


def _chain_problem(rng: random.Random, difficulty: int) -> Problem:
    """A random map in which exactly one of ``difficulty`` keys reaches the target in ``hops`` steps.

    The answer's path uses fresh letters; every other key's path is drawn link by link (a letter
    already linked keeps its link, so paths merge) and the draw is repeated until no other key
    ends on the target. Distractor links from unused letters fill the list up to CHAIN_LINKS, so
    neither the target's in-links nor the list length point at the answer.
    """
    while True:
        hops = rng.choice(CHAIN_HOPS)
        keys = rng.sample(CHAIN_ALPHABET, difficulty)
        target = rng.choice([c for c in CHAIN_ALPHABET if c not in keys])
        answer = keys[0]
        steps = rng.sample([c for c in CHAIN_ALPHABET if c not in keys and c != target], hops - 1)
        path = [answer, *steps, target]
        links = dict(zip(path, path[1:]))
        for key in keys[1:]:
            node = key
            for _ in range(hops):
                if node not in links:
                    links[node] = rng.choice(CHAIN_ALPHABET)
                node = links[node]
        if [k for k in keys if chain_end(links, k, hops) == target] == [answer]:
            break
    unused = [c for c in CHAIN_ALPHABET if c not in links]
    for source in rng.sample(unused, max(0, min(len(unused), CHAIN_LINKS - len(links)))):
        links[source] = rng.choice(CHAIN_ALPHABET)
    # The target is renamed to a digit: see CHAIN_GOALS.
    goal = rng.choice(CHAIN_GOALS)
    links = {(goal if a == target else a): (goal if b == target else b) for a, b in links.items()}
    target = goal
    listed = dict(rng.sample(sorted(links.items()), len(links)))
    keys = rng.sample(keys, difficulty)
    meta = {"task": "chain", "keys": keys, "links": listed, "target": target, "hops": hops,
            "difficulty": difficulty}
    return Problem(prompt=chain_prompt(listed, keys, target, hops), answer=answer, meta=meta)


def chain_prompt(links: dict[str, str], keys: list[str], target: str, hops: int) -> str:
    """The chain task's question: the links in the given order, then the keys to try."""
    return (
        f"Links: {', '.join(link_text(a, b) for a, b in links.items())}.\n"
        f"Which of {', '.join(keys)} reaches {target} in {HOP_WORDS[hops]} steps?"
    )


def link_text(source: str, target: str) -> str:
    """A link as the prompt lists it and a step writes it: the two letters side by side (``EQ``).

    No space between them: the step's next token is then predicted right at the source letter,
    the plain induction pattern (find this letter earlier, copy what followed it). With a space,
    the model must match two tokens back, and a 2-layer model stayed at chance on the drills
    for 2,400 steps where it learned the adjacent form in 300 (docs/data.md).
    """
    return source + target


def chain_end(links: dict[str, str], key: str, hops: int) -> str:
    """Where ``key`` is after following ``hops`` links."""
    for _ in range(hops):
        key = links[key]
    return key


def _recall_problem(rng: random.Random, difficulty: int) -> Problem:
    target = rng.randrange(10)
    answer = rng.choice([k for k in KEY_ALPHABET if key_value(k) == target])
    others = rng.sample([k for k in KEY_ALPHABET if key_value(k) != target], difficulty - 1)
    keys = rng.sample([answer, *others], difficulty)
    values = {k: key_value(k) for k in keys}
    prompt = f"Find the key whose value is {target}.\nKeys: {', '.join(keys)}."
    meta = {"task": "recall", "keys": keys, "values": values, "target": target, "difficulty": difficulty}
    return Problem(prompt=prompt, answer=answer, meta=meta)


def make_problem(rng: random.Random, difficulty: int = DEFAULT_DIFFICULTY, task: str = DEFAULT_TASK) -> Problem:
    """Draw one problem with ``difficulty`` keys from ``rng``: exactly one key is the answer."""
    _check_difficulty(difficulty, task)
    return _chain_problem(rng, difficulty) if task == "chain" else _recall_problem(rng, difficulty)


def iter_problems(*, seed: int, difficulty: int = DEFAULT_DIFFICULTY, task: str = DEFAULT_TASK):
    """An endless, seeded stream of problems (problem i depends only on seed, difficulty and task)."""
    _check_difficulty(difficulty, task)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    # The recall task keeps the stream it always had.
    name = f"mrt-fast/keys/{seed}/{difficulty}" if task == "recall" else f"mrt-fast/{task}/{seed}/{difficulty}"
    rng = random.Random(name)
    while True:
        yield make_problem(rng, difficulty, task)


def generate_problems(
    n: int, *, seed: int, difficulty: int = DEFAULT_DIFFICULTY, task: str = DEFAULT_TASK
) -> list[Problem]:
    """The first ``n`` problems of the seeded stream."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    stream = iter_problems(seed=seed, difficulty=difficulty, task=task)
    return [next(stream) for _ in range(n)]


# ---- traces ---------------------------------------------------------------------------------


def verdict(reached: str, target: str) -> str:
    """The paragraph that closes an attempt."""
    return f"{reached} is {target}, so yes." if reached == target else f"{reached} is not {target}, so no."


def attempt_steps(problem: Problem, key: str) -> list[str]:
    """The paragraphs of one attempt after its opening: one per step, then the verdict."""
    meta = problem.meta
    if meta["task"] == "recall":
        value = meta["values"][key]
        return [f"{key}{value}.", verdict(str(value), str(meta["target"]))]
    steps, node = [], key
    for _ in range(meta["hops"]):
        nxt = meta["links"][node]
        steps.append(link_text(node, nxt) + ".")
        node = nxt
    return [*steps, verdict(node, meta["target"])]


def lookups(problem: Problem) -> list[tuple[str, str]]:
    """The single lookups a solution is made of, as ``(query, fact)`` texts of a step paragraph.

    Chain: every listed link (``("E", "B")`` for the step ``EB.``); recall: every key's value
    (``("k", "1")`` for ``k1.``). The warm start drills them before it trains on traces.
    """
    if problem.meta["task"] == "recall":
        return [(k, str(v)) for k, v in problem.meta["values"].items()]
    return [(a, b) for a, b in problem.meta["links"].items()]


def shorter_map(problem: Problem, n_links: int) -> Problem:
    """A chain problem with only its first ``n_links`` links listed (a drill on a smaller map).

    Its keys may no longer reach anything: only the lookups of the result are meaningful. A
    recall problem is returned as it is.
    """
    meta = problem.meta
    if meta["task"] == "recall" or n_links >= len(meta["links"]):
        return problem
    links = dict(list(meta["links"].items())[:n_links])
    prompt = chain_prompt(links, meta["keys"], meta["target"], meta["hops"])
    return Problem(prompt=prompt, answer=problem.answer, meta={**meta, "links": links})


def answer_text(key: str) -> str:
    """The text after ``</think>``: the final answer, boxed for the grader."""
    return f"The answer is \\boxed{{{key}}}."


def attempt_opening(rng: random.Random, key: str, *, first: bool, recheck: bool) -> str:
    """The paragraph that opens an attempt on ``key`` (a cue, or the first attempt's ``Let me try``)."""
    if first:
        return f"Let me try {key}."
    if recheck and rng.random() < 0.7:
        return f"{RECHECK_CUE} {key}."
    cues, weights = zip(*NEW_ATTEMPT_CUES)
    cue = rng.choices(cues, weights)[0]
    return f"{cue} Let me try {key}." if cue.endswith("?") else f"{cue}, try {key}."


UNTRIED_HEAD = "Keys not tried:"


def untried_text(problem: Problem, tried) -> str:
    """The paragraph a listed trace writes after a failed attempt: the keys not tried yet, in the
    question's order."""
    return f"{UNTRIED_HEAD} " + ", ".join(k for k in problem.meta["keys"] if k not in tried) + "."


def sft_trace(problem: Problem, rng: random.Random, style: TraceStyle = TraceStyle()) -> str:
    """A full assistant turn for ``problem``: ``<think>`` attempts ``</think>`` and the answer.

    Attempts try the keys in a random order, sometimes re-check a key already tried, and may
    give up early (``style``); see the module docstring.
    """
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")
    keys = problem.meta["keys"]
    order = list(keys) if style.list_untried else rng.sample(keys, len(keys))
    tried: list[str] = []
    paragraphs: list[str] = []
    found = None
    gave_up_first = rng.random() < style.give_up_first_prob
    while found is None and not gave_up_first:
        recheck = bool(tried) and rng.random() < style.recheck_prob
        key = rng.choice(tried) if recheck else order[len(tried)]
        paragraphs += [attempt_opening(rng, key, first=not paragraphs, recheck=recheck), *attempt_steps(problem, key)]
        if not recheck:
            tried.append(key)
        if key == problem.answer:
            found = key
            continue
        if style.list_untried:
            paragraphs.append(untried_text(problem, tried))
        if rng.random() < style.give_up_prob:
            break
    thinking = THINK_START + "\n" + PARAGRAPH_SEP.join(paragraphs)
    if found is None:
        guess = rng.choice([k for k in keys if k not in tried])
        separator = PARAGRAPH_SEP if paragraphs else ""
        return thinking + separator + TERMINATION_TEXT + answer_text(guess)
    if rng.random() < style.recheck_found_prob:
        opening = attempt_opening(rng, found, first=False, recheck=True)
        thinking += PARAGRAPH_SEP + PARAGRAPH_SEP.join([opening, *attempt_steps(problem, found)])
    if rng.random() < style.terminate_found_prob:
        return thinking + PARAGRAPH_SEP + TERMINATION_TEXT + answer_text(found)
    return thinking + "\n" + THINK_END + "\n\n" + answer_text(found)


# ---- reading traces back ---------------------------------------------------------------------

# An attempt opens with a line ending "try k." or "double-check k."; each paragraph is one line.
_ATTEMPT_RE = re.compile(r"^[^\n]*\b(?:try|double-check) ([a-zA-Z])\.$", re.MULTILINE)
_VERDICT_RE = re.compile(r"^[^\n]* so (?:yes|no)\.$", re.MULTILINE)


@dataclass(frozen=True)
class Attempt:
    """One attempt read back from a trace: where it ends and whether it was productive."""

    key: str
    end: int  # character offset just after the attempt's verdict line (an episode boundary)
    productive: bool  # a listed key not tried before (finds the answer or removes a candidate)
    found: bool  # this attempt checked the answer key
    complete: bool  # its verdict line was written


def verdict_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the verdict lines (``... so yes.`` / ``... so no.``) in a trace."""
    return [m.span() for m in _VERDICT_RE.finditer(text)]


def rechecks(thinking: str) -> int:
    """Attempts in a (possibly model-written) thinking text that try a key an earlier attempt of
    the same text already tried (including the key already found): the task's unproductive
    episodes, which add tokens and cannot change the answer."""
    keys = [m.group(1) for m in _ATTEMPT_RE.finditer(thinking)]
    return sum(key in keys[:i] for i, key in enumerate(keys))


def read_attempts(problem: Problem, thinking: str) -> list[Attempt]:
    """The attempts of a (possibly model-written) thinking text, in order.

    An attempt ends with the first verdict line ("... so yes." / "... so no.") after its opening,
    or where the next attempt or the text starts, if it has none (``complete`` False). Used to
    measure progress per episode.
    """
    keys = set(problem.meta["keys"])
    matches = list(_ATTEMPT_RE.finditer(thinking))
    attempts: list[Attempt] = []
    tried: set[str] = set()
    for i, m in enumerate(matches):
        key = m.group(1)
        stop = matches[i + 1].start() if i + 1 < len(matches) else len(thinking)
        closing = _VERDICT_RE.search(thinking, m.end(), stop)
        end = closing.end() if closing else stop
        productive = key in keys and key not in tried
        tried.add(key)
        attempts.append(Attempt(key, end, productive, key == problem.answer, closing is not None))
    return attempts
