"""Graders: boxed extraction, math-verify equivalence, exact match, bad input."""

import pytest

from mrt_fast.data import extract_boxed, grade


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces kept whole
        (r"\boxed{\sqrt{\frac{a}{b}}} end", r"\sqrt{\frac{a}{b}}"),
        (r"\boxed{1} then \boxed{2}", "2"),  # the last one wins
        (r"\boxed{1} then \boxed{2", "1"),  # an unclosed last box falls back to the previous
        (r"\fbox{7}", "7"),
        (r"$\boxed 5$", "5"),
        (r"\boxed{}", ""),
        ("no answer here", None),
        (r"\boxed{unclosed", None),
        (r"\boxed", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_rejects_non_strings():
    with pytest.raises(TypeError, match="text"):
        extract_boxed(None)


@pytest.mark.parametrize(
    "response, answer",
    [
        (r"\boxed{0.5}", "1/2"),
        (r"\boxed{\frac{1}{2}}", "0.5"),
        (r"\boxed{1/2}", r"\frac{1}{2}"),
        (r"\boxed{\dfrac{1}{2}}", "1/2"),
        (r"<think>try 3</think> \boxed{2x + 1}", "1+2x"),
        (r"\boxed{10}", r"\boxed{10}"),  # a boxed reference
        (r"\boxed{\{1,2\}}", r"\{2,1\}"),
    ],
)
def test_math_equivalent_answers_grade_true(response, answer):
    assert grade(response, answer, kind="math") is True


@pytest.mark.parametrize(
    "response, answer",
    [
        (r"\boxed{3}", "4"),
        (r"\boxed{0.51}", "1/2"),
        ("the answer is 4", "4"),  # no boxed answer: wrong, not an error
        (r"\boxed{@@ ## ]]}", "4"),  # unparsable model answer: wrong, not an error
        (r"\boxed{4", "4"),
        (r"\boxed{}", "4"),  # empty: math-verify extracts nothing
    ],
)
def test_math_wrong_or_unparsable_answers_grade_false(response, answer):
    assert grade(response, answer, kind="math") is False


def test_exact_grader_compares_stripped_strings():
    assert grade(r"The answer is \boxed{k}.", "k", kind="exact")
    assert grade(r"\boxed{ k }", "k", kind="exact")
    assert not grade(r"\boxed{K}", "k", kind="exact")
    assert not grade(r"\boxed{0.5}", "1/2", kind="exact")
    assert not grade("k", "k", kind="exact")  # the answer must be boxed


def test_grade_bad_input():
    with pytest.raises(ValueError, match="kind"):
        grade(r"\boxed{1}", "1", kind="fuzzy")
    with pytest.raises(ValueError, match="answer"):
        grade(r"\boxed{1}", "   ", kind="math")
    with pytest.raises(TypeError, match="answer"):
        grade(r"\boxed{1}", 1, kind="math")
    with pytest.raises(TypeError, match="response"):
        grade(None, "1")
    with pytest.raises(ValueError, match="cannot be parsed"):
        grade(r"\boxed{1}", "}{", kind="math")
