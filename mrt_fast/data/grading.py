"""Answer graders: the 0/1 outcome reward of a response.

``kind="math"`` extracts the last ``\\boxed{...}`` of the response and compares it with the
reference answer through math-verify (so ``1/2``, ``0.5`` and ``\\frac{1}{2}`` agree).
``kind="exact"`` compares the last boxed answer with the reference as stripped strings: the
embedded synthetic task uses it. A response without a boxed answer, or one math-verify cannot
parse, grades as incorrect (False); a *reference* answer that cannot be graded is a caller
bug and raises ``ValueError``.
"""

from __future__ import annotations

from functools import lru_cache

GRADER_KINDS = ("math", "exact")
_BOXED_MARKERS = ("\\boxed", "\\fbox")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced.

    Nested braces are kept (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``); ``\\boxed 5`` (the
    brace-less form) yields ``5``. Returns None when there is no complete boxed answer.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    start = max(text.rfind(marker) for marker in _BOXED_MARKERS)
    while start >= 0:
        found = _boxed_content_at(text, start)
        if found is not None:
            return found
        # An unclosed box: fall back to the previous complete one.
        start = max(text.rfind(marker, 0, start) for marker in _BOXED_MARKERS)
    return None


def _boxed_content_at(text: str, start: int) -> str | None:
    marker = "\\boxed" if text.startswith("\\boxed", start) else "\\fbox"
    i = start + len(marker)
    if i < len(text) and text[i] == " ":
        # "\boxed 5": the argument runs to the next whitespace or "$".
        j = i + 1
        while j < len(text) and not text[j].isspace() and text[j] != "$":
            j += 1
        return text[i + 1 : j] or None
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


@lru_cache(maxsize=4096)
def _parse_reference(answer: str):
    from math_verify import parse

    # Reference answers come bare ("1/2") or boxed; wrap bare ones so LaTeX parsing applies.
    parsed = parse(answer if "\\boxed" in answer else f"\\boxed{{{answer}}}")
    if not parsed:
        parsed = parse(answer)
    return parsed


def grade(response: str, answer: str, *, kind: str = "math") -> bool:
    """True when the final boxed answer of ``response`` matches the reference ``answer``.

    Args:
        response: the model's full output (thinking and answer).
        answer: the reference answer (bare, e.g. ``"1/2"``, or boxed).
        kind: ``"math"`` (math-verify equivalence) or ``"exact"`` (stripped string equality).
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    if kind not in GRADER_KINDS:
        raise ValueError(f"kind must be one of {GRADER_KINDS}, got {kind!r}")
    if not answer.strip():
        raise ValueError("answer must be a non-empty reference answer")

    predicted = extract_boxed(response)
    if predicted is None:
        return False
    if kind == "exact":
        reference = extract_boxed(answer) if "\\boxed" in answer else answer
        return predicted.strip() == (reference or "").strip()

    from math_verify import parse, verify

    gold = _parse_reference(answer)
    if not gold:
        raise ValueError(f"answer {answer!r} cannot be parsed by math-verify; use kind='exact'")
    guess = parse(f"\\boxed{{{predicted}}}")
    if not guess:
        return False  # unparsable model answer: graded as wrong, never an error
    return bool(verify(gold, guess))
