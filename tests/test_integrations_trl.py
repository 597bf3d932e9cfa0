"""mrt_fast.integrations.trl against the installed TRL (>= 1.15): its own functions and a real GRPOTrainer.

Per-call checks compare with TRL's function on the same inputs (a constant log-prob offset would
cancel in GRPO's advantages and ratios, so only a per-call check can see it); the trainer run
checks that the patch is reached and changes nothing but rounding.
"""

import sys
import tempfile
import types

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is not installed (pip install -e '.[dev]')")

import trl.trainer.utils as trl_utils  # noqa: E402

from mrt_fast.integrations import trl as adapter  # noqa: E402
from mrt_fast.integrations import UnsupportedVersionError  # noqa: E402
from mrt_fast.kernels import use_backend  # noqa: E402

TRL_CHUNKED = trl_utils._ChunkedLogProbFunction
TRL_SELECTIVE = trl_utils.selective_log_softmax


@pytest.fixture(autouse=True)
def torch_backend_and_clean_patch():
    with use_backend("torch"):
        yield
    adapter.unpatch()


def lm_head_inputs(n=24, h=16, v=50, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / 2).requires_grad_()
    b = (torch.randn(v, generator=g) / 4).requires_grad_() if bias else None
    return hidden, weight, b, torch.randint(0, v, (n,), generator=g)


def value_and_grads(fn, hidden, weight, bias, targets, *rest):
    logp, entropy, *_ = fn.apply(hidden, weight, bias, targets, *rest)
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    # Both outputs reach the loss, as in GRPO's entropy bonus.
    grads = torch.autograd.grad((logp * torch.linspace(-1, 1, len(logp))).sum() + 0.1 * entropy.sum(), leaves)
    return logp.detach(), entropy.detach(), grads


