"""Training plans: what to sample, how to reward it, and the groups the packer consumes.

Each RL plan samples through the rollout engine protocol (``generate`` / ``fork`` /
``branch_at_boundaries``, CONTRACTS.md §3), grades answers, and returns an :class:`RLPlan`:

- ``groups``: :class:`mrt_fast.packing.PrefixGroup` s (one shared prefix, several continuations)
  with loss masks (forced-termination text masked) and episode ids that are unique over the
  whole plan (so per-episode advantages can be indexed by them);
- ``advantages``: ``[S]`` per continuation in plan order (group by group, continuation by
  continuation: pass ``seq_ids``) or ``[E]`` per episode (pass ``episode_ids``), see ``level``;
- ``metrics``: verl-style scalars (``reward/mean``, ``reward/progress/mean``, ``response_length/mean`` ...).

Plans:

- :func:`grpo_plan`      n samples per prompt, group-baseline advantages on the 0/1 outcome (alpha = 0).
- :func:`mrt_rl_plan`    a trace from the old policy cut at an episode boundary; from the prefix, half
  the continuations terminate now and half continue thinking; ``R = r + alpha * progress`` with
  the termination baseline.
- :func:`mrt_online_plan` n samples per prompt, ``J`` at every episode boundary, per-episode dense
  advantages ``A_seq + alpha * progress``.
- :func:`mrt_star_plan`  SFT examples: correct traces that make progress, cut after the episode of
  maximal ``J`` and closed with the termination text and a correct forced answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from mrt_fast.mrt.advantages import (
    check_alpha,
    group_baseline,
    per_episode_dense,
    progress_rewards,
    termination_baseline,
)
from mrt_fast.mrt.episodes import EpisodeSplitter, EpisodeTrace, episode_trace
from mrt_fast.mrt.progress import Grader, check_k, progress_from_J, run_meta_prover

CUT_MODES = ("random", "every")


# ----------------------------------------------------------------------------------------------
# Plan outputs
# ----------------------------------------------------------------------------------------------


@dataclass
class RLPlan:
    """Packed-ready RL data for one step.

    ``level`` is ``"sequence"`` (``advantages[S]``, one per continuation in group order: the packer's
    global sequence ids) or ``"episode"`` (``advantages[E]`` indexed by the groups' episode ids).
    ``sample_logprobs`` holds the engine's per-token log-probs of each continuation (0.0 on the
    forced-termination tokens, which were not sampled). ``details`` keeps per-trace numbers for
    logging and analysis (outcomes, ``J`` at each boundary, cut points).
    """

    groups: list[Any]
    advantages: torch.Tensor
    level: str
    metrics: dict[str, float]
    sample_logprobs: list[list[list[float]]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def num_sequences(self) -> int:
        return sum(len(g.continuations) for g in self.groups)


@dataclass
class SFTExample:
    """One MRT-STaR example: ``prompt_ids`` is context, ``response_ids`` the target (``loss_mask`` 0 on
    the forced-termination text)."""

    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[float]
    text: str
    problem: int = -1
    J: list[float] = field(default_factory=list)  # J at every boundary of the source trace
    cut_episodes: int = 0  # the trace is cut after this many episodes (the argmax of J)

    def to_prefix_group(self) -> Any:
        from mrt_fast.packing import PrefixGroup

        return PrefixGroup(self.prompt_ids, [self.response_ids], loss_masks=[self.loss_mask])


class _GroupBuilder:
    """Collects continuations into PrefixGroups, renumbering trace-local episode ids to plan-global ones."""

    def __init__(self) -> None:
        self.groups: list[Any] = []
        self.logprobs: list[list[list[float]]] = []
        self.next_episode = 0

    def new_episodes(self, count: int) -> int:
        first = self.next_episode
        self.next_episode += count
        return first

    def add(self, prefix, continuations, loss_masks, episode_ids, logprobs) -> None:
        from mrt_fast.packing import PrefixGroup

        self.groups.append(PrefixGroup(list(prefix), continuations, loss_masks=loss_masks, episode_ids=episode_ids))
        self.logprobs.append(logprobs)


def _check_problems(prompts, answers) -> None:
    if len(prompts) != len(answers):
        raise ValueError(f"prompts ({len(prompts)}) and answers ({len(answers)}) must have the same length")
    if not prompts:
        raise ValueError("prompts is empty: a plan needs at least one problem")


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _logprobs(c: Any) -> list[float]:
    lp = list(getattr(c, "logprobs", None) or [])
    return lp if len(lp) == len(c.token_ids) else [0.0] * len(c.token_ids)


def _empty(kind: str) -> ValueError:
    return ValueError(f"got an empty {kind} continuation; cannot train on zero tokens")


# ----------------------------------------------------------------------------------------------
# GRPO
# ----------------------------------------------------------------------------------------------


def grpo_plan(
    engine: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[str],
    *,
    grader: Grader,
    params: Any,
    n: int,
    normalize_std: bool = False,
    splitter: EpisodeSplitter | None = None,
) -> RLPlan:
    """GRPO: ``n`` samples per prompt, advantage = 0/1 outcome minus the group mean (alpha = 0)."""
    _check_problems(prompts, answers)
    check_k(n, "n")
    samples = engine.generate([list(p) for p in prompts], params, n=n)
    builder = _GroupBuilder()
    outcome, group_ids, lengths, n_episodes = [], [], [], []
    for i, (prompt, per_prompt) in enumerate(zip(prompts, samples)):
        conts, eps = [], []
        for c in per_prompt:
            if not c.token_ids:
                raise _empty("GRPO")
            tr = episode_trace(tokenizer, c.token_ids, splitter)
            first = builder.new_episodes(tr.num_episodes)
            conts.append(list(c.token_ids))
            eps.append([first + e for e in tr.episode_ids])
            outcome.append(float(grader(c.text, answers[i])))
            group_ids.append(i)
            lengths.append(len(c.token_ids))
            n_episodes.append(tr.num_episodes)
        builder.add(prompt, conts, None, eps, [_logprobs(c) for c in per_prompt])
    adv = group_baseline(outcome, group_ids, normalize_std=normalize_std)
    metrics = {
        "reward/mean": _mean(outcome),
        "reward/progress/mean": 0.0,
        "outcome/accuracy": _mean(outcome),
        "response_length/mean": _mean(lengths),
        "episodes/mean": _mean(n_episodes),
        "advantage/abs_mean": float(adv.abs().mean()),
    }
    return RLPlan(builder.groups, adv, "sequence", metrics, builder.logprobs, {"outcome": outcome})


# ----------------------------------------------------------------------------------------------
# MRT-RL
# ----------------------------------------------------------------------------------------------


def mrt_rl_plan(
    engine: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[str],
    *,
    grader: Grader,
    params: Any,
    termination_ids: Sequence[int],
    n: int,
    alpha: float = 1.0,
    answer_params: Any = None,
    cut: str = "random",
    train_terminate: bool = True,
    old_traces: Sequence[Sequence[int]] | None = None,
    rng: random.Random | None = None,
    splitter: EpisodeSplitter | None = None,
) -> RLPlan:
    """MRT-RL with the termination baseline.

    For each prompt: a trace from the old policy (sampled with ``params`` unless ``old_traces`` gives
    the response token ids) is cut after a random number of episodes (``cut="random"``; ``"every"``
    uses every boundary, one group each). From the prefix ``c``, ``n // 2`` continuations
    *terminate now* (``termination_ids`` then an answer sampled with ``answer_params``, default
    ``params``) and ``n - n // 2`` *continue thinking* (sampled with ``params``). The terminate-now
    answers are forced-termination samples at ``c``: their mean score is ``J(c)``.

    Rewards: terminate-now ``R = r``; continue-thinking ``R = r + alpha * (r - J(c))`` (its progress
    over stopping at ``c``). Advantages ``A = R - mean(R of terminate-now) = R - J(c)``. With
    ``train_terminate=False`` the terminate-now continuations only form the baseline.
    """
    _check_problems(prompts, answers)
    alpha = check_alpha(alpha)
    check_k(n, "n")
    if n < 2:
        raise ValueError(f"n must be >= 2 for MRT-RL (at least one terminate-now and one continue-thinking), got {n}")
    if cut not in CUT_MODES:
        raise ValueError(f"cut must be one of {CUT_MODES}, got {cut!r}")
    if not termination_ids:
        raise ValueError("termination_ids must not be empty")
    rng = rng or random.Random(0)
    answer_params = params if answer_params is None else answer_params
    n_term, n_cont = n // 2, n - n // 2

    if old_traces is None:
        old_traces = [s[0].token_ids for s in engine.generate([list(p) for p in prompts], params, n=1)]
    if len(old_traces) != len(prompts):
        raise ValueError(f"old_traces ({len(old_traces)}) must hold one trace per prompt ({len(prompts)})")
    traces = [episode_trace(tokenizer, t, splitter) for t in old_traces]

    # Cut points: after j episodes, j < num_episodes (cutting after the last one leaves nothing to continue).
    cuts: list[list[int]] = []  # per trace, the episode counts j to cut after
    for tr in traces:
        choices = list(range(tr.num_episodes))
        cuts.append(choices if cut == "every" else [rng.choice(choices)])
    boundaries = [[([0] + tr.episode_ends)[j] for j in js] for tr, js in zip(traces, cuts)]

    from mrt_fast.rollout import branch_at_boundaries

    full = [list(p) + tr.token_ids for p, tr in zip(prompts, traces)]
    term_samples = branch_at_boundaries(
        engine, full, [[len(p) + b for b in bs] for p, bs in zip(prompts, boundaries)], list(termination_ids),
        answer_params, n_term,
    )
    prefixes = [(i, j, b, full[i][: len(prompts[i]) + b]) for i in range(len(prompts)) for j, b in zip(cuts[i], boundaries[i])]
    cont_samples = engine.fork([p for *_, p in prefixes], params, n=n_cont)

    builder = _GroupBuilder()
    all_R, all_gid, all_term, trained = [], [], [], []
    outcome_term, outcome_cont, prefix_J, progress, lengths = [], [], [], [], []
    for g, ((i, j, b, prefix), conts) in enumerate(zip(prefixes, cont_samples)):
        terms = term_samples[i][cuts[i].index(j)]
        r_term = [float(grader(c.text, answers[i])) for c in terms]
        r_cont = [float(grader(c.text, answers[i])) for c in conts]
        J = _mean(r_term)
        R = progress_rewards(r_term + r_cont, [J] * n, [True] * n_term + [False] * n_cont, alpha)
        all_R += R.tolist()
        all_gid += [g] * n
        all_term += [True] * n_term + [False] * n_cont
        trained += [train_terminate] * n_term + [True] * n_cont
        outcome_term += r_term
        outcome_cont += r_cont
        prefix_J.append(J)
        progress += [r - J for r in r_cont]

        # Episode ids: the prefix holds episodes 0..j-1 of the trace; a terminate-now answer is one new
        # episode; a continue-thinking continuation is split together with its prefix.
        first = builder.new_episodes(j)
        seqs, masks, eps, lps = [], [], [], []
        if train_terminate:
            answer_episode = builder.new_episodes(1)
            for c in terms:
                seqs.append(list(termination_ids) + list(c.token_ids))
                masks.append([0.0] * len(termination_ids) + [1.0] * len(c.token_ids))
                eps.append([answer_episode] * len(seqs[-1]))
                lps.append([0.0] * len(termination_ids) + _logprobs(c))
                lengths.append(len(c.token_ids))
        for c in conts:
            if not c.token_ids:
                raise _empty("continue-thinking")
            tr = episode_trace(tokenizer, traces[i].token_ids[:b] + list(c.token_ids), splitter)
            # Its first paragraph joins the prefix's last episode unless it starts with a cue.
            new = builder.new_episodes(max(tr.num_episodes - j, 0))
            eps.append([first + e if e < j else new + e - j for e in tr.episode_ids[b:]])
            seqs.append(list(c.token_ids))
            masks.append([1.0] * len(c.token_ids))
            lps.append(_logprobs(c))
            lengths.append(len(c.token_ids))
        builder.add(prefix, seqs, masks, eps, lps)

    adv = termination_baseline(all_R, all_gid, all_term)
    adv = adv[torch.tensor(trained, dtype=torch.bool)]
    metrics = {
        "reward/mean": _mean(all_R),
        "reward/progress/mean": _mean(progress),
        "outcome/accuracy": _mean(outcome_term + outcome_cont),
        "mrt/terminate_accuracy": _mean(outcome_term),
        "mrt/continue_accuracy": _mean(outcome_cont),
        "mrt/J_prefix/mean": _mean(prefix_J),
        "mrt/cut_episodes/mean": _mean([j for _, j, _, _ in prefixes]),
        "episodes/mean": _mean([tr.num_episodes for tr in traces]),
        "response_length/mean": _mean(lengths),
        "advantage/abs_mean": float(adv.abs().mean()),
    }
    details = {
        "cuts": [(i, j, b) for i, j, b, _ in prefixes],
        "J_prefix": prefix_J,
        "rewards": all_R,
    }
    return RLPlan(builder.groups, adv, "sequence", metrics, builder.logprobs, details)


# ----------------------------------------------------------------------------------------------
# MRT-online (per-episode dense) and MRT-STaR share: sample traces, J at every boundary
# ----------------------------------------------------------------------------------------------


@dataclass
class ScoredTrace:
    """A sampled trace with its outcome and the meta-prover's ``J`` at every boundary."""

    problem: int
    trace: EpisodeTrace
    outcome: float
    boundaries: list[int]
    J: list[float]
    forced_answers: list[list[Any]]
    forced_correct: list[list[bool]]
    logprobs: list[float]


