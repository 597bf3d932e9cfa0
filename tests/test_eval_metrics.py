"""pass@k, maj@k and normalised regret against hand-computed examples."""

import math

import pytest

from mrt_fast.eval import area_under_curve, curve_on_grid, maj_at_k, normalized_regret, pass_at_k


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    # 1 - C(2,2)/C(4,2) = 1 - 1/6
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    assert pass_at_k(4, 3, 2) == 1.0  # fewer than k wrong samples
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(100, 7, 10) == pytest.approx(1 - math.comb(93, 10) / math.comb(100, 10))
    with pytest.raises(ValueError, match="k must be >= 1"):
        pass_at_k(4, 1, 0)
    with pytest.raises(ValueError, match="cannot exceed"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="cannot exceed"):
        pass_at_k(4, 1, 5)


def test_maj_at_k_by_hand():
    answers = ["3", "4", "4", None, "3", "3"]
    correct = [True, False, False, False, True, True]
    assert maj_at_k(answers, correct, 3) == 0.0  # 4 wins 2:1
    assert maj_at_k(answers, correct, 6) == 1.0  # 3 wins 3:2
    assert maj_at_k(answers, correct, 1) == 1.0
    assert maj_at_k(["4", "3"], [False, True], 2) == 0.0  # tie: the first seen answer wins
    assert maj_at_k([None, None], [False, False], 2) == 0.0
    with pytest.raises(ValueError, match="k must be >= 1"):
        maj_at_k(answers, correct, 0)


def test_regret_area_by_hand():
    # Curve (0,0) -> (100, .5) -> (300, 1), flat after.
    tokens, J = [100, 300], [0.5, 1.0]
    # budget 400: 25 + 150 + 100 = 275
    assert area_under_curve(tokens, J, 400) == pytest.approx(275.0)
    assert normalized_regret(tokens, J, 400) == pytest.approx(1 - 275 / 400)
    # budget 200: 25 + (0.5 + 0.75) / 2 * 100 = 87.5 (cut by linear interpolation)
    assert area_under_curve(tokens, J, 200) == pytest.approx(87.5)
    assert normalized_regret(tokens, J, 200) == pytest.approx(1 - 87.5 / 200)
    # budget 50 inside the first segment: 0.5 * 50 * 0.25
    assert normalized_regret(tokens, J, 50) == pytest.approx(1 - 6.25 / 50)
    # oracle 0.5 and a J_0 at token 0 (a vertical jump adds no area)
    assert normalized_regret([0, 100], [0.5, 0.5], 100, oracle=0.5) == pytest.approx(0.0)


def test_regret_bad_input():
    with pytest.raises(ValueError, match="budget"):
        normalized_regret([1], [1.0], 0)
    with pytest.raises(ValueError, match="non-decreasing"):
        normalized_regret([5, 3], [0.1, 0.2], 10)
    with pytest.raises(ValueError, match="same length"):
        normalized_regret([5], [0.1, 0.2], 10)


def test_curve_on_grid():
    assert curve_on_grid([100, 300], [0.5, 1.0], [0, 50, 100, 200, 300, 1000]) == pytest.approx(
        [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    )
    assert curve_on_grid([0, 0, 10], [0.5, 0.7, 0.9], [0, 5]) == pytest.approx([0.7, 0.8])


def test_regret_rejects_values_that_are_not_probabilities():
    for bad in ([-0.5, 0.5], [0.5, 1.5]):
        with pytest.raises(ValueError, match="pass_at_1 holds probabilities"):
            normalized_regret([10, 20], bad, 30)


def authors_area(x, y, cutoff):
    """The area of analysis/code/regret.ipynb (numpy, fp64), written the notebook's way."""
    import numpy as np

    y = [0.0] + list(y)
    x = np.array([0.0] + list(x))
    filtered = list(x[x < cutoff])
    if len(filtered) == len(x):
        return np.trapezoid(y + [y[-1]], list(x) + [cutoff]) / cutoff
    i = len(filtered) - 1
    y_cut = y[i] + (cutoff - x[i]) / (x[i + 1] - x[i]) * (y[i + 1] - y[i])
    return np.trapezoid(y[: i + 1] + [y_cut], filtered + [cutoff]) / cutoff


@pytest.mark.parametrize("cutoff", [50, 130.5, 400, 4096])
def test_regret_matches_the_authors_notebook(cutoff):
    x = [120.0, 180.25, 250.0, 333.0]
    y = [0.125, 0.5, 0.375, 0.875]
    assert normalized_regret(x, y, cutoff) == pytest.approx(1 - authors_area(x, y, cutoff), abs=1e-12)
