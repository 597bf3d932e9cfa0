"""mrt_fast.integrations.verl against the installed verl (0.9.x): its registry, agg_loss and ppo_loss.

Every comparison runs verl's own code next to ours on the same inputs, in fp64, so agreement is
to rounding (rtol 1e-10). .ci/run installs verl without its heavy dependencies.
"""

import os
import subprocess
import sys
import types

import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos",
                                 reason="verl is not installed (.ci/run installs verl==0.9.1 --no-deps)")

from verl.workers.config import FSDPActorConfig, PolicyLossConfig  # noqa: E402

from mrt_fast.integrations import verl as adapter  # noqa: E402
from mrt_fast.integrations import UnsupportedVersionError  # noqa: E402
from mrt_fast.kernels import reference as R  # noqa: E402
from mrt_fast.kernels import use_backend  # noqa: E402

B, T = 5, 6
MODES = adapter.VERL_LOSS_AGG_MODES
GLOBAL_BATCH_INFOS = {
    "local": {},
    # As verl's ppo_loss fills it on one of two data-parallel ranks.
    "global": {"dp_size": 2, "batch_num_tokens": 37, "global_batch_size": 9, "loss_scale_factor": 11},
}


@pytest.fixture
def registered():
    adapter.register()
    yield
    adapter.unregister()


def actor_config(mode, batch_info=None, loss_mode="vanilla", **overrides):
    config = FSDPActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, loss_agg_mode=mode,
                             clip_ratio=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                             policy_loss=PolicyLossConfig(loss_mode=loss_mode), **overrides)
    config.global_batch_info.update(batch_info or {})
    return config


def batch(seed=0, poison_masked=True):
    """[B, T] verl tensors: a short row, a fully masked row, NaN/inf at masked positions."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3] = False
    log_prob = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = log_prob + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    weights = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    if poison_masked:  # verl ignores whatever masked positions hold
        old = old.masked_fill(~mask, float("nan"))
        adv = adv.masked_fill(~mask, float("inf"))
    return dict(log_prob=log_prob, old=old, adv=adv, mask=mask, weights=weights)


def run_loss(fn, b, mode, config, with_weights):
    log_prob = b["log_prob"].clone().requires_grad_()
    loss, metrics = fn(old_log_prob=b["old"], log_prob=log_prob, advantages=b["adv"], response_mask=b["mask"],
                       loss_agg_mode=mode, config=config,
                       rollout_is_weights=b["weights"] if with_weights else None)
    (grad,) = torch.autograd.grad(loss, log_prob)
    return loss.detach(), grad, metrics


@pytest.mark.parametrize("with_weights", [False, True], ids=["no_is_weights", "is_weights"])
@pytest.mark.parametrize("info", GLOBAL_BATCH_INFOS)
@pytest.mark.parametrize("mode", MODES)
def test_registered_loss_equals_verl_vanilla(registered, mode, info, with_weights):
    b = batch(seed=len(mode))
    config = actor_config(mode, GLOBAL_BATCH_INFOS[info])
    # verl's own loss sees NaN at masked positions only where its masked sums drop them; give it
    # the clean batch and ours the poisoned one.
    want, want_grad, want_metrics = run_loss(core_algos.get_policy_loss_fn("vanilla"), batch(len(mode), False),
                                             mode, config, with_weights)
    loss, grad, metrics = run_loss(core_algos.get_policy_loss_fn("mrt_fast"), b, mode, config, with_weights)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
    assert metrics.keys() == want_metrics.keys()
    for key in metrics:
        assert metrics[key] == pytest.approx(want_metrics[key], abs=1e-7), key


@pytest.mark.parametrize("mode", MODES)
def test_aggregation_weights_equal_verl_agg_loss(mode):
    b = batch(seed=7, poison_masked=False)
    values = torch.randn(B, T, dtype=torch.float64)
    for info in GLOBAL_BATCH_INFOS.values():
        want = core_algos.agg_loss(values, b["mask"], mode, **info)
        got = (adapter.verl_aggregation_weights(b["mask"], mode, **info) * values).sum()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def ppo_batch(seed=0):
    """A verl actor micro-batch as ppo_loss receives it: left-padded prompts, flat model log-probs."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    g = torch.Generator().manual_seed(seed)
    prompt_lens, response_lens, P, Rl = [2, 3, 1, 2], [3, 4, 2, 4], 3, 4
    attention_mask = torch.zeros(4, P + Rl, dtype=torch.int64)
    response_mask = torch.zeros(4, Rl, dtype=torch.int64)
    for row, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        attention_mask[row, P - p:P + r] = 1
        response_mask[row, :r] = 1
    response_mask[2] = 0  # a response whose every token is masked (e.g. filtered out)
    nnz = sum(prompt_lens) + sum(response_lens)
    data = TensorDict({
        "prompts": torch.randint(0, 50, (4, P), generator=g),
        "responses": torch.randint(0, 50, (4, Rl), generator=g),
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "old_log_probs": -torch.rand(4, Rl, generator=g, dtype=torch.float64) * 2,
        "advantages": torch.randn(4, Rl, generator=g, dtype=torch.float64),
    }, batch_size=[4])
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(response_mask.sum()), global_batch_size=4)
    log_probs = (-torch.rand(nnz, generator=g, dtype=torch.float64) * 2).requires_grad_()
    entropy = torch.rand(nnz, generator=g, dtype=torch.float64) * 3
    return data, log_probs, entropy


