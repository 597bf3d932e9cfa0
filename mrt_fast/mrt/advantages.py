"""Rewards and the advantage forms MRT trains with.

All functions take and return fp32 tensors (or anything ``torch.as_tensor`` accepts) and are plain
PyTorch, so they serve the plans and the tests alike. Shapes follow the fused loss
(:func:`mrt_fast.loss.fused_policy_loss`): per-sequence advantages ``[S]`` go with ``seq_ids``,
per-episode advantages ``[E]`` with ``episode_ids``.

- ``R = outcome + alpha * progress`` (:func:`mrt_rewards`).
- Group baseline (GRPO): ``A = R - mean_group(R)``, optionally divided by the group's (unbiased, as
  TRL and verl compute it) standard deviation plus ``eps`` (:func:`group_baseline`).
- Termination baseline (MRT-RL, the authors' ``A = R - R_termination``): ``A = r - J(c)`` plus
  ``alpha`` times the progress the meta-prover measured (:func:`termination_advantages`);
  :func:`termination_baseline` forms the same baseline from terminate-now rewards in the group.
- Per-episode dense (MRT-online, MRT-RL's dense option): each episode's tokens get
  ``A_seq + alpha * progress_episode`` (:func:`per_episode_dense`).
- The same optional standard-deviation scaling for all of them (:func:`group_std_scale`).

Group and sequence ids are renumbered internally, so any non-negative integers work as names.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

TensorLike = torch.Tensor | Sequence[float]


def check_alpha(alpha: float, name: str = "alpha") -> float:
    """A weight such as ``alpha`` must be a finite real number (NaN or inf would poison every advantage)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(alpha).__name__}")
    if not math.isfinite(alpha):
        raise ValueError(f"{name} must be finite, got {alpha}")
    return float(alpha)


def _as_vector(name: str, values: TensorLike) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite, got {t.tolist()}")
    return t


def _as_index_vector(name: str, values: TensorLike, n: int | None = None) -> torch.Tensor:
    """Non-negative integer ids as int64: floats must be integral (never truncated), bools are refused."""
    t = torch.as_tensor(values)
    if t.dim() != 1 or (n is not None and t.numel() != n):
        want = f" with {n} entries" if n is not None else ""
        raise ValueError(f"{name} must be 1-D{want}, got shape {tuple(t.shape)}")
    if t.dtype == torch.bool:
        raise TypeError(f"{name} must be integers, got booleans")
    if t.dtype.is_floating_point:
        if not torch.isfinite(t).all() or not torch.equal(t, t.round()):
            raise ValueError(f"{name} must be integers, got non-integral values {t.tolist()}")
    elif t.dtype.is_complex:
        raise TypeError(f"{name} must be integers, got {t.dtype}")
    t = t.long()
    if t.numel() and t.min() < 0:
        raise ValueError(f"{name} must be >= 0, got {t.tolist()}")
    return t


def _as_group_ids(group_ids: TensorLike, n: int) -> torch.Tensor:
    """Group ids renumbered to ``0..G-1`` (so a huge id costs nothing)."""
    g = _as_index_vector("group_ids", group_ids, n)
    return torch.unique(g, return_inverse=True)[1] if g.numel() else g


def _as_flags(name: str, values: TensorLike, n: int) -> torch.Tensor:
    """Booleans, or numbers that are exactly 0 or 1."""
    t = torch.as_tensor(values)
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if t.dtype != torch.bool and not ((t == 0) | (t == 1)).all():
        raise ValueError(f"{name} must hold booleans (or 0/1), got {t.tolist()}")
    return t.bool()


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a positive finite float when normalize_std is on, got {eps!r}")
    return float(eps)


def mrt_rewards(outcome: TensorLike, progress: TensorLike, alpha: float) -> torch.Tensor:
    """``R = outcome + alpha * progress`` elementwise (same 1-D shape)."""
    alpha = check_alpha(alpha)
    o, p = _as_vector("outcome", outcome), _as_vector("progress", progress)
    if o.shape != p.shape:
        raise ValueError(f"outcome {tuple(o.shape)} and progress {tuple(p.shape)} must have the same shape")
    return o + alpha * p


