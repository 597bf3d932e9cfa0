"""The trainer's failure behaviour and its building blocks, in-process (a one-rank FSDP2 job).

Multi-rank runs of every algorithm are in test_train_distributed.py.
"""

import importlib.util
import json
import math
import os
import random
import re
import signal
import subprocess
import sys

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


def sft_argv(assets, out, steps=3, **extra):
    argv = ["--model.path", str(assets / "model"), "--data.source", str(assets / "data.jsonl"),
            "--algo.name", "sft", "--train.steps", str(steps), "--train.global_batch_size", "2",
            "--train.mini_batch_size", "2", "--optim.lr", "1e-3", "--eval.num_problems", "0",
            "--log.progress_bar", "false", "--log.plots", "false", "--checkpoint.every", "1",
            "--checkpoint.export_hf", "false", "--output-dir", str(out)]
    for key, value in extra.items():
        argv += [f"--{key}", str(value)]
    return argv


def sft_config(assets, out, steps=3, **extra):
    return parse_args(sft_argv(assets, out, steps, **extra)).config


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


def test_ctrl_c_checkpoints_at_the_end_of_the_step_and_resume_continues(assets, tmp_path, monkeypatch, capsys):
    sync = train.sync_engine
    calls = {"n": 0}

    def sync_then_interrupt(engine, actor):
        sync(engine, actor)
        calls["n"] += 1
        if calls["n"] == 2:  # the first sync is at start-up; the second ends step 1
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train, "sync_engine", sync_then_interrupt)
    rc = train.main(sft_argv(assets, tmp_path, steps=5, **{"checkpoint.every": 0}))
    out = capsys.readouterr().out
    assert rc == 130  # 128 + SIGINT: a scheduler can tell it from a finished run
    assert "interrupted at step 1 (SIGINT)" in out
    assert f"resume with   : python -m mrt_fast.train --config {tmp_path / 'config.yaml'} --resume auto" in out
    assert checkpoint.latest(tmp_path) == tmp_path / "checkpoints" / "step_1"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored

    monkeypatch.setattr(train, "sync_engine", sync)
    summary = train.run(sft_config(assets, tmp_path, steps=2, resume="auto", **{"checkpoint.every": 0}))
    assert summary["status"] == "completed" and summary["step"] == 2
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]

    # --export-only: an HF export of the latest checkpoint, no training; eval --model <run dir> finds it
    summary = train.run(sft_config(assets, tmp_path, resume="auto"), export_only=True)
    exported = transformers.AutoModelForCausalLM.from_pretrained(summary["hf_export"])
    assert summary["step"] == 2 and exported.config.hidden_size == 32
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    from mrt_fast.eval.cli import find_export

    assert find_export(tmp_path) == tmp_path / "hf-step_2"


def test_export_only_refuses_without_a_checkpoint(assets, tmp_path, capsys):
    assert train.main(sft_argv(assets, tmp_path) + ["--export-only"]) == 2
    assert "--export-only exports a checkpoint: add --resume auto" in capsys.readouterr().err
    assert train.main(sft_argv(assets, tmp_path, resume="auto") + ["--export-only"]) == 2
    assert "has no checkpoint to export" in capsys.readouterr().err
    assert not list(tmp_path.glob("hf*"))


