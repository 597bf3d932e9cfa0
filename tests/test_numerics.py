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


def test_sft_through_the_fused_path_has_the_nll_gradient():
    """SFT's loss is the fused policy loss with advantage 1 (ratio 1, nothing clipped): same value
    and same gradient of every parameter as the token-mean NLL from the log-prob provider, fp64."""
    import transformers

    from mrt_fast.loss import token_logprobs
    from mrt_fast.packing import PrefixGroup, pack, packed_hidden
    from mrt_fast.train import Actor

    config = transformers.Qwen2Config(vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float64)
    (batch,) = pack([PrefixGroup([1, 2, 3], [[4, 5, 6]], loss_masks=[[1, 0, 1]]),
                     PrefixGroup([7], [[8, 9, 10, 11], [12]])])

    def grads():
        out = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return out

    loss, metrics = Actor(model)(batch, "sft")
    loss.backward()
    got = grads()
    head = model.get_output_embeddings()
    logp = token_logprobs(packed_hidden(model, batch), head.weight, batch.targets)
    mask = batch.target_loss_mask.double()
    nll = -(logp * mask).sum() / mask.sum()
    nll.backward()
    want = grads()
    torch.testing.assert_close(loss, nll, rtol=1e-12, atol=0)
    torch.testing.assert_close(metrics["logprobs"], logp.detach(), rtol=1e-12, atol=1e-14)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-13, msg=lambda m: f"{name}: {m}")


def test_autocast_does_not_round_the_fp32_logits():
    """Under CPU bf16 autocast the operands are cast to bf16 (as nn.Linear would), but the logits,
    softmax and gradients stay fp32: the result equals fp64 maths on the bf16-rounded operands."""
    from mrt_fast.loss import fused_policy_loss, token_logprobs

    g = torch.Generator().manual_seed(0)
    h = (torch.randn(9, 16, generator=g) * 3).requires_grad_()
    w = (torch.randn(37, 16, generator=g) * 3).requires_grad_()
    t = torch.randint(0, 37, (9,), generator=g)
    hb, wb = h.detach().bfloat16().double(), w.detach().bfloat16().double()
    want = torch.log_softmax(hb @ wb.T, -1).gather(-1, t[:, None]).squeeze(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = token_logprobs(h, w, t)
        _, metrics = fused_policy_loss(h, w, t, torch.ones(9))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)  # bf16 logits would be ~0.1 off
    torch.testing.assert_close(metrics["logprobs"].double(), want, rtol=1e-5, atol=1e-4)
