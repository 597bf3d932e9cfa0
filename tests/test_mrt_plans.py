"""Meta-prover wiring and the training plans on a tiny random model through the real HF engine.

Old-policy traces are real R1-style traces of the embedded task (so they have several episodes);
continuations and forced answers come from a tiny random Qwen2 model. The test grader is a fixed
function of the response text (about half the random answers pass), so advantages are non-trivial
and can be recomputed by hand from the returned tokens.
"""

import random

import pytest
import torch

from mrt_fast.data import build_tiny_tokenizer, grade
from mrt_fast.data.synthetic import generate_problems, sft_trace
from mrt_fast.data.tiny_model import tiny_model_config
from mrt_fast.mrt.episodes import episode_trace
from mrt_fast.mrt.plans import grpo_plan, mrt_online_plan, mrt_rl_plan, mrt_star_plan
from mrt_fast.mrt.progress import progress_from_J, run_meta_prover, termination_token_ids
from mrt_fast.packing import pack
from mrt_fast.rollout import HFEngine, SamplingParams


def parity_grader(response: str, answer: str) -> bool:
    return sum(map(ord, response)) % 2 == 0


@pytest.fixture(scope="module")
def setup():
    tok = build_tiny_tokenizer()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_model_config(len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config).eval()
    engine = HFEngine(model, tok)
    problems = generate_problems(2, seed=3)
    prompts = []
    for p in problems:
        text = tok.apply_chat_template([{"role": "user", "content": p.prompt}], add_generation_prompt=True, tokenize=False)
        prompts.append(tok(text, add_special_tokens=False)["input_ids"])
    traces = [tok(sft_trace(p, random.Random(s)), add_special_tokens=False)["input_ids"]
              for s, p in enumerate(problems)]
    return dict(tok=tok, model=model, engine=engine, prompts=prompts, answers=[p.answer for p in problems],
                traces=traces, term=termination_token_ids(tok),
                params=SamplingParams(temperature=1.0, max_new_tokens=10, seed=1))


def text_of(tok, ids):
    return tok.decode(ids, skip_special_tokens=True)


def test_meta_prover_grades_k_forced_answers_at_every_boundary(setup):
    s = setup
    trs = [episode_trace(s["tok"], t) for t in s["traces"]]
    bounds = [tr.meta_boundaries() for tr in trs]
    assert all(b[0] == 0 and b == sorted(b) and len(b) == tr.num_episodes + 1 for b, tr in zip(bounds, trs))
    res = run_meta_prover(s["engine"], s["prompts"], s["traces"], bounds, answers=s["answers"], grader=parity_grader,
                          termination_ids=s["term"], k=3, params=s["params"])
    for i, per_trace in enumerate(res.completions):
        assert len(per_trace) == len(bounds[i])
        for b, answers_at_b, J in zip(bounds[i], per_trace, res.J[i]):
            assert len(answers_at_b) == 3
            assert all(c.prompt_len == len(s["prompts"][i]) + b + len(s["term"]) for c in answers_at_b)
            assert J == sum(parity_grader(c.text, "") for c in answers_at_b) / 3
    with pytest.raises(ValueError, match="k must be >= 1"):
        run_meta_prover(s["engine"], s["prompts"], s["traces"], bounds, answers=s["answers"], grader=parity_grader,
                        termination_ids=s["term"], k=0, params=s["params"])


def check_groups_consistent(plan):
    seen = set()
    for g in plan.groups:
        ids_here = set()
        for k, cont in enumerate(g.continuations):
            mask, eps = g.loss_mask(k), g.episode_id(k)
            assert len(mask) == len(eps) == len(cont) > 0
            assert eps == sorted(eps)
            ids_here |= set(eps)
        assert not (ids_here & seen), "episode ids must be unique across groups"
        seen |= ids_here
    assert plan.advantages.dtype == torch.float32 and torch.isfinite(plan.advantages).all()


def test_grpo_plan(setup):
    s = setup
    plan = grpo_plan(s["engine"], s["tok"], s["prompts"], s["answers"], grader=parity_grader, params=s["params"], n=3)
    check_groups_consistent(plan)
    assert plan.level == "sequence" and plan.num_sequences == 6 == plan.advantages.numel()
    r = []
    for g, prompt in zip(plan.groups, s["prompts"]):
        assert g.prefix == prompt and len(g.continuations) == 3
        assert all(m == 1.0 for k in range(3) for m in g.loss_mask(k))
        r.append([float(parity_grader(text_of(s["tok"], c), "")) for c in g.continuations])
    r = torch.tensor(r)
    torch.testing.assert_close(plan.advantages, (r - r.mean(1, keepdim=True)).flatten())
    assert plan.metrics["reward/mean"] == pytest.approx(r.mean().item())
    assert plan.metrics["response_length/mean"] == pytest.approx(sum(len(c) for g in plan.groups for c in g.continuations) / 6)
    assert plan.metrics["advantage/mean"] == pytest.approx(0.0, abs=1e-6)  # the group baseline centres


