"""First-contact checks of the training path on a GPU; prints one markdown section.

    python bench/gpu_train_check.py            # on a CUDA machine (Qwen2-1.5B-shaped trainer step)
    python bench/gpu_train_check.py --cpu      # tiny shapes on the CPU, to check the script itself

Checks, each reported as a table row (exit status 1 if any fails):

1. Process group: the trainer's group maps CPU tensors to gloo and CUDA tensors to NCCL, so the
   CPU control reductions (metrics, non-finite check, stop requests) work; a plain NCCL group
   cannot reduce a CPU tensor.
2. Recompute: packed attention with gradient checkpointing (reentrant and not), `packed_hidden`
   called outside any attention context, on the GPU's default packed backend (flex): gradients
   equal those without checkpointing and those of the separate sequences (plain SDPA), fp32.
3. KV bound: the HF engine under a `max_kv_tokens` smaller than one wave samples the same tokens
   as unbounded, holds at most the bound, and its peak GPU memory drops.
4. Decode speed of the embedded engine (Qwen2-1.5B shape, bf16): ms per decode step and tokens/s
   at 4 and 32 rows, a baseline to compare with vLLM (always "ok": it measures, it does not judge).
5. Trainer step: one GRPO update (FSDP2, bf16 compute, checkpointing, packed prefixes) of a
   Qwen2-1.5B-shaped random model on a synthetic plan: time, tokens/s, MFU from the model-FLOP
   count of `perf/model_flops`, peak memory. Generation is left out: its speed is its own check.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from typing import Any, Callable

import torch
import transformers

QWEN2_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False)


def random_model(shape: dict, device: torch.device, dtype: torch.dtype, **extra: Any) -> torch.nn.Module:
    config = transformers.Qwen2Config(max_position_embeddings=32768, attention_dropout=0.0, **shape, **extra)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.to(dtype)


def random_groups(vocab: int, prompts: int, n: int, prompt_len: int, response_len: int, seed: int = 0):
    from mrt_fast.packing import PrefixGroup

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(prompts):
        lengths = torch.randint(max(1, response_len // 2), response_len + 1, (n,), generator=g).tolist()
        out.append(PrefixGroup(torch.randint(0, vocab, (prompt_len,), generator=g).tolist(),
                               [torch.randint(0, vocab, (r,), generator=g).tolist() for r in lengths]))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------- checks


def check_group(env) -> tuple[bool, str]:
    import torch.distributed as dist

    from mrt_fast.distributed import collective_device
    from mrt_fast.metrics import reduce_mean

    config = dist.get_backend_config()
    cpu = torch.ones(2)
    dist.all_reduce(cpu)
    mean = reduce_mean({"x": 3.0}, {"x": 2.0})
    ok = collective_device().type == "cpu" and mean == {"x": 3.0}
    detail = f"default group `{config}`: CPU all-reduce and reduce_mean ok"
    if env.device.type == "cuda":
        dist.all_reduce(torch.ones(2, device=env.device))
        plain = dist.new_group([0], backend="nccl")
        try:
            dist.all_reduce(torch.ones(2), group=plain)
            detail += "; a plain NCCL group reduced a CPU tensor (unexpected, but harmless)"
        except RuntimeError as exc:
            detail += f"; a plain NCCL group fails as expected (`{str(exc).splitlines()[0][:60]}`)"
        staged = collective_device(plain)
        ok &= staged.type == "cuda"
        detail += f"; helpers stage on `{staged}` there"
    return ok, detail


def check_recompute(device: torch.device) -> tuple[bool, str]:
    from mrt_fast.packing import pack, packed_hidden
    from mrt_fast.packing.attention import default_backend

    backend = default_backend(device)
    torch.manual_seed(0)
    model = random_model(dict(TINY, vocab_size=97), device, torch.float32)
    groups = random_groups(97, prompts=3, n=3, prompt_len=150, response_len=60)
    (batch,) = pack(groups)
    weights = torch.randn(batch.num_targets, 64, device=device)

    def grads(checkpointing: bool | None, reentrant: bool = False, packed: bool = True) -> dict:
        model.zero_grad(set_to_none=True)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.train()
        else:
            model.gradient_checkpointing_disable()
        if packed:
            hidden = packed_hidden(model, batch, backend=backend)
        else:  # each prefix + continuation alone through plain SDPA, hidden states at the same targets
            rows = []
            for group in groups:
                for cont in group.continuations:
                    seq = torch.tensor(group.prefix + cont, device=device)[None]
                    out = model.base_model(input_ids=seq).last_hidden_state[0]
                    rows.append(out[len(group.prefix) - 1: len(group.prefix) + len(cont) - 1])
            hidden = torch.cat(rows)
        (hidden * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        plain = grads(False)
        separate = grads(False, packed=False)
        worst = {}
        for name, kwargs in (("separate", None), ("ckpt", dict(checkpointing=True)),
                             ("ckpt-reentrant", dict(checkpointing=True, reentrant=True))):
            got = separate if kwargs is None else grads(**kwargs)
            worst[name] = max(float((got[k] - plain[k]).norm() / plain[k].norm().clamp_min(1e-30)) for k in plain)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
        model.gradient_checkpointing_disable()
    ok = all(v < 1e-4 for v in worst.values())
    return ok, f"backend {backend}; worst relative gradient error vs packed without checkpointing: " + ", ".join(
        f"{k} {v:.1e}" for k, v in worst.items())


def check_kv_bound(device: torch.device, on_gpu: bool) -> tuple[bool, str]:
    from mrt_fast.rollout import HFEngine, SamplingParams

    shape = dict(QWEN2_1_5B, num_hidden_layers=4) if on_gpu else TINY
    torch.manual_seed(0)
    model = random_model(shape, device, torch.float32).eval()
    prompt_len, n, new = (512, 8, 64) if on_gpu else (24, 4, 8)
    prompts = [g.prefix for g in random_groups(shape["vocab_size"], 4, 1, prompt_len, 1, seed=1)]
    params = SamplingParams(temperature=1.0, max_new_tokens=new, seed=0, ignore_eos=True)
    bound = (prompt_len + n * new) * 2  # two prompts' wave, of four

    def run(max_kv_tokens):
        if on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if on_gpu else 0
        engine = HFEngine(model, max_kv_tokens=max_kv_tokens)
        out = engine.generate(prompts, params, n=n)
        sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if on_gpu else float("nan")
        return [[c.token_ids for c in row] for row in out], engine.peak_kv_tokens, peak

    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        free_tokens, free_kv, free_mb = run(None)
        bounded_tokens, bounded_kv, bounded_mb = run(bound)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    same = sum(a == b for ra, rb in zip(free_tokens, bounded_tokens) for a, b in zip(ra, rb))
    total = sum(len(r) for r in free_tokens)
    ok = same == total and bounded_kv <= bound < free_kv
    detail = f"bound {bound} KV slots; held {bounded_kv} (unbounded {free_kv}); identical samples {same}/{total}"
    if on_gpu:
        detail += f"; peak extra GPU memory {bounded_mb:.0f} MiB bounded vs {free_mb:.0f} MiB unbounded"
    return ok, detail


def check_decode_speed(device: torch.device, on_gpu: bool) -> tuple[bool, str]:
    """Tokens/s of the embedded engine's decode loop: a baseline, not a pass/fail target."""
    from mrt_fast.rollout import HFEngine, SamplingParams

    shape = QWEN2_1_5B if on_gpu else TINY
    torch.manual_seed(0)
    model = random_model(shape, device, torch.bfloat16 if on_gpu else torch.float32).eval()
    rows, prompt_len, new = (4, 512, 128) if on_gpu else (2, 16, 16)
    prompts = [g.prefix for g in random_groups(shape["vocab_size"], rows, 1, prompt_len, 1, seed=3)]
    engine = HFEngine(model)
    details = []
    for n in (1, 8):
        params = SamplingParams(temperature=1.0, max_new_tokens=new, seed=0, ignore_eos=True)
        engine.generate(prompts[:1], SamplingParams(temperature=1.0, max_new_tokens=4, seed=0))  # warm-up
        sync(device)
        t0 = time.perf_counter()
        out = engine.generate(prompts, params, n=n)
        sync(device)
        seconds = time.perf_counter() - t0
        sampled = sum(len(c.token_ids) for row in out for c in row)
        details.append(f"{rows * n} rows: {seconds / new * 1e3:.1f} ms/step, {sampled / seconds:,.0f} tokens/s "
                       f"({new / seconds:.0f} per sequence)")
    return True, f"{shape['num_hidden_layers']} layers, prompt {prompt_len}, {new} new tokens (prefill included); " + \
        "; ".join(details)


