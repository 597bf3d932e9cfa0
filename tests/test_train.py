"""The trainer's failure behaviour and its building blocks, in-process (a one-rank FSDP2 job).

Multi-rank runs of every algorithm are in test_train_distributed.py.
"""

import json
import math
import os
import random
import signal

import pytest
import torch
import transformers

from mrt_fast import checkpoint, train
from mrt_fast.config import parse_args
from mrt_fast.data import build_tiny_tokenizer, tiny_model_config
from mrt_fast.data.synthetic import generate_problems, sft_trace
from mrt_fast.metrics import read_metrics


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_inproc")
    tok = build_tiny_tokenizer()
    cfg = tiny_model_config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rng = random.Random(0)
    with open(root / "data.jsonl", "w") as f:
        for p in generate_problems(16, seed=0, difficulty=3):
            f.write(json.dumps({"prompt": p.prompt, "answer": p.answer, "response": sft_trace(p, rng)}) + "\n")
    return root


def sft_config(assets, out, steps=3, **extra):
    argv = ["--model.path", str(assets / "model"), "--data.source", str(assets / "data.jsonl"),
            "--algo.name", "sft", "--train.steps", str(steps), "--train.global_batch_size", "2",
            "--train.mini_batch_size", "2", "--optim.lr", "1e-3", "--eval.num_problems", "0",
            "--log.progress_bar", "false", "--checkpoint.every", "1", "--checkpoint.export_hf", "false",
            "--output-dir", str(out)]
    for key, value in extra.items():
        argv += [f"--{key}", str(value)]
    return parse_args(argv).config


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(assets, tmp_path, monkeypatch, capsys):
    forward = train.Actor.forward
    calls = {"n": 0}

    def poisoned(self, batch, mode, **kw):  # fault injection: the second step's loss turns NaN
        loss, metrics = forward(self, batch, mode, **kw)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] >= 2 else loss), metrics

    monkeypatch.setattr(train.Actor, "forward", poisoned)
    with pytest.raises(SystemExit) as exc:
        train.run(sft_config(assets, tmp_path))
    assert exc.value.code == 1
    out = capsys.readouterr().out
    assert "stopped at step 2: non-finite loss" in out and "step_1" in out
    assert checkpoint.latest(tmp_path) == tmp_path / "checkpoints" / "step_1"
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_1"]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]


def test_non_finite_gradient_is_caught_before_the_update():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    holder = torch.nn.Module()
    holder.p = p
    env = train.init_distributed()
    try:
        with pytest.raises(train.NonFiniteError, match="gradient norm"):
            train.clip_and_check(holder, 1.0, {"actor/pg_loss": 0.5})
        p.grad = torch.tensor([3.0, 4.0, 0.0])
        assert train.clip_and_check(holder, 1.0, {"actor/pg_loss": 0.5}).item() == pytest.approx(5.0)
        assert torch.linalg.vector_norm(p.grad).item() == pytest.approx(1.0, rel=1e-5)  # clipped
        with pytest.raises(train.NonFiniteError, match="non-finite loss"):
            train.clip_and_check(holder, 1.0, {"actor/pg_loss": math.nan})
    finally:
        train.destroy_distributed()
    assert env.world_size == 1


def test_ctrl_c_checkpoints_at_the_end_of_the_step_and_resume_continues(assets, tmp_path, monkeypatch):
    sync = train.sync_engine
    calls = {"n": 0}

    def sync_then_interrupt(engine, actor):
        sync(engine, actor)
        calls["n"] += 1
        if calls["n"] == 2:  # the first sync is at start-up; the second ends step 1
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train, "sync_engine", sync_then_interrupt)
    summary = train.run(sft_config(assets, tmp_path, steps=5, **{"checkpoint.every": 0}))
    assert summary["status"] == "interrupted" and summary["step"] == 1
    assert checkpoint.latest(tmp_path) == tmp_path / "checkpoints" / "step_1"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored

    monkeypatch.setattr(train, "sync_engine", sync)
    summary = train.run(sft_config(assets, tmp_path, steps=2, resume="auto", **{"checkpoint.every": 0}))
    assert summary["status"] == "completed" and summary["step"] == 2
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]

    # --export-only: an HF export of the latest checkpoint, no training
    summary = train.run(sft_config(assets, tmp_path, resume="auto"), export_only=True)
    exported = transformers.AutoModelForCausalLM.from_pretrained(summary["hf_export"])
    assert summary["step"] == 2 and exported.config.hidden_size == 32
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


