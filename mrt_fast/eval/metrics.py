"""Evaluation metrics: pass@k (unbiased), maj@k, and normalised regret over a token budget.

Pure Python on floats: these are the numbers the paper reports, and the tests check them against
hand-computed examples.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al., 2021).

    ``1 - C(n - c, k) / C(n, k)``, computed as a product so large ``n`` does not overflow.
    """
    _check_count("n", n, 1)
    _check_count("c", c, 0)
    _check_count("k", k, 1)
    if c > n:
        raise ValueError(f"c ({c}) cannot exceed n ({n})")
    if k > n:
        raise ValueError(f"k ({k}) cannot exceed the number of samples n ({n})")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int) -> float:
    """Majority vote over the first ``k`` samples: 1.0 if the most frequent extracted answer is correct.

    ``answers[i]`` is the extracted final answer of sample ``i`` (``None`` when there is none: it
    does not vote) and ``correct[i]`` its grade. Ties go to the answer seen first. No vote at all
    counts as wrong.
    """
    _check_count("k", k, 1)
    if len(answers) != len(correct):
        raise ValueError(f"answers ({len(answers)}) and correct ({len(correct)}) must have the same length")
    if k > len(answers):
        raise ValueError(f"k ({k}) cannot exceed the number of samples ({len(answers)})")
    votes = Counter(a for a in answers[:k] if a is not None)
    if not votes:
        return 0.0
    best = max(votes.values())
    winner = next(a for a in answers[:k] if a is not None and votes[a] == best)
    return 1.0 if correct[list(answers).index(winner)] else 0.0


def _check_curve(tokens: Sequence[float], values: Sequence[float]) -> tuple[list[float], list[float]]:
    xs, ys = [float(t) for t in tokens], [float(v) for v in values]
    if len(xs) != len(ys):
        raise ValueError(f"tokens ({len(xs)}) and pass_at_1 ({len(ys)}) must have the same length")
    if not all(math.isfinite(v) for v in xs + ys):
        raise ValueError("tokens and pass_at_1 must be finite")
    if not all(0.0 <= v <= 1.0 for v in ys):
        raise ValueError(f"pass_at_1 holds probabilities: every value must lie in [0, 1], got {ys}")
    if xs and xs[0] < 0:
        raise ValueError(f"tokens must be >= 0, got {xs[0]}")
    if any(b < a for a, b in zip(xs, xs[1:])):
        raise ValueError(f"tokens must be non-decreasing (tokens spent up to each boundary), got {xs}")
    return xs, ys


def area_under_curve(tokens: Sequence[float], pass_at_1: Sequence[float], budget: float) -> float:
    """Area under the piecewise-linear curve through ``(0, 0)`` and ``(tokens_j, J_j)`` on ``[0, budget]``.

    The curve is flat after its last point and cut at ``budget`` by linear interpolation.
    """
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget must be a positive finite number of tokens, got {budget!r}")
    xs, ys = _check_curve(tokens, pass_at_1)
    xs, ys = [0.0] + xs, [0.0] + ys
    area = 0.0
    for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:]):
        if x0 >= budget:
            return area
        if x1 <= budget:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_cut = y0 + (y1 - y0) * (budget - x0) / (x1 - x0)
            return area + (budget - x0) * (y0 + y_cut) / 2
    return area + (budget - xs[-1]) * ys[-1]


def normalized_regret(
    tokens: Sequence[float], pass_at_1: Sequence[float], budget: float, oracle: float = 1.0
) -> float:
    """Normalised cumulative regret at ``budget``: ``oracle - area_under_curve / budget``.

    ``tokens[j]`` are the tokens spent up to episode boundary ``j`` and ``pass_at_1[j]`` the
    meta-prover's pass@1 there (docs/mrt.md). ``oracle`` is ``J*`` (1.0: always right).
    """
    if not math.isfinite(oracle):
        raise ValueError(f"oracle must be finite, got {oracle}")
    return oracle - area_under_curve(tokens, pass_at_1, budget) / budget


def curve_on_grid(tokens: Sequence[float], pass_at_1: Sequence[float], grid: Sequence[float]) -> list[float]:
    """The same piecewise-linear curve (through ``(0, 0)``, flat after the last point) sampled at ``grid``.

    Used to average per-trace curves, whose boundaries fall at different token counts, for plots.
    """
    xs, ys = _check_curve(tokens, pass_at_1)
    xs, ys = [0.0] + xs, [0.0] + ys
    out = []
    for g in grid:
        i = 0
        while i + 1 < len(xs) and xs[i + 1] <= g:
            i += 1
        if i + 1 == len(xs) or xs[i + 1] == xs[i]:
            out.append(ys[i])
        else:
            out.append(ys[i] + (ys[i + 1] - ys[i]) * (g - xs[i]) / (xs[i + 1] - xs[i]))
    return out
