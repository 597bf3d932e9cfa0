"""The vLLM engine against the fake `vllm` of tests/fake_vllm (vLLM 0.33's call contract over a
real tiny model on the CPU): the behaviours of real vLLM that a naive wrapper gets wrong."""

import random

import fake_vllm
import numpy as np
import pytest
import torch

from mrt_fast.data.tokenizer import ASSETS_DIR, load_tokenizer
from mrt_fast.rollout import HFEngine, SamplingParams, make_engine
from mrt_fast.rollout.testing import tiny_causal_lm, tiny_tokenizer, torch_threads
from mrt_fast.train import weights_digest
from mrt_fast.rollout.vllm_engine import SUPPORTED_VLLM, _as_value_error, check_vllm_version

MAX_POS = 64
PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture(autouse=True, scope="module")
def _fake_vllm_one_thread():
    with torch_threads(1), fake_vllm.installed():
        yield


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _tied_lm(seed: int):
    """A Qwen2-shaped model whose LM head is its embedding matrix (as Qwen2.5-1.5B, Qwen3)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def tied_path(tokenizer, tmp_path_factory):
    return _save(_tied_lm(0), tokenizer, tmp_path_factory.mktemp("tied"))


def _engine(path, tokenizer, **kw):
    return make_engine("vllm", model_path=path, tokenizer=tokenizer, dtype="float32", **kw)


def test_the_fake_keeps_vllm_033_contract(tied_path):
    """The behaviours the engine works around really are in the fake (else the tests below prove nothing)."""
    import vllm
    from vllm.exceptions import VLLMValidationError

    assert not issubclass(VLLMValidationError, ValueError)
    with pytest.raises(VLLMValidationError, match="greedy"):
        vllm.SamplingParams(n=4, temperature=0.0)
    with pytest.raises(VLLMValidationError, match=r"\[0, 2\]"):
        vllm.SamplingParams(temperature=2.5)
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    llm = vllm.LLM(tied_path, seed=0)
    assert not torch.equal(state, torch.random.get_rng_state())  # vllm.LLM reseeds torch
    # One load_weights call holding the tied alias without its embedding fails after loading the rest.
    model = llm.apply_model(lambda m: m)[0]
    other = _tied_lm(1).state_dict()
    with pytest.raises(ValueError, match="tied"):
        vllm.load_weights(model, [("lm_head.weight", other["lm_head.weight"]),
                                  ("model.norm.weight", other["model.norm.weight"] + 1)])
    assert torch.equal(model.model.norm.weight, other["model.norm.weight"] + 1)  # half-updated


def test_greedy_with_n_branches_returns_n_identical_completions(tied_path, tokenizer):
    engine = _engine(tied_path, tokenizer)
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    forked = engine.fork([PROMPT], params, n=3)[0]
    expected = HFEngine(_tied_lm(0), tokenizer).generate([PROMPT], params)[0][0]
    assert [c.token_ids for c in forked] == [expected.token_ids] * 3
    assert forked[0] is not forked[1]  # copies: a caller may edit one branch
    for c in forked:
        assert c.logprobs == pytest.approx(expected.logprobs, abs=1e-5)


def test_weight_sync_of_a_tied_embedding_model_loads_everything_in_one_call(tied_path, tokenizer):
    engine = _engine(tied_path, tokenizer)
    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    before, digest = engine.generate([PROMPT], params)[0][0], engine.apply_model(weights_digest)[0]
    new = _tied_lm(7)
    engine.update_weights(new)  # a module, as the trainer's state dict: both names, one tensor
    after, expected = engine.generate([PROMPT], params)[0][0], HFEngine(new).generate([PROMPT], params)[0][0]
    assert after.token_ids == expected.token_ids
    assert after.logprobs == pytest.approx(expected.logprobs, abs=1e-5)
    assert after.logprobs != pytest.approx(before.logprobs, abs=1e-3)
    assert engine.apply_model(weights_digest)[0] != digest  # the digest follows the engine's weights
    engine.update_weights(_tied_lm(0).state_dict())
    assert engine.apply_model(weights_digest)[0] == digest
    assert engine.generate([PROMPT], params)[0][0].logprobs == before.logprobs


def test_update_weights_resets_the_prefix_cache(tied_path, tokenizer):
    """Without the reset the fake (like vLLM) would reuse logits cached under the old weights."""
    engine = _engine(tied_path, tokenizer)
    params = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
    before = engine.generate([PROMPT], params)[0][0].logprobs
    new = _tied_lm(3)
    engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(new.state_dict().items())})
    assert engine.generate([PROMPT], params)[0][0].logprobs == before  # stale cache
    engine.update_weights(new)
    expected = HFEngine(new).generate([PROMPT], params)[0][0].logprobs
    assert engine.generate([PROMPT], params)[0][0].logprobs == pytest.approx(expected, abs=1e-5)
    assert expected != pytest.approx(before, abs=1e-3)


def test_building_the_engine_keeps_the_callers_random_state(tied_path, tokenizer):
    torch.manual_seed(1234)
    random.seed(5)
    np.random.seed(6)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(1234)
    random.seed(5)
    np.random.seed(6)
    _engine(tied_path, tokenizer, seed=99)
    assert torch.equal(torch.rand(3), expected[0])
    assert (random.random(), np.random.rand()) == expected[1:]


def test_unseeded_sampling_follows_torch_manual_seed(tied_path, tokenizer):
    engine = _engine(tied_path, tokenizer)
    params = SamplingParams(temperature=1.0, max_new_tokens=8, ignore_eos=True)
    torch.manual_seed(3)
    first = [c.token_ids for c in engine.generate([PROMPT], params, n=3)[0]]
    torch.manual_seed(3)
    assert [c.token_ids for c in engine.generate([PROMPT], params, n=3)[0]] == first


def test_under_torchrun_each_rank_gets_the_external_launcher_on_its_own_gpu(tied_path, tokenizer, monkeypatch):
    single = _engine(tied_path, tokenizer)
    assert single.llm._args.distributed_executor_backend is None
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    import vllm

    with pytest.raises(RuntimeError, match="cuda:0"):  # what a plain vllm.LLM would do under torchrun
        vllm.LLM(tied_path)
    engine = _engine(tied_path, tokenizer, seed=3)
    assert engine.llm._args.distributed_executor_backend == "external_launcher"
    assert engine.llm.device_index == 3 and engine.llm._args.seed == 3
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(ValueError, match="VLLM_ENABLE_V1_MULTIPROCESSING must be 0"):
        _engine(tied_path, tokenizer)


@pytest.mark.parametrize("temperature", [2.5, 0.005])
def test_temperatures_vllm_would_reject_or_change_are_value_errors(tied_path, tokenizer, temperature):
    engine = _engine(tied_path, tokenizer)
    with pytest.raises(ValueError, match="params.temperature must be 0"):
        engine.generate([PROMPT], SamplingParams(temperature=temperature))


def test_a_prompt_filling_the_whole_context_is_a_value_error(tied_path, tokenizer):
    engine = _engine(tied_path, tokenizer, max_model_len=16)
    engine.generate([[3] * 15], SamplingParams(max_new_tokens=4))  # one free position is enough
    with pytest.raises(ValueError, match=r"prompts\[0\] has 16 tokens, the model's whole context length 16"):
        engine.generate([[3] * 16], SamplingParams(max_new_tokens=4))


def test_vllm_validation_errors_become_value_errors_naming_our_argument():
    from vllm.exceptions import VLLMValidationError

    err = _as_value_error(VLLMValidationError("max_tokens must be at least 1", parameter="max_tokens", value=0))
    assert isinstance(err, ValueError) and "params.max_new_tokens" in str(err)
    other = RuntimeError("CUDA out of memory")
    assert _as_value_error(other) is other


def test_stop_token_that_is_also_eos_reports_stop_like_the_hf_engine(tokenizer, tmp_path):
    """vLLM checks EOS before stop_token_ids; the engine reports the HF engine's order."""
    model = tiny_causal_lm("qwen2", max_position_embeddings=MAX_POS)
    greedy = HFEngine(model).generate([PROMPT], SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True))[0][0]
    eos = greedy.token_ids[2]
    tok = tiny_tokenizer()
    tok.eos_token = tok.convert_ids_to_tokens(eos)
    engine = _engine(_save(model, tok, tmp_path), tok)
    hf = HFEngine(model, tok, eos_token_id=eos)
    for params in (SamplingParams(temperature=0.0, max_new_tokens=8),
                   SamplingParams(temperature=0.0, max_new_tokens=8, stop_token_ids=[eos])):
        got, want = engine.generate([PROMPT], params)[0][0], hf.generate([PROMPT], params)[0][0]
        assert (got.token_ids, got.finish_reason, got.stop_reason) == (want.token_ids, want.finish_reason, want.stop_reason)
    assert got.finish_reason == "stop" and got.stop_reason == eos