def test_grpo_length_penalty_and_std_normalisation(setup):
    s = setup
    plan = grpo_plan(s["engine"], s["tok"], s["prompts"], s["answers"], grader=parity_grader, params=s["params"],
                     n=3, length_penalty=0.5, normalize_std=True)
    R = torch.tensor([[float(parity_grader(text_of(s["tok"], c), "")) - 0.5 * len(c) / s["params"].max_new_tokens
                       for c in g.continuations] for g in plan.groups], dtype=torch.float64)
    centred = R - R.mean(1, keepdim=True)
    std = R.std(1, keepdim=True)
    expected = torch.where(std > 0, centred / (std + 1e-6), centred)
    torch.testing.assert_close(plan.advantages, expected.flatten().float())
    assert plan.metrics["reward/mean"] == pytest.approx(R.mean().item())
    with pytest.raises(ValueError, match="length_penalty"):
        grpo_plan(s["engine"], s["tok"], s["prompts"], s["answers"], grader=parity_grader, params=s["params"],
                  n=2, length_penalty=-1.0)


def meta_J(s, prompt, response, boundary, meta_params, k):
    """J at one boundary, measured again from scratch: streams are named by their context, so the
    same seed and context give the plan's forced answers."""
    return run_meta_prover(s["engine"], [prompt], [response], [[boundary]], answers=[""], grader=parity_grader,
                           termination_ids=s["term"], k=k, params=meta_params).J[0][0]


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_mrt_rl_plan_termination_baseline_and_measured_progress(setup, alpha):
    s = setup
    n, k = 4, 3
    meta_params = SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=6, seed=11)
    plan = mrt_rl_plan(s["engine"], s["tok"], s["prompts"], s["answers"], grader=parity_grader, params=s["params"],
                       meta_params=meta_params, termination_ids=s["term"], n=n, k=k, alpha=alpha,
                       old_traces=s["traces"], rng=random.Random(5))
    check_groups_consistent(plan)
    assert len(plan.groups) == 2 and plan.num_sequences == 2 * n == plan.advantages.numel()
    expected = []
    T = len(s["term"])
    for g, (i, j, b), J_reported in zip(plan.groups, plan.details["cuts"], plan.details["J_prefix"]):
        tr = episode_trace(s["tok"], s["traces"][i])
        assert b == ([0] + tr.episode_ends)[j] and j < tr.num_episodes  # cut at an episode boundary
        prompt, prefix = s["prompts"][i], s["traces"][i][:b]
        assert g.prefix == prompt + prefix
        J = meta_J(s, prompt, s["traces"][i], b, meta_params, k)  # k forced answers at T = 0.6
        assert J_reported == J
        for c, cont in enumerate(g.continuations):
            mask = g.loss_mask(c)
            if c < n // 2:  # terminate now: termination text (masked) + an answer from the policy (trained)
                assert cont[:T] == s["term"] and mask == [0.0] * T + [1.0] * (len(cont) - T)
                assert len(set(g.episode_id(c))) == 1
                expected.append(float(parity_grader(text_of(s["tok"], cont[T:]), "")) - J)
            else:
                assert mask == [1.0] * len(cont)
                r = float(parity_grader(text_of(s["tok"], cont), ""))
                progress = 0.0
                if alpha:
                    combined = episode_trace(s["tok"], prefix + cont)
                    if combined.think_end > b:  # J forced where the continuation's thinking ends
                        progress = meta_J(s, prompt, prefix + cont, combined.think_end, meta_params, k) - J
                expected.append(r - J + alpha * progress)
    torch.testing.assert_close(plan.advantages, torch.tensor(expected))
    assert {"reward/mean", "reward/progress/mean", "response_length/mean", "mrt/J_prefix/mean", "advantage/mean",
            "advantage/abs_mean", "mrt/prefix_length/mean", "mrt/forced_answer_length/mean"} <= set(plan.metrics)
    generated = [len(c) - (T if c[:T] == s["term"] else 0) for g in plan.groups for c in g.continuations]
    assert plan.metrics["response_length/mean"] == pytest.approx(sum(generated) / len(generated))

    # The packer consumes the groups as they are: one target per continuation token, masks carried.
    batches = pack(plan.groups)
    assert sum(b.num_targets for b in batches) == sum(len(c) for g in plan.groups for c in g.continuations)
    assert sum(float(b.target_loss_mask.sum()) for b in batches) == sum(
        sum(g.loss_mask(k)) for g in plan.groups for k in range(len(g.continuations)))
    assert max(int(b.target_seq_ids.max()) for b in batches) == plan.advantages.numel() - 1


