"""Bad input gets a ValueError/TypeError that names the argument (and the expected shape/dtype);
edge inputs that are legitimate (masked vocabulary, sparse sequence ids) compute correctly."""

import pytest
import torch

from mrt_fast.kernels import reference, use_backend
from mrt_fast.loss import (
    MRTPolicyLoss,
    fused_policy_loss,
    linear_cross_entropy,
    logprobs_from_logits,
    policy_loss_from_logits,
    policy_loss_from_logprobs,
    token_logprobs,
    verl_policy_loss,
)

N, H, V = 7, 8, 11


@pytest.fixture
def batch():
    return dict(hidden=torch.randn(N, H), weight=torch.randn(V, H), targets=torch.randint(0, V, (N,)),
                advantages=torch.randn(N))


def call(batch, **overrides):
    args = {**batch, **overrides}
    with use_backend("torch"):
        return fused_policy_loss(args.pop("hidden"), args.pop("weight"), args.pop("targets"), args.pop("advantages"),
                                 **args)


BAD_INPUTS = {
    "hidden 1-D": (dict(hidden=torch.randn(N)), r"hidden must have shape \[N, H\]"),
    "hidden int": (dict(hidden=torch.ones(N, H, dtype=torch.int64)), "hidden must have dtype"),
    "weight H mismatch": (dict(weight=torch.randn(V, H + 1)), r"weight must have shape \[V, H\] with H=8"),
    "weight dtype differs": (dict(weight=torch.randn(V, H, dtype=torch.float64)), "weight must have the dtype of hidden"),
    "bias wrong length": (dict(bias=torch.randn(V + 1)), r"bias must have shape \[V\]"),
    "targets N mismatch": (dict(targets=torch.zeros(N + 1, dtype=torch.long)), r"targets must have shape \[N\] with N=7"),
    "targets float": (dict(targets=torch.zeros(N)), "targets must have dtype int64"),
    "targets >= V": (dict(targets=torch.full((N,), V)), r"targets must lie in \[0, V\)"),
    "targets negative": (dict(targets=torch.full((N,), -100)), r"targets must lie in \[0, V\)"),
    "advantages NaN": (dict(advantages=torch.full((N,), float("nan"))), "advantages contains NaN"),
    "advantages int": (dict(advantages=torch.ones(N, dtype=torch.long)), "advantages must have dtype"),
    "advantages 2-D": (dict(advantages=torch.randn(N, 1)), "advantages must have shape"),
    "advantages wrong length": (dict(advantages=torch.randn(3)), r"advantages must have shape \[N\]=7"),
    "episode_ids out of range": (dict(advantages=torch.randn(2), episode_ids=torch.tensor([0, 1, 2, 0, 0, 0, 0])),
                                 r"episode_ids must lie in \[0, E"),
    "seq_ids out of range": (dict(advantages=torch.randn(2), seq_ids=torch.tensor([0, 0, 1, 1, 2, 2, 2])),
                             r"seq_ids must lie in \[0, S"),
    "seq_ids negative": (dict(seq_ids=torch.full((N,), -1)), "seq_ids must be >= 0"),
    "seq_ids float": (dict(seq_ids=torch.zeros(N)), "seq_ids must have dtype"),
    "loss_mask wrong length": (dict(loss_mask=torch.ones(N - 1)), r"loss_mask must have shape \[N\]"),
    "old_logprobs inf": (dict(old_logprobs=torch.full((N,), float("-inf"))), "old_logprobs contains NaN or inf"),
    "ref_logprobs NaN": (dict(ref_logprobs=torch.full((N,), float("nan"))), "ref_logprobs contains NaN or inf"),
    "ref_logprobs wrong length": (dict(ref_logprobs=torch.zeros(N + 2)), r"ref_logprobs must have shape \[N\]"),
    "beta without ref": (dict(beta=0.1), "beta != 0 needs ref_logprobs"),
    "unknown loss_agg": (dict(loss_agg="mean"), "loss_agg must be one of"),
    "unknown kl_estimator": (dict(kl_estimator="k4"), "kl_estimator must be one of"),
    "seq agg without seq_ids": (dict(loss_agg="seq-mean-token-mean"), "needs seq_ids"),
    "dual_clip <= 1": (dict(dual_clip=0.5), "dual_clip must be None or a number > 1"),
    "negative eps": (dict(eps_low=-0.1), "eps_low and eps_high must be >= 0"),
    "temperature 0": (dict(temperature=0.0), r"temperature must be a finite number >= 1e-05"),
    "temperature 1e-40": (dict(temperature=1e-40), r"temperature must be a finite number >= 1e-05"),
    "temperature inf": (dict(temperature=float("inf")), r"temperature must be a finite number >= 1e-05"),
    "hidden NaN": (dict(hidden=torch.full((N, H), float("nan"))), "hidden contains NaN"),
    "loss_mask -1": (dict(loss_mask=torch.tensor([1, 1, -1, 0, 1, 1, 1])), r"loss_mask must hold only 0 and 1 .*got \[-1\]"),
    "loss_mask 2": (dict(loss_mask=torch.full((N,), 2.0)), "loss_mask must hold only 0 and 1"),
    "loss_mask NaN": (dict(loss_mask=torch.full((N,), float("nan"))), "loss_mask must hold only 0 and 1"),
    "episode_ids -1": (dict(advantages=torch.randn(2), episode_ids=torch.full((N,), -1)), "episode_ids must be >= 0"),
    "max_len True": (dict(max_len=True, seq_ids=torch.zeros(N, dtype=torch.long), loss_agg="dr_grpo"), "max_len must"),
    "chunk_size 0": (dict(chunk_size=0), "chunk_size must be >= 1"),
    "hidden on meta": (dict(hidden=torch.randn(N, H, device="meta"), weight=torch.randn(V, H, device="meta")),
                       "hidden is on the meta device"),
    "max_len 0": (dict(max_len=0, seq_ids=torch.zeros(N, dtype=torch.long), loss_agg="dr_grpo"), "max_len must be"),
    "device differs": (dict(seq_ids=torch.zeros(N, dtype=torch.long, device="meta")), "seq_ids is on meta"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_fused_policy_loss_rejects(batch, case):
    overrides, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        call(batch, **overrides)


def test_token_logprobs_rejects(batch):
    with pytest.raises(ValueError, match=r"targets must lie in \[0, V\)"):
        token_logprobs(batch["hidden"], batch["weight"], torch.full((N,), V))
    with pytest.raises(ValueError, match=r"weight must have shape \[V, H\]"):
        token_logprobs(batch["hidden"], torch.randn(V, 3), batch["targets"])
    with pytest.raises(ValueError, match="targets is on meta"):
        token_logprobs(batch["hidden"], batch["weight"], batch["targets"].to("meta"))


def test_logprobs_from_logits_rejects():
    with pytest.raises(ValueError, match=r"targets must have shape \(2, 3\)"):
        logprobs_from_logits(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def test_module_validates_config_at_construction():
    with pytest.raises(ValueError, match="loss_agg"):
        MRTPolicyLoss(loss_agg="sum")


def test_verl_adapter_rejects_shape_mismatch():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"advantages must have shape \[B, T\] = \(2, 3\)"):
        verl_policy_loss(x, x, torch.zeros(2, 4), x, "token-mean", {})


TYPE_ERRORS = {
    "targets as a list": (dict(targets=list(range(N))), "targets must be a torch.Tensor"),
    "advantages as a list": (dict(advantages=[0.5] * N), "advantages must be a torch.Tensor"),
    "loss_mask of strings": (dict(loss_mask=["1"] * N), "loss_mask must be a torch.Tensor"),
    "temperature True": (dict(temperature=True), "temperature must be a number, got bool"),
    "temperature '1'": (dict(temperature="1"), "temperature must be a number, got str"),
    "chunk_size 2.5": (dict(chunk_size=2.5), r"chunk_size must be a positive int .* got float \(2.5\)"),
    "chunk_size '8'": (dict(chunk_size="8"), r"chunk_size must be a positive int .* got str \('8'\)"),
}


@pytest.mark.parametrize("case", list(TYPE_ERRORS))
def test_fused_policy_loss_rejects_wrong_kinds_with_type_error(batch, case):
    overrides, message = TYPE_ERRORS[case]
    with pytest.raises(TypeError, match=message):
        call(batch, **overrides)


def test_token_logprobs_rejects_lists_meta_bad_chunks_and_tiny_temperatures(batch):
    h, w, t = batch["hidden"], batch["weight"], batch["targets"]
    with pytest.raises(TypeError, match=r"targets must be a torch.Tensor .* got list \(convert it with torch.tensor\)"):
        token_logprobs(h, w, t.tolist())
    with pytest.raises(ValueError, match="weight is on the meta device"):
        token_logprobs(h, w.to("meta"), t)
    for bad in (2.5, "8"):
        with pytest.raises(TypeError, match="chunk_size must be a positive int"):
            token_logprobs(h, w, t, chunk_size=bad)
    with pytest.raises(ValueError, match=r"temperature must be a finite number >= 1e-05"):
        token_logprobs(h, w, t, temperature=1e-40)
    with pytest.raises(ValueError, match="hidden contains NaN"):
        token_logprobs(torch.where(torch.rand(N, H) < 0.1, float("nan"), h), w, t)
    # The smallest accepted temperature still gives finite log-probs (no overflow).
    assert torch.isfinite(token_logprobs(h, w, t, temperature=1e-5)).all()


def test_policy_loss_from_logprobs_rejects_non_finite_logprobs():
    logp = torch.tensor([-1.0, float("nan"), -2.0])
    with pytest.raises(ValueError, match="logprobs contains NaN or inf"):
        policy_loss_from_logprobs(logp, torch.ones(3))
    with pytest.raises(ValueError, match="entropy contains NaN or inf"):
        policy_loss_from_logprobs(logp.nan_to_num(), torch.ones(3), entropy=torch.full((3,), float("nan")),
                                  entropy_coef=0.01)


def test_adapters_name_the_callers_arguments():
    h, w = torch.randn(2, 3, H), torch.randn(V, H)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, V\)"):
        linear_cross_entropy(h, w, torch.full((2, 3), -100))
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"rollout_is_weights must have shape \[B, T\] = \(2, 3\)"):
        verl_policy_loss(x, x, x, torch.ones(2, 3), "token-mean", {}, rollout_is_weights=torch.ones(6))
    with pytest.raises(ValueError, match="config.loss_scale_factor must be a positive int"):
        verl_policy_loss(x, x, x, torch.ones(2, 3), "seq-mean-token-sum-norm",
                         {"global_batch_info": {"loss_scale_factor": 0}})


