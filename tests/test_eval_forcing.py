"""The evaluator on a tiny random model through the real HF engine: budget forcing (thinking
continues past </think> with "Wait" until the forcing budget) and the regret x-coordinates (the
authors' convention: meta-prover input + mean forced-answer length; and the response-only one)."""

import random

import pytest
import torch

from mrt_fast.data import THINK_END, build_tiny_tokenizer
from mrt_fast.data.synthetic import generate_problems, sft_trace
from mrt_fast.data.tiny_model import tiny_model_config
from mrt_fast.eval.metrics import normalized_regret
from mrt_fast.eval.runner import EvalSettings, _budget_forcing, _strip_tail, evaluate
from mrt_fast.mrt.episodes import episode_trace
from mrt_fast.mrt.progress import run_meta_prover, termination_token_ids
from mrt_fast.rollout import HFEngine, SamplingParams


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = tiny_model_config(len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=2)
    return tok, HFEngine(AutoModelForCausalLM.from_config(config).eval(), tok)


def test_budget_forcing_suppresses_think_end_and_appends_wait(tiny):
    tok, engine = tiny
    problem = generate_problems(1, seed=0)[0]
    closed = episode_trace(tok, tok(sft_trace(problem, random.Random(0)) + "<|im_end|>", add_special_tokens=False)["input_ids"])
    cut = closed.think_end // 2
    truncated = episode_trace(tok, closed.token_ids[:cut])  # cut by its budget: no </think>
    prompt = tok("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    budget = len(closed.token_ids) + 25
    s = EvalSettings(params=SamplingParams(temperature=1.0, max_new_tokens=8), meta_params=None, n=1, ks=[1],
                     forcing_budget=budget, forcing_step=8)
    states = _budget_forcing(engine, tok, [prompt, prompt], [closed, truncated], s)

    cue = tok("\n\nWait", add_special_tokens=False)["input_ids"]
    # The closed trace keeps its thinking (up to </think>, trailing newline dropped) and gets a cue.
    kept = _strip_tail(tok, closed.token_ids[: closed.think_end]) + cue
    assert tok.decode(kept).endswith("yes.\n\nWait") and states[0][0][: len(kept)] == kept
    # The truncated trace simply continues: its first state extends it without a cue.
    assert states[1][0][:cut] == truncated.token_ids and len(states[1][0]) > cut
    for per_trace in states:
        lengths = [len(ids) for ids in per_trace]
        assert lengths == sorted(lengths) and lengths[-1] >= budget - 8 - len(cue)
        assert lengths[-2] < budget  # it stops once over the budget
        for ids in per_trace:
            assert THINK_END not in tok.decode(ids)


def parity(response, answer):
    return sum(map(ord, response)) % 2 == 0


@pytest.fixture(scope="module")
def setup(tiny):
    tok, engine = tiny
    prompts = [tok(f"<|im_start|>user\nq{i}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
               for i in range(2)]
    return tok, engine, prompts


def run(setup, convention):
    tok, engine, prompts = setup
    settings = EvalSettings(params=SamplingParams(temperature=1.0, max_new_tokens=24, seed=0),
                            meta_params=SamplingParams(temperature=1.0, max_new_tokens=8, seed=5),
                            n=1, ks=[1], meta_k=3, budgets=[40, 400], regret_tokens=convention)
    result = evaluate(engine, tok, prompts, ["a", "b"], grader=parity, termination_ids=termination_token_ids(tok),
                      settings=settings, extract=lambda text: None)
    return result, settings


def test_authors_x_is_the_meta_prover_input_plus_the_mean_answer(setup):
    tok, engine, prompts = setup
    term = termination_token_ids(tok)
    authors, settings = run(setup, "authors")
    response, _ = run(setup, "response")
    for c_a, c_r, prompt in zip(authors["curves"], response["curves"], prompts):
        assert c_a["J"] == c_r["J"]  # the same measurements, placed differently
        # re-measure: the streams are named by their contexts, so the same answers come back
        trace = engine.generate([prompt], settings.params, n=1)[0][0]
        bounds = episode_trace(tok, trace.token_ids).meta_boundaries()
        assert c_r["tokens"] == bounds  # response tokens before each boundary
        meta = run_meta_prover(engine, [prompt], [trace.token_ids], [bounds], answers=["a"], grader=parity,
                               termination_ids=term, k=3, params=settings.meta_params)
        expected, last = [], 0.0
        for b, answers in zip(bounds, meta.completions[0]):
            x = len(prompt) + b + len(term) + sum(len(a.token_ids) for a in answers) / 3
            last = max(last, x)
            expected.append(last)
        assert c_a["tokens"] == pytest.approx(expected)
        assert c_a["tokens"][0] > len(prompt) + len(term)  # answering without thinking is not free
    for budget in ("40", "400"):
        want = sum(normalized_regret(c["tokens"], c["J"], int(budget)) for c in authors["curves"]) / 2
        assert authors["regret"][budget] == pytest.approx(want)


def test_unknown_convention_is_rejected():
    with pytest.raises(ValueError, match="regret_tokens"):
        EvalSettings(params=None, meta_params=None, n=1, ks=[1], regret_tokens="tokens")