def test_text_is_decoded_with_our_tokenizer_not_vllms():
    """`Completion.text`, which the graders read, comes from the tokenizer given to the engine, not
    from the one vLLM loads with AutoTokenizer (which can decode some tokens differently)."""

    class Marked:  # our tokenizer, with a decode that vLLM's own tokenizer cannot produce
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def decode(self, ids, **kw):
            return "<ours>" + self._inner.decode(ids, **kw)

    ours = load_tokenizer(ASSETS_DIR)
    engine = make_engine("vllm", model_path=str(ASSETS_DIR), tokenizer=Marked(ours), dtype="float32")
    params = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    out = engine.generate([ours.encode("Links: b k.")], params)[0][0]
    assert out.text.startswith("<ours>")
    assert out.text == "<ours>" + ours.decode(out.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    # A path instead of a tokenizer object loads ours with load_tokenizer, not AutoTokenizer.
    assert type(make_engine("vllm", model_path=str(ASSETS_DIR), dtype="float32").tokenizer) is type(ours)


def test_sleep_and_wake_around_a_weight_sync(tied_path, tokenizer):
    engine = _engine(tied_path, tokenizer, enable_sleep_mode=True)
    params = SamplingParams(temperature=0.0, max_new_tokens=5, ignore_eos=True)
    new = _tied_lm(5)
    engine.sleep(level=1)
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate([PROMPT], params)
    engine.wake_up(["weights"])
    engine.update_weights(new)
    engine.wake_up(["kv_cache"])
    expected = HFEngine(new).generate([PROMPT], params)[0][0].logprobs
    assert engine.generate([PROMPT], params)[0][0].logprobs == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("version, ok", [("0.33.0", True), ("0.20.0", True), ("0.33.1rc1+cu129", True),
                                         ("0.19.1", False), ("0.34.0", False), ("0.10.2", False), ("dev", False)])
def test_vllm_version_outside_the_supported_range_is_a_clear_error(version, ok):
    if ok:
        check_vllm_version(version)
    else:
        with pytest.raises(ImportError, match=f"vllm {version} is installed.*supports vllm{','.join(SUPPORTED_VLLM)}"):
            check_vllm_version(version)


def test_building_with_an_unsupported_vllm_fails_at_start_up(tied_path, tokenizer, monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.10.2")
    with pytest.raises(ImportError, match="supports vllm>=0.20,<0.34"):
        _engine(tied_path, tokenizer)


@pytest.mark.parametrize("kw, match", [({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization must be in"),
                                       ({"tensor_parallel_size": 0}, "tensor_parallel_size must be an int >= 1"),
                                       ({"max_model_len": 1}, "max_model_len must be an int >= 2")])
def test_bad_engine_arguments_are_value_errors(tied_path, tokenizer, kw, match):
    with pytest.raises(ValueError, match=match):
        _engine(tied_path, tokenizer, **kw)


def test_the_vllm_extra_pins_the_supported_range():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert pyproject["project"]["optional-dependencies"]["vllm"] == ["vllm" + ",".join(SUPPORTED_VLLM)]


def test_requests_of_one_call_draw_independent_streams(tied_path, tokenizer):
    """One seed for a call, but every request its own stream: the same prompt twice in a call gives
    different samples (one seed for all requests would make them equal), and the call repeats."""
    engine = _engine(tied_path, tokenizer)
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=3)
    first = engine.generate([PROMPT, PROMPT, PROMPT[:3]], params, n=2)
    again = engine.generate([PROMPT, PROMPT, PROMPT[:3]], params, n=2)
    ids = [[c.token_ids for c in row] for row in first]
    assert ids == [[c.token_ids for c in row] for row in again]
    assert ids[0] != ids[1] and ids[0][0] != ids[0][1]