@pytest.mark.parametrize("override, message", [
    ({"data.prompt_column": "question"}, r"is missing column\(s\) \['question'\].*set data.prompt_column"),
    ({"data.source": "/no/such.jsonl"}, r"data.source='/no/such.jsonl' does not exist"),
    ({"model.path": "/no/such/model"}, r"model.path='/no/such/model' does not exist"),
    ({"eval.num_problems": 16}, r"has 16 rows: too few to hold out eval.num_problems=16"),
])
def test_bad_inputs_fail_before_any_compute(assets, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        train.run(sft_config(assets, tmp_path, **override))
    train.destroy_distributed()
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("lines, grader, message", [
    (['{"prompt": "p", "answer": "1", "response": "r"}', '{"prompt": "q", "answer": '], "exact",
     r"data.source='.*bad.jsonl': line 2 is not valid JSON"),
    (['{"prompt": "p", "answer": "1", "response": "r"}', '[1, 2]'], "exact", r"line 2 is not a JSON object"),
    (['{"prompt": "p", "answer": "1", "response": "r"}', '{"prompt": "q", "answer": null, "response": "r"}'],
     "exact", r"row 1 has no usable 'answer' value"),
    pytest.param(['{"prompt": "p", "answer": "1/2", "response": "r"}', '{"prompt": "q", "answer": "}{", "response": "r"}'],
                 "math", r"data.grader='math' cannot grade 1 answer\(s\) of data.source=.*row 1: ",
                 marks=pytest.mark.skipif(importlib.util.find_spec("math_verify") is None,
                                          reason="the math grader needs the optional math-verify package")),
])
def test_bad_data_rows_are_found_at_load_naming_the_config_key(assets, tmp_path, lines, grader, message, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    argv = sft_argv(assets, tmp_path / "run", **{"data.source": data, "data.grader": grader})
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_held_out_rows_of_a_data_file_are_not_trained_on(assets, tmp_path):
    from mrt_fast.data.problems import describe_eval_source, load_eval_examples, load_examples

    cfg = sft_config(assets, tmp_path, **{"eval.num_problems": 4})
    train_rows, eval_rows = load_examples(cfg), load_eval_examples(cfg)
    assert len(train_rows) == 12 and len(eval_rows) == 4
    assert not {ex.prompt for ex in train_rows} & {ex.prompt for ex in eval_rows}
    assert "last 4 rows" in describe_eval_source(cfg) and "held out of training" in describe_eval_source(cfg)
    cfg = sft_config(assets, tmp_path, **{"eval.num_problems": 4, "eval.source": assets / "data.jsonl"})
    assert len(load_examples(cfg)) == 16 and len(load_eval_examples(cfg)) == 4  # a separate source: nothing held out


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


# The default job's code path must not import these (the GPU image lacks them); `import x` fails
# for a module whose sys.modules entry is None.
NO_OPTIONAL_PACKAGES = """
import sys
for name in ("datasets", "math_verify"):
    sys.modules[name] = None
from mrt_fast.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not WARM_START.is_file(), reason="the warm-started tiny checkpoint is not shipped yet")
def test_embedded_default_job_runs_end_to_end_in_small(tmp_path):
    """The no-argument job (embedded warm start, synthetic task, MRT-RL, evaluation), shrunk, without
    datasets or math-verify: it prints its directory and plan first, shows its own evaluation bars,
    writes the curves PNG, and its evaluation equals python -m mrt_fast.eval's with the same settings."""
    small = ["--train.steps", "1", "--train.global_batch_size", "2", "--train.mini_batch_size", "2",
             "--rollout.n", "2", "--rollout.max_new_tokens", "64", "--rollout.meta_k", "2",
             "--eval.num_problems", "2", "--eval.samples", "2", "--eval.max_new_tokens", "64", "--eval.meta_k", "2",
             "--log.tensorboard", "false", "--output-dir", str(tmp_path)]
    assert parse_args(small).config.algo.name == "mrt-rl" and parse_args(small).config.model.path == "embedded"
    proc = subprocess.run([sys.executable, "-c", NO_OPTIONAL_PACKAGES, *small], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = proc.stdout.splitlines()[:6]
    assert first[0] == f"[mrt_fast.train] run directory : {tmp_path}"
    assert first[1].startswith("[mrt_fast.train] model         : the shipped tiny warm start")
    assert "algorithm     : mrt-rl" in first[3] and "steps         : 1 x 2 prompts" in first[4]
    assert "evaluation    : pass@1 (T=0.6, top-p 0.95, 2 samples, 64 tokens) before and after" in first[5]
    assert "eval before training" in proc.stderr and "eval after training" in proc.stderr  # their own bars
    assert proc.stderr.index("eval before training") < proc.stderr.index("train:")
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 1]  # eval before, the step, eval after
    assert "reward/progress/mean" in rows[1] and 0 <= rows[2]["eval/accuracy"] <= 1
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert (tmp_path / "training_curves.png").stat().st_size > 10_000
    assert f"curves        : {tmp_path / 'training_curves.png'}" in proc.stdout
    trainer_eval = json.loads((tmp_path / "eval.json").read_text())
    assert trainer_eval["label"] == "pass@1 (T=0.6, top-p 0.95, 2 samples, 64 tokens)"

    # The same model, problems and settings through python -m mrt_fast.eval: the same numbers.
    from mrt_fast.eval import main as eval_main

    assert eval_main(["--model", str(tmp_path), "--num-problems", "2", "--n", "2", "--max-new-tokens", "64",
                      "--meta-k", "2", "--seed", "0", "--no-progress", "--no-plots", "--out", str(tmp_path / "ev")]) == 0
    cli = json.loads((tmp_path / "ev" / "eval.json").read_text())
    after = trainer_eval["after"]
    assert cli["label"] == trainer_eval["label"]
    assert after["eval/accuracy"] == pytest.approx(cli["pass@1"], abs=1e-12)
    assert after["eval/response_length/mean"] == pytest.approx(cli["mean_tokens"], abs=1e-12)
    assert after["eval/J_at_empty_prefix"] == pytest.approx(cli["J_at_empty_prefix"], abs=1e-12)
    for budget, regret in cli["regret"].items():
        assert after[f"eval/regret@{budget}"] == pytest.approx(regret, abs=1e-12)


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


def test_training_curves_plot_every_logged_series(tmp_path, capsys):
    from mrt_fast.curves import main as curves_main, series, write_training_curves
    from mrt_fast.metrics import MetricsWriter

    assert write_training_curves(tmp_path) is None  # nothing logged yet
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    writer.log(0, {"eval/accuracy": 0.25})
    for step in (1, 2, 3):
        writer.log(step, {"reward/mean": 0.1 * step, "response_length/mean": 100.0 + step, "actor/grad_norm": 1.0,
                          "actor/entropy": float("nan") if step == 2 else 0.5})
    writer.log(3, {"eval/accuracy": 0.5})
    writer.close()
    rows = read_metrics(tmp_path)
    assert series(rows, "eval/accuracy") == ([0, 3], [0.25, 0.5])
    assert series(rows, "actor/entropy") == ([1, 3], [0.5, 0.5])  # a non-finite value is skipped, not drawn
    assert curves_main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'training_curves.png'}"
    assert (tmp_path / "training_curves.png").stat().st_size > 10_000
    assert curves_main([str(tmp_path / "nothing")]) == 2


def test_periodic_evaluation_on_held_out_rows_with_progress_bars(assets, tmp_path, capsys):
    cfg = sft_config(assets, tmp_path, steps=2, **{"eval.num_problems": 2, "eval.every": 1, "eval.samples": 1,
                                                   "eval.max_new_tokens": 6, "eval.meta_k": 1,
                                                   "eval.meta_max_new_tokens": 2, "eval.before_training": "false",
                                                   "log.progress_bar": "true"})
    summary = train.run(cfg)
    rows = read_metrics(tmp_path)
    assert [(r["step"], "eval/accuracy" in r) for r in rows] == [(1, True), (2, True), (2, True)]  # + the final one
    assert summary["eval"]["eval/accuracy"] == rows[-1]["eval/accuracy"]
    err = capsys.readouterr().err
    assert "eval at step 1" in err and "eval at step 2" in err and "eval after training" in err
