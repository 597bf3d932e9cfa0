"""MRT-RL's progress term is measured by the meta-prover, not implied by the outcome.

A scripted engine (it reads its context, no model) makes the case the rescale ``alpha * (r - J(c))``
cannot express: a continuation whose final answer is wrong (r = 0) although its second episode
("Wait, step two") makes forced answers right. The meta-prover gives J(c) = 1/4 at the cut and
J = 1 after "step two", so the alpha term turns that episode's advantage from negative to positive.
"""

import random

import pytest
import torch

from mrt_fast.data import build_tiny_tokenizer
from mrt_fast.mrt.episodes import episode_trace, make_splitter
from mrt_fast.mrt.plans import mrt_rl_plan
from mrt_fast.mrt.progress import termination_token_ids
from mrt_fast.rollout import Completion, SamplingParams

OLD = "<think>\nfirst try\n\nWait, second try\n</think> The answer is \\boxed{1}."
CONTINUATION = "step one\n\nWait, step two\n</think> The answer is \\boxed{1}."
RIGHT, WRONG = " \\boxed{7}", " \\boxed{1}"
K = 4


def grader(response: str, answer: str) -> bool:
    return "\\boxed{7}" in response


class ScriptedEngine:
    """generate: the old trace. fork: after the termination text, a forced answer that is right
    when the context holds "step two" (else only sample 0 is right: J = 1/4); otherwise the
    continuation. It has no ``max_new_tokens`` caps, so plans take the generic per-budget path."""

    def __init__(self, tok, term):
        self.tok, self.term = tok, term

    def _completion(self, text, context_len):
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return Completion(ids, self.tok.decode(ids), [-0.5] * len(ids), "eos", context_len)

    def generate(self, prompts, params, n=1):
        return [[self._completion(OLD, len(p)) for _ in range(n)] for p in prompts]

    def fork(self, prefixes, params, n):
        out = []
        for p in prefixes:
            if p[-len(self.term):] == self.term:
                right = "step two" in self.tok.decode(p)
                out.append([self._completion(RIGHT if right or s == 0 else WRONG, len(p)) for s in range(n)])
            else:
                out.append([self._completion(CONTINUATION, len(p)) for _ in range(n)])
        return out

    def update_weights(self, weights=None):
        pass


@pytest.fixture(scope="module")
def scripted():
    tok = build_tiny_tokenizer()
    term = termination_token_ids(tok)
    prompt = tok("Find the key.", add_special_tokens=False)["input_ids"]
    return tok, term, prompt, ScriptedEngine(tok, term)


def plan_for(scripted, alpha, progress):
    tok, term, prompt, engine = scripted
    params = SamplingParams(temperature=1.0, max_new_tokens=200, seed=0)
    return mrt_rl_plan(engine, tok, [prompt], ["7"], grader=grader, params=params, meta_params=params,
                       termination_ids=term, n=2, k=K, alpha=alpha, progress=progress, cut="every",
                       splitter=make_splitter(min_gap=0), rng=random.Random(0))


def test_alpha_zero_is_exactly_the_outcome_form(scripted):
    for progress in ("paper", "dense"):
        plan = plan_for(scripted, 0.0, progress)
        assert plan.details["J_prefix"] == [0.25, 0.25]  # one group per cut of the two-episode old trace
        # terminate-now answer (sample 0: right) r - J = 0.75; continuation (wrong) r - J = -0.25
        assert plan.advantages.tolist() == [0.75, -0.25] * 2  # nothing is measured when alpha = 0


def test_paper_progress_flips_the_sign_of_a_wrong_continuation_that_made_progress(scripted):
    plan = plan_for(scripted, 1.0, "paper")
    assert plan.level == "sequence"
    assert [J[-1] for J in plan.details["J_continuations"]] == [1.0, 1.0]  # J where its thinking ends
    # continuation: r - J(c) + alpha (J_after - J(c)) = -0.25 + 0.75 = 0.5 > 0; a rescale would keep it < 0
    assert plan.advantages.tolist() == [0.75, 0.5] * 2
    assert plan.metrics["reward/progress/mean"] == 0.75


