"""Packed shared-prefix forward/backward == running each prefix + continuation separately.

Tiny random Llama / Qwen2 / Qwen3 / Mistral models in fp64: log-probs and the gradients of every
parameter must match the separate-sequence reference
(stock HF forward, full logits, log_softmax), with several groups per batch, continuations of different lengths, an
empty-prefix plain sequence, a group split across micro-batches, sliding windows and tied
embeddings.
"""

import pytest
import torch
import transformers

from mrt_fast.packing import PrefixGroup, check_model, pack, packed_hidden, packed_logprobs

VOCAB = 97
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0,
)
MODEL_CONFIGS = {
    "llama": lambda **kw: transformers.LlamaConfig(**COMMON, **kw),
    "qwen2": lambda **kw: transformers.Qwen2Config(**COMMON, **kw),
    "qwen3": lambda **kw: transformers.Qwen3Config(**COMMON, head_dim=8, **kw),
    "mistral": lambda **kw: transformers.MistralConfig(**COMMON, **{"sliding_window": None, **kw}),
}


def _fp64_rms_norm(self, x):
    """HF's RMSNorm rounds through fp32 even in fp64 models. A shared prefix token's gradient is a
    sum over continuations, which that rounding would see once (packed) vs per continuation
    (separate): ~1e-7 relative noise that would hide real errors. Same formula, in fp64."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def make_model(name: str, **overrides) -> torch.nn.Module:
    config = MODEL_CONFIGS[name](**overrides)
    # Reference path: stock SDPA attention (eager would round its softmax through fp32).
    config._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float64)
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = _fp64_rms_norm.__get__(module)
    # Random init leaves norms at 1 and biases at 0; perturb every parameter so nothing is trivially symmetric.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def make_groups(seed: int = 0) -> list[PrefixGroup]:
    g = torch.Generator().manual_seed(seed)

    def toks(n):
        return torch.randint(0, VOCAB, (n,), generator=g).tolist()

    return [
        PrefixGroup(toks(7), [toks(3), toks(5), toks(1)], episode_ids=[[0, 1, 1], [0, 0, 1, 2, 2], [3]]),
        PrefixGroup(toks(4), [toks(6), toks(2)], loss_masks=[[1, 1, 0, 0, 1, 1], [0, 1]]),
        PrefixGroup([], [toks(5)]),  # a plain sequence: its first token is context
        PrefixGroup(toks(1), [toks(4), toks(4)]),
    ]


def separate_logprobs(model, groups) -> dict:
    """Reference: each prefix + continuation through the stock model, log_softmax of full logits."""
    out = {}
    for gi, group in enumerate(groups):
        for k, cont in enumerate(group.continuations):
            seq = torch.tensor(group.prefix + cont)[None]
            logp = torch.log_softmax(model(input_ids=seq).logits[0].double(), dim=-1)
            first = len(group.prefix) if group.prefix else 1
            positions = torch.arange(first, seq.shape[1])
            out[(gi, k)] = logp[positions - 1, seq[0, positions]]
    return out


def loss_weights(groups) -> dict:
    """Fixed random per-token weights, so the backward pass checks more than a plain sum."""
    g = torch.Generator().manual_seed(123)
    return {
        (gi, k): torch.randn(len(c) - (0 if group.prefix else 1), generator=g, dtype=torch.float64)
        for gi, group in enumerate(groups)
        for k, c in enumerate(group.continuations)
    }


def grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_packed_equals_separate(model, groups, pad_to_multiple=None, **pack_kwargs):
    weights = loss_weights(groups)
    model.zero_grad()
    ref = separate_logprobs(model, groups)
    sum(torch.dot(weights[key], lp) for key, lp in ref.items()).backward()
    ref_grads = grads(model)

    model.zero_grad()
    batches = pack(groups, **pack_kwargs)
    got = {}
    for batch in batches:  # micro-batches: gradients accumulate, as in training
        logprobs = packed_logprobs(model, batch, backend="sdpa", pad_to_multiple=pad_to_multiple)
        for key, lp in zip(batch.sequence_keys, logprobs):
            got[key] = lp
        sum(torch.dot(weights[key], lp.double()) for key, lp in zip(batch.sequence_keys, logprobs)).backward()
    got_grads = grads(model)

    assert got.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(got[key].double(), ref[key].detach(), rtol=1e-9, atol=1e-10)
    assert got_grads.keys() == ref_grads.keys() == {n for n, _ in model.named_parameters()}
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}")
    assert model.config._attn_implementation == "sdpa"  # restored after the packed forward
    return batches


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_shared_prefix_packed_equals_separate(name):
    model = make_model(name)
    batches = check_packed_equals_separate(model, make_groups())
    assert len(batches) == 1 and batches[0].shares_prefix
    assert batches[0].num_tokens < batches[0].unshared_tokens


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_group_split_across_micro_batches(name):
    groups = make_groups(seed=1)
    # Group 0 has 7 + 9 tokens > 12: its continuations are spread over micro-batches with the prefix.
    batches = check_packed_equals_separate(make_model(name), groups, max_tokens=12)
    carrying_group0 = [b for b in batches if 0 in b.group_indices]
    assert len(carrying_group0) >= 2
    assert all(b.num_tokens <= 12 for b in batches)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing_recomputes_packed_attention(reentrant):
    """Recomputed layers run after `packed_hidden` has returned, outside any attention context:
    they must attend through the packed mask again (plain SDPA there was a CheckpointError, or
    with reentrant checkpointing silently wrong gradients)."""
    model = make_model("qwen2")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()  # checkpointing is active only in training mode
    check_packed_equals_separate(model, make_groups(), max_tokens=16)


def test_padded_stream_equals_separate():
    """Padding the stream (as flex does on a GPU) changes no log-prob and no gradient."""
    check_packed_equals_separate(make_model("llama"), make_groups(seed=3), pad_to_multiple=32)


def test_unshared_packing_equals_separate():
    check_packed_equals_separate(make_model("qwen2"), make_groups(seed=2), share_prefix=False)


def test_tied_embeddings():
    model = make_model("qwen2", tie_word_embeddings=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    check_packed_equals_separate(model, make_groups(seed=3))


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("mistral", {"sliding_window": 5}),  # every layer windowed
        ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),  # mixed layers
    ],
)
def test_sliding_window_handled(name, overrides):
    model = make_model(name, **overrides)
    check_packed_equals_separate(model, make_groups(seed=4))


def test_flex_backend_forward_matches_sdpa_on_cpu():
    # FlexAttention has no CPU backward; its forward (eager) still checks the BlockMask path end to end.
    model = make_model("llama").float()
    batch = pack(make_groups(seed=5))[0]
    with torch.no_grad():
        sdpa = packed_hidden(model, batch, backend="sdpa")
        flex = packed_hidden(model, batch, backend="flex")
        # Padded as on a GPU (a multiple of 1024 there): the block mask covers the padding group too.
        flex_padded = packed_hidden(model, batch, backend="flex", pad_to_multiple=128)
    assert batch.num_tokens % 128 != 0
    torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flex_padded, sdpa, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no backward on the CPU"):
        packed_hidden(model, batch, backend="flex")


def test_flash_varlen_refuses_shared_prefix():
    batch = pack(make_groups())[0]
    with pytest.raises(ValueError, match="cannot share a prefix"):
        packed_hidden(make_model("llama"), batch, backend="flash_varlen")


def test_flash_varlen_matches_sdpa():
    pytest.importorskip("flash_attn", reason="flash-attn is not installed (and needs a CUDA GPU)")
    if not torch.cuda.is_available():
        pytest.skip("flash-attn varlen needs a CUDA GPU")
    model = make_model("qwen2").to("cuda", torch.bfloat16)
    batch = pack(make_groups(), share_prefix=False)[0]
    with torch.no_grad():
        ref = packed_hidden(model, batch, backend="sdpa")
        got = packed_hidden(model, batch, backend="flash_varlen")
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
        ({"logit_scale": 0.5}, "logit_scale"),
        ({"logits_scaling": 2.0}, "logits_scaling"),
        ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ],
)
def test_non_standard_logits_refused(overrides, match):
    model = make_model("llama")
    for key, value in overrides.items():
        setattr(model.config, key, value)
    with pytest.raises(ValueError, match=match):
        check_model(model)


def test_real_gemma2_refused():
    config = transformers.Gemma2Config(**{**COMMON, "head_dim": 8})
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="softcapping"):
        packed_hidden(model, pack(make_groups())[0])


def test_token_out_of_vocab_refused():
    batch = pack([PrefixGroup([1, 2], [[3, VOCAB]])])[0]
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        packed_hidden(make_model("llama"), batch)


def test_group_longer_than_max_positions_refused():
    batch = pack([PrefixGroup([1] * 60, [[2] * 5])])[0]
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        packed_hidden(make_model("llama"), batch)


def test_batch_type_checked():
    with pytest.raises(TypeError, match="PackedBatch"):
        packed_hidden(make_model("llama"), [1, 2, 3])


# --- the trainer's call ------------------------------------------------------------------------


def separate_hidden(model, groups, batch) -> torch.Tensor:
    """Reference hidden states for `batch.targets`, each from its own prefix + continuation."""
    rows = []
    for g, k in batch.sequence_keys:
        group = groups[g]
        seq = torch.tensor(group.prefix + group.continuations[k])[None]
        hidden = model.base_model(input_ids=seq).last_hidden_state[0]
        first = len(group.prefix) if group.prefix else 1
        rows.append(hidden[first - 1 : seq.shape[1] - 1])
    return torch.cat(rows)


def test_fused_policy_loss_on_packed_batch_equals_separate():
    from mrt_fast.loss import fused_policy_loss

    model = make_model("qwen3")
    groups = make_groups(seed=6)
    (batch,) = pack(groups)
    adv = torch.randn(len(batch.seq_ids), dtype=torch.float64)
    head = model.get_output_embeddings().weight
    results = []
    for hidden_fn in (lambda: packed_hidden(model, batch, backend="sdpa"), lambda: separate_hidden(model, groups, batch)):
        model.zero_grad()
        loss, _ = fused_policy_loss(hidden_fn(), head, batch.targets, adv, seq_ids=batch.target_seq_ids,
                                    loss_mask=batch.target_loss_mask, loss_agg="seq-mean-token-mean")
        loss.backward()
        results.append((loss.detach(), grads(model)))
    (loss_packed, g_packed), (loss_ref, g_ref) = results
    torch.testing.assert_close(loss_packed, loss_ref, rtol=1e-10, atol=1e-12)
    for name in g_ref:
        torch.testing.assert_close(g_packed[name], g_ref[name], rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}")

    # A padding micro-batch (rank balancing filler) runs the same compute and adds no gradient.
    model.zero_grad()
    padding = batch.as_padding()
    loss, _ = fused_policy_loss(packed_hidden(model, padding, backend="sdpa"), head, padding.targets, adv,
                                seq_ids=padding.target_seq_ids, loss_mask=padding.target_loss_mask)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(float(p.grad.abs().max()) == 0.0 for p in model.parameters() if p.grad is not None)
