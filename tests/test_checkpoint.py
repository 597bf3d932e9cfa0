"""Sharded checkpoints: round trip, atomic 'latest', keep_last, compatibility checks, HF export.

These run in-process as a one-rank FSDP2 job (the same code path torchrun takes with more ranks);
the 2-process resume test lives in test_train_distributed.py.
"""

import random

import pytest
import torch
import transformers

from mrt_fast import checkpoint
from mrt_fast.config import RunConfig
from mrt_fast.distributed import destroy_distributed, full_state_dict, init_distributed, shard, transformer_blocks
from mrt_fast.train import build_optimizer


def tiny_config(hidden=32, tie=False):
    return transformers.Qwen2Config(
        vocab_size=67, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie)


@pytest.fixture
def env():
    env = init_distributed()
    yield env
    destroy_distributed()


class NextTokenLM(torch.nn.Module):
    """A root wrapper computing a plain next-token loss in its forward (the checkpoint code is
    agnostic of the loss; the trainer's Actor is tested with the real loss elsewhere)."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, ids):
        logits = self.policy(input_ids=ids).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 67), ids[:, 1:].reshape(-1))


def make(env, seed=0, hidden=32, tie=False):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(hidden, tie))
    cfg = RunConfig()
    cfg.optim.lr = 1e-2
    cfg.optim.scheduler = "cosine"
    actor = shard(NextTokenLM(model), transformer_blocks(model), param_dtype=torch.float32)
    optimizer, scheduler = build_optimizer(actor, cfg)
    return actor, optimizer, scheduler


def train_step(actor, optimizer, scheduler, seed):
    """One real AdamW step (so the optimizer has state to save); returns the loss."""
    g = torch.Generator().manual_seed(seed)
    loss = actor(torch.randint(0, 67, (2, 9), generator=g))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()
    return loss.item()


def params(actor):
    return {k: v.clone() for k, v in full_state_dict(actor).items()}


def test_round_trip_restores_model_optimizer_scheduler_rng_and_trainer_state(env, tmp_path):
    actor, opt, sched = make(env)
    train_step(actor, opt, sched, 1)
    random.seed(123)
    torch.manual_seed(456)
    path = checkpoint.save(tmp_path, 1, actor, opt, scheduler=sched, trainer_state={"data_position": 17})
    expect_rand, expect_torch = random.random(), torch.rand(3)
    expected_params = params(actor)
    expected_next = train_step(actor, opt, sched, 2)

    fresh, opt2, sched2 = make(env, seed=1)
    assert not torch.equal(params(fresh)["policy.lm_head.weight"], expected_params["policy.lm_head.weight"])
    state = checkpoint.load(checkpoint.resolve_resume(tmp_path, "auto"), fresh, opt2, scheduler=sched2)
    assert path == tmp_path / "checkpoints" / "step_1"
    assert state["step"] == 1 and state["trainer"] == {"data_position": 17} and state["rng_restored"]
    assert random.random() == expect_rand and torch.equal(torch.rand(3), expect_torch)
    got = params(fresh)
    assert all(torch.equal(got[k], expected_params[k]) for k in expected_params)
    assert sched2.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"] - 1
    # Optimizer moments came back too: the next step is bit-identical.
    assert train_step(fresh, opt2, sched2, 2) == expected_next
    assert all(torch.equal(a, b) for a, b in zip(params(fresh).values(), params(actor).values()))


def test_failed_write_never_becomes_latest_and_leaves_no_debris(env, tmp_path, monkeypatch):
    actor, opt, sched = make(env)
    checkpoint.save(tmp_path, 1, actor, opt, scheduler=sched)
    train_step(actor, opt, sched, 1)

    def crash(tmp, final):
        raise OSError("simulated failure after the shards were written")

    monkeypatch.setattr(checkpoint, "_commit", crash)
    with pytest.raises(checkpoint.CheckpointError, match="writing checkpoint step 2 .* failed .*simulated failure"):
        checkpoint.save(tmp_path, 2, actor, opt, scheduler=sched)
    root = tmp_path / "checkpoints"
    assert not (root / "step_2.incomplete").exists()  # the partial write was removed ...
    assert checkpoint.latest(tmp_path) == root / "step_1"  # ... and never named latest
    assert checkpoint.resolve_resume(tmp_path, "auto") == root / "step_1"
    assert checkpoint.list_checkpoints(tmp_path) == [root / "step_1"]

    # Debris of a process killed mid-write is never read, and the next write of that step replaces it.
    (root / "step_2.incomplete").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        checkpoint.resolve_resume(tmp_path, str(root / "step_2.incomplete"))
    monkeypatch.undo()
    checkpoint.save(tmp_path, 2, actor, opt, scheduler=sched)
    assert checkpoint.latest(tmp_path) == root / "step_2"
    assert not (root / "step_2.incomplete").exists()


def test_keep_last_prunes_old_checkpoints(env, tmp_path):
    actor, opt, sched = make(env)
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, actor, opt, scheduler=sched, keep_last=2)
    root = tmp_path / "checkpoints"
    assert checkpoint.list_checkpoints(tmp_path) == [root / "step_2", root / "step_3"]
    assert (root / "latest").read_text().strip() == "step_3"
    with pytest.raises(ValueError, match="keep_last"):
        checkpoint.save(tmp_path, 4, actor, opt, keep_last=0)


def test_incompatible_checkpoint_fails_before_loading(env, tmp_path):
    actor, opt, sched = make(env, hidden=32)
    path = checkpoint.save(tmp_path, 1, actor, opt, scheduler=sched)
    other, opt2, _ = make(env, hidden=48)
    with pytest.raises(checkpoint.CheckpointError, match="different model.*shape mismatch"):
        checkpoint.load(path, other, opt2)
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        checkpoint.resolve_resume(tmp_path, str(tmp_path / "nowhere"))
    assert checkpoint.resolve_resume(tmp_path / "fresh", "auto") is None
    assert checkpoint.resolve_resume(tmp_path, None) is None


@pytest.mark.parametrize("tie", [False, True])
def test_hf_export_reloads_with_plain_transformers_and_same_logprobs(env, tmp_path, tie):
    actor, opt, sched = make(env, tie=tie)
    train_step(actor, opt, sched, 1)
    state = full_state_dict(actor, cpu=True)
    template = transformers.AutoModelForCausalLM.from_config(tiny_config(tie=tie))
    out = checkpoint.export_hf(tmp_path / "hf", state, template, strip_prefix="policy.")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    trained = transformers.AutoModelForCausalLM.from_config(tiny_config(tie=tie))
    trained.load_state_dict({k.removeprefix("policy."): v for k, v in state.items()})
    trained.eval()
    ids = torch.randint(0, 67, (3, 11))
    with torch.no_grad():
        lp_a = torch.log_softmax(trained(input_ids=ids).logits.double(), -1)
        lp_b = torch.log_softmax(reloaded(input_ids=ids).logits.double(), -1)
    assert torch.equal(lp_a, lp_b)
    # and the trained weights really are in the export (not the template's random init)
    assert torch.equal(reloaded.lm_head.weight, state["policy.lm_head.weight"])