def _group_mean(values: torch.Tensor, group_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-group mean of ``values`` over the entries with ``weight == 1``; one value per group id."""
    n_groups = int(group_ids.max()) + 1 if group_ids.numel() else 0
    sums = torch.zeros(n_groups).index_add_(0, group_ids, values * weight)
    counts = torch.zeros(n_groups).index_add_(0, group_ids, weight)
    return sums / counts, counts


def group_std_scale(rewards: TensorLike, group_ids: TensorLike, eps: float = 1e-6) -> torch.Tensor:
    """Per-entry divisor for standard-deviation normalisation: ``std_group(R) + eps``.

    The standard deviation is the unbiased one (TRL, verl). A group whose rewards do not spread
    (all equal, or a single sample) gets divisor 1: its advantages are left as they are (for a
    group baseline they are 0 anyway; under the termination baseline they need not be, and dividing
    them by ``eps`` would blow them up).
    """
    eps = _check_eps(eps)
    r = _as_vector("rewards", rewards)
    g = _as_group_ids(group_ids, r.numel())
    if r.numel() == 0:
        return r
    ones = torch.ones_like(r)
    mean, counts = _group_mean(r, g, ones)
    sq, _ = _group_mean((r - mean[g]).square(), g, ones)
    std = (sq * counts / (counts - 1).clamp(min=1)).sqrt()
    return torch.where(std > 0, std + eps, torch.ones_like(std))[g]


def group_baseline(
    rewards: TensorLike, group_ids: TensorLike, *, normalize_std: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO advantages: ``R - mean`` within each group (optionally ``/ (std + eps)``).

    ``group_ids[i]`` names the group (problem) of ``rewards[i]``. The standard deviation is the
    unbiased one (TRL, verl); a group without spread has advantage 0.
    """
    if normalize_std:
        _check_eps(eps)
    r = _as_vector("rewards", rewards)
    g = _as_group_ids(group_ids, r.numel())
    if r.numel() == 0:
        return r
    mean, _ = _group_mean(r, g, torch.ones_like(r))
    adv = r - mean[g]
    if normalize_std:
        adv = adv / group_std_scale(r, g, eps)
    return adv


def termination_baseline(rewards: TensorLike, group_ids: TensorLike, is_terminate: TensorLike) -> torch.Tensor:
    """MRT-RL advantages: ``R - mean(R of the group's terminate-now continuations)``.

    Every group must hold at least one terminate-now continuation (the baseline is undefined
    otherwise).
    """
    r = _as_vector("rewards", rewards)
    g = _as_group_ids(group_ids, r.numel())
    term = _as_flags("is_terminate", is_terminate, r.numel())
    if r.numel() == 0:
        return r
    mean, counts = _group_mean(r, g, term.float())
    present = torch.zeros_like(counts).index_add_(0, g, torch.ones_like(r)) > 0
    missing = (present & (counts == 0)).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"groups {missing} have no terminate-now continuation to form the termination baseline")
    return r - mean[g]


def termination_advantages(
    outcome: TensorLike, prefix_J: TensorLike, progress: TensorLike, alpha: float
) -> torch.Tensor:
    """MRT-RL advantages ``A = (r - J(c)) + alpha * progress`` of continuations of prefixes ``c``.

    ``r`` is each continuation's 0/1 outcome, ``prefix_J`` the meta-prover's estimate of its
    prefix's value (the authors' termination reward, ``A = R - R_termination``) and ``progress``
    what the meta-prover measured the continuation's own thinking to add: ``J(c + thinking) - J(c)``
    (0 for a terminate-now continuation). Progress is measured, never derived from ``r``: with
    ``alpha = 0`` this is exactly the outcome form ``r - J(c)``.
    """
    alpha = check_alpha(alpha)
    o = _as_vector("outcome", outcome)
    j = _as_vector("prefix_J", prefix_J)
    p = _as_vector("progress", progress)
    if not (o.shape == j.shape == p.shape):
        raise ValueError(f"outcome {tuple(o.shape)}, prefix_J {tuple(j.shape)} and progress {tuple(p.shape)} must match")
    return (o - j) + alpha * p


def per_episode_dense(
    sequence_advantages: TensorLike, episode_progress: TensorLike, episode_seq: TensorLike, alpha: float
) -> torch.Tensor:
    """MRT-online per-episode values ``[E]``: ``A_seq[episode_seq[e]] + alpha * progress[e]``.

    ``sequence_advantages [S]`` is the outcome advantage of each sequence (e.g. a group baseline),
    ``episode_progress [E]`` the progress ``J_j - J_{j-1}`` of every episode, ``episode_seq [E]`` the
    sequence each episode belongs to. Use with ``episode_ids`` in the fused loss.
    """
    alpha = check_alpha(alpha)
    a = _as_vector("sequence_advantages", sequence_advantages)
    p = _as_vector("episode_progress", episode_progress)
    s = _as_index_vector("episode_seq", episode_seq, p.numel())
    if s.numel() and s.max() >= a.numel():
        raise ValueError(f"episode_seq must index into {a.numel()} sequences, got {s.tolist()}")
    return a[s] + alpha * p