def test_dense_progress_flips_only_the_episode_that_made_progress(scripted):
    tok, term, _, _ = scripted
    plan = plan_for(scripted, 1.0, "dense")
    assert plan.level == "episode"
    # the continuation's episodes: "step one" (J stays 1/4: progress 0), "Wait, step two" + answer (J -> 1)
    assert plan.advantages.tolist() == [0.75, -0.25, 0.5] * 2
    for g in plan.groups:
        cont, eps = g.continuations[1], g.episode_id(1)
        second = tok.decode(cont).index("Wait, step two")
        values = [plan.advantages[e].item() for e in eps]
        starts = [len(tok.decode(cont[:t])) for t in range(len(cont))]
        assert all(v == (0.5 if start >= second else -0.25) for v, start in zip(values, starts))
        # the answer tokens after </think> belong to the last episode
        assert values[-1] == 0.5


def test_dense_and_paper_agree_on_the_total_progress(scripted):
    tok, _, _, _ = scripted
    paper, dense = plan_for(scripted, 1.0, "paper"), plan_for(scripted, 1.0, "dense")
    for b_paper, b_dense in zip(paper.details["progress_boundaries"], dense.details["progress_boundaries"]):
        assert b_paper == b_dense[-1:]  # the paper form's one measurement is the dense form's last
    old = episode_trace(tok, tok(OLD, add_special_tokens=False)["input_ids"], make_splitter(min_gap=0))
    assert old.num_episodes == 2


def test_std_normalisation_divides_each_group_by_its_return_spread(scripted):
    plain = plan_for(scripted, 1.0, "paper").advantages
    tok, term, prompt, engine = scripted
    params = SamplingParams(temperature=1.0, max_new_tokens=200, seed=0)
    scaled = mrt_rl_plan(engine, tok, [prompt], ["7"], grader=grader, params=params, meta_params=params,
                         termination_ids=term, n=2, k=K, alpha=1.0, cut="every", normalize_std=True,
                         splitter=make_splitter(min_gap=0)).advantages
    # returns per group: terminate-now 1, continuation 0 + alpha * 0.75
    returns = torch.tensor([1.0, 0.75], dtype=torch.float64)
    std = returns.std().item()
    torch.testing.assert_close(scaled, plain / (std + 1e-6))


@pytest.mark.parametrize("progress", ["paper", "dense"])
def test_batch_normalisation_gives_unit_rms_over_trained_tokens(scripted, progress):
    tok, term, prompt, engine = scripted
    params = SamplingParams(temperature=1.0, max_new_tokens=200, seed=0)
    kwargs = dict(grader=grader, params=params, meta_params=params, termination_ids=term, n=2, k=K, alpha=1.0,
                  progress=progress, cut="every", splitter=make_splitter(min_gap=0))
    plain = mrt_rl_plan(engine, tok, [prompt], ["7"], **kwargs)
    scaled = mrt_rl_plan(engine, tok, [prompt], ["7"], normalize_std="batch", **kwargs)
    # per token: its sequence's (or episode's) value, weighted by the loss mask, in fp64
    values, weights = [], []
    for g_index, g in enumerate(scaled.groups):
        for c in range(len(g.continuations)):
            ids = g.episode_id(c) if scaled.level == "episode" else [None] * len(g.continuations[c])
            seq = 2 * g_index + c
            for e, m in zip(ids, g.loss_mask(c)):
                values.append(float(scaled.advantages[e] if e is not None else scaled.advantages[seq]))
                weights.append(m)
    v, w = torch.tensor(values, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64)
    assert float(((v * v * w).sum() / w.sum()).sqrt()) == pytest.approx(1.0, rel=1e-5)
    ratio = scaled.advantages / plain.advantages
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()))  # one scale for the whole plan
    with pytest.raises(ValueError, match="normalize_std must be one of"):
        mrt_rl_plan(engine, tok, [prompt], ["7"], normalize_std="token", **kwargs)
