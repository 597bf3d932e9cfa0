"""End-to-end training-step benchmark: one GRPO / MRT-RL step, time split into generation and update.

Run: ``pytest bench/bench_train.py`` (add ``--benchmark-json out.json`` to keep the figures).

One step of the trainer's recipe, built from the same functions ``mrt_fast.train`` runs
(rollouts and the algorithm's plan -> pack + balance -> fused loss inside the FSDP2 root forward
-> AdamW -> weight sync to the engine), on a one-rank process group:

* CPU: a tiny random Qwen2 (fp32, SDPA packed attention), 4 prompts x 4 samples, 32 new tokens.
* GPU (skipped without CUDA): a Qwen2-1.5B-shaped model with random weights (bf16 compute, fp32
  master weights, FlexAttention), 8 prompts x 8 samples, 512 new tokens, embedded HF engine.

``extra_info`` records generation tokens/s (sampled tokens / generation time), update tokens/s
(prompt + response tokens as separate sequences would hold them / update time), the packed
tokens actually computed, and on a GPU the MFU of the update.
"""

from __future__ import annotations

import time

import pytest
import torch
import transformers

from mrt_fast import train
from mrt_fast.config import parse_args
from mrt_fast.distributed import destroy_distributed, init_distributed
from mrt_fast.metrics import mfu

HAS_CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA device: the Qwen2-1.5B-shaped step needs a GPU"

SETUPS = {
    "cpu-tiny": dict(shape=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2), prompts=4, n=4, new_tokens=32, vocab=None),
    "gpu-qwen2-1.5b": dict(shape=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                      num_attention_heads=12, num_key_value_heads=2), prompts=8, n=8,
                           new_tokens=512, vocab=151936),
}


def _step_runner(setup: dict, algo: str):
    from mrt_fast.data import build_tiny_tokenizer, tiny_model_config
    from mrt_fast.rollout import make_engine

    env = init_distributed()
    tok = build_tiny_tokenizer()
    cfg_model = tiny_model_config(vocab_size=setup["vocab"] or len(tok), tie_word_embeddings=False,
                                  max_position_embeddings=4096, **setup["shape"])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg_model)
    model.config.use_cache = False
    cfg = parse_args([
        "--algo.name", algo, "--train.global_batch_size", str(setup["prompts"]),
        "--train.mini_batch_size", str(setup["prompts"]), "--rollout.n", str(setup["n"]),
        "--rollout.max_new_tokens", str(setup["new_tokens"]), "--rollout.meta_max_new_tokens", "16",
        "--algo.entropy_coef", "0.01", "--train.max_tokens_per_micro_batch", "16384",
        "--model.gradient_checkpointing", str(HAS_CUDA).lower(),
    ]).config
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    rollout_model = transformers.AutoModelForCausalLM.from_config(cfg_model).to(env.device, dtype).eval()
    actor = train.build_actor(model, cfg, env)
    optimizer, _ = train.build_optimizer(actor, cfg)
    engine = make_engine("hf", model=rollout_model, tokenizer=tok)
    train.sync_engine(engine, actor)
    examples = [train.Example(p.prompt, p.answer) for p in __import__(
        "mrt_fast.data.synthetic", fromlist=["generate_problems"]).generate_problems(setup["prompts"], seed=0)]
    grader = train.grader_for(cfg)
    stats: dict[str, float] = {}

    def step() -> None:
        # ignore_eos-like behaviour is not needed: a random model rarely samples EOS early.
        t0 = time.perf_counter()
        plan = train.make_plan(cfg, examples, engine, tok, grader, seed=0)
        plan, _ = train.gather_plan(plan)
        t1 = time.perf_counter()
        metrics = train.update(actor, optimizer, plan, cfg, env)
        train.sync_engine(engine, actor)
        if HAS_CUDA:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        sampled = sum(len(c) for g in plan.groups for c in g.continuations)
        stats.update(gen_s=t1 - t0, update_s=t2 - t1, sampled_tokens=sampled,
                     gen_tokens_per_s=sampled / (t1 - t0),
                     update_tokens_per_s=metrics["perf/total_num_tokens"] / (t2 - t1),
                     packed_tokens=metrics["perf/packed_num_tokens"])
        util = mfu(metrics["perf/model_flops"] / (t2 - t1))
        if util is not None:
            stats["update_mfu"] = util

    return step, stats


@pytest.mark.parametrize("algo", ["grpo", "mrt-rl"])
@pytest.mark.parametrize("setup", [
    "cpu-tiny",
    pytest.param("gpu-qwen2-1.5b", marks=pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)),
])
def test_train_step(benchmark, setup, algo):
    if setup == "cpu-tiny" and HAS_CUDA:
        pytest.skip("the CPU shape is for machines without a GPU")
    step, stats = _step_runner(SETUPS[setup], algo)
    try:
        step()  # warm-up: allocator, FlexAttention compilation
        benchmark.pedantic(step, rounds=2 if setup == "cpu-tiny" else 3, iterations=1)
        benchmark.extra_info.update({k: round(v, 4) for k, v in stats.items()})
        benchmark.extra_info["device"] = torch.cuda.get_device_name() if HAS_CUDA else "cpu"
    finally:
        destroy_distributed()
