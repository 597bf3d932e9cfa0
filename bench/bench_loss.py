"""Loss benchmarks: forward + backward time and peak memory, ours against the alternatives.

Run: ``pytest bench/bench_loss.py`` (add ``--benchmark-json out.json`` to keep the figures).

Implementations, all computing a GRPO clipped loss (on-policy, token-mean) and its gradients
w.r.t. the hidden states and the LM head, at the same shape:

* ``fused_loss``       - mrt_fast.loss.fused_policy_loss (layer 2, 6*N*H*V algorithm)
* ``logprob_provider`` - mrt_fast.loss.token_logprobs (layer 1) + the loss in PyTorch on [N]
* ``torch_full``       - full logits + log_softmax in plain PyTorch (what most code does)
* ``torch_compile``    - torch.compile of ``torch_full``
* ``liger_grpo``       - Liger-Kernel's LigerFusedLinearGRPOLoss (when installed)
* ``lm_head_matmul``   - torch's own LM-head matmul forward + backward (the floor we compare to)

``extra_info`` records TFLOP/s counted as 8*N*H*V (forward 2NHV + backward 6NHV with
recomputation: one convention for all, whatever FLOPs an implementation really spends),
the ratio of the time to ``lm_head_matmul`` at the same shape, and on CUDA the peak memory
above the inputs and their gradients. GPU shapes are bf16 and skip without CUDA (reason stated); the CPU shapes
are small, fp32, and run on the PyTorch paths.
"""

from __future__ import annotations

import time

import pytest
import torch

from mrt_fast.kernels import use_backend
from mrt_fast.loss import fused_policy_loss, token_logprobs

HAS_CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA device: the GPU shapes (bf16, Triton kernels) need one"

GPU_SHAPES = [(n, h, v) for n in (8192, 16384) for h in (1536, 4096) for v in (131072, 151936)]
CPU_SHAPES = [(512, 256, 8192)]
IMPLS = ["fused_loss", "logprob_provider", "torch_full", "torch_compile", "liger_grpo", "lm_head_matmul"]
SEQ_LEN = {"cuda": 1024, "cpu": 128}  # tokens per sequence: advantages are per sequence


def grpo_terms(logp: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    ratio = torch.exp(logp - logp.detach())
    return torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2)).mean()


def torch_full(hidden, weight, targets, adv_tok):
    logits = (hidden @ weight.T).float()
    logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    return grpo_terms(logp, adv_tok)


class Case:
    """Inputs of one shape and a ``step()`` that runs forward + backward of one implementation."""

    def __init__(self, impl: str, n: int, h: int, v: int, device: str):
        self.impl, self.device = impl, torch.device(device)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        g = torch.Generator(device="cpu").manual_seed(0)
        self.hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
        self.weight = (torch.randn(v, h, generator=g) / h**0.5).to(device, dtype).requires_grad_()
        self.targets = torch.randint(0, v, (n,), generator=g).to(device)
        t = SEQ_LEN[device] if n % SEQ_LEN[device] == 0 else n
        self.batch, self.seq_len = n // t, t
        self.adv_seq = torch.randn(self.batch, generator=g).to(device)
        self.seq_ids = torch.arange(self.batch, device=device).repeat_interleave(t)
        self.adv_tok = self.adv_seq[self.seq_ids]
        self.step = getattr(self, f"_{impl}")()

    def _fused_loss(self):
        def step():
            loss, _ = fused_policy_loss(self.hidden, self.weight, self.targets, self.adv_seq, seq_ids=self.seq_ids)
            loss.backward()

        return step

    def _logprob_provider(self):
        def step():
            grpo_terms(token_logprobs(self.hidden, self.weight, self.targets), self.adv_tok).backward()

        return step

    def _torch_full(self):
        return lambda: torch_full(self.hidden, self.weight, self.targets, self.adv_tok).backward()

    def _torch_compile(self):
        compiled = torch.compile(torch_full)
        return lambda: compiled(self.hidden, self.weight, self.targets, self.adv_tok).backward()

    def _liger_grpo(self):
        liger = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is not installed")
        module = liger.LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="bnpo",
                                                compiled=self.device.type == "cuda")
        x = self.hidden.view(self.batch, self.seq_len, -1)
        mask = torch.ones(self.batch, self.seq_len, device=self.device)
        targets = self.targets.view(self.batch, self.seq_len)

        def step():
            loss, _ = module(x, self.weight, targets, mask, self.adv_seq)
            loss.backward()

        return step

    def _lm_head_matmul(self):
        grad = torch.randn(self.hidden.shape[0], self.weight.shape[0], device=self.device, dtype=self.hidden.dtype)
        return lambda: (self.hidden @ self.weight.T).backward(grad)

    def grad_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.hidden, self.weight))

    def run(self):
        self.hidden.grad = self.weight.grad = None
        self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()


_matmul_seconds: dict[tuple, float] = {}


def matmul_seconds(n, h, v, device, rounds) -> float:
    """Mean time of torch's LM-head matmul forward + backward at this shape (cached per shape)."""
    key = (n, h, v, device)
    if key not in _matmul_seconds:
        case = Case("lm_head_matmul", n, h, v, device)
        case.run()
        start = time.perf_counter()
        for _ in range(rounds):
            case.run()
        _matmul_seconds[key] = (time.perf_counter() - start) / rounds
        del case
    return _matmul_seconds[key]


def shape_params():
    for n, h, v in GPU_SHAPES:
        yield pytest.param("cuda", n, h, v, id=f"cuda-bf16-N{n}-H{h}-V{v}",
                           marks=pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA))
    for n, h, v in CPU_SHAPES:
        yield pytest.param("cpu", n, h, v, id=f"cpu-fp32-N{n}-H{h}-V{v}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device,n,h,v", list(shape_params()))
def test_loss_fwd_bwd(benchmark, bench_device, impl, device, n, h, v):
    rounds, warmup = (10, 2) if device == "cuda" else (3, 1)
    # Our CPU path is the chunked PyTorch one; never the interpreter, even if TRITON_INTERPRET is set.
    with use_backend("auto" if device == "cuda" else "torch"):
        try:
            case = Case(impl, n, h, v, device)
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            benchmark.pedantic(case.run, rounds=rounds, warmup_rounds=warmup, iterations=1)
        except torch.OutOfMemoryError:
            pytest.skip(f"{impl} runs out of device memory at N={n}, H={h}, V={v}")
    seconds = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        device=bench_device, dtype="bf16" if device == "cuda" else "fp32", N=n, H=h, V=v,
        tflops_8nhv=8 * n * h * v / seconds / 1e12,
        ratio_to_lm_head_matmul=seconds / matmul_seconds(n, h, v, device, rounds),
        # Above the inputs and their gradients (dh, dW are outputs every implementation must hold).
        peak_extra_mib=(torch.cuda.max_memory_allocated() - base - case.grad_bytes()) / 2**20 if device == "cuda" else None,
    )
