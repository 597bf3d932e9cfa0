"""`max_kv_tokens`: a bound smaller than one wave gives the same samples, and the KV the engine
holds at once (prefilled contexts and decode rows, from the buffers' storage) stays under it."""

import pytest
import torch

from mrt_fast.rollout import HFEngine, SamplingParams
from mrt_fast.rollout.testing import tiny_causal_lm, torch_threads

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [14, 15], [20, 21, 22, 23, 24], list(range(30, 42))]
PARAMS = SamplingParams(temperature=1.0, max_new_tokens=8, seed=3, ignore_eos=True)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm("qwen2", max_position_embeddings=128)


def tokens(out):
    return [[c.token_ids for c in row] for row in out]


@pytest.mark.parametrize("shared_prefix_decoding", [True, False], ids=["shared", "plain"])
def test_generate_under_a_bound_smaller_than_one_wave(model, shared_prefix_decoding):
    free = HFEngine(model, shared_prefix_decoding=shared_prefix_decoding)
    want = free.generate(PROMPTS, PARAMS, n=4)
    bound = 64
    assert free.peak_kv_tokens > 2 * bound  # the unbounded wave holds far more
    bounded = HFEngine(model, max_kv_tokens=bound, shared_prefix_decoding=shared_prefix_decoding)
    got = bounded.generate(PROMPTS, PARAMS, n=4)
    assert tokens(got) == tokens(want)
    for row_got, row_want in zip(got, want):
        for a, b in zip(row_got, row_want):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    assert 0 < bounded.peak_kv_tokens <= bound


def test_boundaries_under_a_bound(model):
    traces = [list(range(3, 30)), list(range(40, 52))]
    boundaries = [[4, 15, 27], [6, 12]]
    termination = [90, 91]
    params = SamplingParams(temperature=1.0, max_new_tokens=5, seed=1, ignore_eos=True)
    free = HFEngine(model)
    want = free.branch_at_boundaries(traces, boundaries, termination, params, k=3)
    bound = 80
    assert free.peak_kv_tokens > bound
    bounded = HFEngine(model, max_kv_tokens=bound)
    got = bounded.branch_at_boundaries(traces, boundaries, termination, params, k=3)
    assert [[tokens(b) for b in t] for t in [got]] == [[tokens(b) for b in t] for t in [want]]
    assert 0 < bounded.peak_kv_tokens <= bound


def test_config_key_reaches_the_trainers_engine(model):
    from mrt_fast.config import from_dict
    from mrt_fast.train import build_engine

    engine = build_engine(from_dict({"rollout": {"max_kv_tokens": 100}}), model, None, None)  # env: vllm only
    assert engine.max_kv_tokens == 100
    with pytest.raises(ValueError, match="rollout.max_kv_tokens"):
        from_dict({"rollout": {"max_kv_tokens": 0}})
    with pytest.raises(ValueError, match="rollout.max_kv_tokens bounds the hf engine"):
        from_dict({"rollout": {"max_kv_tokens": 100, "engine": "vllm"}})