def score_traces(
    engine: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[str],
    *,
    grader: Grader,
    params: Any,
    meta_params: Any,
    termination_ids: Sequence[int],
    n: int,
    k: int,
    responses: Sequence[Sequence[Sequence[int]]] | None = None,
    splitter: EpisodeSplitter | None = None,
) -> list[ScoredTrace]:
    """Sample ``n`` traces per prompt, grade them, and estimate ``J`` at every episode boundary
    (``k`` forced-termination answers each, through prefix-sharing branching).

    ``responses[i]`` may give problem ``i``'s traces (response token ids) instead of sampling them,
    e.g. traces sampled offline; they are graded on their decoded text.
    """
    _check_problems(prompts, answers)
    check_k(n, "n")
    check_k(k)
    if responses is None:
        samples = engine.generate([list(p) for p in prompts], params, n=n)
        flat = [(i, c.token_ids, c.text, _logprobs(c)) for i, per in enumerate(samples) for c in per]
    else:
        if len(responses) != len(prompts):
            raise ValueError(f"responses ({len(responses)}) must hold one list of traces per prompt ({len(prompts)})")
        flat = [
            (i, list(r), tokenizer.decode(list(r), skip_special_tokens=True), [0.0] * len(r))
            for i, per in enumerate(responses) for r in per
        ]
    for i, ids, *_ in flat:
        if not ids:
            raise ValueError(f"responses for problem {i} hold an empty trace")
    traces = [episode_trace(tokenizer, ids, splitter) for _, ids, _, _ in flat]
    bounds = [tr.meta_boundaries() for tr in traces]
    meta = run_meta_prover(
        engine, [prompts[i] for i, *_ in flat], [tr.token_ids for tr in traces], bounds,
        answers=[answers[i] for i, *_ in flat], grader=grader, termination_ids=termination_ids, k=k,
        params=meta_params,
    )
    return [
        ScoredTrace(i, tr, float(grader(text, answers[i])), bs, J, comps, corr, lp)
        for (i, _, text, lp), tr, bs, J, comps, corr in zip(flat, traces, bounds, meta.J, meta.completions, meta.correct)
    ]


