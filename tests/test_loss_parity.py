"""Parity with the loss definitions users come from: verl, TRL and Liger-Kernel.

* verl - the installed library's own ``agg_loss``, ``compute_policy_loss_vanilla`` and
  ``kl_penalty`` (skipped without verl; .ci/run installs it), combined as verl's actor does:
  ``pg_loss - entropy_coeff * agg_loss(entropy) + kl_coef * agg_loss(kl)`` with one mode.
* TRL  - its GRPO loss lives inside ``GRPOTrainer._compute_loss`` (no function to call), so it is
  restated below from huggingface/trl ``trl/trainer/grpo_trainer.py``:
  ``-min(coef_1 A, coef_2 A) + beta * k3`` and the loss_type normalisations grpo / bnpo /
  dr_grpo / dapo (single process, no gradient accumulation). The log-prob functions TRL
  exposes are compared with the real ones in tests/test_integrations_trl.py.

Liger-Kernel's ``LigerFusedLinearGRPOLoss`` is run side by side on the CPU when installed.
"""

import pytest
import torch

from mrt_fast.kernels import reference as R
from mrt_fast.kernels import use_backend
from mrt_fast.loss import fused_policy_loss

B, T, H, V = 4, 6, 16, 29


# ---------------------------------------------------------------- verl, the installed library

# Our ``seq-mean-token-sum-norm`` is verl's with ``global_batch_size=1`` (sum over tokens / T, no
# division by the number of sequences); verl >= 0.9 also divides by the non-empty sequences, which
# mrt_fast.integrations.verl does.
VERL_GLOBAL_INFO = {"seq-mean-token-sum-norm": {"global_batch_size": 1}}


def verl_actor_loss(old, logp, adv, mask, mode, clip_low, clip_high, clip_c, entropy=None, entropy_coeff=0.0,
                    ref=None, kl_coef=0.0, kl_kind="k3"):
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not installed")
    from verl.workers.config import FSDPActorConfig

    config = FSDPActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, clip_ratio=clip_low,
                             clip_ratio_high=clip_high, clip_ratio_c=clip_c, loss_agg_mode=mode)
    info = VERL_GLOBAL_INFO.get(mode, {})
    config.global_batch_info.update(info)
    loss, metrics = core_algos.compute_policy_loss_vanilla(old, logp, adv, mask.bool(), mode, config)
    if entropy_coeff:
        loss = loss - entropy_coeff * core_algos.agg_loss(entropy, mask.bool(), mode, **info)
    if kl_coef:
        kl = core_algos.kl_penalty(logp, ref, {"k1": "k1", "k2": "k2", "k3": "low_var_kl"}[kl_kind])
        loss = loss + kl_coef * core_algos.agg_loss(kl, mask.bool(), mode, **info)
    return loss, metrics["actor/pg_clipfrac"], metrics["actor/pg_clipfrac_lower"]


# ---------------------------------------------------------------- TRL, restated from grpo_trainer.py


def trl_grpo_loss(logp, old, ref, adv_seq, mask, loss_type, beta, eps_low, eps_high, max_completion_length):
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    advantages = adv_seq.unsqueeze(1)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    if loss_type == "dapo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)  # num_items_in_batch / 1 process
    raise ValueError(loss_type)


# ---------------------------------------------------------------- shared batch


def padded_batch(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B * T, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) / H**0.5
    targets = torch.randint(0, V, (B * T,), generator=g)
    mask = torch.ones(B, T, dtype=dtype)
    mask[1, 4:] = 0  # a short response
    mask[2] = 0  # a fully masked response: verl excludes it from seq means, TRL grpo counts it
    with torch.no_grad():
        logp, entropy = R.logprobs_and_entropy(R.linear_logits(hidden, weight), targets)
    old = logp + 0.5 * torch.randn(B * T, generator=g, dtype=dtype)
    ref = logp + 0.3 * torch.randn(B * T, generator=g, dtype=dtype)
    adv_seq = torch.randn(B, generator=g, dtype=dtype)
    adv_tok = torch.randn(B, T, generator=g, dtype=dtype)
    seq_ids = torch.arange(B).repeat_interleave(T)
    return dict(hidden=hidden, weight=weight, targets=targets, mask=mask, logp=logp.view(B, T),
                entropy=entropy.view(B, T), old=old, ref=ref, adv_seq=adv_seq, adv_tok=adv_tok, seq_ids=seq_ids)