@pytest.mark.parametrize("mode", MODES)
def test_ppo_loss_end_to_end(registered, mode):
    from verl.workers.utils.losses import ppo_loss

    results = {}
    for loss_mode in ("vanilla", "mrt_fast"):
        data, log_probs, entropy = ppo_batch(seed=3)
        config = actor_config(mode, loss_mode=loss_mode, entropy_coeff=0.01, loss_scale_factor=8)
        loss, metrics = ppo_loss(config, {"log_probs": log_probs, "entropy": entropy}, data)
        (grad,) = torch.autograd.grad(loss, log_probs)
        results[loss_mode] = (loss.detach(), grad, float(metrics["actor/pg_loss"].values[0]))
    for want, got in zip(results["vanilla"], results["mrt_fast"]):
        torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(want), rtol=1e-10, atol=1e-12)
    assert results["mrt_fast"][1].abs().sum() > 0


def test_linear_cross_entropy_has_verls_contract():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(40, 16, generator=g, dtype=torch.float64) / 4
    labels = torch.randint(0, 40, (2, 5), generator=g)
    with use_backend("torch"):
        logp, entropy = adapter.linear_cross_entropy(hidden, weight, labels, 0.7, "none", None)
    want_logp, want_entropy = R.logprobs_and_entropy(R.linear_logits(hidden.reshape(10, 16), weight, None, 0.7),
                                                     labels.reshape(-1))
    assert logp.shape == entropy.shape == (10,)  # flattened, as verl's kernel returns
    torch.testing.assert_close(logp, want_logp)
    torch.testing.assert_close(entropy, want_entropy)


def test_linear_cross_entropy_keeps_fp32_logits_under_autocast():
    """verl's actor forward runs under bf16 autocast: the operands are bf16, the logits are not."""
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(64, 32, generator=g), torch.randn(300, 32, generator=g) / 3
    labels = torch.randint(0, 300, (64,), generator=g)
    h16, w16 = hidden.bfloat16().double(), weight.bfloat16().double()
    exact = torch.log_softmax(h16 @ w16.T, -1).gather(1, labels[:, None])[:, 0]
    with use_backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        logp, _ = adapter.linear_cross_entropy(hidden, weight, labels, 1.0)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp.double(), exact, atol=1e-4, rtol=1e-5)


def test_linear_cross_entropy_hands_tensor_parallel_calls_to_verl():
    """With a process group (Megatron's vocab-parallel head) the call reaches verl's own kernel."""
    import traceback

    hidden, weight, labels = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(Exception) as raised:  # verl's kernel is Triton-only: it fails on CPU tensors
        adapter.linear_cross_entropy(hidden, weight, labels, 1.0, "none", object())
    frames = [frame.filename for frame in traceback.extract_tb(raised.value.__traceback__)]
    assert any(name.endswith("verl/utils/kernel/linear_cross_entropy.py") for name in frames), frames


def test_register_kernel_swaps_every_bound_copy_and_unregister_restores(monkeypatch):
    import verl.utils.kernel.linear_cross_entropy as kernel_module

    original = kernel_module.linear_cross_entropy
    # Megatron's forward modules bind the kernel at import; stand in one such loaded module.
    bound = types.ModuleType("verl.models.mcore._bound_kernel_copy")
    bound.linear_cross_entropy = original
    monkeypatch.setitem(sys.modules, bound.__name__, bound)
    adapter.register(kernel=True)
    try:
        assert kernel_module.linear_cross_entropy is adapter.linear_cross_entropy
        assert bound.linear_cross_entropy is adapter.linear_cross_entropy
        assert core_algos.get_policy_loss_fn("mrt_fast") is adapter.policy_loss
        adapter.register(kernel=True)  # idempotent
    finally:
        adapter.unregister()
    assert kernel_module.linear_cross_entropy is original
    assert bound.linear_cross_entropy is original
    with pytest.raises(ValueError, match="Unsupported loss mode"):
        core_algos.get_policy_loss_fn("mrt_fast")


def test_register_refuses_an_unknown_contract(monkeypatch):
    def agg_loss(loss_mat, loss_mask, mode):  # a hypothetical release with another signature
        return loss_mat.sum()

    monkeypatch.setattr(core_algos, "agg_loss", agg_loss)
    with pytest.raises(UnsupportedVersionError, match=r"verl >= 0\.9"):
        adapter.register()
    assert "mrt_fast" not in core_algos.POLICY_LOSS_REGISTRY


def test_register_refuses_to_overwrite_another_loss(monkeypatch):
    monkeypatch.setitem(core_algos.POLICY_LOSS_REGISTRY, "mrt_fast", core_algos.get_policy_loss_fn("vanilla"))
    with pytest.raises(ValueError, match="already registered"):
        adapter.register()


def test_external_module_registers_inside_a_fresh_verl_process():
    """What a Ray worker does: ``import verl`` with VERL_USE_EXTERNAL_MODULES set."""
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="mrt_fast.integrations.verl_autoload",
               MRT_FAST_VERL_KERNEL="1")
    code = ("import verl\n"
            "from verl.trainer.ppo.core_algos import get_policy_loss_fn\n"
            "import verl.utils.kernel.linear_cross_entropy as k\n"
            "print(get_policy_loss_fn('mrt_fast').__module__, k.linear_cross_entropy.__module__)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["mrt_fast.integrations.verl", "mrt_fast.integrations.verl"]
