"""SamplingParams validation, the token sampler against fp64 reference distributions, random
streams, and stop-string detection across token boundaries."""

import pytest
import torch

from mrt_fast.rollout import SamplingParams
from mrt_fast.rollout.sampling import sample_next, uniform_streams
from mrt_fast.rollout.stopping import StopStrings
from mrt_fast.rollout.testing import tiny_tokenizer, torch_threads


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):  # tiny models on a shared CPU: see mrt_fast.rollout.testing.torch_threads
        yield


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be >= 1"),
        ({"max_new_tokens": 2.5}, TypeError, "max_new_tokens must be an int"),
        ({"temperature": -0.1}, ValueError, "temperature must be 0 .greedy. or a finite number >= 1e-05"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"top_p": 0.0}, ValueError, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, ValueError, "top_p"),
        ({"top_k": -2}, ValueError, "top_k must be >= 0"),
        ({"stop": [""]}, ValueError, "stop must be a list of non-empty strings"),
        ({"stop_token_ids": [-1]}, ValueError, "stop_token_ids must be non-negative"),
        ({"seed": 1.5}, TypeError, "seed must be an int"),
    ],
)
def test_sampling_params_reject_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_normalise_vllm_spellings():
    p = SamplingParams(top_k=-1, stop="</think>")
    assert p.top_k == 0 and p.stop == ["</think>"]


def reference_distribution(logits, temperature, top_k, top_p):
    """fp64 reference: temperature, then top-k, then top-p on the renormalised top-k probs."""
    probs = torch.softmax(logits.double() / temperature, -1)
    order = probs.argsort(descending=True, stable=True)
    sorted_p = probs[order]
    keep = torch.ones_like(sorted_p, dtype=torch.bool)
    if top_k:
        keep[top_k:] = False
    kept = sorted_p * keep
    kept = kept / kept.sum()
    if top_p < 1.0:
        keep &= (torch.cumsum(kept, 0) - kept) < top_p
    out = torch.zeros_like(probs)
    out[order] = sorted_p * keep
    return out / out.sum()


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 7, 1.0), (0.8, 0, 0.6), (1.5, 12, 0.8)])
def test_sampler_draws_from_the_filtered_distribution(temperature, top_k, top_p):
    torch.manual_seed(0)
    vocab, draws = 37, 40_000
    logits = torch.randn(vocab) * 2.0
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    uniforms = torch.rand(draws, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tokens, logprobs = sample_next(logits.expand(draws, vocab), params, uniforms)
    expected = reference_distribution(logits, temperature, top_k, top_p)
    freq = torch.bincount(tokens, minlength=vocab).double() / draws
    assert bool((freq[expected == 0] == 0).all()), "sampled a token the filters removed"
    # 40k draws: the standard error of a frequency is <= 0.0025; allow 4 of them.
    assert (freq - expected).abs().max().item() < 0.01
    # Log-probs are the temperature-scaled distribution before filtering.
    full = torch.log_softmax(logits.double() / temperature, -1)
    torch.testing.assert_close(logprobs.double(), full[tokens], atol=1e-5, rtol=0)


def test_greedy_takes_the_argmax_and_reports_temperature_one_logprobs():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9], [5.0, 0.0, 0.0, 5.0]])
    tokens, logprobs = sample_next(logits, SamplingParams(temperature=0.0), torch.zeros(2, dtype=torch.float64))
    assert tokens.tolist() == [1, 0]  # ties go to the first index, as argmax does
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1)[[0, 1], [1, 0]])


def test_uniform_streams_are_named_by_their_key():
    a = uniform_streams([(1, 0), (1, 1), (1, 0)], 16, torch.device("cpu"))
    b = uniform_streams([(1, 0)], 16, torch.device("cpu"))
    assert torch.equal(a[0], a[2]) and torch.equal(a[0], b[0]) and not torch.equal(a[0], a[1])
    assert bool(((a >= 0) & (a < 1)).all())


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_stop_string_split_across_tokens_is_found_when_it_completes(tokenizer):
    text = "Wait, check again: 3 + 4 = 7. </think> The answer"
    ids = tokenizer.encode(text)
    stops = StopStrings(tokenizer, ["</think>"])
    pieces = [tokenizer.decode([t]) for t in ids]
    hits = [stops.hit(ids[: n + 1]) for n in range(len(ids))]
    end = text.index("</think>") + len("</think>")
    completes = next(n for n in range(len(ids)) if len("".join(pieces[: n + 1])) >= end)
    assert hits.index(True) == completes
    assert stops.cut(tokenizer.decode(ids)) == (text[: text.index("</think>")], "</think>")