def mrt_online_plan(
    engine: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[str],
    *,
    grader: Grader,
    params: Any,
    meta_params: Any,
    termination_ids: Sequence[int],
    n: int,
    k: int,
    alpha: float = 1.0,
    normalize_std: bool = False,
    responses: Sequence[Sequence[Sequence[int]]] | None = None,
    splitter: EpisodeSplitter | None = None,
) -> RLPlan:
    """MRT-online: per-episode dense advantages ``A_seq + alpha * (J_j - J_{j-1})``.

    ``A_seq`` is the group baseline of the 0/1 outcome over the ``n`` samples of a prompt; the
    progress of episode ``j`` comes from ``k`` forced-termination answers at every boundary.
    """
    alpha = check_alpha(alpha)
    scored = score_traces(
        engine, tokenizer, prompts, answers, grader=grader, params=params, meta_params=meta_params,
        termination_ids=termination_ids, n=n, k=k, responses=responses, splitter=splitter,
    )
    seq_adv = group_baseline([s.outcome for s in scored], [s.problem for s in scored], normalize_std=normalize_std)
    builder = _GroupBuilder()
    progress, episode_seq = [], []
    for i, prompt in enumerate(prompts):
        members = [(si, s) for si, s in enumerate(scored) if s.problem == i]
        conts, eps = [], []
        for si, s in members:
            if not s.trace.token_ids:
                raise _empty("MRT-online")
            first = builder.new_episodes(s.trace.num_episodes)
            progress += progress_from_J(s.J).tolist()
            episode_seq += [si] * s.trace.num_episodes
            conts.append(s.trace.token_ids)
            eps.append([first + e for e in s.trace.episode_ids])
        builder.add(prompt, conts, None, eps, [s.logprobs for _, s in members])
    values = per_episode_dense(seq_adv, progress, episode_seq, alpha)
    metrics = {
        "reward/mean": _mean([s.outcome for s in scored]),
        "reward/progress/mean": _mean(progress),
        "outcome/accuracy": _mean([s.outcome for s in scored]),
        "mrt/J0/mean": _mean([s.J[0] for s in scored]),
        "mrt/J_final/mean": _mean([s.J[-1] for s in scored]),
        "episodes/mean": _mean([s.trace.num_episodes for s in scored]),
        "response_length/mean": _mean([len(s.trace.token_ids) for s in scored]),
        "advantage/abs_mean": float(values.abs().mean()),
    }
    details = {"outcome": [s.outcome for s in scored], "J": [s.J for s in scored], "boundaries": [s.boundaries for s in scored]}
    return RLPlan(builder.groups, values, "episode", metrics, builder.logprobs, details)