@pytest.mark.parametrize("override, message", [
    ({"data.prompt_column": "question"}, r"has no column\(s\) \['question'\]"),
    ({"data.source": "/no/such.jsonl"}, r"data.source='/no/such.jsonl' does not exist"),
    ({"model.path": "/no/such/model"}, r"model.path='/no/such/model' does not exist"),
])
def test_bad_inputs_fail_before_any_compute(assets, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        train.run(sft_config(assets, tmp_path, **override))
    train.destroy_distributed()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_unloadable_model_dir_and_incompatible_checkpoint(assets, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot be loaded as an HF causal LM"):
        train.run(sft_config(assets, tmp_path / "a", **{"model.path": tmp_path / "empty"}))
    train.destroy_distributed()

    # A checkpoint of another model: a wider copy of the tiny model.
    tok = build_tiny_tokenizer()
    wide = tiny_model_config(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=2)
    transformers.AutoModelForCausalLM.from_config(wide).save_pretrained(tmp_path / "wide")
    tok.save_pretrained(tmp_path / "wide")
    train.run(sft_config(assets, tmp_path / "run", steps=1))
    with pytest.raises(checkpoint.CheckpointError, match="different model"):
        train.run(sft_config(assets, tmp_path / "run", steps=2, resume="auto", **{"model.path": tmp_path / "wide"}))
    train.destroy_distributed()
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1]  # nothing ran on the bad resume


def test_data_stream_is_resumable_and_covers_every_example():
    a = train.DataStream(5, seed=3, shuffle=True)
    first = a.take(7)
    assert sorted(first[:5]) == list(range(5))  # an epoch is a permutation
    b = train.DataStream(5, seed=3, shuffle=True, position=4)
    assert b.take(3) == first[4:7]
    assert train.DataStream(4, seed=0, shuffle=False).take(6) == [0, 1, 2, 3, 0, 1]


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_lr_schedule_warmup_then_cosine_or_constant():
    model = torch.nn.Linear(2, 2)
    cfg = parse_args(["--optim.lr", "1.0", "--train.steps", "10", "--optim.warmup_ratio", "0.2",
                      "--optim.min_lr_ratio", "0.1"]).config
    _, sched = train.build_optimizer(model, cfg)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        sched.step()
    assert lrs[:2] == [0.5, 1.0]
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(x >= y for x, y in zip(lrs[1:], lrs[2:]))
    cfg.optim.scheduler = "constant"
    _, sched = train.build_optimizer(model, cfg)
    for _ in range(5):
        sched.step()
    assert sched.get_last_lr()[0] == 1.0


WARM_START = train.Path(train.__file__).parent / "data" / "assets" / "tiny" / "model.safetensors"


@pytest.mark.skipif(not WARM_START.is_file(), reason="the warm-started tiny checkpoint is not shipped yet")
def test_embedded_default_job_runs_end_to_end_in_small(tmp_path):
    """The no-argument job (embedded warm start, synthetic task, MRT-RL, evaluation), shrunk."""
    cfg = parse_args(["--train.steps", "1", "--train.global_batch_size", "2", "--train.mini_batch_size", "2",
                      "--rollout.n", "2", "--rollout.max_new_tokens", "64", "--rollout.meta_k", "2",
                      "--eval.num_problems", "2", "--eval.max_new_tokens", "64", "--eval.meta_k", "2",
                      "--log.progress_bar", "false", "--output-dir", str(tmp_path)]).config
    assert cfg.algo.name == "mrt-rl" and cfg.model.path == "embedded"
    summary = train.run(cfg)
    assert summary["status"] == "completed"
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 1]  # eval before, the step, eval after
    assert "reward/progress/mean" in rows[1] and 0 <= rows[2]["eval/accuracy"] <= 1
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "eval.json").is_file()


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                      "seq-mean-token-sum-norm"])
def test_micro_batch_accumulation_equals_one_big_batch(assets, loss_agg):
    """However the packer splits a mini-batch into micro-batches, the update is the same: each
    micro-batch loss is weighted by its share of the mini-batch's tokens (or sequences)."""
    from mrt_fast.packing import PrefixGroup

    g = torch.Generator().manual_seed(1)
    groups = [PrefixGroup(torch.randint(5, 400, (int(p),), generator=g).tolist(),
                          [torch.randint(5, 400, (int(r),), generator=g).tolist() for r in rs])
              for p, rs in ((7, (3, 9)), (12, (5, 4, 6)), (4, (11,)), (9, (2, 8)))]
    advantages = [torch.randn(len(gr.continuations), generator=g).tolist() for gr in groups]
    plan = train.Plan(groups, advantages, "sequence", {})
    results = []
    for budget in (4096, 30):  # one micro-batch / one per group
        cfg = sft_config(assets, "unused", **{"algo.name": "grpo", "algo.loss_agg": loss_agg, "rollout.n": 2,
                                              "rollout.max_new_tokens": 12,
                                              "train.max_tokens_per_micro_batch": budget})
        env = train.init_distributed()
        try:
            model, _ = train.load_model_and_tokenizer(cfg)
            actor = train.build_actor(model, cfg, env)
            optimizer, _ = train.build_optimizer(actor, cfg)
            metrics = train.update(actor, optimizer, plan, cfg, env)
            # Compare gradients (Adam's first step is ~lr * sign(grad): rounding-level differences of
            # tiny gradients would flip whole updates).
            grads = {n: p.grad.full_tensor().clone() for n, p in actor.named_parameters()}
            results.append((metrics, grads))
        finally:
            train.destroy_distributed()
    (m_one, w_one), (m_many, w_many) = results
    assert m_one["packing/micro_batches"] == 1 and m_many["packing/micro_batches"] >= 3
    assert m_one["actor/grad_norm"] == pytest.approx(m_many["actor/grad_norm"], rel=1e-5)
    for name in w_one:
        torch.testing.assert_close(w_one[name], w_many[name], rtol=1e-4, atol=1e-7, msg=name)
    assert m_one["actor/grad_norm"] > 0


def test_a_local_model_dir_keeps_its_own_tokenization(assets, tmp_path):
    """Regression: AutoTokenizer next to a qwen2 config.json swaps in Qwen2Tokenizer, which splits the
    tiny task's text into different ids; a run from a saved warm start must see what it was trained on."""
    model, tokenizer = train.load_model_and_tokenizer(sft_config(assets, tmp_path / "run"))
    text = "Find the key whose value is 7.\nKeys: b, k, e.<think>\nLet me try k.\n\nk1."
    expected = build_tiny_tokenizer()(text, add_special_tokens=False)["input_ids"]
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == expected
