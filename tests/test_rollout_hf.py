"""The embedded HF engine against independent references: no-cache greedy decoding,
transformers' own `generate`, fp64 log-probs and the trainer's log-prob provider."""

import pytest
import torch

from mrt_fast.loss import token_logprobs
from mrt_fast.rollout import HFEngine, SamplingParams
from mrt_fast.rollout.testing import tiny_causal_lm, tiny_tokenizer, torch_threads


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):  # tiny models on a shared CPU: see mrt_fast.rollout.testing.torch_threads
        yield

KINDS = ["qwen2", "llama"]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [14, 15], [20, 21, 22, 23, 24]]


@pytest.fixture(scope="module", params=KINDS)
def model(request):
    return tiny_causal_lm(request.param, max_position_embeddings=64)


def greedy_without_cache(model, prompt, steps):
    """Reference: recompute the whole sequence at every step, no cache, no padding."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
    return out


def test_batched_greedy_matches_recomputation_and_transformers_generate(model):
    engine = HFEngine(model)
    out = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True))
    for prompt, (c,) in zip(PROMPTS, out):
        assert c.token_ids == greedy_without_cache(model, prompt, 12)
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                            pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert c.token_ids == hf[0, len(prompt):].tolist()


def test_sampled_rows_do_not_depend_on_the_rest_of_the_batch(model):
    params = SamplingParams(temperature=1.0, top_k=50, max_new_tokens=10, seed=7)
    engine = HFEngine(model)
    together = engine.generate(PROMPTS, params, n=2)
    for prompt, row in zip(PROMPTS, together):
        alone = engine.generate([prompt], params, n=2)[0]
        assert [c.token_ids for c in row] == [c.token_ids for c in alone]
        for a, b in zip(row, alone):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 1.0, 5), (0.6, 0.95, 20)])
def test_logprobs_match_the_trainers_provider_and_fp64(model, temperature, top_p, top_k):
    """Reported log-probs are log_softmax(logits / T) at the sampled token, before top-k/top-p:
    equal (fp32 tolerance 2e-5) to mrt_fast.loss.token_logprobs on a separate full forward."""
    engine = HFEngine(model)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=10, seed=3)
    for prompt, row in zip(PROMPTS, engine.generate(PROMPTS, params, n=2)):
        for c in row:
            ids = torch.tensor([prompt + c.token_ids])
            with torch.no_grad():
                out = model(ids, output_hidden_states=True)
            hidden = out.hidden_states[-1][0, len(prompt) - 1 : -1]
            targets = torch.tensor(c.token_ids)
            torch.testing.assert_close(model.lm_head(hidden), out.logits[0, len(prompt) - 1 : -1])
            with torch.no_grad():
                trainer = token_logprobs(hidden, model.lm_head.weight, targets, temperature=temperature)
            reference = torch.log_softmax(out.logits[0, len(prompt) - 1 : -1].double() / temperature, -1)
            reference = reference.gather(-1, targets[:, None]).squeeze(-1)
            got = torch.tensor(c.logprobs, dtype=torch.float64)
            torch.testing.assert_close(got, trainer.double(), atol=2e-5, rtol=0)
            torch.testing.assert_close(got, reference, atol=2e-5, rtol=0)
            if top_k:  # every sampled token is among the top k of its step
                logits = out.logits[0, len(prompt) - 1 : -1]
                ranks = (logits > logits.gather(-1, targets[:, None])).sum(-1)
                assert bool((ranks < top_k).all())


def test_greedy_logprobs_are_temperature_one(model):
    engine = HFEngine(model)
    (c,), = engine.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_new_tokens=6))
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[0] + c.token_ids])).logits[0, len(PROMPTS[0]) - 1 : -1]
    expected = torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), expected, atol=2e-5, rtol=0)


def count_tokens(model):
    """Count the token positions fed through the model (a forward pre-hook on the embedding)."""
    seen = []
    handle = model.get_input_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0].numel()))
    return seen, handle


def test_fork_computes_the_prefix_once(model):
    engine = HFEngine(model)
    prefix = list(range(3, 40))
    seen, handle = count_tokens(model)
    try:
        engine.fork([prefix], SamplingParams(max_new_tokens=9, ignore_eos=True, seed=0), n=6)
    finally:
        handle.remove()
    # One prefill of the prefix, then one token per branch per step after the first.
    assert sum(seen) == len(prefix) + 6 * (9 - 1)


def test_prefix_cache_handle_is_reusable_and_invalidated_by_update_weights(model):
    engine = HFEngine(model)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    sampled = SamplingParams(temperature=1.0, max_new_tokens=6, seed=5)
    handle = engine.prefill(PROMPTS)
    assert [[c.token_ids for c in r] for r in engine.fork(handle, greedy, n=2)] == \
        [[c.token_ids for c in r] for r in engine.fork(PROMPTS, greedy, n=2)]
    assert [[c.token_ids for c in r] for r in engine.fork(handle, sampled, n=3)] == \
        [[c.token_ids for c in r] for r in engine.fork(PROMPTS, sampled, n=3)]
    engine.update_weights()
    with pytest.raises(ValueError, match="before update_weights"):
        engine.fork(handle, greedy, n=1)


def test_update_weights_copies_another_models_state_dict(model):
    kind = "llama" if "Llama" in type(model).__name__ else "qwen2"
    other = tiny_causal_lm(kind, max_position_embeddings=64, seed=123)
    own = tiny_causal_lm(kind, max_position_embeddings=64)  # a copy we may overwrite
    engine = HFEngine(own)
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    before = engine.generate([PROMPTS[0]], params)[0][0].token_ids
    engine.update_weights(other.state_dict())
    after = engine.generate([PROMPTS[0]], params)[0][0].token_ids
    assert after == greedy_without_cache(other, PROMPTS[0], 8) and after != before
    engine.update_weights(other)  # a module works too; the engine's own module is a no-op
    engine.update_weights(own)
    with pytest.raises(ValueError, match="names the model does not have"):
        engine.update_weights({"not.a.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="has shape"):
        engine.update_weights({"lm_head.weight": torch.zeros(3, 3)})


def test_eos_ends_a_sample_and_ignore_eos_keeps_going(model):
    greedy = HFEngine(model).generate([PROMPTS[2]], SamplingParams(temperature=0.0, max_new_tokens=10))[0][0]
    eos = greedy.token_ids[4]
    engine = HFEngine(model, eos_token_id=eos)
    out = engine.generate([PROMPTS[2]], SamplingParams(temperature=0.0, max_new_tokens=10))[0][0]
    assert out.finish_reason == "eos" and out.token_ids == greedy.token_ids[: greedy.token_ids.index(eos) + 1]
    kept = engine.generate([PROMPTS[2]], SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True))[0][0]
    assert kept.token_ids == greedy.token_ids and kept.finish_reason == "length"


def test_generation_stops_at_the_context_length(model):
    engine = HFEngine(model)  # max_position_embeddings = 64
    out = engine.generate([[3] * 61, [4] * 64, [5] * 10], SamplingParams(temperature=0.0, max_new_tokens=8))
    assert [len(r[0].token_ids) for r in out] == [3, 0, 8]
    assert all(r[0].finish_reason == "length" for r in out)


def test_stop_strings_without_a_tokenizer_are_an_error(model):
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        HFEngine(model).generate([PROMPTS[0]], SamplingParams(stop=["x"]))


def test_engine_restores_training_mode_and_builds_no_graph(model):
    model.train()
    try:
        out = HFEngine(model).generate([PROMPTS[0]], SamplingParams(max_new_tokens=3, seed=0))
        assert model.training and len(out[0][0].token_ids) == 3
    finally:
        model.eval()


def test_text_is_decoded_with_the_tokenizer(model):
    tok = tiny_tokenizer()
    engine = HFEngine(model, tok)
    c = engine.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_new_tokens=8))[0][0]
    assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)


def test_small_batches_give_the_same_results(model):
    params = SamplingParams(temperature=1.0, max_new_tokens=7, seed=11)
    big = HFEngine(model).generate(PROMPTS, params, n=3)
    small = HFEngine(model, max_batch_size=2, prefill_chunk_tokens=4).generate(PROMPTS, params, n=3)
    assert [[c.token_ids for c in r] for r in big] == [[c.token_ids for c in r] for r in small]
    by_kv = HFEngine(model, max_kv_tokens=20).generate(PROMPTS, params, n=3)  # 1 row: 9 cached + 7 new
    assert [[c.token_ids for c in r] for r in big] == [[c.token_ids for c in r] for r in by_kv]


def test_engine_rejects_sliding_window_models():
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True,
                         sliding_window=8, max_window_layers=0)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="full-attention"):
        HFEngine(model)


def test_shared_prefix_decoding_equals_copying_the_prefix_into_every_branch(model):
    """Branches of one context read its KV through shared-prefix attention by default; the same
    samples and log-probs (fp32, 1e-5) come out of the plain path that copies the KV per branch."""
    params = SamplingParams(temperature=0.9, top_k=40, max_new_tokens=10, seed=8)
    shared = HFEngine(model).generate(PROMPTS, params, n=3)
    copied = HFEngine(model, shared_prefix_decoding=False).generate(PROMPTS, params, n=3)
    assert [[c.token_ids for c in r] for r in shared] == [[c.token_ids for c in r] for r in copied]
    for r1, r2 in zip(shared, copied):
        for a, b in zip(r1, r2):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    # The attention implementation is the model's own again afterwards.
    assert model.config._attn_implementation == "sdpa"