@pytest.mark.parametrize("temperature,logit_scale,bias", [(1.0, 1.0, False), (0.7, 1.0, True), (0.9, 2.5, False)])
def test_chunked_log_probs_equal_trls_function(temperature, logit_scale, bias):
    inputs = lm_head_inputs(bias=bias)
    rest = (temperature, 4096, None, logit_scale, ("log_probs", "entropy"))
    want = value_and_grads(TRL_CHUNKED, *inputs, *rest)
    got = value_and_grads(adapter.ChunkedLogProbs, *inputs, *rest)
    # Two fp32 log-sum-exps of logits up to ~15 (logit_scale 2.5 / T 0.9): ~1e-6 apart, 1e-5 at worst.
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_chunked_log_probs_under_bf16_autocast_are_no_less_accurate_than_trls():
    hidden, weight, _, targets = lm_head_inputs(n=64, h=32, v=300, seed=2)
    h16, w16 = hidden.detach().bfloat16().double(), weight.detach().bfloat16().double()
    exact = torch.log_softmax(h16 @ w16.T / 0.8, -1).gather(1, targets[:, None])[:, 0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = TRL_CHUNKED.apply(hidden, weight, None, targets, 0.8, 4096, None, 1.0, ("log_probs",))[0]
        ours = adapter.ChunkedLogProbs.apply(hidden, weight, None, targets, 0.8, 4096, None, 1.0, ("log_probs",))[0]
    # TRL rounds each logits tile to bf16 before its fp32 fold; we keep fp32 logits.
    assert (ours.double() - exact).abs().max() <= (theirs.double() - exact).abs().max()


@pytest.mark.parametrize("case", ["is_top1", "mean_logits+log_sum_sq_probs", "softcapping", "logit_scale_0"])
def test_what_we_do_not_compute_goes_to_trls_function(case):
    hidden, weight, bias, targets = lm_head_inputs(seed=4)
    outputs, softcap, scale = ("log_probs", "entropy"), None, 1.0
    if case == "is_top1":
        outputs = ("log_probs", "is_top1")  # SFT's accuracy metric
    elif case == "mean_logits+log_sum_sq_probs":
        outputs = ("log_probs", "mean_logits", "is_top1", "log_sum_sq_probs")  # DPO's
    elif case == "softcapping":
        softcap = 30.0  # Gemma
    else:
        scale = 0.0  # a real 0.0 is kept by TRL
    args = (hidden, weight, bias, targets, 0.9, 4096, softcap, scale, outputs)
    before = adapter.call_counts["chunked_log_probs/trl"]
    got = adapter.ChunkedLogProbs.apply(*args)
    want = TRL_CHUNKED.apply(*args)
    assert adapter.call_counts["chunked_log_probs/trl"] == before + 1
    assert len(got) == 5
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            assert torch.equal(g, w)


@pytest.mark.parametrize("layout", ["rows", "rows_k", "rows_k_masked", "rows_masked_bf16"])
def test_selective_log_softmax_equals_trls(layout):
    g = torch.Generator().manual_seed(5)
    dtype = torch.bfloat16 if layout.endswith("bf16") else torch.float32
    logits = (3 * torch.randn(3, 4, 40, generator=g)).to(dtype).requires_grad_()
    index = torch.randint(0, 40, (3, 4, 5) if "_k" in layout else (3, 4), generator=g)
    row_mask = None
    if "masked" in layout:
        row_mask = torch.rand(index.shape, generator=g) > 0.3
        index = index.masked_fill(~row_mask, -100)  # masked ids need not be valid
    temperature = 0.8
    clean = index.clamp(min=0)  # TRL's torch path gathers every id, masked or not
    weights = torch.rand(index.shape, generator=g)
    want = TRL_SELECTIVE(logits.float(), clean, temperature, row_mask)
    (want_grad,) = torch.autograd.grad((want * weights).sum(), logits)
    got = adapter.selective_log_softmax(logits, index, temperature, row_mask)
    assert got.shape == index.shape
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad((got * weights).sum(), logits)
    torch.testing.assert_close(grad.float(), want_grad.float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-6,
                               rtol=1e-5)


def test_trls_own_callers_reach_the_patched_selective_log_softmax():
    logits = torch.randn(2, 5, 30, generator=torch.Generator().manual_seed(6))
    index = torch.randint(0, 30, (2, 5), generator=torch.Generator().manual_seed(7))
    want, want_entropy = trl_utils.selective_log_softmax_and_entropy(logits, index, temperature=0.7)
    adapter.patch()
    before = adapter.call_counts["selective_log_softmax"]
    got, entropy = trl_utils.selective_log_softmax_and_entropy(logits, index, temperature=0.7)
    assert adapter.call_counts["selective_log_softmax"] == before + 1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, want_entropy)


def test_patch_reaches_every_binding_and_unpatch_restores(monkeypatch):
    # TRL's trainers that take selective_log_softmax import it by name; stand in one loaded module.
    bound = types.ModuleType("trl.experimental._bound_copy")
    bound.selective_log_softmax = TRL_SELECTIVE
    monkeypatch.setitem(sys.modules, bound.__name__, bound)
    adapter.patch()
    assert trl_utils._ChunkedLogProbFunction is adapter.ChunkedLogProbs
    assert trl_utils.selective_log_softmax is adapter.selective_log_softmax
    assert bound.selective_log_softmax is adapter.selective_log_softmax
    adapter.patch()  # idempotent
    adapter.unpatch()
    assert trl_utils._ChunkedLogProbFunction is TRL_CHUNKED
    assert trl_utils.selective_log_softmax is TRL_SELECTIVE
    assert bound.selective_log_softmax is TRL_SELECTIVE


def test_patch_refuses_an_unknown_contract(monkeypatch):
    def selective_log_softmax(logits, index):  # a hypothetical release with the older signature
        return logits

    monkeypatch.setattr(trl_utils, "selective_log_softmax", selective_log_softmax)
    with pytest.raises(UnsupportedVersionError, match=r"trl >= 1\.15"):
        adapter.patch()
    assert trl_utils._ChunkedLogProbFunction is TRL_CHUNKED  # nothing replaced


