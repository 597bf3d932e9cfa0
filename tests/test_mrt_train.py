"""The trainer's MRT wiring, in-process on the shipped tiny model and task: a KL penalty to the reference model
works for every RL algorithm, every step logs the update-scale metrics, and the episode settings
reach the plans."""

import pytest

from mrt_fast import train
from mrt_fast.config import parse_args
from mrt_fast.metrics import read_metrics


def config(out, algo, **extra):
    argv = ["--algo.name", algo, "--data.num_problems", "8", "--train.steps", "2", "--train.global_batch_size", "2",
            "--train.mini_batch_size", "2", "--optim.lr", "1e-2", "--optim.warmup_ratio", "0",
            "--rollout.n", "2", "--rollout.max_new_tokens", "24", "--rollout.meta_k", "2",
            "--rollout.meta_max_new_tokens", "6", "--eval.num_problems", "0", "--log.progress_bar", "false",
            "--checkpoint.export_hf", "false", "--output-dir", str(out)]
    for key, value in extra.items():
        argv += [f"--{key}", str(value)]
    return parse_args(argv).config


@pytest.mark.parametrize("algo", ["grpo", "mrt-rl", "mrt-online"])
def test_kl_to_the_reference_model_for_every_rl_algorithm(tmp_path, algo):
    # The entropy bonus moves the policy even when every advantage is 0 (24 tokens rarely reach an answer).
    cfg = config(tmp_path, algo, **{"algo.beta": 0.02, "model.reference_model": "true",
                                           "algo.entropy_coef": 0.01})
    assert train.run(cfg)["status"] == "completed"
    rows = read_metrics(tmp_path)
    for row in rows:
        for key in ("advantage/mean", "advantage/abs_mean", "actor/entropy", "actor/grad_norm", "actor/kl_loss",
                    "response_length/mean"):
            assert key in row and row[key] == row[key], key  # present and not NaN
    assert rows[0]["actor/kl_loss"] == pytest.approx(0.0, abs=1e-6)  # the reference is the starting policy
    assert rows[1]["actor/kl_loss"] > 0  # after one update the policy has moved away from it


def test_episode_settings_reach_the_plans(tmp_path):
    cfg = config(tmp_path, "grpo", **{"algo.episode_max_episodes": 0})
    model, tok = train.load_model_and_tokenizer(cfg)
    from mrt_fast.rollout import make_engine

    engine = make_engine("hf", model=model.eval(), tokenizer=tok)
    examples = train.load_examples(cfg)[:2]
    grader = train.grader_for(cfg)
    one = train.make_plan(cfg, examples, engine, tok, grader, seed=1)
    assert one.metrics["episodes/mean"] == 1.0  # no cut allowed: every response is one episode
    splitter = train.episode_splitter(config(tmp_path, "grpo", **{"algo.episode_min_gap": 0}))
    assert len(splitter("a\n\nWait b\n\nWait c")) == 3
    assert len(train.episode_splitter(cfg)("a\n\nWait b\n\nWait c")) == 1


def test_batch_normalisation_uses_one_scale_over_all_ranks(monkeypatch):
    """Each rank's plan divides by its own RMS; the trainer rescales to the RMS over every rank."""
    import math

    import torch

    from mrt_fast.mrt.plans import RLPlan
    from mrt_fast.packing import PrefixGroup

    raw = torch.tensor([1.0, -3.0])  # this rank: two sequences of 2 and 1 trained tokens
    local = math.sqrt((1.0 * 2 + 9.0 * 1) / 3)
    rl = RLPlan([PrefixGroup([5], [[1, 2], [3]])], raw / local, "sequence",
                {"advantage/mean": 0.0, "advantage/abs_mean": 1.0}, advantage_scale=local)
    other_rank = torch.tensor([4.0 * 5, 5.0], dtype=torch.float64)  # RMS 2 over 5 tokens
    monkeypatch.setattr(train, "all_reduce_sum", lambda t: t + other_rank)
    train._one_batch_scale(rl)
    overall = math.sqrt((11.0 + 20.0) / 8)
    torch.testing.assert_close(rl.advantages, raw / overall)
    assert rl.advantage_scale == pytest.approx(overall)
    assert rl.metrics["advantage/abs_mean"] == pytest.approx(local / overall)
