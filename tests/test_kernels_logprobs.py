"""Layer 1 (log-prob provider) against a plain fp64 reference: values and grads, both backends.

The Triton kernels run through the interpreter here (TRITON_INTERPRET=1 from conftest), so
shapes stay small; odd sizes put V, H and N off every block boundary (blocks are 16/32/16).
"""

import os

import pytest
import torch

from mrt_fast.kernels import use_backend
from mrt_fast.kernels import reference as R
from mrt_fast.kernels.backend import ENV_VAR, resolve_backend
from mrt_fast.loss import logprobs_from_logits, token_logprobs

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="Triton needs a GPU or TRITON_INTERPRET=1"))]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 inputs: exact fp32 in the interpreter; on a GPU, loose enough for tf32 dots (~3e-4 relative),
# which torch.set_float32_matmul_precision('high') switches on for our kernels as for torch's matmuls.
FP32_TOL = dict(atol=2e-3, rtol=2e-3) if torch.cuda.is_available() else dict(atol=2e-5, rtol=2e-5)


def make_inputs(N, H, V, dtype=torch.float32, scale=1.0, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g, dtype=torch.float64) * scale).to(DEVICE, dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5).to(DEVICE, dtype)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(DEVICE, dtype) if bias else None
    targets = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    return hidden, weight, b, targets