def tiny_grpo_run(patched, per_call=None):
    """3 GRPO steps (SGD, fp32) of a 1-layer Qwen2 on the shipped tiny tokenizer: (initial, final) parameters."""
    from datasets import Dataset
    from transformers import Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from mrt_fast.data.tiny_model import tiny_model_config
    from mrt_fast.data.tokenizer import load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_model_config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    prompts = Dataset.from_dict({"prompt": ["12+3=", "7*8=", "5-2=", "9+9="]})

    def longer_is_better(completions, **kwargs):
        return [len(c) / 10 for c in completions]

    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=8, max_steps=3, learning_rate=0.1, optim="sgd", temperature=0.9,
                      bf16=False, use_cpu=True, seed=0, report_to=[], save_strategy="no", disable_tqdm=True)
    if patched:
        adapter.patch()
        if per_call is not None:
            trl_utils._ChunkedLogProbFunction = per_call
    try:
        trainer = GRPOTrainer(model=model, reward_funcs=[longer_is_better], args=args, train_dataset=prompts,
                              processing_class=tokenizer)
        trainer.train()
    finally:
        adapter.unpatch()
    return initial, {name: p.detach().clone() for name, p in model.named_parameters()}


class ComparedWithTRL:
    """Serves each call with ours and records its distance to TRL's own function on the same inputs."""

    gaps: list[float] = []

    @staticmethod
    def apply(*args):
        ours = adapter.ChunkedLogProbs.apply(*args)
        with torch.no_grad():
            theirs = TRL_CHUNKED.apply(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
        ComparedWithTRL.gaps.append(max((ours[i] - theirs[i]).abs().max().item() for i in (0, 1)))
        return ours


def test_grpo_trainer_patched_equals_unpatched():
    initial, want = tiny_grpo_run(patched=False)
    served_before = adapter.call_counts["chunked_log_probs"]
    ComparedWithTRL.gaps.clear()
    _, got = tiny_grpo_run(patched=True, per_call=ComparedWithTRL)
    # One fused-LM-head forward per step (on-policy GRPO), each served by us, none handed back.
    assert adapter.call_counts["chunked_log_probs"] - served_before == len(ComparedWithTRL.gaps) == 3
    # fp32 rounding of the log-sum-exp over V=478 columns: ~1e-6 per token.
    assert max(ComparedWithTRL.gaps) < 1e-5
    # Gradients then differ by ~1e-6 relative; times lr 0.1 over 3 steps that is ~1e-8 on the
    # parameters, which themselves move by ~1e-2 (so a wrong gradient would show).
    assert max((want[k] - initial[k]).abs().max().item() for k in want) > 1e-3
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=name)


def test_sft_trainer_asks_for_is_top1_and_gets_trls_function():
    """The patch is process-wide: SFT's fused head wants is_top1, which we hand back to TRL."""
    from datasets import Dataset
    from transformers import Qwen2ForCausalLM
    from trl import SFTConfig, SFTTrainer

    from mrt_fast.data.tiny_model import tiny_model_config
    from mrt_fast.data.tokenizer import load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer()
    final = []
    for patched in (False, True):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(tiny_model_config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
        args = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, max_steps=2, learning_rate=0.1,
                         optim="sgd", bf16=False, use_cpu=True, seed=0, report_to=[], save_strategy="no",
                         disable_tqdm=True)
        texts = Dataset.from_dict({"text": ["12+3=15", "7*8=56", "5-2=3", "9+9=18"]})
        handed_back = adapter.call_counts["chunked_log_probs/trl"]
        if patched:
            adapter.patch()
        try:
            SFTTrainer(model=model, args=args, train_dataset=texts, processing_class=tokenizer).train()
        finally:
            adapter.unpatch()
        if patched:
            assert adapter.call_counts["chunked_log_probs/trl"] - handed_back == 2
        final.append({name: p.detach().clone() for name, p in model.named_parameters()})
    for name in final[0]:
        assert torch.equal(final[0][name], final[1][name]), name


def test_versions_older_than_the_contract_are_refused():
    from mrt_fast.integrations._patching import Library

    with pytest.raises(UnsupportedVersionError, match=r"older than .* supports trl >= 99"):
        Library("trl", "trl >= 99", minimum=(99,))