def check_train_step(env, args) -> tuple[bool, str]:
    from mrt_fast import train
    from mrt_fast.config import parse_args
    from mrt_fast.metrics import mfu, peak_flops

    on_gpu = env.device.type == "cuda"
    shape = QWEN2_1_5B if on_gpu else TINY
    torch.manual_seed(0)
    model = random_model(shape, torch.device("cpu"), torch.float32)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = parse_args(["--algo.name", "grpo", "--train.global_batch_size", str(args.prompts),
                      "--train.mini_batch_size", str(args.prompts), "--rollout.n", str(args.n),
                      "--train.max_tokens_per_micro_batch", str(args.micro_batch_tokens),
                      "--model.gradient_checkpointing", "true", "--algo.entropy_coef", "0.01"]).config
    actor = train.build_actor(model, cfg, env)
    optimizer, _ = train.build_optimizer(actor, cfg)
    groups = random_groups(shape["vocab_size"], args.prompts, args.n, args.prompt_len, args.response_len)
    g = torch.Generator().manual_seed(2)
    plan = train.Plan(groups, [torch.randn(args.n, generator=g).tolist() for _ in groups], "sequence", {})

    t0 = time.perf_counter()
    train.update(actor, optimizer, plan, cfg, env)  # warm-up: compiles flex and the block mask
    optimizer.zero_grad(set_to_none=True)
    sync(env.device)
    warmup = time.perf_counter() - t0
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(env.device)
    t0 = time.perf_counter()
    metrics = train.update(actor, optimizer, plan, cfg, env)
    sync(env.device)
    seconds = time.perf_counter() - t0
    util = mfu(metrics["perf/model_flops"] / seconds)
    peak = peak_flops(torch.cuda.get_device_name()) if on_gpu else None
    memory = f"{torch.cuda.max_memory_allocated(env.device) / 2**30:.1f} GiB" if on_gpu else "n/a (CPU)"
    ok = metrics["actor/grad_norm"] > 0 and metrics["perf/model_flops"] > 0
    return ok, (f"{args.prompts} prompts x {args.n} (prompt {args.prompt_len}, responses <= {args.response_len}), "
                f"{metrics['packing/micro_batches']:.0f} micro-batches of <= {args.micro_batch_tokens}: "
                f"{seconds:.2f} s (first call {warmup:.1f} s), "
                f"{metrics['perf/packed_num_tokens'] / seconds:,.0f} packed tokens/s "
                f"({metrics['perf/total_num_tokens'] / seconds:,.0f} as separate sequences), "
                f"{metrics['perf/model_flops'] / seconds / 1e12:.3g} model TFLOP/s"
                + (f", MFU {util:.1%} of {peak / 1e12:.0f}" if util is not None else ", MFU n/a")
                + f", peak memory {memory}")


