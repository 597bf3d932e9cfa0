"""Rewards and the three advantage forms MRT trains with.

All functions take and return fp32 tensors (or anything ``torch.as_tensor`` accepts) and are plain
PyTorch, so they serve the plans and the tests alike. Shapes follow the fused loss
(:func:`mrt_fast.loss.fused_policy_loss`): per-sequence advantages ``[S]`` go with ``seq_ids``,
per-episode advantages ``[E]`` with ``episode_ids``.

- ``R = outcome + alpha * progress`` (:func:`mrt_rewards`).
- Group baseline (GRPO): ``A = R - mean_group(R)``, optionally divided by the group's (unbiased, as
  TRL and verl compute it) standard deviation plus ``eps`` (:func:`group_baseline`).
- Termination baseline (MRT-RL): ``A = R - mean(R of the terminate-now branch)`` within a group, so a
  continuation is rewarded by what it gains over stopping at the prefix (:func:`termination_baseline`).
- Per-episode dense (MRT-online): each episode's tokens get ``A_seq + alpha * progress_episode``
  (:func:`per_episode_dense`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

TensorLike = torch.Tensor | Sequence[float]


def check_alpha(alpha: float) -> float:
    """``alpha`` must be a finite real number (NaN or inf would poison every advantage)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a float, got {type(alpha).__name__}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    return float(alpha)


def _as_vector(name: str, values: TensorLike) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite, got {t.tolist()}")
    return t


def _as_group_ids(group_ids: TensorLike, n: int) -> torch.Tensor:
    g = torch.as_tensor(group_ids)
    if g.dim() != 1 or g.numel() != n:
        raise ValueError(f"group_ids must be 1-D with {n} entries (one per reward), got shape {tuple(g.shape)}")
    if g.dtype.is_floating_point or g.dtype == torch.bool:
        raise TypeError(f"group_ids must be integers, got {g.dtype}")
    if n and g.min() < 0:
        raise ValueError("group_ids must be >= 0")
    return g.long()


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


def group_baseline(
    rewards: TensorLike, group_ids: TensorLike, *, normalize_std: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO advantages: ``R - mean`` within each group (optionally ``/ (std + eps)``).

    ``group_ids[i]`` names the group (problem) of ``rewards[i]``. The standard deviation is the
    unbiased one (TRL, verl); a group of one sample has no spread and gets advantage 0.
    """
    r = _as_vector("rewards", rewards)
    g = _as_group_ids(group_ids, r.numel())
    if r.numel() == 0:
        return r
    mean, counts = _group_mean(r, g, torch.ones_like(r))
    adv = r - mean[g]
    if normalize_std:
        sq, _ = _group_mean(adv.square(), g, torch.ones_like(r))
        var = sq * counts / (counts - 1).clamp(min=1)
        adv = adv / (var.sqrt()[g] + eps)
    return adv


def termination_baseline(rewards: TensorLike, group_ids: TensorLike, is_terminate: TensorLike) -> torch.Tensor:
    """MRT-RL advantages: ``R - mean(R of the group's terminate-now continuations)``.

    Every group must hold at least one terminate-now continuation (the baseline is undefined
    otherwise).
    """
    r = _as_vector("rewards", rewards)
    g = _as_group_ids(group_ids, r.numel())
    term = torch.as_tensor(is_terminate, dtype=torch.bool)
    if term.shape != r.shape:
        raise ValueError(f"is_terminate must have shape {tuple(r.shape)}, got {tuple(term.shape)}")
    if r.numel() == 0:
        return r
    mean, counts = _group_mean(r, g, term.float())
    present = torch.zeros_like(counts).index_add_(0, g, torch.ones_like(r)) > 0
    missing = (present & (counts == 0)).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"groups {missing} have no terminate-now continuation to form the termination baseline")
    return r - mean[g]


def progress_rewards(
    outcome: TensorLike, prefix_J: TensorLike, is_terminate: TensorLike, alpha: float
) -> torch.Tensor:
    """MRT-RL rewards ``R = r + alpha * progress`` for continuations of a prefix with value ``J(c)``.

    A continue-thinking continuation adds thinking after the prefix and ends in an answer graded
    ``r``; its progress is ``r - J(c)`` (the gain over answering at the prefix). A terminate-now
    continuation adds no thinking: progress 0.
    """
    o = _as_vector("outcome", outcome)
    j = _as_vector("prefix_J", prefix_J)
    term = torch.as_tensor(is_terminate, dtype=torch.bool)
    if not (o.shape == j.shape == term.shape):
        raise ValueError(
            f"outcome {tuple(o.shape)}, prefix_J {tuple(j.shape)} and is_terminate {tuple(term.shape)} must match"
        )
    progress = torch.where(term, torch.zeros_like(o), o - j)
    return mrt_rewards(o, progress, alpha)


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
    s = torch.as_tensor(episode_seq)
    if s.shape != p.shape:
        raise ValueError(f"episode_seq {tuple(s.shape)} must match episode_progress {tuple(p.shape)}")
    if s.numel() and (s.min() < 0 or s.max() >= a.numel()):
        raise ValueError(f"episode_seq must index into {a.numel()} sequences, got {s.tolist()}")
    return a[s.long()] + alpha * p
