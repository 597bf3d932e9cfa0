"""Training plans: what to sample, how to reward it, and the groups the packer consumes.

Each RL plan samples through the rollout engine protocol (``generate`` / ``fork`` /
``branch_at_boundaries``, docs/contracts.md), grades answers, and returns an :class:`RLPlan`:

- ``groups``: :class:`mrt_fast.packing.PrefixGroup` s (one shared prefix, several continuations)
  with loss masks (forced-termination text masked) and episode ids that are unique over the
  whole plan (so per-episode advantages can be indexed by them);
- ``advantages``: ``[S]`` per continuation in plan order (group by group, continuation by
  continuation: pass ``seq_ids``) or ``[E]`` per episode (pass ``episode_ids``), see ``level``;
- ``metrics``: verl-style scalars. Every plan reports ``response_length/mean`` (sampled tokens per
  trained sequence), ``advantage/mean`` and ``advantage/abs_mean`` (over trained tokens, as the
  token-mean loss weighs them), ``reward/mean`` and ``outcome/accuracy``; MRT plans add ``mrt/...``.

Plans:

- :func:`grpo_plan`      n samples per prompt, group-baseline advantages on the 0/1 outcome.
- :func:`mrt_rl_plan`    a trace from the old policy cut at an episode boundary; from the prefix some
  continuations terminate now and the others continue thinking; ``A = r - J(c)`` with ``J(c)`` from
  ``k`` forced answers, plus ``alpha`` times the progress the meta-prover measures for the
  continuation's thinking (one scalar, or per episode with ``progress="dense"``).
- :func:`mrt_online_plan` n samples per prompt, ``J`` at every episode boundary, per-episode dense
  advantages ``A_seq + alpha * progress``.
- :func:`mrt_star_plan`  SFT examples: correct traces that make progress, cut after the episode of
  maximal ``J`` and closed with the termination text and a correct forced answer.

``normalize_std`` means the same in every RL plan: ``"group"`` divides each group's advantages by the
standard deviation of its sequences' returns (:func:`mrt_fast.mrt.advantages.group_std_scale`),
``"batch"`` divides all of them by their root mean square over the trained tokens (unit update scale).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

from mrt_fast.mrt.advantages import (
    check_alpha,
    group_baseline,
    group_std_scale,
    per_episode_dense,
    termination_advantages,
)
from mrt_fast.mrt.episodes import EpisodeSplitter, EpisodeTrace, episode_trace
from mrt_fast.mrt.progress import Grader, check_k, progress_from_J, run_meta_prover
from mrt_fast.rollout.sampling import derive_seed

CUT_MODES = ("random", "every")
PROGRESS_FORMS = ("paper", "dense")


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
    advantage_scale: float = 1.0  # normalize_std="batch": the RMS the advantages were divided by (1 otherwise)

    @property
    def num_sequences(self) -> int:
        return sum(len(g.continuations) for g in self.groups)


@dataclass
class SFTExample:
    """One MRT-STaR example: ``prompt_ids`` is context, ``response_ids`` the target (``loss_mask`` 1
    everywhere: the termination text at the cut is trained, so the model learns to stop there)."""

    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[float]
    text: str
    problem: int = -1
    J: list[float] = field(default_factory=list)  # J at every boundary of the source trace
    cut_episodes: int = 0  # the trace is cut after this many episodes (the argmax of J)
    cut_tokens: int = 0  # response tokens before the termination text

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


def _with_seed(params: Any, *salt: str) -> Any:
    """``params`` for a distinct sampling purpose: a derived seed, so e.g. continuations forked at the
    empty prefix never replay the old trace sampled from the same context."""
    return replace(params, seed=derive_seed(params.seed, *salt))


def _token_advantages(builder: _GroupBuilder, advantages: torch.Tensor, level: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every continuation token's advantage and its loss-mask weight, in plan order."""
    values, weights = [torch.zeros(0)], [torch.zeros(0)]
    seq = 0
    for g in builder.groups:
        for k in range(len(g.continuations)):
            mask = torch.tensor(g.loss_mask(k), dtype=torch.float32)
            if level == "episode":
                values.append(advantages[torch.tensor(g.episode_id(k), dtype=torch.long)])
            else:
                values.append(advantages[seq].expand(len(mask)))
            weights.append(mask)
            seq += 1
    return torch.cat(values), torch.cat(weights)


def _advantage_metrics(builder: _GroupBuilder, advantages: torch.Tensor, level: str) -> dict[str, float]:
    """``advantage/mean`` and ``advantage/abs_mean`` over trained tokens (what the token-mean loss weighs)."""
    v, w = _token_advantages(builder, advantages, level)
    total = float(w.sum()) or 1.0
    return {"advantage/mean": float((v * w).sum()) / total, "advantage/abs_mean": float((v.abs() * w).sum()) / total}