def test_mrt_rl_plan_every_boundary_and_terminate_branch_off(setup):
    s = setup
    params = SamplingParams(temperature=1.0, max_new_tokens=max(len(t) for t in s["traces"]) + 1, seed=1)
    plan = mrt_rl_plan(s["engine"], s["tok"], s["prompts"], s["answers"], grader=parity_grader, params=params,
                       meta_params=s["params"], termination_ids=s["term"], n=1, k=2, cut="every",
                       train_terminate=False, old_traces=s["traces"])
    check_groups_consistent(plan)
    n_eps = [episode_trace(s["tok"], t).num_episodes for t in s["traces"]]
    assert len(plan.groups) == sum(n_eps)
    assert [j for _, j, _ in plan.details["cuts"]] == [j for n in n_eps for j in range(n)]
    assert all(len(g.continuations) == 1 for g in plan.groups) and plan.advantages.numel() == len(plan.groups)
    assert all(g.continuations[0][: len(s["term"])] != s["term"] for g in plan.groups)  # all continue thinking
    with pytest.raises(ValueError, match="n must be >= 2"):
        mrt_rl_plan(s["engine"], s["tok"], s["prompts"], s["answers"], grader=parity_grader, params=s["params"],
                    meta_params=s["params"], termination_ids=s["term"], n=1, k=2, old_traces=s["traces"])
    with pytest.raises(ValueError, match="alpha"):
        mrt_rl_plan(s["engine"], s["tok"], s["prompts"], s["answers"], grader=parity_grader, params=s["params"],
                    meta_params=s["params"], termination_ids=s["term"], n=2, k=2, alpha=float("nan"),
                    old_traces=s["traces"])
    with pytest.raises(ValueError, match="progress must be one of"):
        mrt_rl_plan(s["engine"], s["tok"], s["prompts"], s["answers"], grader=parity_grader, params=s["params"],
                    meta_params=s["params"], termination_ids=s["term"], n=2, k=2, progress="rescale",
                    old_traces=s["traces"])


def test_mrt_rl_continuations_share_the_response_budget_with_their_prefix(setup):
    """Prefix + continuation <= params.max_new_tokens: with EOS ignored every continuation runs to
    its budget, so the longest one ends exactly at max_new_tokens."""
    s = setup
    budget = max(len(t) for t in s["traces"]) + 4
    params = SamplingParams(temperature=1.0, max_new_tokens=budget, seed=2, ignore_eos=True)
    plan = mrt_rl_plan(s["engine"], s["tok"], s["prompts"], s["answers"], grader=parity_grader, params=params,
                       meta_params=s["params"], termination_ids=s["term"], n=2, k=1, alpha=0.0, cut="every",
                       old_traces=s["traces"])
    totals = [b + len(g.continuations[1]) for g, (_, _, b) in zip(plan.groups, plan.details["cuts"])]
    assert max(totals) == budget and all(t == budget for t in totals)
    assert any(b > 0 for _, _, b in plan.details["cuts"])  # cuts inside the trace were tested too
    assert plan.metrics["mrt/total_length/mean"] == budget


def test_mrt_rl_branches_never_replay_the_old_trace(setup):
    """A cut after 0 episodes forks from the prompt the old trace was sampled from: with the same seed
    and sample index, continuation #0 must still be a new sample."""
    s = setup
    plan = mrt_rl_plan(s["engine"], s["tok"], s["prompts"], s["answers"], grader=parity_grader, params=s["params"],
                       meta_params=s["params"], termination_ids=s["term"], n=4, k=1, alpha=0.0, cut="every",
                       train_terminate=False)
    old = plan.details["old_traces"]
    for g, (i, j, b) in zip(plan.groups, plan.details["cuts"]):
        assert all(old[i][b:] != cont for cont in g.continuations)