# ----------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (checks the script itself)")
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--response-len", type=int, default=None)
    parser.add_argument("--micro-batch-tokens", type=int, default=None)
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_train_check: no CUDA device; run with --cpu for the tiny CPU version", file=sys.stderr)
        return 2
    defaults = dict(prompts=2, n=2, prompt_len=16, response_len=24, micro_batch_tokens=64) if args.cpu else \
        dict(prompts=8, n=8, prompt_len=256, response_len=1024, micro_batch_tokens=16384)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    from mrt_fast.distributed import destroy_distributed, init_distributed

    if args.cpu:
        import os

        os.environ.setdefault("MRT_FAST_KERNEL_BACKEND", "torch")
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    env = init_distributed()
    device = env.device
    checks: list[tuple[str, Callable[[], tuple[bool, str]]]] = [
        ("1. process group (CPU tensors)", lambda: check_group(env)),
        ("3. recompute under packed attention", lambda: check_recompute(device)),
        ("4. rollout KV bound", lambda: check_kv_bound(device, device.type == "cuda")),
        ("6. embedded engine decode speed", lambda: check_decode_speed(device, device.type == "cuda")),
        ("12. trainer step MFU", lambda: check_train_step(env, args)),
    ]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    lines = [f"## Training path checks ({name}, torch {torch.__version__}, transformers {transformers.__version__})",
             "", "| check | result | details |", "|---|---|---|"]
    failed = 0
    try:
        for title, check in checks:
            try:
                ok, detail = check()
            except Exception as exc:  # report and go on: one broken check must not hide the others
                ok, detail = False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                traceback.print_exc(file=sys.stderr)
            failed += not ok
            lines.append(f"| {title} | {'ok' if ok else 'FAIL'} | {detail} |")
    finally:
        destroy_distributed()
    print("\n".join(lines), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
