"""Layer 2 (fused policy loss) against the fp64 full-logits reference: loss, grads, metrics.

Reference = full ``[N, V]`` fp64 logits + ``log_softmax`` + ``reference.policy_token_terms`` +
``reference.aggregation_weights`` under autograd; test_loss_parity.py holds that reference to
verl's and TRL's own formulas. Both backends run: chunked PyTorch and Triton (interpreter on CPU).
"""

import os

import pytest
import torch

from mrt_fast.kernels import reference as R
from mrt_fast.kernels import use_backend
from mrt_fast.loss import MRTPolicyLoss, fused_policy_loss, policy_loss_from_logits

TRITON_OK = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not TRITON_OK, reason="Triton needs a GPU or TRITON_INTERPRET=1"))]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: exact in the interpreter; loose enough on a GPU for tf32 dots (set_float32_matmul_precision("high")).
TOL = dict(atol=2e-3, rtol=2e-3) if torch.cuda.is_available() else dict(atol=3e-5, rtol=3e-5)


def make_batch(N=29, H=24, V=83, S=4, E=6, dtype=torch.float32, scale=1.0, seed=0, old_noise=0.6):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g, dtype=torch.float64) * scale).to(DEVICE, dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5).to(DEVICE, dtype)
    bias = (0.5 * torch.randn(V, generator=g, dtype=torch.float64)).to(DEVICE, dtype)
    targets = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    seq_ids = torch.sort(torch.randint(0, S, (N,), generator=g)).values.to(DEVICE)
    episode_ids = torch.randint(0, E, (N,), generator=g).to(DEVICE)
    mask = (torch.rand(N, generator=g) > 0.25).float().to(DEVICE)
    with torch.no_grad():
        z = R.linear_logits(hidden.double(), weight.double(), bias.double())
        logp, _ = R.logprobs_and_entropy(z, targets)
    old = (logp + old_noise * torch.randn(N, generator=g, dtype=torch.float64).to(DEVICE)).float()
    ref = (logp + 0.3 * torch.randn(N, generator=g, dtype=torch.float64).to(DEVICE)).float()
    adv = {"token": torch.randn(N, generator=g), "sequence": torch.randn(S, generator=g),
           "episode": torch.randn(E, generator=g)}
    return dict(hidden=hidden, weight=weight, bias=bias, targets=targets, seq_ids=seq_ids, episode_ids=episode_ids,
                loss_mask=mask, old=old, ref=ref, adv={k: v.to(DEVICE) for k, v in adv.items()}, S=S)


def reference_loss(b, adv, *, use_bias, old_logprobs, ref_logprobs, seq_ids, episode_ids, loss_mask, loss_agg,
                   temperature, max_len=None, **cfg):
    """fp64 loss and grads from full logits (autograd)."""
    leaves = [b["hidden"].double().requires_grad_(), b["weight"].double().requires_grad_()]
    bias = b["bias"].double().requires_grad_() if use_bias else None
    logits = R.linear_logits(leaves[0], leaves[1], bias, temperature)
    logp, ent = R.logprobs_and_entropy(logits, b["targets"])
    if episode_ids is not None:
        adv_tok = adv[episode_ids]
    elif adv.shape[0] == logp.shape[0]:
        adv_tok = adv
    else:
        adv_tok = adv[seq_ids]
    term, stats = R.policy_token_terms(
        logp, ent, adv_tok.double(), old_logprobs=None if old_logprobs is None else old_logprobs.double(),
        ref_logprobs=None if ref_logprobs is None else ref_logprobs.double(), **cfg)
    num_seqs = adv.shape[0] if (episode_ids is None and seq_ids is not None and adv.shape[0] != logp.shape[0]) else None
    w = R.aggregation_weights(loss_mask if loss_mask is not None else torch.ones_like(logp), seq_ids, loss_agg,
                              num_seqs=num_seqs, max_len=max_len)
    loss = R.weighted_sum(term, w)
    grads = torch.autograd.grad(loss, leaves + ([bias] if use_bias else []))
    return loss.detach(), grads, logp.detach(), stats, ent.detach()