def test_mrt_online_plan_per_episode_advantages(setup):
    s = setup
    responses = [[t, t[: len(t) // 2]] for t in s["traces"]]  # a full and a truncated trace per problem
    plan = mrt_online_plan(s["engine"], s["tok"], s["prompts"], s["answers"], grader=parity_grader,
                           params=s["params"], meta_params=s["params"], termination_ids=s["term"], n=2, k=2,
                           alpha=0.5, responses=responses)
    check_groups_consistent(plan)
    assert plan.level == "episode"
    all_eps = [e for g in plan.groups for k in range(len(g.continuations)) for e in g.episode_id(k)]
    assert sorted(set(all_eps)) == list(range(plan.advantages.numel()))
    outcome = torch.tensor(plan.details["outcome"]).view(2, 2)
    seq_adv = (outcome - outcome.mean(1, keepdim=True)).flatten()
    expected = torch.cat([seq_adv[i] + 0.5 * progress_from_J(J) for i, J in enumerate(plan.details["J"])])
    torch.testing.assert_close(plan.advantages, expected)
    for g, per in zip(plan.groups, responses):
        assert g.continuations == per
    assert plan.details["J"][0][0] in (0.0, 0.5, 1.0)


def test_mrt_star_plan_cuts_after_the_best_episode(setup):
    s = setup

    def grader(response, answer):  # the true answer, or about half of the random ones
        return grade(response, answer, kind="exact") or parity_grader(response, answer)

    # STaR keeps only traces whose own answer is right: the first warm-start trace of each problem
    # that answers correctly after at least two attempts (episodes).
    problems = generate_problems(2, seed=3)
    traces = []
    for p in problems:
        for seed in range(100):
            text = sft_trace(p, random.Random(seed))
            ids = s["tok"](text, add_special_tokens=False)["input_ids"]
            if grade(text, p.answer, kind="exact") and episode_trace(s["tok"], ids).num_episodes >= 2:
                traces.append(ids)
                break
    assert len(traces) == len(problems)
    responses = [[t] for t in traces]
    # Seeded: every boundary's context names its own random streams, so J differs between boundaries.
    meta_params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=4)
    examples, metrics = mrt_star_plan(s["engine"], s["tok"], s["prompts"], s["answers"], grader=grader,
                                      params=s["params"], meta_params=meta_params, termination_ids=s["term"],
                                      n=1, k=4, responses=responses)
    assert metrics["star/kept"] == len(examples) >= 1
    T = len(s["term"])
    for ex in examples:
        J = ex.J
        best = ex.cut_episodes
        assert J[best] == max(J[1:]) > J[0] and best == min(j for j in range(1, len(J)) if J[j] == J[best])
        cut = episode_trace(s["tok"], traces[ex.problem]).meta_boundaries()[best]
        assert ex.response_ids[:cut] == traces[ex.problem][:cut]
        assert ex.response_ids[cut:cut + T] == s["term"]
        assert ex.loss_mask == [1.0] * len(ex.response_ids)  # the stop at the cut is trained too
        assert ex.cut_tokens == cut
        assert grader(text_of(s["tok"], ex.response_ids[cut + T:]), s["answers"][ex.problem])
        g = ex.to_prefix_group()
        assert g.prefix == s["prompts"][ex.problem] and g.continuations == [ex.response_ids]


def test_plan_advantages_feed_the_fused_loss(setup):
    """Per-sequence (MRT-RL) and per-episode (MRT-online) advantages drive fused_policy_loss on packed
    batches; on-policy (ratio 1) token-mean loss is minus the mean advantage over trained tokens."""
    from mrt_fast.loss import fused_policy_loss
    from mrt_fast.packing import packed_hidden

    s = setup
    model = s["model"]
    rl = mrt_rl_plan(s["engine"], s["tok"], s["prompts"], s["answers"], grader=parity_grader, params=s["params"],
                     meta_params=s["params"], termination_ids=s["term"], n=2, k=2, alpha=1.0,
                     old_traces=s["traces"], rng=random.Random(1))
    online = mrt_online_plan(s["engine"], s["tok"], s["prompts"], s["answers"], grader=parity_grader,
                             params=s["params"], meta_params=s["params"], termination_ids=s["term"], n=1, k=2,
                             responses=[[t] for t in s["traces"]])
    for plan, key in ((rl, "seq_ids"), (online, "episode_ids")):
        (batch,) = pack(plan.groups)
        ids = batch.target_seq_ids if key == "seq_ids" else batch.target_episode_ids
        hidden = packed_hidden(model, batch)
        loss, _ = fused_policy_loss(hidden, model.lm_head.weight, batch.targets, plan.advantages,
                                    loss_mask=batch.target_loss_mask, **{key: ids})
        mask = batch.target_loss_mask
        expected = -(plan.advantages[ids] * mask).sum() / mask.sum()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        loss.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        model.zero_grad()
