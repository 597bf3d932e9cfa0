"""Meta-prover branching: cutting one trace's cache at every boundary gives the same answers as
recomputing each boundary's context, and costs one prefill per trace."""

import pytest
import torch

from mrt_fast.rollout import HFEngine, SamplingParams, branch_at_boundaries
from mrt_fast.rollout.testing import tiny_causal_lm, torch_threads


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):  # tiny models on a shared CPU: see mrt_fast.rollout.testing.torch_threads
        yield

TRACES = [list(range(3, 45)), list(range(50, 71)), [7, 8, 9]]
BOUNDARIES = [[0, 5, 42, 20, 20], [3, 21], [1]]
TERMINATION = [97, 98, 99]


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def engine(request):
    return HFEngine(tiny_causal_lm(request.param, max_position_embeddings=128))


class ForkOnly:
    """The real HF engine seen through the plain protocol (no branch_at_boundaries of its own),
    as the vLLM backend is: branching then recomputes nothing itself but calls fork."""

    def __init__(self, engine):
        self.engine = engine

    def generate(self, prompts, params, n=1):
        return self.engine.generate(prompts, params, n)

    def fork(self, prefixes, params, n):
        return self.engine.fork(prefixes, params, n)

    def update_weights(self, weights=None):
        self.engine.update_weights(weights)


def recompute(engine, traces, boundaries, termination, params, k):
    """Reference: every boundary's full context prefilled from scratch (a plain batch)."""
    contexts = [trace[:b] + termination for trace, bounds in zip(traces, boundaries) for b in bounds]
    answers = iter(engine.generate(contexts, params, n=k))
    return [[next(answers) for _ in bounds] for bounds in boundaries]


def ids(answers):
    return [[[c.token_ids for c in branch] for branch in trace] for trace in answers]


@pytest.mark.parametrize("termination", [TERMINATION, []], ids=["termination", "no-termination"])
def test_truncated_cache_gives_the_same_greedy_answers_as_recomputation(engine, termination):
    boundaries = [[b for b in bounds if b > 0 or termination] for bounds in BOUNDARIES]
    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    got = branch_at_boundaries(engine, TRACES, boundaries, termination, params, k=2)
    assert ids(got) == ids(recompute(engine, TRACES, boundaries, termination, params, 2))
    for trace, bounds, answers in zip(TRACES, boundaries, got):
        assert [a[0].prompt_len for a in answers] == [b + len(termination) for b in bounds]


def test_seeded_sampling_through_the_truncated_cache_matches_fork(engine):
    """Same random streams (seed, answer j) on both paths: identical samples and log-probs."""
    params = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=8, seed=42)
    got = branch_at_boundaries(engine, TRACES, BOUNDARIES, TERMINATION, params, k=3)
    contexts = [t[:b] + TERMINATION for t, bs in zip(TRACES, BOUNDARIES) for b in bs]
    flat = engine.fork(contexts, params, n=3)
    flat_got = [answers for trace in got for answers in trace]
    assert [[c.token_ids for c in a] for a in flat_got] == [[c.token_ids for c in a] for a in flat]
    for a, b in zip(flat_got, flat):
        for x, y in zip(a, b):
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)


def test_generic_path_through_fork_agrees(engine):
    params = SamplingParams(temperature=0.7, max_new_tokens=6, seed=1)
    direct = branch_at_boundaries(engine, TRACES, BOUNDARIES, TERMINATION, params, k=2)
    generic = branch_at_boundaries(ForkOnly(engine), TRACES, BOUNDARIES, TERMINATION, params, k=2)
    assert ids(direct) == ids(generic)


def test_small_batches_prefill_chunks_and_copied_prefixes_give_the_same_answers(engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=5, seed=3)
    copied = HFEngine(engine.model, shared_prefix_decoding=False)
    assert ids(branch_at_boundaries(copied, TRACES, BOUNDARIES, TERMINATION, params, k=3)) == \
        ids(branch_at_boundaries(engine, TRACES, BOUNDARIES, TERMINATION, params, k=3))
    small = HFEngine(engine.model, max_batch_size=4, prefill_chunk_tokens=16)
    assert ids(branch_at_boundaries(small, TRACES, BOUNDARIES, TERMINATION, params, k=3)) == \
        ids(branch_at_boundaries(engine, TRACES, BOUNDARIES, TERMINATION, params, k=3))


def test_cost_is_one_prefill_per_trace_plus_answers(engine):
    """Tokens through the model: P (one prefill) + B*T (termination per boundary) + B*k*(A-1)
    (decoding) -- not B*k*(P+A) as recomputing every branch would be."""
    trace = list(range(3, 83))
    bounds = [10, 30, 50, 80]
    k, answer = 4, 6
    seen = []
    hook = engine.model.get_input_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].numel()))
    try:
        branch_at_boundaries(engine, [trace], [bounds], TERMINATION, SamplingParams(max_new_tokens=answer, ignore_eos=True, seed=0), k)
    finally:
        hook.remove()
    # The prefill stops at the last boundary; boundaries are left-padded to the longest in
    # their batch only in the termination block, which here has one width for all.
    assert sum(seen) == max(bounds) + len(bounds) * len(TERMINATION) + len(bounds) * k * (answer - 1)


@pytest.mark.parametrize(
    "args, error, match",
    [
        (dict(boundaries=[[0], [1]]), ValueError, "boundaries has 2 lists but traces has 3"),
        (dict(boundaries=[[43], [1], [1]]), ValueError, r"boundaries\[0\] has offset 43, outside \[0, 42\]"),
        (dict(boundaries=[[-1], [1], [1]]), ValueError, r"boundaries\[0\] has offset -1"),
        (dict(boundaries=[[0], [1], [1]], termination_ids=[]), ValueError, "empty context"),
        (dict(k=0), ValueError, "k must be >= 1"),
        (dict(termination_ids=[5, 1000]), ValueError, r"termination_ids\[0\] contains token id 1000"),
        (dict(boundaries=[[1.5], [1], [1]]), TypeError, r"boundaries\[0\] must contain ints"),
        (dict(traces=[]), ValueError, "traces must not be empty"),
    ],
)
def test_bad_branching_input_raises_a_clear_error(engine, args, error, match):
    kwargs = dict(traces=TRACES, boundaries=[[1], [1], [1]], termination_ids=TERMINATION, k=2)
    kwargs.update(args)
    with pytest.raises(error, match=match):
        branch_at_boundaries(engine, params=SamplingParams(max_new_tokens=2), **kwargs)


def test_context_longer_than_the_model_is_rejected():
    engine = HFEngine(tiny_causal_lm("qwen2", max_position_embeddings=32))
    with pytest.raises(ValueError, match="more than the model's context length 32"):
        branch_at_boundaries(engine, [list(range(40))], [[31]], [1, 2], SamplingParams(max_new_tokens=2), k=1)
