"""The MRT method: episodes, the meta-prover and progress, rewards/advantages, training plans.

- :mod:`.episodes`   split thinking text into episodes; map them to tokens
- :mod:`.progress`   meta-prover ``J`` at episode boundaries (forced termination), progress
- :mod:`.advantages` ``R = outcome + alpha * progress`` and the three advantage forms
- :mod:`.plans`      GRPO, MRT-RL, MRT-online and MRT-STaR data plans for the trainer
"""

from mrt_fast.mrt.advantages import (
    group_baseline,
    group_std_scale,
    mrt_rewards,
    per_episode_dense,
    termination_advantages,
    termination_baseline,
)
from mrt_fast.mrt.episodes import (
    DEFAULT_CUES,
    EpisodeSplitter,
    EpisodeTrace,
    episode_trace,
    make_splitter,
    response_episodes,
    split_episodes,
    thinking_span,
    token_episode_ids,
    tokenize_episodes,
)
from mrt_fast.mrt.plans import (
    RLPlan,
    SFTExample,
    grpo_plan,
    mrt_online_plan,
    mrt_rl_plan,
    mrt_star_plan,
    score_traces,
)
from mrt_fast.mrt.progress import estimate_J, progress_from_J, run_meta_prover, termination_token_ids

__all__ = [
    "DEFAULT_CUES",
    "EpisodeSplitter",
    "EpisodeTrace",
    "RLPlan",
    "SFTExample",
    "episode_trace",
    "grpo_plan",
    "make_splitter",
    "mrt_online_plan",
    "mrt_rl_plan",
    "mrt_star_plan",
    "score_traces",
    "termination_token_ids",
    "estimate_J",
    "group_baseline",
    "group_std_scale",
    "mrt_rewards",
    "per_episode_dense",
    "progress_from_J",
    "response_episodes",
    "run_meta_prover",
    "split_episodes",
    "termination_advantages",
    "termination_baseline",
    "thinking_span",
    "token_episode_ids",
    "tokenize_episodes",
]
