"""Progress, rewards and each advantage form against hand-computed numbers (and an fp64 reference)."""

import math

import pytest
import torch

from mrt_fast.mrt.advantages import (
    group_baseline,
    mrt_rewards,
    group_std_scale,
    per_episode_dense,
    termination_advantages,
    termination_baseline,
)
from mrt_fast.mrt.progress import check_k, progress_from_J


def close(t, expected):
    torch.testing.assert_close(t, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=1e-6)


def test_progress_is_the_difference_of_consecutive_J():
    # J at the empty prefix and after each of 3 episodes (k = 4 samples: multiples of 1/4).
    close(progress_from_J([0.25, 0.25, 0.75, 0.5]), [0.0, 0.5, -0.25])
    assert progress_from_J([0.5]).numel() == 0
    with pytest.raises(ValueError, match="J"):
        progress_from_J([])


def test_rewards_and_alpha_validation():
    close(mrt_rewards([1.0, 0.0, 1.0], [0.5, -0.25, 0.0], alpha=0.5), [1.25, -0.125, 1.0])
    close(mrt_rewards([1.0, 0.0], [0.5, 0.5], alpha=0), [1.0, 0.0])
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="alpha"):
            mrt_rewards([1.0], [0.0], alpha=bad)
    with pytest.raises(TypeError, match="alpha"):
        mrt_rewards([1.0], [0.0], alpha="1")
    with pytest.raises(ValueError, match="same shape"):
        mrt_rewards([1.0, 0.0], [0.0], alpha=1.0)


def test_k_must_be_positive():
    with pytest.raises(ValueError, match="k must be >= 1"):
        check_k(0)
    with pytest.raises(TypeError, match="k must be an int"):
        check_k(2.0)


def test_group_baseline_by_hand():
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5]
    groups = [0, 0, 0, 0, 1, 1, 2]
    # group 0: mean 0.5 -> +-0.5; group 1: mean 1 -> 0; group 2 (one sample) -> 0
    close(group_baseline(rewards, groups), [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0])
    # unbiased std of group 0 = sqrt(4 * 0.25 / 3) = 0.57735
    s = math.sqrt(1 / 3)
    expected = [0.5 / (s + 1e-6), -0.5 / (s + 1e-6), -0.5 / (s + 1e-6), 0.5 / (s + 1e-6), 0.0, 0.0, 0.0]
    close(group_baseline(rewards, groups, normalize_std=True), expected)


def test_group_baseline_matches_an_fp64_reference_on_random_groups():
    g = torch.randint(0, 5, (37,))
    r = torch.randn(37, dtype=torch.float64)
    ref = torch.empty_like(r)
    for gid in g.unique():
        m = g == gid
        x = r[m] - r[m].mean()
        ref[m] = x / (r[m].std() + 1e-6) if m.sum() > 1 else x * 0
    torch.testing.assert_close(group_baseline(r, g, normalize_std=True), ref.float(), rtol=1e-5, atol=1e-5)


