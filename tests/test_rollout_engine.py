"""Engine protocol tests, run against every backend: the embedded HF engine (Qwen2- and
Llama-shaped tiny random models) always; the vLLM engine over the fake `vllm` of
tests/fake_vllm (vLLM 0.33's call contract on a real tiny model, CPU) always; and over the real
vLLM where it is importable and a GPU is present."""

import importlib.util
import os

import fake_vllm

import pytest
import torch

from mrt_fast.rollout import Completion, HFEngine, SamplingParams, VLLMEngine, make_engine
from mrt_fast.rollout.testing import tiny_causal_lm, tiny_tokenizer, torch_threads


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):  # tiny models on a shared CPU: see mrt_fast.rollout.testing.torch_threads
        yield

HAS_VLLM = importlib.util.find_spec("vllm") is not None
VLLM_SKIP = (
    "vllm is not installed (optional extra: pip install 'mrt-fast[vllm]')" if not HAS_VLLM
    else "vllm needs a CUDA GPU" if not torch.cuda.is_available() else None
)
BACKENDS = [
    "hf-qwen2",
    "hf-llama",
    "vllm-fake",
    pytest.param("vllm", marks=pytest.mark.skipif(VLLM_SKIP is not None, reason=VLLM_SKIP or "")),
]
MAX_POS = 128


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=BACKENDS)
def engine(request, tokenizer, tmp_path_factory):
    if request.param.startswith("hf"):
        model = tiny_causal_lm(request.param.split("-")[1], max_position_embeddings=MAX_POS)
        yield make_engine("hf", model=model, tokenizer=tokenizer)
        return
    path = tmp_path_factory.mktemp("tiny-vllm")
    # vLLM's attention kernels want head_dim >= 32: hidden 256 / 4 heads = 64.
    tiny_causal_lm("qwen2", hidden_size=256, max_position_embeddings=MAX_POS).save_pretrained(path)
    tokenizer.save_pretrained(path)
    options = dict(model_path=str(path), tokenizer=tokenizer, dtype="float32", gpu_memory_utilization=0.2,
                   enforce_eager=True)
    if request.param == "vllm":
        yield make_engine("vllm", **options)
    else:
        with fake_vllm.installed():
            yield make_engine("vllm", **options)


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]


def test_generate_returns_n_completions_per_prompt_with_consistent_fields(engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=6, seed=0)
    out = engine.generate(PROMPTS, params, n=3)
    assert len(out) == len(PROMPTS) and all(len(row) == 3 for row in out)
    for prompt, row in zip(PROMPTS, out):
        for c in row:
            assert isinstance(c, Completion)
            assert c.prompt_len == len(prompt)
            assert 1 <= len(c.token_ids) <= 6 and len(c.logprobs) == len(c.token_ids)
            assert c.finish_reason in ("stop", "length", "eos")
            assert (c.finish_reason == "length") == (len(c.token_ids) == 6 and c.finish_reason != "eos")
            assert all(lp <= 0.0 for lp in c.logprobs)
            assert isinstance(c.text, str)


def test_greedy_fork_equals_greedy_generate(engine):
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    single = [engine.generate([p], params)[0][0].token_ids for p in PROMPTS]
    forked = engine.fork(PROMPTS, params, n=4)
    for expected, branches in zip(single, forked):
        assert [b.token_ids for b in branches] == [expected] * 4


def test_seed_makes_sampling_reproducible(engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=1234)
    first = engine.generate(PROMPTS, params, n=4)
    again = engine.generate(PROMPTS, params, n=4)
    assert [[c.token_ids for c in row] for row in first] == [[c.token_ids for c in row] for row in again]
    # The n samples of one prompt are different draws, and another seed gives other samples.
    assert len({tuple(c.token_ids) for c in first[0]}) > 1
    other = engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=8, seed=99), n=4)
    assert [c.token_ids for c in other[0]] != [c.token_ids for c in first[0]]


def test_stop_token_id_ends_a_sample_and_is_kept(engine):
    greedy = engine.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_new_tokens=10))[0][0]
    stop_at = 3
    stop_id = greedy.token_ids[stop_at]
    first = greedy.token_ids.index(stop_id)
    out = engine.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=[stop_id]))[0][0]
    assert out.finish_reason == "stop"
    assert out.token_ids == greedy.token_ids[: first + 1]


