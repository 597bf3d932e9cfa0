"""Numerics of 16-bit training: the fused loss's backward scale, fp16 refused, the bf16-logits fallback."""

import warnings

import pytest
import torch

from mrt_fast.config import from_dict
from mrt_fast.kernels import logprobs as logprobs_module
from mrt_fast.kernels.policy_loss import PolicyConfig, TokenInputs, fused_policy_loss_core


def _bf16_loss_grads(scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n, h, v = 12, 16, 40
    hidden = (torch.randn(n, h, generator=g)).to(torch.bfloat16).requires_grad_()
    weight = (0.3 * torch.randn(v, h, generator=g)).to(torch.bfloat16).requires_grad_()
    inp = TokenInputs(targets=torch.randint(0, v, (n,), generator=g), weights=torch.full((n,), 1.0 / n),
                      advantages=torch.randn(n, generator=g), adv_index=None, old_logprobs=None, ref_logprobs=None)
    loss, _ = fused_policy_loss_core(hidden, weight, None, inp, PolicyConfig(), backend="torch")
    (loss * scale).backward()
    return hidden.grad, weight.grad


def test_backward_scale_is_not_rounded_to_bf16():
    """A micro-batch weight of 1/3 scales the stored bf16 gradients in fp32, rounding once: the
    result equals the unit-scale gradients times 1/3 computed in fp32 (bf16(1/3) is 0.2% off)."""
    dh1, dw1 = _bf16_loss_grads(1.0)
    dh, dw = _bf16_loss_grads(1.0 / 3.0)
    for unit, got in ((dh1, dh), (dw1, dw)):
        assert got.dtype == torch.bfloat16
        want = (unit.float() * (1.0 / 3.0)).to(torch.bfloat16)
        rounded_scale = unit * torch.tensor(1.0 / 3.0).to(torch.bfloat16)
        assert not torch.equal(want, rounded_scale)  # the test can tell the two apart
        assert torch.equal(got, want)


def test_float16_refused_without_loss_scaling():
    with pytest.raises(ValueError, match="model.dtype=float16 needs loss scaling"):
        from_dict({"model": {"dtype": "float16"}})
    assert from_dict({"model": {"dtype": "bfloat16"}}).model.dtype == "bfloat16"


def test_bf16_logits_fallback_warns_once(monkeypatch):
    """The CPU has no mm(out_dtype=...): the fallback rounds the product to bf16, and says so once."""
    monkeypatch.setattr(logprobs_module, "_warned_bf16_logits", False)
    a = torch.randn(3, 8).to(torch.bfloat16)
    b = torch.randn(8, 5).to(torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="rounded to torch.bfloat16"):
        out = logprobs_module.mm_fp32_out(a, b)
    assert out.dtype == torch.float32 and torch.equal(out, (a @ b).float())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logprobs_module.mm_fp32_out(a, b)  # no second warning