def mrt_star_plan(
    engine: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[str],
    *,
    grader: Grader,
    params: Any,
    meta_params: Any,
    termination_ids: Sequence[int],
    n: int,
    k: int,
    max_per_problem: int = 1,
    responses: Sequence[Sequence[Sequence[int]]] | None = None,
    splitter: EpisodeSplitter | None = None,
) -> tuple[list[SFTExample], dict[str, float]]:
    """MRT-STaR: SFT examples from traces that make progress.

    A trace is kept when its own answer is correct, ``J`` peaks after at least one episode above the
    empty prefix (``max_j J_j > J_0``), and a forced-termination answer at the peak is correct. The
    example is the trace cut after the episode of maximal ``J`` (first maximum), closed with the
    termination text (masked out of the loss) and that correct answer. Per problem, the
    ``max_per_problem`` traces with the largest progress ``J_max - J_0`` are kept (shorter first on ties).
    """
    check_k(max_per_problem, "max_per_problem")
    scored = score_traces(
        engine, tokenizer, prompts, answers, grader=grader, params=params, meta_params=meta_params,
        termination_ids=termination_ids, n=n, k=k, responses=responses, splitter=splitter,
    )
    candidates: dict[int, list[tuple[float, int, SFTExample]]] = {}
    for s in scored:
        if not s.outcome:
            continue
        best = max(range(1, len(s.J)), key=lambda j: (s.J[j], -j), default=None)
        if best is None or s.J[best] <= s.J[0]:
            continue
        answer = next((c for c, ok in zip(s.forced_answers[best], s.forced_correct[best]) if ok), None)
        if answer is None:
            continue
        cut = s.boundaries[best]
        response = s.trace.token_ids[:cut] + list(termination_ids) + list(answer.token_ids)
        mask = [1.0] * cut + [0.0] * len(termination_ids) + [1.0] * len(answer.token_ids)
        example = SFTExample(
            list(prompts[s.problem]), response, mask, tokenizer.decode(response), s.problem, list(s.J), best
        )
        candidates.setdefault(s.problem, []).append((s.J[best] - s.J[0], len(response), example))
    examples = []
    for problem in sorted(candidates):
        ranked = sorted(candidates[problem], key=lambda t: (-t[0], t[1]))
        examples += [ex for *_, ex in ranked[:max_per_problem]]
    metrics = {
        "star/kept": float(len(examples)),
        "star/kept_fraction": len(examples) / len(scored),
        "outcome/accuracy": _mean([s.outcome for s in scored]),
        "reward/progress/mean": _mean([max(s.J) - s.J[0] for s in scored]),
        "response_length/mean": _mean([len(e.response_ids) for e in examples]),
    }
    return examples, metrics