def test_termination_baseline_by_hand():
    # Group 0: terminate-now rewards 1, 0 (mean 0.5); continue rewards 1, 1.5.
    # Group 1: terminate-now reward 0; continue rewards 1.0, 0.0.
    rewards = [1.0, 0.0, 1.0, 1.5, 0.0, 1.0, 0.0]
    groups = [0, 0, 0, 0, 1, 1, 1]
    term = [True, True, False, False, True, False, False]
    close(termination_baseline(rewards, groups, term), [0.5, -0.5, 0.5, 1.0, 0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="no terminate-now"):
        termination_baseline([1.0, 0.0], [0, 1], [True, False])


def test_termination_advantages_by_hand():
    # J(c) = 0.25; continue-thinking outcomes 1 and 0 with measured progress 0.5 and 0.75; terminate-now 1.
    # A = r - J + alpha * progress: 0.75 + 0.25 = 1.0 ; -0.25 + 0.375 = 0.125 ; 0.75 + 0 = 0.75
    close(termination_advantages([1.0, 0.0, 1.0], [0.25] * 3, [0.5, 0.75, 0.0], alpha=0.5), [1.0, 0.125, 0.75])
    # alpha = 0 is exactly the outcome form r - J(c), whatever the progress.
    close(termination_advantages([1.0, 0.0], [0.25, 0.75], [0.5, -0.5], alpha=0.0), [0.75, -0.75])
    # Progress is not implied by the outcome: a failed continuation that made progress can be positive.
    assert termination_advantages([0.0], [0.25], [0.75], alpha=1.0).item() > 0
    with pytest.raises(ValueError, match="must match"):
        termination_advantages([1.0], [0.5, 0.5], [0.0], alpha=1.0)


def test_per_episode_dense_by_hand():
    # Two sequences (outcome advantages 0.5, -0.5); sequence 0 has 3 episodes, sequence 1 has 2.
    values = per_episode_dense([0.5, -0.5], [0.25, 0.0, 0.5, -0.25, 0.75], [0, 0, 0, 1, 1], alpha=2.0)
    close(values, [1.0, 0.5, 1.5, -1.0, 1.0])
    with pytest.raises(ValueError, match="episode_seq"):
        per_episode_dense([0.5], [0.1], [1], alpha=1.0)
    with pytest.raises(ValueError, match="alpha"):
        per_episode_dense([0.5], [0.1], [0], alpha=math.nan)


def test_bad_shapes_and_values_are_named():
    with pytest.raises(ValueError, match="group_ids"):
        group_baseline([1.0, 0.0], [0])
    with pytest.raises(ValueError, match="group_ids must be integers"):
        group_baseline([1.0, 0.0], [0.7, 1.9])  # never truncated to [0, 1]
    close(group_baseline([1.0, 0.0], [0.0, 0.0]), [0.5, -0.5])  # integral floats are ids
    with pytest.raises(TypeError, match="group_ids"):
        group_baseline([1.0, 0.0], [True, False])
    with pytest.raises(ValueError, match="rewards must be finite"):
        group_baseline([1.0, math.nan], [0, 0])
    with pytest.raises(ValueError, match="is_terminate"):
        termination_baseline([1.0, 0.0], [0, 0], [True])


def test_progress_from_J_rejects_values_that_are_not_probabilities():
    for bad in ([0.5, math.nan], [0.1, 5.0], [-0.25, 0.5]):
        with pytest.raises(ValueError, match=r"J holds probabilities"):
            progress_from_J(bad)


def test_std_normalisation_needs_a_positive_eps():
    for eps in (0.0, -1e-6, math.nan):
        with pytest.raises(ValueError, match="eps"):
            group_baseline([1.0, 0.0], [0, 0], normalize_std=True, eps=eps)
    close(group_baseline([1.0, 0.0], [0, 0], eps=0.0), [0.5, -0.5])  # eps unused without normalisation


def test_group_std_scale_leaves_groups_without_spread_unscaled():
    # group 0: rewards 1, 0 (unbiased std sqrt(0.5)); group 1: 0.5, 0.5 (no spread); group 2: one sample.
    scale = group_std_scale([1.0, 0.0, 0.5, 0.5, 1.0], [0, 0, 1, 1, 2], eps=1e-6)
    close(scale, [math.sqrt(0.5) + 1e-6] * 2 + [1.0, 1.0, 1.0])


def test_is_terminate_must_be_boolean():
    with pytest.raises(ValueError, match="is_terminate must hold booleans"):
        termination_baseline([1.0, 0.0], [0, 0], [0.5, 0.0])
    close(termination_baseline([1.0, 0.0], [0, 0], [1, 0]), [0.0, -1.0])


def test_huge_group_ids_are_renumbered_not_allocated():
    # A group id of 10**12 would need a 4 TB table if ids indexed it directly.
    close(group_baseline([1.0, 0.0, 1.0], [10**12, 10**12, 7]), [0.5, -0.5, 0.0])
    close(termination_baseline([1.0, 0.0], [10**12, 10**12], [True, False]), [0.0, -1.0])


def test_episode_seq_ids_are_not_truncated():
    with pytest.raises(ValueError, match="episode_seq must be integers"):
        per_episode_dense([0.5, -0.5], [0.1, 0.2], [0.7, 1.9], alpha=1.0)
    close(per_episode_dense([0.5, -0.5], [0.1, 0.2], [0.0, 1.0], alpha=1.0), [0.6, -0.3])