def test_stop_string_spanning_a_token_boundary(engine, tokenizer):
    greedy = engine.generate([PROMPTS[1]], SamplingParams(temperature=0.0, max_new_tokens=16))[0][0]
    pieces = [tokenizer.decode([t]) for t in greedy.token_ids]
    # A stop string made of the end of one multi-character token and the start of the next.
    i = next(i for i in range(3, len(pieces) - 1) if pieces[i] and pieces[i + 1])
    stop = pieces[i][-1] + pieces[i + 1][:1]
    text = greedy.text
    first = text.find(stop)
    assert first != -1
    out = engine.generate([PROMPTS[1]], SamplingParams(temperature=0.0, max_new_tokens=16, stop=[stop]))[0][0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:first]
    # Tokens run up to (and include) the token that completed the stop string.
    end = first + len(stop)
    n_tokens = next(n for n in range(1, len(pieces) + 1) if len("".join(pieces[:n])) >= end)
    assert out.token_ids == greedy.token_ids[:n_tokens]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda e, p: e.generate(PROMPTS, p, n=0), "n must be >= 1"),
        (lambda e, p: e.fork(PROMPTS, p, n=-1), "n must be >= 1"),
        (lambda e, p: e.generate([], p), "prompts must not be empty"),
        (lambda e, p: e.generate([[1, 2], []], p), r"prompts\[1\] is empty"),
        (lambda e, p: e.fork([[]], p, n=2), r"prefixes\[0\] is empty"),
        (lambda e, p: e.generate([[3] * (MAX_POS + 1)], p), r"prompts\[0\] has 129 tokens, more than the model's context"),
        (lambda e, p: e.generate([[1, 100000]], p), r"prompts\[0\] contains token id 100000"),
        (lambda e, p: e.generate([[1, 2]], SamplingParams(stop_token_ids=[100000])), r"stop_token_ids \[100000\]"),
    ],
)
def test_bad_input_raises_a_clear_error(engine, call, match):
    with pytest.raises(ValueError, match=match):
        call(engine, SamplingParams(max_new_tokens=2))


def test_text_prompt_is_a_type_error(engine):
    with pytest.raises(TypeError, match="prompts"):
        engine.generate(["hello"], SamplingParams())


def test_update_weights_changes_what_is_sampled(engine):
    """After a sync the engine samples from the new weights (for vLLM this also checks that the
    prefix cache was reset: the same prompt must not reuse KV computed with the old weights)."""
    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    before = engine.generate([PROMPTS[0]], params)[0][0].token_ids
    kind = "llama" if "Llama" in _model_class(engine) else "qwen2"
    hidden = 256 if isinstance(engine, VLLMEngine) else 32
    other = tiny_causal_lm(kind, hidden_size=hidden, max_position_embeddings=MAX_POS, seed=99)
    original = {k: v.clone() for k, v in _state_dict(engine).items()}
    try:
        engine.update_weights(other.state_dict())
        after = engine.generate([PROMPTS[0]], params)[0][0].token_ids
        expected = HFEngine(other).generate([PROMPTS[0]], params)[0][0].token_ids
        assert after == expected and after != before
    finally:
        engine.update_weights(original)
    assert engine.generate([PROMPTS[0]], params)[0][0].token_ids == before


def _model_class(engine) -> str:
    return type(engine.model).__name__ if isinstance(engine, HFEngine) else "Qwen2"


def _state_dict(engine):
    if isinstance(engine, HFEngine):
        return engine.model.state_dict()
    # vLLM fuses some weights; the HF checkpoint this engine was built from has the HF names.
    from safetensors.torch import load_file

    return load_file(os.path.join(engine.model_path, "model.safetensors"))


def test_make_engine_rejects_unknown_backend_and_a_module_for_vllm():
    with pytest.raises(ValueError, match="backend must be one of"):
        make_engine("sglang")
    with pytest.raises(ValueError, match="pass model_path="):
        make_engine("vllm", model=tiny_causal_lm("qwen2"))


def test_make_engine_hf_loads_a_checkpoint_directory(tmp_path, tokenizer):
    model = tiny_causal_lm("qwen2")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    engine = make_engine("hf", model_path=str(tmp_path))
    assert isinstance(engine, HFEngine) and engine.tokenizer is not None
    params = SamplingParams(temperature=0.0, max_new_tokens=5)
    expected = HFEngine(model).generate([PROMPTS[0]], params)[0][0].token_ids
    assert engine.generate([PROMPTS[0]], params)[0][0].token_ids == expected