def run_both(backend, b, layout="sequence", *, use_bias=True, with_old=True, with_ref=True, use_mask=True,
             loss_agg="token-mean", temperature=1.0, tol=TOL, **cfg):
    adv = b["adv"][layout]
    kwargs = dict(
        old_logprobs=b["old"] if with_old else None, ref_logprobs=b["ref"] if with_ref else None,
        seq_ids=b["seq_ids"], episode_ids=b["episode_ids"] if layout == "episode" else None,
        loss_mask=b["loss_mask"] if use_mask else None, loss_agg=loss_agg, temperature=temperature, **cfg)
    cfg_ref = {k: v for k, v in kwargs.items() if k in ("eps_low", "eps_high", "dual_clip", "beta", "kl_estimator", "entropy_coef")}
    want_loss, want_grads, want_logp, stats, want_ent = reference_loss(
        b, adv, use_bias=use_bias, **{k: v for k, v in kwargs.items() if k not in cfg_ref and k != "chunk_size"},
        **cfg_ref)
    leaves = [b["hidden"].detach().clone().requires_grad_(), b["weight"].detach().clone().requires_grad_()]
    bias = b["bias"].detach().clone().requires_grad_() if use_bias else None
    with use_backend(backend):
        loss, metrics = fused_policy_loss(leaves[0], leaves[1], b["targets"], adv, bias=bias, **kwargs)
    grads = torch.autograd.grad(loss, leaves + ([bias] if use_bias else []))
    torch.testing.assert_close(loss.double().cpu(), want_loss.cpu(), **tol)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got.double().cpu(), want.cpu(), atol=tol["atol"] * max(1.0, float(want.abs().max())),
                                   rtol=tol["rtol"])
    torch.testing.assert_close(metrics["logprobs"].double().cpu(), want_logp.cpu(), **tol)
    mask = kwargs["loss_mask"] if use_mask else torch.ones_like(want_logp)
    torch.testing.assert_close(metrics["entropy"].double().cpu(), R.masked_mean(want_ent, mask).double().cpu(), **tol)
    for key, stat in (("clip_ratio/low", "low"), ("clip_ratio/high", "high"), ("clip_ratio/dual", "dual")):
        if stat in stats:
            torch.testing.assert_close(metrics[key].cpu(), R.masked_mean(stats[stat], mask).cpu(), atol=1e-6, rtol=0)
    if with_ref:
        torch.testing.assert_close(metrics["kl"].double().cpu(), R.masked_mean(stats["kl"], mask).double().cpu(), **tol)
    return loss, metrics


