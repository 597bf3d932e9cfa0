"""The meta-prover ``J`` and per-episode progress.

``J(x, z_{0:j})`` is the probability that the model answers correctly when forced to stop thinking
after the prefix ``z_{0:j}``: continue the assistant turn after the prefix with the termination text
(which closes ``</think>``), sample ``k`` answers and grade them. ``j = 0`` is the empty prefix.
All branches of one trace share its prefix, so they go through the rollout engine's
``branch_at_boundaries`` (prefix KV reuse / prefix caching).

Progress of episode ``j`` is ``J_j - J_{j-1}`` (:func:`progress_from_J`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

Grader = Callable[[str, str], bool]  # (response, reference answer) -> correct


def check_k(k: int, name: str = "k") -> int:
    """A count that must be a positive int (``k`` samples, ``n`` samples, a budget ...)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"{name} must be >= 1, got {k}")
    return k


def default_grader(kind: str = "math") -> Grader:
    """The task grader of :mod:`mrt_fast.data` (``grade(response, answer, kind=...)``)."""
    from mrt_fast.data import grade

    def _grade(response: str, answer: str) -> bool:
        return bool(grade(response, answer, kind=kind))

    return _grade


def termination_token_ids(tokenizer: Any, termination_text: str | None = None) -> list[int]:
    """Token ids of the forced-termination text (default: :data:`mrt_fast.data.TERMINATION_TEXT`)."""
    if termination_text is None:
        from mrt_fast.data import TERMINATION_TEXT as termination_text
    ids = tokenizer(termination_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("termination_text encodes to no tokens")
    return list(ids)


@dataclass
class MetaProverResult:
    """Forced-termination samples at each boundary of each trace.

    ``J[i][b]`` is the fraction of the ``k`` answers at boundary ``b`` of trace ``i`` graded correct;
    ``completions[i][b]`` the sampled answers (token ids after the termination text) and
    ``correct[i][b]`` their grades.
    """

    J: list[list[float]]
    completions: list[list[list[Any]]]
    correct: list[list[list[bool]]]


def run_meta_prover(
    engine: Any,
    prompts: Sequence[Sequence[int]],
    traces: Sequence[Sequence[int]],
    boundaries: Sequence[Sequence[int]],
    *,
    answers: Sequence[str],
    grader: Grader,
    termination_ids: Sequence[int],
    k: int,
    params: Any,
) -> MetaProverResult:
    """Sample ``k`` forced-termination answers at every boundary and grade them.

    ``prompts[i]`` are the prompt token ids (chat template applied), ``traces[i]`` the response
    token ids after the prompt and ``boundaries[i]`` token offsets into ``traces[i]`` (0 = the empty
    prefix). The branch at ``b`` continues ``prompts[i] + traces[i][:b] + termination_ids``.
    """
    from mrt_fast.rollout import branch_at_boundaries

    check_k(k)
    n = len(prompts)
    if not (len(traces) == len(boundaries) == len(answers) == n):
        raise ValueError(
            f"prompts ({n}), traces ({len(traces)}), boundaries ({len(boundaries)}) and answers "
            f"({len(answers)}) must have the same length"
        )
    if not termination_ids:
        raise ValueError("termination_ids must not be empty: the meta-prover needs a forced termination")
    full, offsets = [], []
    for i, (p, t, bs) in enumerate(zip(prompts, traces, boundaries)):
        for b in bs:
            if not 0 <= b <= len(t):
                raise ValueError(f"boundary {b} of trace {i} is outside [0, {len(t)}]")
        full.append(list(p) + list(t))
        offsets.append([len(p) + b for b in bs])
    branches = branch_at_boundaries(engine, full, offsets, list(termination_ids), params, k)
    J, correct = [], []
    for i, per_trace in enumerate(branches):
        grades = [[bool(grader(c.text, answers[i])) for c in samples] for samples in per_trace]
        correct.append(grades)
        J.append([sum(g) / len(g) for g in grades])
    return MetaProverResult(J=J, completions=branches, correct=correct)


def estimate_J(engine: Any, prompts, traces, boundaries, **kwargs) -> list[list[float]]:
    """``J`` at every boundary of every trace (see :func:`run_meta_prover` for the arguments)."""
    return run_meta_prover(engine, prompts, traces, boundaries, **kwargs).J


def progress_from_J(J: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Progress of each episode, ``J_j - J_{j-1}``: ``[n]`` from ``J`` at ``n + 1`` boundaries.

    ``J[0]`` is the value of the empty prefix, ``J[j]`` the value after ``j`` episodes.
    """
    j = torch.as_tensor(J, dtype=torch.float32)
    if j.dim() != 1 or j.numel() < 1:
        raise ValueError(f"J must be 1-D with at least one value (the empty prefix), got shape {tuple(j.shape)}")
    if not ((j >= 0) & (j <= 1)).all():  # also catches NaN
        raise ValueError(f"J holds probabilities: every value must lie in [0, 1], got {j.tolist()}")
    return j[1:] - j[:-1]