def fused(b, advantages, **kwargs):
    with use_backend("torch"):
        return fused_policy_loss(b["hidden"], b["weight"], b["targets"], advantages, loss_mask=b["mask"].reshape(-1),
                                 seq_ids=b["seq_ids"], **kwargs)


@pytest.mark.parametrize("mode", R.VERL_LOSS_AGGS)
@pytest.mark.parametrize("kl_kind", ["k1", "k2", "k3"])
def test_fused_loss_matches_verl_actor_loss(mode, kl_kind):
    b = padded_batch(seed=hash((mode, kl_kind)) % 1000)
    old, ref = b["old"].view(B, T), b["ref"].view(B, T)
    want, clipfrac, clipfrac_lower = verl_actor_loss(
        old, b["logp"], b["adv_tok"], b["mask"], mode, 0.2, 0.28, 3.0, entropy=b["entropy"], entropy_coeff=0.01,
        ref=ref, kl_coef=0.05, kl_kind=kl_kind)
    loss, metrics = fused(b, b["adv_tok"].reshape(-1), old_logprobs=b["old"], ref_logprobs=b["ref"], eps_low=0.2,
                          eps_high=0.28, dual_clip=3.0, beta=0.05, kl_estimator=kl_kind, entropy_coef=0.01,
                          loss_agg=mode, max_len=T)
    torch.testing.assert_close(loss, want)
    assert float(metrics["clip_ratio/region"]) == pytest.approx(clipfrac, abs=1e-6)
    assert float(metrics["clip_ratio/dual"]) == pytest.approx(clipfrac_lower, abs=1e-6)


@pytest.mark.parametrize("loss_type", R.TRL_LOSS_TYPES)
def test_fused_loss_matches_trl_grpo_loss(loss_type):
    b = padded_batch(seed=5)
    old, ref = b["old"].view(B, T), b["ref"].view(B, T)
    want = trl_grpo_loss(b["logp"], old, ref, b["adv_seq"], b["mask"], loss_type, 0.04, 0.2, 0.28, T + 3)
    # TRL advantages are per sequence: pass [B] with seq_ids, broadcast inside the kernel.
    loss, _ = fused(b, b["adv_seq"], old_logprobs=b["old"], ref_logprobs=b["ref"], beta=0.04, eps_low=0.2,
                    eps_high=0.28, loss_agg=loss_type, max_len=T + 3)
    torch.testing.assert_close(loss, want)


@pytest.mark.parametrize("loss_type", R.TRL_LOSS_TYPES)
def test_side_by_side_with_liger_grpo_loss(loss_type):
    liger = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is not installed")
    b = padded_batch(seed=9, dtype=torch.float32)
    b["mask"][2] = 1.0  # Liger's grpo divides by per-row counts; keep every row non-empty here
    x = b["hidden"].view(B, T, H).clone().requires_grad_()
    w = b["weight"].clone().requires_grad_()
    old, ref = b["old"].float().view(B, T), b["ref"].float().view(B, T)
    module = liger.LigerFusedLinearGRPOLoss(beta=0.04, compiled=False, loss_type=loss_type, epsilon_low=0.2,
                                            epsilon_high=0.28, max_completion_length=T, use_ref_model=True)
    want, _ = module(x, w, b["targets"].view(B, T), b["mask"], b["adv_seq"].float(), ref_per_token_logps=ref,
                     old_per_token_logps=old)
    want_gx, want_gw = torch.autograd.grad(want, (x, w))
    x2, w2 = b["hidden"].clone().requires_grad_(), b["weight"].clone().requires_grad_()
    with use_backend("torch"):
        loss, _ = fused_policy_loss(x2, w2, b["targets"], b["adv_seq"].float(), loss_mask=b["mask"].reshape(-1),
                                    seq_ids=b["seq_ids"], old_logprobs=b["old"].float(), ref_logprobs=b["ref"].float(),
                                    beta=0.04, eps_low=0.2, eps_high=0.28, loss_agg=loss_type, max_len=T)
    gx, gw = torch.autograd.grad(loss, (x2, w2))
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, want_gx.view(B * T, H), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gw, want_gw, atol=1e-5, rtol=1e-4)


def test_aggregation_weights_all_masked_are_zero():
    mask = torch.zeros(6)
    seq_ids = torch.tensor([0, 0, 1, 1, 2, 2])
    for mode in R.LOSS_AGGS:
        w = R.aggregation_weights(mask, seq_ids, mode, max_len=4)
        assert torch.all(w == 0), mode