@pytest.mark.parametrize("loss_agg", ["seq-mean-token-mean", "grpo", "dr_grpo", "seq-mean-token-sum"])
def test_huge_sequence_ids_are_renumbered_not_allocated(batch, loss_agg):
    dense = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    huge = torch.tensor([0, 0, 10**12, 10**12, 10**12, 5, 5])  # S = 10**12 + 1 by definition
    want, _ = call(batch, seq_ids=dense, loss_agg=loss_agg)
    got, _ = call(batch, seq_ids=huge, loss_agg=loss_agg)
    scale = {"grpo": 3 / (10**12 + 1), "dr_grpo": 3 / (10**12 + 1)}.get(loss_agg, 1.0)  # S enters these two
    torch.testing.assert_close(got, want * scale, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------
# A masked vocabulary (-inf logits or bias): finite entropy (0 log 0 = 0) and finite gradients
# --------------------------------------------------------------------------------------------


def masked_problem(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(N, H, generator=g, dtype=dtype), torch.randn(V, H, generator=g, dtype=dtype)
    bias = torch.zeros(V, dtype=dtype)
    bias[[0, 4, 9]] = float("-inf")  # column 0 too: the first column once broke the log-sum-exp
    targets = torch.tensor([1, 2, 3, 5, 6, 7, 8])
    return h, w, bias, targets


def reference_terms(h, w, bias, targets, temperature=1.0):
    """fp64 log-probs and entropy over the unmasked vocabulary only (masked tokens have p = 0 and
    drop out exactly), with autograd; the entropy equals torch.distributions.Categorical's."""
    live = torch.isfinite(bias)
    logp_all = torch.log_softmax((h @ w[live].T + bias[live]) / temperature, -1)
    column = torch.cumsum(live.long(), 0) - 1  # vocabulary id -> column among the unmasked ones
    logp = logp_all.gather(1, column[targets][:, None]).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    categorical = torch.distributions.Categorical(logits=(h @ w.T + bias).detach() / temperature).entropy()
    torch.testing.assert_close(entropy.detach(), categorical)
    return logp, entropy


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_masked_vocabulary_entropy_and_gradients_match_categorical(backend):
    h, w, bias, targets = masked_problem()
    a, b = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    logp_ref, ent_ref = reference_terms(hr, wr, bias, targets, 0.7)
    ((logp_ref * a).sum() + (ent_ref * b).sum()).backward()
    assert torch.isfinite(ent_ref).all()

    dtype = torch.float64 if backend == "torch" else torch.float32
    tol = dict(rtol=1e-9, atol=1e-9) if backend == "torch" else dict(rtol=2e-4, atol=2e-4)
    hk, wk = h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    with use_backend(backend):
        logp, ent = token_logprobs(hk, wk, targets, bias=bias.to(dtype), temperature=0.7, return_entropy=True)
    ((logp.double() * a).sum() + (ent.double() * b).sum()).backward()
    torch.testing.assert_close(logp.double(), logp_ref.detach(), **tol)
    torch.testing.assert_close(ent.double(), ent_ref.detach(), **tol)
    torch.testing.assert_close(hk.grad.double(), hr.grad, **tol)
    torch.testing.assert_close(wk.grad.double(), wr.grad, **tol)


def test_masked_logits_entropy_and_gradients_from_logits():
    h, w, bias, targets = masked_problem()
    a, b = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    hr = h.clone().requires_grad_()
    logp_ref, ent_ref = reference_terms(hr, w, bias, targets)
    ((logp_ref * a).sum() + (ent_ref * b).sum()).backward()
    hk = h.clone().requires_grad_()
    logp, ent = logprobs_from_logits(hk @ w.T + bias, targets, return_entropy=True)
    ((logp * a).sum() + (ent * b).sum()).backward()
    torch.testing.assert_close(ent, ent_ref.detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(hk.grad, hr.grad, rtol=1e-9, atol=1e-9)
    # With an entropy bonus through the from-logits loss: finite loss and gradients.
    logits = (h @ w.T + bias).requires_grad_()
    loss, metrics = policy_loss_from_logits(logits, targets, a, entropy_coef=0.01)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(metrics["entropy"]) and torch.isfinite(logits.grad).all()
    # The shipped reference maths (kernels/reference.py) agrees, value and gradient.
    hs = h.clone().requires_grad_()
    logp_s, ent_s = reference.logprobs_and_entropy(hs @ w.T + bias, targets)
    ((logp_s * a).sum() + (ent_s * b).sum()).backward()
    torch.testing.assert_close(ent_s, ent_ref.detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(hs.grad, hr.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_masked_vocabulary_with_entropy_bonus_gives_finite_loss_and_gradients(backend):
    h, w, bias, targets = masked_problem(torch.float32)
    adv = torch.randn(N)
    hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
    logp_ref, ent_ref = reference_terms(hr, wr, bias.double(), targets)
    ref = (-(adv.double() * torch.exp(logp_ref - logp_ref.detach())) - 0.01 * ent_ref).mean()
    ref.backward()
    hk, wk = h.clone().requires_grad_(), w.clone().requires_grad_()
    with use_backend(backend):
        loss, metrics = fused_policy_loss(hk, wk, targets, adv, bias=bias, entropy_coef=0.01)
    loss.backward()
    assert torch.isfinite(metrics["entropy"])
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hk.grad.double(), hr.grad, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(wk.grad.double(), wr.grad, rtol=1e-3, atol=1e-5)
