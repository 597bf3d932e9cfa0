"""Bad input gets a ValueError that names the argument (and the expected shape/dtype)."""

import pytest
import torch

from mrt_fast.kernels import use_backend
from mrt_fast.loss import MRTPolicyLoss, fused_policy_loss, logprobs_from_logits, token_logprobs, verl_policy_loss

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
    "temperature 0": (dict(temperature=0.0), "temperature must be a finite number > 0"),
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
    with pytest.raises(ValueError, match="advantages must have log_prob's shape"):
        verl_policy_loss(x, x, torch.zeros(2, 4), x, "token-mean", {})