SCENARIOS = {
    "per-sequence adv, off-policy, k3": dict(layout="sequence", beta=0.1, kl_estimator="k3"),
    "per-token adv, on-policy": dict(layout="token", with_old=False, with_ref=False),
    "per-episode adv, k1, no bias": dict(layout="episode", beta=0.05, kl_estimator="k1", use_bias=False),
    "k2, asymmetric clip, dual clip": dict(beta=0.2, kl_estimator="k2", eps_low=0.1, eps_high=0.28, dual_clip=1.5),
    "entropy bonus, temperature": dict(entropy_coef=0.03, temperature=0.7, loss_agg="seq-mean-token-mean"),
    "no mask, dr_grpo": dict(use_mask=False, loss_agg="dr_grpo", max_len=11),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_fused_loss_matches_reference(backend, scenario):
    b = make_batch(seed=len(scenario))
    loss, metrics = run_both(backend, b, **SCENARIOS[scenario])
    if "dual" in scenario:
        assert metrics["clip_ratio/dual"] > 0, "the batch should exercise the dual clip"
    if "off-policy" in scenario:
        assert metrics["clip_ratio/low"] > 0 and metrics["clip_ratio/high"] > 0, "the batch should exercise both clips"


@pytest.mark.parametrize("loss_agg", R.LOSS_AGGS)
def test_each_loss_agg_torch_path(loss_agg):
    run_both("torch", make_batch(seed=7), loss_agg=loss_agg, beta=0.04)


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_loss_agg_kernel_uses_the_weights(backend):
    # The kernel only sees the per-token weight; one seq-level and one token-level mode suffice there.
    run_both(backend, make_batch(seed=8), loss_agg="seq-mean-token-sum")


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token_and_chunking(backend):
    b = make_batch(N=1, S=1, E=1, seed=3)
    run_both(backend, b, layout="token")
    b = make_batch(N=21, seed=4)
    run_both(backend, b, chunk_size=8)  # three chunks, the last one short


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_gives_zero_loss_and_zero_grads(backend):
    b = make_batch(seed=5)
    hidden = b["hidden"].clone().requires_grad_()
    weight = b["weight"].clone().requires_grad_()
    for loss_agg in ("token-mean", "seq-mean-token-mean", "grpo"):
        with use_backend(backend):
            loss, metrics = fused_policy_loss(hidden, weight, b["targets"], b["adv"]["sequence"], seq_ids=b["seq_ids"],
                                              loss_mask=torch.zeros_like(b["loss_mask"]), old_logprobs=b["old"],
                                              ref_logprobs=b["ref"], beta=0.1, loss_agg=loss_agg)
        gh, gw = torch.autograd.grad(loss, (hidden, weight))
        assert loss.item() == 0.0 and not torch.isnan(loss)
        assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0
        assert all(torch.isfinite(v).all() for v in metrics.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_of_magnitude_1e4(backend):
    b = make_batch(N=13, H=16, V=45, scale=1.5e4 / 4, seed=6, old_noise=0.0)
    b["old"] = None
    # fp32 logits of 1e4 carry ~1e-3 absolute error: compare loosely, but everything must be finite.
    loss, metrics = run_both(backend, b, with_old=False, with_ref=False, use_bias=False, entropy_coef=0.01,
                             tol=dict(atol=5e-2, rtol=5e-3))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs(backend):
    # bf16 operands with fp32 logits and accumulation: loss to 1e-4; grads carry the bf16 rounding
    # of dlogits and of dW's per-chunk accumulation (stated tolerance: 2% of the largest entry).
    b = make_batch(N=17, H=32, V=70, dtype=torch.bfloat16, seed=9)
    run_both(backend, b, beta=0.1, tol=dict(atol=2e-2, rtol=2e-2))


def test_grad_scaled_by_upstream_gradient_and_module():
    b = make_batch(seed=10)
    h = b["hidden"].clone().requires_grad_()
    module = MRTPolicyLoss(eps_high=0.28, loss_agg="seq-mean-token-mean")
    with use_backend("torch"):
        loss, _ = module(h, b["weight"], b["targets"], b["adv"]["sequence"], seq_ids=b["seq_ids"], old_logprobs=b["old"])
        (g1,) = torch.autograd.grad(loss, h)
        loss, _ = module(h, b["weight"], b["targets"], b["adv"]["sequence"], seq_ids=b["seq_ids"], old_logprobs=b["old"])
        (g3,) = torch.autograd.grad(3.0 * loss, h)
    torch.testing.assert_close(g3, 3.0 * g1)
    assert "seq-mean-token-mean" in repr(module)


def test_no_grad_forward_matches_and_skips_gradient_matmuls(monkeypatch):
    b = make_batch(seed=12)
    hidden = b["hidden"].clone().requires_grad_()
    with use_backend("torch"):
        loss, _ = fused_policy_loss(hidden, b["weight"], b["targets"], b["adv"]["token"], old_logprobs=b["old"])
        calls = []
        monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, c: calls.append(1) or torch.matmul(a, c))
        with torch.no_grad():
            loss_ng, _ = fused_policy_loss(hidden, b["weight"], b["targets"], b["adv"]["token"], old_logprobs=b["old"])
    assert len(calls) == 1, "under no_grad only the logits matmul should run"
    torch.testing.assert_close(loss_ng, loss.detach())


def test_policy_loss_from_logits_matches_fused():
    b = make_batch(seed=13, dtype=torch.float64)
    kwargs = dict(old_logprobs=b["old"].double(), ref_logprobs=b["ref"].double(), seq_ids=b["seq_ids"],
                  loss_mask=b["loss_mask"], beta=0.1, entropy_coef=0.02, dual_clip=2.0, loss_agg="grpo")
    logits = R.linear_logits(b["hidden"], b["weight"], b["bias"]).detach().requires_grad_()  # raw logits
    loss, metrics = policy_loss_from_logits(logits, b["targets"], b["adv"]["sequence"], temperature=0.8, **kwargs)
    with use_backend("torch"):
        want, want_metrics = fused_policy_loss(b["hidden"], b["weight"], b["targets"], b["adv"]["sequence"],
                                               bias=b["bias"], temperature=0.8, **kwargs)
    torch.testing.assert_close(loss, want)
    for key in want_metrics:
        torch.testing.assert_close(metrics[key].double(), want_metrics[key].double())
    (g,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest floating tensor any aten op produces while active."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            # Floating outputs only: the interpreter moves kernel arguments as uint8 byte views.
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.max_numel = max(self.max_numel, t.numel())
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_never_materialises_n_by_v(backend):
    # N*V = 2560; a [chunk=8, V] block is 512 and the largest legitimate tensor is dW [V, H] = 1024.
    b = make_batch(N=40, H=16, V=64, seed=14)
    hidden = b["hidden"].clone().requires_grad_()
    weight = b["weight"].clone().requires_grad_()
    from mrt_fast.loss import token_logprobs

    with _LargestTensor() as probe, use_backend(backend):
        loss, _ = fused_policy_loss(hidden, weight, b["targets"], b["adv"]["sequence"], seq_ids=b["seq_ids"],
                                    old_logprobs=b["old"], chunk_size=8)
        loss.backward()
        logp = token_logprobs(hidden, weight, b["targets"], chunk_size=8)
        logp.sum().backward()
    assert probe.max_numel < 40 * 64, probe.max_numel


def test_autocast_casts_fp32_master_weight_like_linear():
    b = make_batch(seed=15)
    weight = b["weight"].clone().requires_grad_()
    hidden = b["hidden"].to(torch.bfloat16).requires_grad_()
    with use_backend("torch"), torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss, _ = fused_policy_loss(hidden, weight, b["targets"], b["adv"]["token"])
    loss.backward()
    assert weight.grad is not None and weight.grad.dtype == torch.float32
    with pytest.raises(ValueError, match="weight must have the dtype of hidden"):
        fused_policy_loss(hidden, weight, b["targets"], b["adv"]["token"])  # outside autocast: no silent cast