def reference(hidden, weight, bias, targets, temperature, g_logp, g_ent):
    """fp64 values and grads from full logits + log_softmax (autograd)."""
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    leaves.append(bias.detach().double().requires_grad_() if bias is not None else None)
    logits = R.linear_logits(leaves[0], leaves[1], leaves[2], temperature)
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(1, targets[:, None]).squeeze(1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    grads = torch.autograd.grad((logp * g_logp).sum() + (ent * g_ent).sum(), [x for x in leaves if x is not None])
    return logp.detach(), ent.detach(), grads


def run(backend, hidden, weight, bias, targets, temperature, g_logp, g_ent):
    leaves = [t.detach().requires_grad_() for t in (hidden, weight)]
    leaves.append(bias.detach().requires_grad_() if bias is not None else None)
    with use_backend(backend):
        logp, ent = token_logprobs(leaves[0], leaves[1], targets, temperature=temperature, bias=leaves[2],
                                   return_entropy=True)
    grads = torch.autograd.grad((logp * g_logp.to(logp)).sum() + (ent * g_ent.to(ent)).sum(),
                                [x for x in leaves if x is not None])
    return logp, ent, grads


def assert_close_all(got, want, **tol):
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double().cpu(), w.double().cpu(), **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "N,H,V,temperature,bias",
    [
        (1, 16, 17, 1.0, False),  # one token
        (37, 24, 101, 0.7, True),  # V, H, N off every block boundary; temperature != 1
        (20, 48, 300, 1.3, False),  # several vocab tiles
        (5, 7, 33, 1.0, True),  # H below one block
    ],
)
def test_logprobs_entropy_and_grads_match_fp64_reference(backend, N, H, V, temperature, bias):
    hidden, weight, b, targets = make_inputs(N, H, V, bias=bias, seed=N + V)
    g_logp = torch.randn(N, dtype=torch.float64).to(DEVICE)
    g_ent = torch.randn(N, dtype=torch.float64).to(DEVICE)
    want_lp, want_ent, want_g = reference(hidden, weight, b, targets, temperature, g_logp, g_ent)
    logp, ent, grads = run(backend, hidden, weight, b, targets, temperature, g_logp, g_ent)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32 and logp.shape == (N,)
    assert_close_all([logp, ent], [want_lp, want_ent], **FP32_TOL)
    assert_close_all(grads, want_g, **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_of_magnitude_1e4_are_stable(backend):
    # Hidden scaled so that logits reach ~1e4: the online log-sum-exp must not overflow, and the
    # entropy (computed relative to the running max) must not cancel catastrophically.
    hidden, weight, b, targets = make_inputs(9, 16, 45, scale=1.5e4 / 4, bias=False, seed=3)
    g_logp, g_ent = torch.ones(9, dtype=torch.float64), torch.full((9,), 0.5, dtype=torch.float64)
    want_lp, want_ent, want_g = reference(hidden, weight, None, targets, 1.0, g_logp, g_ent)
    logits = R.linear_logits(hidden.double(), weight.double())
    assert logits.abs().max() > 5e3
    logp, ent, grads = run(backend, hidden, weight, None, targets, 1.0, g_logp, g_ent)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    # fp32 logits of size 1e4 carry ~1e-3 absolute rounding; log-probs inherit it.
    torch.testing.assert_close(logp.double().cpu(), want_lp, atol=5e-2, rtol=1e-4)
    torch.testing.assert_close(ent.double().cpu(), want_ent, atol=5e-2, rtol=1e-3)
    for g, w in zip(grads, want_g):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double().cpu(), w, atol=5e-2 * float(w.abs().max()) + 1e-3, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_inputs_within_stated_tolerance(backend, dtype):
    # 16-bit operands, fp32 accumulation: the reference uses the same rounded inputs in fp64, so
    # the remaining error is the 16-bit rounding of dlogits fed to the gradient matmuls
    # (bf16: 8 mantissa bits, ~4e-3 relative).
    hidden, weight, b, targets = make_inputs(19, 40, 77, dtype=dtype, seed=11)
    g = torch.randn(19, dtype=torch.float64)
    want_lp, want_ent, want_g = reference(hidden, weight, b, targets, 1.0, g, 0.5 * g)
    logp, ent, grads = run(backend, hidden, weight, b, targets, 1.0, g, 0.5 * g)
    assert logp.dtype == torch.float32
    assert_close_all([logp, ent], [want_lp, want_ent], atol=1e-4, rtol=1e-4)
    for got, want in zip(grads, want_g):
        torch.testing.assert_close(got.double().cpu(), want, atol=2e-2 * float(want.abs().max()), rtol=2e-2)


def test_torch_path_is_independent_of_chunk_size():
    hidden, weight, b, targets = make_inputs(23, 16, 50, dtype=torch.float64, seed=5)
    outs = []
    for chunk in (1, 7, 23):
        h = hidden.clone().requires_grad_()
        with use_backend("torch"):
            logp = token_logprobs(h, weight, targets, bias=b, chunk_size=chunk)
        (gh,) = torch.autograd.grad(logp.sum(), h)
        outs.append((logp, gh))
    for logp, gh in outs[1:]:
        torch.testing.assert_close(logp, outs[0][0])
        torch.testing.assert_close(gh, outs[0][1])


def test_grads_only_for_leaves_that_need_them():
    hidden, weight, b, targets = make_inputs(6, 16, 20, seed=2)
    h = hidden.requires_grad_()
    logp = token_logprobs(h, weight, targets, bias=b)  # weight and bias frozen
    logp.sum().backward()
    assert h.grad is not None and weight.grad is None and b.grad is None


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_from_logits_matches_log_softmax(temperature):
    logits = torch.randn(3, 5, 41, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 41, (3, 5))
    logp, ent = logprobs_from_logits(logits, targets, temperature, return_entropy=True)
    logp_all = torch.log_softmax(logits / temperature, -1)
    want = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    want_ent = -(logp_all.exp() * logp_all).sum(-1)
    torch.testing.assert_close(logp, want)
    torch.testing.assert_close(ent, want_ent)
    w = torch.randn(3, 5, dtype=torch.float64)
    (g,) = torch.autograd.grad((logp * w).sum() + ent.sum(), logits)
    (g_want,) = torch.autograd.grad((want * w).sum() + want_ent.sum(), logits)
    torch.testing.assert_close(g, g_want)


def test_backend_selection(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(ENV_VAR, "torch")
    assert resolve_backend(cpu) == "torch"
    with use_backend("auto"):
        assert resolve_backend(cpu) == ("triton" if os.environ.get("TRITON_INTERPRET") == "1" else "torch")
        with use_backend("torch"):
            assert resolve_backend(cpu) == "torch"
    monkeypatch.setenv(ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=ENV_VAR):
        resolve_backend(cpu)
    with pytest.raises(ValueError, match="use_backend"):
        with use_backend("cuda"):
            pass
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend(cpu) == "torch"  # auto on CPU without the interpreter
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        resolve_backend(cpu)
