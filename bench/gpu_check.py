"""First contact with a GPU: the checks ``bench/gpu_check.sh`` runs, one part per process.

    python bench/gpu_check.py PART [--cpu-dry-run]

prints a markdown section on stdout and exits 1 when a check fails (0 when it passes or a part
does not apply). Parts:

* ``env``       - device, versions, which optional packages import, and that ``mrt_fast.loss``,
                  ``mrt_fast.rollout`` and ``mrt_fast.train`` import with the optional ones blocked.
* ``kernels``   - the Triton kernels (``token_logprobs``, ``fused_policy_loss``) against fp64 at
                  fp32 and bf16: small odd shapes and the headline N=8192, H=4096, V=131072.
* ``loss``      - the headline loss benchmark (bf16, forward + backward) against plain PyTorch,
                  ``torch.compile`` of it and the LM-head matmul (time, peak memory).
* ``attention`` - FlexAttention prefix-tree forward + backward against separate sequences on a
                  Qwen2-shaped model (log-probs and every gradient), then the Qwen2-1.5B-shaped
                  shared vs unshared vs padded step of ``bench_packing.py``.
* ``train``     - one MRT-RL trainer step of a Qwen2-1.5B-shaped random model (``bench_train.py``'s
                  recipe, generation included): generation and update time, tokens/s, MFU, peak
                  memory. (``bench/gpu_train_check.py``, run by the shell script when present,
                  checks the training path itself.)
* ``vllm``      - only where ``import vllm`` works: the engine protocol tests against real vLLM.

``--cpu-dry-run`` runs every part at small shapes on the CPU (the Triton kernels through the
interpreter), to check the script itself where no GPU is at hand; its figures mean nothing.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

OPTIONAL = ("vllm", "flash_attn", "liger_kernel", "datasets", "math_verify", "tensorboard")
HEADLINE = (8192, 4096, 131072)
SMALL_SHAPES = [(61, 40, 509), (257, 96, 1000)]  # odd sizes: off every block boundary
DRY_RUN_SHAPES = [(37, 24, 130)]  # the Triton interpreter on a CPU is slow
# max |got - fp64| / max |fp64|: fp32 runs with TF32 dots on a GPU (~1e-3), bf16 inputs give bf16 outputs.
TOLERANCE = {torch.float32: 5e-3, torch.bfloat16: 3e-2}


def _device(dry_run: bool) -> str:
    if dry_run:
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run bench/gpu_check.sh --cpu-dry-run to check the script on a CPU")
    return "cuda"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> str:
    return f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if torch.cuda.is_available() else "-"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


# --------------------------------------------------------------------------------------------- env


def part_env(dry_run: bool) -> tuple[list[str], bool]:
    lines = ["### Environment", ""]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"- device: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
    else:
        lines.append("- device: CPU only" + (" (--cpu-dry-run)" if dry_run else ""))
    versions = []
    for name in ("torch", "triton", "transformers", "pytest", *OPTIONAL):
        try:
            module = importlib.import_module(name)
            versions.append(f"{name} {getattr(module, '__version__', '?')}")
        except Exception as exc:  # an optional package may fail to import in many ways
            versions.append(f"{name} absent ({type(exc).__name__})")
    lines.append("- packages: " + ", ".join(versions))
    blocked = ",".join(OPTIONAL)
    # None in sys.modules: `import x` fails and importlib.util.find_spec(x) says absent, as if uninstalled.
    code = (f"import sys\nsys.modules.update(dict.fromkeys({OPTIONAL!r}))\n"
            "import mrt_fast.loss, mrt_fast.rollout, mrt_fast.packing, mrt_fast.train\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    ok = proc.returncode == 0
    lines.append(f"- `import mrt_fast.loss, .rollout, .packing, .train` with {blocked} blocked: "
                 + ("ok" if ok else f"FAILED\n\n```\n{proc.stderr[-1500:]}\n```"))
    return lines, ok


# ----------------------------------------------------------------------------------------- kernels


def _reference_grads(hidden, weight, targets, g_logp, chunk: int = 1024):
    """fp64 log-probs and the gradients of sum(g * logp) w.r.t. hidden and weight, in row chunks
    (d logp_i / d logits_i = onehot(t_i) - softmax_i), so the headline shape fits in memory."""
    h, w = hidden.double(), weight.double()
    logp = torch.empty(h.shape[0], dtype=torch.float64, device=h.device)
    dh = torch.empty_like(h)
    dw = torch.zeros_like(w)
    for start in range(0, h.shape[0], chunk):
        rows = slice(start, start + chunk)
        logits = h[rows] @ w.T
        log_soft = torch.log_softmax(logits, -1)
        t = targets[rows]
        logp[rows] = log_soft.gather(1, t[:, None]).squeeze(1)
        dlogits = -log_soft.exp_()
        dlogits.scatter_add_(1, t[:, None], torch.ones_like(t, dtype=torch.float64)[:, None])
        dlogits *= g_logp[rows].double()[:, None]
        dh[rows] = dlogits @ w
        dw += dlogits.T @ h[rows]
        del logits, log_soft, dlogits
    return logp, dh, dw


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _kernel_case(n, h, v, dtype, device) -> list:
    """token_logprobs and the GRPO fused loss on the Triton backend vs fp64; max relative errors."""
    from mrt_fast.kernels import use_backend
    from mrt_fast.loss import fused_policy_loss, token_logprobs

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(device, dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(device, dtype)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    g_logp = torch.randn(n, generator=g).to(device)
    adv = torch.randn(n, generator=g).to(device)
    errors = {}
    t0 = time.perf_counter()
    with use_backend("triton"):
        x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp = token_logprobs(x, w, targets)
        (logp * g_logp).sum().backward()
        ref_logp, ref_dh, ref_dw = _reference_grads(hidden, weight, targets, g_logp)
        errors.update(logp=_rel(logp.detach(), ref_logp), dh=_rel(x.grad, ref_dh), dw=_rel(w.grad, ref_dw))
        del x, w, ref_dh, ref_dw
        # On-policy GRPO, token-mean: loss = mean(-A), d loss / d logp_i = -A_i / N (no clipping at ratio 1).
        x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, _ = fused_policy_loss(x, w, targets, adv)
        loss.backward()
        _, ref_dh, ref_dw = _reference_grads(hidden, weight, targets, -adv / n)
        errors.update(loss=abs(float(loss.detach()) + float(adv.double().mean())) / float(adv.double().abs().mean()),
                      loss_dh=_rel(x.grad, ref_dh), loss_dw=_rel(w.grad, ref_dw))
    _sync()
    worst = max(errors.values())
    ok = worst <= TOLERANCE[dtype]
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    return [f"{n}x{h}x{v}", name, *(f"{errors[k]:.1e}" for k in ("logp", "dh", "dw", "loss", "loss_dh", "loss_dw")),
            f"{time.perf_counter() - t0:.1f}", "ok" if ok else f"FAIL (> {TOLERANCE[dtype]:.0e})"]


def part_kernels(dry_run: bool) -> tuple[list[str], bool]:
    device = _device(dry_run)
    shapes = DRY_RUN_SHAPES if dry_run else SMALL_SHAPES + [HEADLINE]
    rows = []
    for n, h, v in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            try:
                rows.append(_kernel_case(n, h, v, dtype, device))
            except Exception as exc:  # report and go on with the other shapes
                rows.append([f"{n}x{h}x{v}", str(dtype), *["-"] * 7, f"ERROR {type(exc).__name__}: {exc}"[:200]])
            _peak_reset()
    lines = ["### Triton kernels vs fp64", "",
             "Max |kernel - fp64| / max |fp64| of the log-probs and their gradients (`token_logprobs`, "
             "upstream gradient random), and of the on-policy GRPO `fused_policy_loss` and its gradients. "
             + ("Triton interpreter on the CPU, small shapes only." if dry_run else "Triton on CUDA; fp32 uses TF32 dots."),
             "", *_table(["N x H x V", "dtype", "logp", "d hidden", "d weight", "loss", "loss d hidden",
                          "loss d weight", "s", "result"], rows)]
    return lines, all(r[-1] == "ok" for r in rows)


# -------------------------------------------------------------------------------------------- loss


def part_loss(dry_run: bool) -> tuple[list[str], bool]:
    from bench_loss import CPU_SHAPES, Case

    from mrt_fast.kernels import use_backend

    device = _device(dry_run)
    n, h, v = CPU_SHAPES[0] if dry_run else HEADLINE
    rounds = 2 if dry_run else 10
    rows, base_s = [], None
    for impl in ("lm_head_matmul", "fused_loss", "torch_full", "torch_compile"):
        try:
            with use_backend("torch" if dry_run else "auto"):
                case = Case(impl, n, h, v, device)
                _peak_reset()
                base = torch.cuda.memory_allocated() if device == "cuda" else 0
                t_first = time.perf_counter()
                case.run()  # warm-up (compilation for torch.compile and Triton)
                first = time.perf_counter() - t_first
                t0 = time.perf_counter()
                for _ in range(rounds):
                    case.run()
                seconds = (time.perf_counter() - t0) / rounds
            extra = ((torch.cuda.max_memory_allocated() - base - case.grad_bytes()) / 2**20) if device == "cuda" else None
            base_s = seconds if impl == "lm_head_matmul" else base_s
            rows.append([impl, f"{seconds * 1e3:.1f}", f"{seconds / base_s:.2f}x",
                         f"{8 * n * h * v / seconds / 1e12:.3g}", "-" if extra is None else f"{extra:.0f}",
                         f"{first:.1f}"])
            del case
        except torch.OutOfMemoryError:
            rows.append([impl, "OOM", "-", "-", "-", "-"])
        except Exception as exc:
            rows.append([impl, f"ERROR {type(exc).__name__}: {exc}"[:200], "-", "-", "-", "-"])
    dtype = "fp32, chunked PyTorch path" if dry_run else "bf16"
    lines = [f"### Loss forward + backward, N={n}, H={h}, V={v} ({dtype}), mean of {rounds}", "",
             *_table(["implementation", "ms", "vs LM-head matmul", "TFLOP/s (8NHV)", "peak extra MiB",
                      "first call s"], rows),
             "", "Targets: `fused_loss` <= 45 ms and < 1 GiB extra at this shape on an H100."]
    return lines, not any(str(r[1]).startswith("ERROR") for r in rows)


# --------------------------------------------------------------------------------------- attention


def _flex_matches_separate(device: str) -> tuple[list, bool]:
    import transformers

    from mrt_fast.packing import PrefixGroup, pack, packed_logprobs

    config = transformers.Qwen2Config(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(device, torch.float32)
    g = torch.Generator().manual_seed(1)

    def toks(k):
        return torch.randint(0, 1000, (k,), generator=g).tolist()

    groups = [PrefixGroup(toks(600), [toks(150), toks(97), toks(200)]), PrefixGroup(toks(33), [toks(60), toks(1)])]
    weights = {(gi, k): torch.randn(len(c), generator=g).to(device)
               for gi, grp in enumerate(groups) for k, c in enumerate(grp.continuations)}
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref = {}
        for gi, grp in enumerate(groups):
            for k, cont in enumerate(grp.continuations):
                seq = torch.tensor(grp.prefix + cont, device=device)[None]
                logp = torch.log_softmax(model(input_ids=seq).logits[0].double(), -1)
                pos = torch.arange(len(grp.prefix), seq.shape[1], device=device)
                ref[(gi, k)] = logp[pos - 1, seq[0, pos]]
        sum(torch.dot(weights[key].double(), lp) for key, lp in ref.items()).backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        # FlexAttention has no backward on the CPU: the dry run checks the same path with SDPA.
        backend = "sdpa" if device == "cpu" else "flex"
        (batch,) = pack(groups)
        got = dict(zip(batch.sequence_keys, packed_logprobs(model, batch, backend=backend)))
        sum(torch.dot(weights[key], lp) for key, lp in got.items()).backward()
        logp_err = max(_rel(got[k], ref[k].detach()) for k in ref)
        grad_err = max(_rel(p.grad, ref_grads[n].double()) for n, p in model.named_parameters())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    ok = logp_err < 1e-4 and grad_err < 1e-3
    row = [backend, f"{batch.num_tokens} / {batch.unshared_tokens}", f"{logp_err:.1e}", f"{grad_err:.1e}",
           "ok" if ok else "FAIL (logp < 1e-4, grads < 1e-3)"]
    return row, ok


def part_attention(dry_run: bool) -> tuple[list[str], bool]:
    from bench_packing import StepCase, VARIANTS

    device = _device(dry_run)
    lines = ["### Prefix-tree attention", "",
             "Forward + backward of a Qwen2-shaped model (3 layers, hidden 256, fp32, TF32 off) over two "
             "shared-prefix groups, packed with prefix-tree attention, against each prefix + continuation "
             "run separately: max relative error of the log-probs and of every parameter gradient.", ""]
    try:
        row, ok = _flex_matches_separate(device)
    except Exception as exc:
        row, ok = ["-", "-", "-", "-", f"ERROR {type(exc).__name__}: {exc}"[:300]], False
    lines += _table(["backend", "packed / separate tokens", "log-probs", "gradients", "result"], [row])
    shape = "P=512, G=4, R=64, tiny Qwen2, fp32" if dry_run else "P=8192, G=8, R=1024, Qwen2-1.5B shape, bf16, grad. ckpt."
    rows = []
    for variant in VARIANTS:
        try:
            _peak_reset()
            case = StepCase(variant, device)
            case.step()  # warm-up: FlexAttention compiles
            times = []
            for _ in range(2 if dry_run else 3):
                t0 = time.perf_counter()
                case.step()
                times.append(time.perf_counter() - t0)
            best = min(times)
            rows.append([variant, case.tokens, f"{best * 1e3:.0f}", f"{case.separate_tokens / best:,.0f}", _peak_gib()])
            del case
        except torch.OutOfMemoryError:
            rows.append([variant, "-", "OOM", "-", "-"])
        except Exception as exc:
            rows.append([variant, "-", f"ERROR {type(exc).__name__}: {exc}"[:200], "-", "-"])
    lines += ["", f"Training step (forward + backward), one group, {shape}; tokens/s counts the separate "
              "sequences' tokens. Target: packed_shared >= 3x faster than packed_unshared.", "",
              *_table(["variant", "tokens computed", "best ms", "tokens/s", "peak GiB"], rows)]
    return lines, ok and not any(str(r[2]).startswith("ERROR") for r in rows)


# ------------------------------------------------------------------------------------------- train


def part_train(dry_run: bool) -> tuple[list[str], bool]:
    import bench_train

    from mrt_fast.distributed import destroy_distributed

    _device(dry_run)
    setup = dict(bench_train.SETUPS["cpu-tiny" if dry_run else "gpu-qwen2-1.5b"])
    if not dry_run:  # inside the part's time box; bench_train.py runs 8 x 8 x 512
        setup.update(n=4, new_tokens=128)
    _peak_reset()
    step, stats = bench_train._step_runner(setup, "mrt-rl")
    try:
        t0 = time.perf_counter()
        step()  # warm-up: allocator, FlexAttention compilation
        first = time.perf_counter() - t0
        step()
    finally:
        destroy_distributed()
    shape = ("tiny Qwen2, fp32, CPU" if dry_run else
             "Qwen2-1.5B shape (random weights), bf16 compute, fp32 master weights, FlexAttention, grad. ckpt., HF engine")
    row = [f"{setup['prompts']} x {setup['n']}, {setup['new_tokens']} new", f"{first:.1f}", f"{stats['gen_s']:.1f}",
           f"{stats['update_s']:.2f}", f"{stats['gen_tokens_per_s']:,.0f}", f"{stats['update_tokens_per_s']:,.0f}",
           f"{stats['packed_tokens']:,.0f}",
           f"{100 * stats['update_mfu']:.1f}%" if "update_mfu" in stats else "-", _peak_gib()]
    lines = [f"### One MRT-RL trainer step ({shape}, one rank)", "",
             *_table(["prompts x samples", "first step s", "generation s", "update s", "gen tokens/s",
                      "update tokens/s", "packed tokens", "update MFU", "peak GiB"], [row])]
    return lines, True


# -------------------------------------------------------------------------------------------- vllm


def part_vllm(dry_run: bool) -> tuple[list[str], bool]:
    try:
        import vllm
    except Exception as exc:
        return [f"### vLLM", "", f"skipped: `import vllm` fails ({type(exc).__name__}: {exc})"[:300]], True
    from mrt_fast.rollout.vllm_engine import check_vllm_version

    lines = ["### vLLM", "", f"vllm {vllm.__version__}"]
    try:
        check_vllm_version(vllm.__version__)
    except ImportError as exc:
        return lines + [f"unsupported: {exc}"], False
    if dry_run or not torch.cuda.is_available():
        return lines + ["skipped: the vLLM engine needs a GPU"], True
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_rollout_engine.py", "-q", "-p", "no:cacheprovider",
                           "-k", "vllm and not fake"], cwd=ROOT, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1:] or ["(no output)"]
    lines += [f"engine protocol tests against real vLLM: {tail[0]}"]
    if proc.returncode != 0:
        lines += ["", "```", proc.stdout[-3000:], "```"]
    return lines, proc.returncode == 0


PARTS = {"env": part_env, "kernels": part_kernels, "loss": part_loss, "attention": part_attention,
         "train": part_train, "vllm": part_vllm}


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "--cpu-dry-run"]
    if len(args) != 1 or args[0] not in PARTS:
        print(f"usage: python bench/gpu_check.py {{{','.join(PARTS)}}} [--cpu-dry-run]", file=sys.stderr)
        return 2
    dry_run = "--cpu-dry-run" in argv
    if dry_run:
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    lines, ok = PARTS[args[0]](dry_run)
    print("\n".join(lines) + "\n", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
