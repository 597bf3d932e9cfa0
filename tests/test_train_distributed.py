"""2-process torchrun (gloo, FSDP2) runs of the trainer on a tiny random Qwen2 model.

Each run is a real `python -m torch.distributed.run --nproc_per_node 2 -m mrt_fast.train ...`.
A random model almost never earns a reward, so the runs add a small entropy bonus: the loss and
gradients are then never zero and "same loss" / "same weights" comparisons have teeth.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from mrt_fast.data import build_tiny_tokenizer, tiny_model_config
from mrt_fast.data.synthetic import generate_problems, sft_trace
from mrt_fast.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny untied Qwen2 (so lm_head.weight is its own parameter) + tokenizer + a jsonl dataset."""
    root = tmp_path_factory.mktemp("train_assets")
    tok = build_tiny_tokenizer()
    cfg = tiny_model_config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rng = random.Random(0)
    with open(root / "data.jsonl", "w") as f:
        for p in generate_problems(32, seed=0, difficulty=3):
            f.write(json.dumps({"prompt": p.prompt, "answer": p.answer, "response": sft_trace(p, rng)}) + "\n")
    return root


def common_args(assets, out, algo, steps):
    return [
        "--model.path", str(assets / "model"), "--data.source", str(assets / "data.jsonl"),
        "--data.grader", "exact", "--algo.name", algo, "--train.steps", str(steps),
        "--train.global_batch_size", "4", "--train.mini_batch_size", "2",
        "--rollout.n", "2", "--rollout.max_new_tokens", "10", "--rollout.meta_k", "2",
        "--rollout.meta_max_new_tokens", "6", "--algo.entropy_coef", "0.01",
        "--optim.lr", "3e-3", "--optim.scheduler", "constant", "--optim.warmup_ratio", "0",
        "--eval.num_problems", "2", "--eval.max_new_tokens", "6", "--log.progress_bar", "false",
        "--log.check_weights", "true", "--output-dir", str(out),
    ]


def launch(args, nproc=2, timeout=240):
    env = {**os.environ, "MRT_FAST_KERNEL_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "mrt_fast.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               # --standalone binds a free port itself: a random --master_port can be taken (EADDRINUSE)
               "--standalone", "-m", "mrt_fast.train", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def step_rows(run_dir):
    return [r for r in read_metrics(run_dir) if "actor/grad_norm" in r]


def hf_weights(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


VERL_NAMES = ("reward/mean", "reward/progress/mean", "response_length/mean", "actor/pg_loss",
              "actor/pg_clipfrac", "actor/ppo_kl", "actor/entropy", "actor/grad_norm", "actor/lr",
              "perf/throughput", "timing_s/gen", "timing_s/update_actor", "packing/prefix_dedup_ratio")


@pytest.mark.slow
def test_mrt_rl_two_ranks_and_resume_gives_the_same_next_step(assets, tmp_path):
    full = tmp_path / "full"
    proc = launch(common_args(assets, full, "mrt-rl", 3) + ["--checkpoint.every", "1", "--checkpoint.keep_last", "3"])
    rows = step_rows(full)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for name in VERL_NAMES:
        assert all(name in r for r in rows), name
    assert all(r["actor/pg_loss"] != 0 and r["actor/grad_norm"] > 0 for r in rows)
    # Weights changed every step, and both ranks held identical weights after each step
    # (log.check_weights compares per-rank digests and would have failed the run otherwise).
    assert len({r["debug/weights_sha256"] for r in rows}) == 3
    assert rows[0]["packing/prefix_dedup_ratio"] > 1.0  # MRT-RL continuations share their prefix
    assert "HF export" in proc.stdout and "    after       : " in proc.stdout

    resumed = tmp_path / "resumed"
    launch(common_args(assets, resumed, "mrt-rl", 3) + ["--resume", str(full / "checkpoints" / "step_2")])
    again = step_rows(resumed)
    assert [r["step"] for r in again] == [3]
    for key in ("actor/pg_loss", "actor/entropy", "actor/grad_norm", "reward/mean", "response_length/mean",
                "debug/weights_sha256"):
        assert again[0][key] == rows[2][key], key


@pytest.mark.slow
def test_sft_two_ranks_equal_one_rank(assets, tmp_path):
    """The gradient of every parameter (lm_head.weight included, which the fused loss reads outside
    the model's own forward) is reduced over ranks: 2 ranks x 2 prompts == 1 rank x 4 prompts."""
    two, one = tmp_path / "two", tmp_path / "one"
    launch(common_args(assets, two, "sft", 2))
    launch(common_args(assets, one, "sft", 2), nproc=1)
    rows2, rows1 = step_rows(two), step_rows(one)
    for a, b in zip(rows2, rows1):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
        assert a["actor/grad_norm"] == pytest.approx(b["actor/grad_norm"], rel=1e-4)
    w2, w1 = hf_weights(two / "hf"), hf_weights(one / "hf")
    start = hf_weights(assets / "model")
    assert set(w2) == set(w1) and "lm_head.weight" in w2
    for name in w2:
        assert not torch.equal(w2[name], start[name]) or "norm" in name, f"{name} did not train"
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-6, msg=name)

    # The HF export is what the trainer holds: same weights as the final sharded checkpoint, and
    # plain transformers computes the same log-probs from either.
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(two / "checkpoints" / "step_2"), str(tmp_path / "ckpt.pt"))
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)["model"]
    exported = transformers.AutoModelForCausalLM.from_pretrained(two / "hf", dtype=torch.float32).eval()
    from_ckpt = transformers.AutoModelForCausalLM.from_pretrained(assets / "model", dtype=torch.float32).eval()
    from_ckpt.load_state_dict({k.removeprefix("policy."): v for k, v in state.items()})
    ids = torch.randint(0, exported.config.vocab_size, (2, 13))
    with torch.no_grad():
        a = torch.log_softmax(exported(input_ids=ids).logits.double(), -1)
        b = torch.log_softmax(from_ckpt(input_ids=ids).logits.double(), -1)
    assert torch.equal(a, b)


# Each run also switches on one option: a frozen reference model with the KL penalty, gradient
# checkpointing, sequence-level loss aggregation.
@pytest.mark.parametrize("algo, options", [
    ("grpo", ["--model.reference_model", "true", "--algo.beta", "0.04"]),
    ("mrt-star", ["--model.gradient_checkpointing", "true"]),
    ("mrt-online", ["--model.gradient_checkpointing", "true", "--algo.loss_agg", "seq-mean-token-mean"]),
])
def test_two_rank_run_of_each_algorithm(assets, tmp_path, algo, options):
    out = tmp_path / algo
    launch(common_args(assets, out, algo, 1) + ["--eval.num_problems", "0", "--checkpoint.export_hf", "false", *options])
    rows = step_rows(out)
    assert [r["step"] for r in rows] == [1]
    assert rows[0]["debug/weights_sha256"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_1" and (out / "config.yaml").is_file()
    if algo != "mrt-star":  # a random model keeps no MRT-STaR trace (none is correct): an empty step
        assert rows[0]["actor/grad_norm"] > 0 and "reward/mean" in rows[0]
    if algo == "grpo":  # KL to the reference: 0 on the first mini-batch, > 0 after the first update
        assert 0 < rows[0]["actor/kl_loss"] < 0.1