NORMALIZE_MODES = ("none", "group", "batch")


def _check_normalize(normalize_std: Any) -> str:
    """``normalize_std``: ``"none"``, ``"group"`` or ``"batch"`` (``False`` / ``True`` mean none / group)."""
    if isinstance(normalize_std, bool):
        return "group" if normalize_std else "none"
    if normalize_std not in NORMALIZE_MODES:
        raise ValueError(f"normalize_std must be one of {NORMALIZE_MODES} (or a bool), got {normalize_std!r}")
    return normalize_std


def _normalize(
    advantages: torch.Tensor,
    mode: str,
    *,
    returns: Sequence[float],
    group_of: Sequence[int],
    sequence_of: torch.Tensor | None,
    builder: _GroupBuilder,
    level: str,
) -> tuple[torch.Tensor, float]:
    """The same standard-deviation normalisation for every plan.

    ``group``: each advantage is divided by the standard deviation of its group's returns
    (:func:`group_std_scale`; ``sequence_of`` maps episode values to their sequence). ``batch``: all
    advantages are divided by their root mean square over the plan's trained tokens, i.e. the spread
    of the returns about each algorithm's own baseline, so every algorithm's update has unit scale.
    Returns the advantages and the scale ``batch`` found (the RMS; 1 for the other modes).
    """
    if mode == "group":
        scale = group_std_scale(returns, group_of)
        return advantages / (scale if sequence_of is None else scale[sequence_of]), 1.0
    if mode == "batch":
        v, w = _token_advantages(builder, advantages, level)
        rms = float(((v.square() * w).sum() / w.sum().clamp(min=1.0)).sqrt())
        return (advantages / rms, rms) if rms > 0 else (advantages, 0.0)  # all 0: nothing to scale
    return advantages, 1.0


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
    normalize_std: bool | str = "none",
    length_penalty: float = 0.0,
    splitter: EpisodeSplitter | None = None,
) -> RLPlan:
    """GRPO: ``n`` samples per prompt, advantage = reward minus the group mean (optionally ``/ std``).

    The reward is the 0/1 outcome, minus ``length_penalty * response tokens / params.max_new_tokens``
    when ``length_penalty > 0`` (a length-control baseline: a policy can shorten its answers without
    making progress per episode).
    """
    _check_problems(prompts, answers)
    check_k(n, "n")
    normalize_std = _check_normalize(normalize_std)
    length_penalty = check_alpha(length_penalty, "length_penalty")
    if length_penalty < 0:
        raise ValueError(f"length_penalty must be >= 0, got {length_penalty}")
    samples = engine.generate([list(p) for p in prompts], params, n=n)
    builder = _GroupBuilder()
    outcome, rewards, group_ids, lengths, n_episodes = [], [], [], [], []
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
            rewards.append(outcome[-1] - length_penalty * len(c.token_ids) / params.max_new_tokens)
            group_ids.append(i)
            lengths.append(len(c.token_ids))
            n_episodes.append(tr.num_episodes)
        builder.add(prompt, conts, None, eps, [_logprobs(c) for c in per_prompt])
    adv, scale = _normalize(group_baseline(rewards, group_ids), normalize_std, returns=rewards, group_of=group_ids,
                            sequence_of=None, builder=builder, level="sequence")
    metrics = {
        "reward/mean": _mean(rewards),
        "reward/progress/mean": 0.0,
        "outcome/accuracy": _mean(outcome),
        "response_length/mean": _mean(lengths),
        "episodes/mean": _mean(n_episodes),
        **_advantage_metrics(builder, adv, "sequence"),
    }
    return RLPlan(builder.groups, adv, "sequence", metrics, builder.logprobs, {"outcome": outcome}, scale)


# ----------------------------------------------------------------------------------------------
# MRT-RL
# ----------------------------------------------------------------------------------------------


def _progress_boundaries(trace: EpisodeTrace, cut: int, form: str) -> list[int]:
    """Where the meta-prover measures a continuation's progress, as offsets into the combined
    response (prefix + continuation): the end of its thinking (``paper``), or every episode
    boundary after the cut up to the end of its thinking (``dense``). Empty when the continuation
    closes its thinking at once (no thinking of its own: progress 0)."""
    after = sorted({b for b in trace.meta_boundaries() if b > cut})
    if form == "paper":
        return after[-1:]
    return after


