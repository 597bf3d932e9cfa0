"""Budget forcing: thinking continues past </think> with "Wait" until the forcing budget."""

import random

import torch

from mrt_fast.data import THINK_END, build_tiny_tokenizer
from mrt_fast.data.synthetic import generate_problems, sft_trace
from mrt_fast.data.tiny_model import tiny_model_config
from mrt_fast.eval.runner import EvalSettings, _budget_forcing, _strip_tail
from mrt_fast.mrt.episodes import episode_trace
from mrt_fast.rollout import HFEngine, SamplingParams


def test_budget_forcing_suppresses_think_end_and_appends_wait():
    from transformers import AutoModelForCausalLM

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = tiny_model_config(len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=2)
    engine = HFEngine(AutoModelForCausalLM.from_config(config).eval(), tok)
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