def test_stop_string_over_many_short_tokens(tokenizer):
    # Single-character tokens force the window to cover several tokens.
    ids = [tokenizer.convert_tokens_to_ids(ch) for ch in "xx= 7"]
    ids = [t for t in ids if t != tokenizer.unk_token_id]
    stops = StopStrings(tokenizer, ["= 7", "zz"])
    assert [stops.hit(ids[: n + 1]) for n in range(len(ids))] == [False] * (len(ids) - 1) + [True]


def test_special_tokens_that_decode_to_nothing_widen_the_window(tokenizer):
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode("ab = 7") + [eos] * 10 + tokenizer.encode("7")
    stops = StopStrings(tokenizer, ["= 77"], skip_special_tokens=True)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab = 77"
    assert stops.hit(ids)


def test_earliest_stop_string_wins():
    stops = StopStrings(object(), ["BB", "A"])
    assert stops.cut("xxBBxA") == ("xx", "BB")
    assert stops.cut("no stop") == ("no stop", None)


@pytest.fixture(scope="module")
def uniform_engine():
    """An engine whose model puts equal mass on every token whatever the context (a zero LM head), so
    its samples are a pure function of its random streams."""
    from mrt_fast.rollout import HFEngine
    from mrt_fast.rollout.testing import tiny_causal_lm

    model = tiny_causal_lm(vocab_size=64)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return HFEngine(model)


def test_different_contexts_draw_independent_streams(uniform_engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=3, ignore_eos=True)
    a, b = uniform_engine.generate([[5, 6, 7], [5, 6, 8]], params, n=2)
    # sample 0 of two different prompts with one seed: different uniforms, so different tokens
    assert a[0].token_ids != b[0].token_ids and a[1].token_ids != b[1].token_ids
    assert a[0].token_ids != a[1].token_ids
    # the same prompt twice in one call: two independent samples, not a copy
    c, d = uniform_engine.generate([[5, 6, 7], [5, 6, 7]], params, n=1)
    assert c[0].token_ids != d[0].token_ids
    # a branch forked from a cut of a trace does not reuse the trace's uniforms
    (trace,) = uniform_engine.generate([[9, 9]], params, n=1)[0]
    (branch,) = uniform_engine.fork([[9, 9] + trace.token_ids[:4]], params, n=1)[0]
    assert branch.token_ids[:8] != trace.token_ids[:8]


def test_same_seed_same_samples_whatever_the_batch(uniform_engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=3, ignore_eos=True)
    alone = uniform_engine.generate([[5, 6, 7]], params, n=2)[0]
    batched = uniform_engine.generate([[1, 2], [5, 6, 7]], params, n=2)[1]
    assert [c.token_ids for c in alone] == [c.token_ids for c in batched]
    again = uniform_engine.generate([[5, 6, 7]], params, n=2)[0]
    assert [c.token_ids for c in alone] == [c.token_ids for c in again]
    other_seed = uniform_engine.generate([[5, 6, 7]], SamplingParams(temperature=1.0, max_new_tokens=12, seed=4,
                                                                     ignore_eos=True), n=2)[0]
    assert [c.token_ids for c in alone] != [c.token_ids for c in other_seed]


def test_fork_caps_each_prefix_below_max_new_tokens(uniform_engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=3, ignore_eos=True)
    out = uniform_engine.fork([[5, 6, 7], [1, 2]], params, n=2, max_new_tokens=[3, 20])
    assert [len(c.token_ids) for c in out[0]] == [3, 3] and [len(c.token_ids) for c in out[1]] == [12, 12]
    with pytest.raises(ValueError, match="max_new_tokens"):
        uniform_engine.fork([[5, 6, 7]], params, n=1, max_new_tokens=[3, 4])