def _segments(trace: EpisodeTrace, cut: int, ends: list[int]) -> list[int]:
    """Segment index of every continuation token: segment ``s`` ends at ``ends[s]``; tokens after
    the last end (the answer) join the last segment."""
    out = []
    for t in range(cut, len(trace.token_ids)):
        s = sum(1 for e in ends if e <= t)
        out.append(min(s, max(len(ends) - 1, 0)))
    return out


def mrt_rl_plan(
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
    progress: str = "paper",
    cut: str = "random",
    train_terminate: bool = True,
    normalize_std: bool | str = "none",
    old_traces: Sequence[Sequence[int]] | None = None,
    rng: random.Random | None = None,
    splitter: EpisodeSplitter | None = None,
) -> RLPlan:
    """MRT-RL with the termination baseline and measured progress.

    For each prompt a trace from the old policy (sampled with ``params`` unless ``old_traces``
    gives the response token ids) is cut after a random number of episodes (``cut="random"``;
    ``"every"`` uses every boundary, one group each). At the prefix ``c``:

    - ``J(c)`` is the fraction of ``k`` forced-termination answers (``termination_ids`` then an
      answer sampled with ``meta_params``) graded correct. These answers are not trained.
    - With ``train_terminate``, ``n // 2`` continuations *terminate now*: the termination text
      (masked) and an answer sampled from the policy with ``params`` (its temperature, its
      log-probs; at most ``meta_params.max_new_tokens`` answer tokens). The other ``n - n // 2``
      (all ``n`` without ``train_terminate``) *continue thinking*, sampled with ``params`` and at
      most ``params.max_new_tokens - len(prefix response)`` tokens: prefix and continuation share one
      response budget.

    Advantages (:func:`termination_advantages`): ``A = r - J(c) + alpha * progress``. Terminate-now
    continuations make no progress. For a continue-thinking one, ``progress="paper"`` measures
    ``J(c + its thinking) - J(c)`` with ``k`` forced answers where its thinking ends (``</think>``,
    or its end when truncated); ``progress="dense"`` measures ``J`` at each of its own episode
    boundaries and gives every episode ``r - J(c) + alpha * (J_end - J_start)`` (``level="episode"``).
    Every measurement goes through ``branch_at_boundaries`` in one call. Nothing is measured when
    ``alpha = 0``.
    """
    from mrt_fast.rollout import branch_at_boundaries
    from mrt_fast.rollout.branching import fork_within_budget

    _check_problems(prompts, answers)
    alpha = check_alpha(alpha)
    check_k(n, "n")
    check_k(k, "k")
    normalize_std = _check_normalize(normalize_std)
    if not isinstance(train_terminate, bool):
        raise TypeError(f"train_terminate must be a bool, got {type(train_terminate).__name__}")
    if train_terminate and n < 2:
        raise ValueError(f"n must be >= 2 for MRT-RL with train_terminate (at least one terminate-now and one "
                         f"continue-thinking), got {n}")
    if cut not in CUT_MODES:
        raise ValueError(f"cut must be one of {CUT_MODES}, got {cut!r}")
    if progress not in PROGRESS_FORMS:
        raise ValueError(f"progress must be one of {PROGRESS_FORMS}, got {progress!r}")
    if not termination_ids:
        raise ValueError("termination_ids must not be empty")
    rng = rng or random.Random(0)
    n_term = n // 2 if train_terminate else 0
    n_cont = n - n_term
    budget = params.max_new_tokens

    if old_traces is None:
        old_traces = [s[0].token_ids for s in engine.generate([list(p) for p in prompts], params, n=1)]
    if len(old_traces) != len(prompts):
        raise ValueError(f"old_traces ({len(old_traces)}) must hold one trace per prompt ({len(prompts)})")
    traces = [episode_trace(tokenizer, t, splitter) for t in old_traces]

    # Cut after j episodes, j < num_episodes (after the last one nothing is left to continue), where
    # the response budget still leaves room to continue.
    cuts: list[list[int]] = []
    for tr in traces:
        starts = [0] + tr.episode_ends
        choices = [j for j in range(tr.num_episodes) if starts[j] < budget]  # j = 0 always qualifies
        cuts.append(choices if cut == "every" else [rng.choice(choices)])
    bounds = [[([0] + tr.episode_ends)[j] for j in js] for tr, js in zip(traces, cuts)]
    prefixes = [(i, j, b) for i in range(len(prompts)) for j, b in zip(cuts[i], bounds[i])]
    full = [list(p) + tr.token_ids for p, tr in zip(prompts, traces)]

    conts = fork_within_budget(
        engine, [full[i][: len(prompts[i]) + b] for i, _, b in prefixes], _with_seed(params, "continue"), n_cont,
        [budget - b for _, _, b in prefixes],
    )
    terms: list[list[list[Any]]] = [[] for _ in prompts]
    if n_term:
        term_params = _with_seed(replace(params, max_new_tokens=meta_params.max_new_tokens), "terminate")
        terms = branch_at_boundaries(engine, full, [[len(p) + b for b in bs] for p, bs in zip(prompts, bounds)],
                                     list(termination_ids), term_params, n_term)

    # Continue-thinking continuations as whole responses (prefix + continuation) and where to measure them.
    combined, measure_at = [], []
    for (i, _, b), per in zip(prefixes, conts):
        for c in per:
            if not c.token_ids:
                raise _empty("continue-thinking")
            tr = episode_trace(tokenizer, traces[i].token_ids[:b] + list(c.token_ids), splitter)
            combined.append(tr)
            measure_at.append(_progress_boundaries(tr, b, progress) if alpha else [])

    # One meta-prover call: J(c) on the old traces, then the continuations' own boundaries.
    entries = [(i, traces[i].token_ids, bounds[i]) for i in range(len(prompts))]
    owners = [i for i, _, _ in prefixes for _ in range(n_cont)]
    entries += [(i, tr.token_ids, at) for i, tr, at in zip(owners, combined, measure_at) if at]
    meta = run_meta_prover(
        engine, [prompts[i] for i, _, _ in entries], [t for _, t, _ in entries], [bs for *_, bs in entries],
        answers=[answers[i] for i, _, _ in entries], grader=grader, termination_ids=termination_ids, k=k,
        params=meta_params,
    )
    measured = iter(meta.J[len(prompts):])
    cont_J = [next(measured) if at else [] for at in measure_at]

    builder = _GroupBuilder()
    values: list[float] = []  # advantages, per sequence or per episode
    returns, group_of, episode_seq = [], [], []  # per trained sequence; per episode: its sequence
    outcome_term, outcome_cont, prefix_J, progress_all, J_after = [], [], [], [], []
    gen_lengths, cont_lengths, total_lengths = [], [], []
    ci = 0
    for g, (i, j, b) in enumerate(prefixes):
        J = meta.J[i][cuts[i].index(j)]
        prefix_J.append(J)
        # Episode ids index per-episode advantages in the dense form, so only trained episodes get one
        # there; in the paper form the prefix's episodes keep ids of their own (context, never trained).
        first = builder.new_episodes(j) if progress == "paper" else -1
        seqs, masks, eps, lps = [], [], [], []
        for c in terms[i][cuts[i].index(j)] if n_term else []:
            r = float(grader(c.text, answers[i]))
            outcome_term.append(r)
            seqs.append(list(termination_ids) + list(c.token_ids))
            masks.append([0.0] * len(termination_ids) + [1.0] * len(c.token_ids))
            lps.append([0.0] * len(termination_ids) + _logprobs(c))
            gen_lengths.append(len(c.token_ids))
            episode = builder.new_episodes(1)
            eps.append([episode] * len(seqs[-1]))
            a = float(termination_advantages([r], [J], [0.0], alpha)[0])
            values.append(a)
            episode_seq.append(len(returns))
            returns.append(r)
            group_of.append(g)
        for c in conts[g]:
            tr, at, Js = combined[ci], measure_at[ci], cont_J[ci]
            ci += 1
            r = float(grader(c.text, answers[i]))
            outcome_cont.append(r)
            gain = (Js[-1] - J) if Js else 0.0
            progress_all.append(gain)
            if Js:
                J_after.append(Js[-1])
            seqs.append(list(c.token_ids))
            masks.append([1.0] * len(c.token_ids))
            lps.append(_logprobs(c))
            gen_lengths.append(len(c.token_ids))
            cont_lengths.append(len(c.token_ids))
            total_lengths.append(b + len(c.token_ids))
            if progress == "dense":
                steps = progress_from_J([J] + Js).tolist() or [0.0]
                seg = _segments(tr, b, at)
                base = builder.new_episodes(len(steps))
                eps.append([base + s for s in seg])
                values += termination_advantages([r] * len(steps), [J] * len(steps), steps, alpha).tolist()
                episode_seq += [len(returns)] * len(steps)
            else:
                # Episode ids follow the trace's own split (the first paragraph joins the prefix's last
                # episode unless it starts with a cue); sequence-level advantages do not read them.
                new = builder.new_episodes(max(tr.num_episodes - j, 0))
                eps.append([first + e if e < j else new + e - j for e in tr.episode_ids[b:]])
                values.append(float(termination_advantages([r], [J], [gain], alpha)[0]))
            returns.append(r + alpha * gain)
            group_of.append(g)
        builder.add(full[i][: len(prompts[i]) + b], seqs, masks, eps, lps)

    level = "episode" if progress == "dense" else "sequence"
    adv, scale = _normalize(
        torch.tensor(values, dtype=torch.float32), normalize_std, returns=returns, group_of=group_of,
        sequence_of=torch.tensor(episode_seq, dtype=torch.long) if level == "episode" else None,
        builder=builder, level=level,
    )
    forced = [len(c.token_ids) for i, j, _ in prefixes for c in meta.completions[i][cuts[i].index(j)]]
    metrics = {
        "reward/mean": _mean(returns),
        "reward/progress/mean": _mean(progress_all),
        "outcome/accuracy": _mean(outcome_term + outcome_cont),
        "response_length/mean": _mean(gen_lengths),
        "episodes/mean": _mean([tr.num_episodes for tr in traces]),
        **_advantage_metrics(builder, adv, level),
        "mrt/terminate_accuracy": _mean(outcome_term),
        "mrt/continue_accuracy": _mean(outcome_cont),
        "mrt/J_prefix/mean": _mean(prefix_J),
        "mrt/cut_episodes/mean": _mean([j for _, j, _ in prefixes]),
        "mrt/prefix_length/mean": _mean([b for *_, b in prefixes]),
        "mrt/continuation_length/mean": _mean(cont_lengths),
        "mrt/total_length/mean": _mean(total_lengths),
        "mrt/forced_answer_length/mean": _mean(forced),
    }
    if J_after:
        metrics["mrt/J_after_continuation/mean"] = _mean(J_after)
    details = {
        "cuts": list(prefixes),
        "old_traces": [tr.token_ids for tr in traces],
        "J_prefix": prefix_J,
        "J_continuations": cont_J,
        "progress_boundaries": measure_at,
        "returns": returns,
    }
    return RLPlan(builder.groups, adv, level, metrics, builder.logprobs, details, scale)


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
    normalize_std: bool | str = "none",
    responses: Sequence[Sequence[Sequence[int]]] | None = None,
    splitter: EpisodeSplitter | None = None,
) -> RLPlan:
    """MRT-online: per-episode dense advantages ``A_seq + alpha * (J_j - J_{j-1})``.

    ``A_seq`` is the group baseline of the 0/1 outcome over the ``n`` samples of a prompt; the
    progress of episode ``j`` comes from ``k`` forced-termination answers at every boundary.
    """
    alpha = check_alpha(alpha)
    normalize_std = _check_normalize(normalize_std)
    scored = score_traces(
        engine, tokenizer, prompts, answers, grader=grader, params=params, meta_params=meta_params,
        termination_ids=termination_ids, n=n, k=k, responses=responses, splitter=splitter,
    )
    outcome, problems = [s.outcome for s in scored], [s.problem for s in scored]
    seq_adv = group_baseline(outcome, problems)
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
    returns = [s.outcome + alpha * (s.J[-1] - s.J[0]) for s in scored]  # the episodes' progress summed
    values, scale = _normalize(values, normalize_std, returns=returns, group_of=problems,
                               sequence_of=torch.tensor(episode_seq, dtype=torch.long), builder=builder,
                               level="episode")
    forced = [len(c.token_ids) for s in scored for per_boundary in s.forced_answers for c in per_boundary]
    metrics = {
        "reward/mean": _mean(returns),
        "reward/progress/mean": _mean(progress),
        "outcome/accuracy": _mean(outcome),
        "response_length/mean": _mean([len(s.trace.token_ids) for s in scored]),
        "episodes/mean": _mean([s.trace.num_episodes for s in scored]),
        **_advantage_metrics(builder, values, "episode"),
        "mrt/J0/mean": _mean([s.J[0] for s in scored]),
        "mrt/J_final/mean": _mean([s.J[-1] for s in scored]),
        "mrt/forced_answer_length/mean": _mean(forced),
    }
    details = {"outcome": [s.outcome for s in scored], "J": [s.J for s in scored], "boundaries": [s.boundaries for s in scored]}
    return RLPlan(builder.groups, values, "episode", metrics, builder.logprobs, details, scale)


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
    termination text and that correct answer, all of it trained: the termination text is where
    the model learns to stop thinking. Per problem, the
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
        mask = [1.0] * len(response)  # the termination text too: the stop at the cut is learned
        example = SFTExample(
            list(prompts[s.problem]), response, mask, tokenizer.decode(response), s.problem, list(s.J), best, cut
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
        "mrt/prefix_length/mean": _mean([e.cut_tokens for e in examples]),
    }
    return examples, metrics
