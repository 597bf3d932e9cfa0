"""The evaluation loop: sample, grade, measure ``J`` along every trace, force longer thinking.

:func:`evaluate` works on any rollout engine and returns a JSON-ready dict:

- accuracy: pass@1 over ``n`` samples, unbiased pass@k and maj@k for each requested ``k``, mean
  response tokens;
- regret: the meta-prover's pass@1 ``J`` at every episode boundary of the first
  ``regret_samples`` traces of each problem, giving per-trace curves ``(tokens spent, J)``; the
  normalised regret of each curve at every budget (:func:`mrt_fast.eval.normalized_regret`),
  averaged; and the mean curve on a token grid for plots. ``regret_tokens`` chooses the x-axis:
  ``"authors"`` (default, as the authors' ``analysis/code/regret.ipynb``) places boundary ``j`` at
  the length of the meta-prover's whole input (prompt + thinking prefix + termination text) plus
  the mean length of its forced answers; ``"response"`` at the response tokens before the boundary;
- budget forcing (``forcing_budget > 0``): the same traces continued past their end by suppressing
  ``</think>`` (generation stops at it, the text before it is kept) and appending ``"Wait"``, in
  steps of ``forcing_step`` tokens until ``forcing_budget`` response tokens, with ``J`` measured
  after every step; these points extend the traces' curves beyond the training budget.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from mrt_fast.data.chat import PARAGRAPH_SEP, THINK_END
from mrt_fast.eval.metrics import curve_on_grid, maj_at_k, normalized_regret, pass_at_k
from mrt_fast.mrt.episodes import episode_trace
from mrt_fast.mrt.progress import Grader, check_k, run_meta_prover

FORCING_CUE = "Wait"
REGRET_TOKENS = ("authors", "response")


@dataclass
class EvalSettings:
    """What to measure. ``params`` samples the traces, ``meta_params`` the forced-termination answers."""

    params: Any
    meta_params: Any
    n: int = 4
    ks: Sequence[int] = (1, 2, 4)
    meta_k: int = 4
    regret_samples: int = 1
    budgets: Sequence[int] = ()
    forcing_budget: int = 0
    forcing_step: int = 64
    grid_points: int = 65
    batch_size: int = 8
    splitter: Any = None  # episode splitter (default: mrt_fast.mrt.episodes.split_episodes)
    regret_tokens: str = "authors"  # x-axis of the regret curves, see the module docstring

    def __post_init__(self) -> None:
        if self.regret_tokens not in REGRET_TOKENS:
            raise ValueError(f"regret_tokens must be one of {REGRET_TOKENS}, got {self.regret_tokens!r}")
        check_k(self.n, "n")
        check_k(self.meta_k, "meta_k")
        check_k(self.regret_samples, "regret_samples")
        check_k(self.batch_size, "batch_size")
        self.ks = sorted(set(self.ks))
        for k in self.ks:
            check_k(k, "k")
            if k > self.n:
                raise ValueError(f"k={k} needs at least k samples per problem, but n={self.n}")
        if self.regret_samples > self.n:
            raise ValueError(f"regret_samples ({self.regret_samples}) cannot exceed n ({self.n})")
        for b in self.budgets:
            check_k(b, "budget")
        if self.forcing_budget:
            check_k(self.forcing_budget, "forcing_budget")
            check_k(self.forcing_step, "forcing_step")


@dataclass
class Curve:
    """One trace's regret curve: tokens spent up to each measurement and ``J`` there."""

    problem: int
    tokens: list[float]
    J: list[float]
    forced_from: int  # index of the first budget-forcing point (== len(tokens) when none)


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


def _think_end_stop(tokenizer: Any, params: Any) -> tuple[Any, int | None]:
    """Sampling params that stop at ``</think>``: by token id when it is one token, else as a string."""
    tid = tokenizer.convert_tokens_to_ids(THINK_END)
    if isinstance(tid, int) and tid != tokenizer.unk_token_id:
        return replace(params, stop_token_ids=list(params.stop_token_ids) + [tid]), tid
    return replace(params, stop=list(params.stop) + [THINK_END]), None


def _strip_tail(tokenizer: Any, ids: list[int]) -> list[int]:
    """Drop trailing special tokens (EOS) and whitespace-only tokens, so a cue starts a new paragraph."""
    special = set(tokenizer.all_special_ids)
    while ids and (ids[-1] in special or not tokenizer.decode(ids[-1:]).strip()):
        ids = ids[:-1]
    return ids


def _budget_forcing(
    engine: Any, tokenizer: Any, prompts: list[list[int]], traces: list[Any], s: EvalSettings
) -> list[list[list[int]]]:
    """Budget forcing: for each trace, its response token ids after every forcing step.

    Thinking is kept up to ``</think>`` and continued with ``"\n\nWait"``; each step samples up to
    ``forcing_step`` tokens and stops at ``</think>`` (dropped again). A trace whose step ran out of
    tokens continues as it is; one that tried to stop thinking (or ended) gets a new cue. All
    traces still under ``forcing_budget`` take their step in one ``generate`` call.
    """
    step_params, think_end_id = _think_end_stop(tokenizer, replace(s.params, max_new_tokens=s.forcing_step))
    cue = tokenizer(PARAGRAPH_SEP + FORCING_CUE, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    ids = [list(tr.token_ids[: tr.think_end]) for tr in traces]
    # A trace that closed its thinking or ended (EOS) is forced on; one cut by its budget just continues.
    needs_cue = [tr.think_end < len(tr.token_ids) or bool(tr.token_ids and tr.token_ids[-1] in special) for tr in traces]
    states: list[list[list[int]]] = [[] for _ in traces]
    while True:
        active = []
        for t in range(len(traces)):
            if needs_cue[t]:
                ids[t] = _strip_tail(tokenizer, ids[t]) + cue
                needs_cue[t] = False
            if len(ids[t]) < s.forcing_budget:
                active.append(t)
        if not active:
            return states
        steps = engine.generate([prompts[t] + ids[t] for t in active], step_params, n=1)
        for t, (c,) in zip(active, steps):
            new = list(c.token_ids)
            if c.finish_reason == "stop":
                if think_end_id is not None and new and new[-1] == think_end_id:
                    new = new[:-1]
                else:  # a stop string: keep the tokens before the one that completed it
                    while new and THINK_END in tokenizer.decode(new):
                        new = new[:-1]
            ids[t] += new
            needs_cue[t] = c.finish_reason != "length"
            states[t].append(list(ids[t]))


def evaluate(
    engine: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[str],
    *,
    grader: Grader,
    termination_ids: Sequence[int],
    settings: EvalSettings,
    extract: Callable[[str], str | None],
    progress: Callable[[int], Any] | None = None,
) -> dict:
    """Evaluate an engine's policy on ``prompts`` (token ids) with reference ``answers``.

    ``extract`` pulls the final answer out of a response for majority voting; ``progress(total)``
    returns a tqdm-like bar (``update``, ``close``) or is None for no bar.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"prompts ({len(prompts)}) and answers ({len(answers)}) must have the same length")
    if not prompts:
        raise ValueError("no problems to evaluate")
    s = settings
    bar = progress(len(prompts)) if progress is not None else None
    per_problem, curves = [], []
    for batch in _batches(len(prompts), s.batch_size):
        bp = [list(prompts[i]) for i in batch]
        samples = engine.generate(bp, s.params, n=s.n)
        measured = []  # (problem, EpisodeTrace) of the traces measured at every boundary
        meta_inputs = []  # (problem, response ids, boundaries, own boundary count or None for a forced point)
        for i, per in zip(batch, samples):
            correct = [bool(grader(c.text, answers[i])) for c in per]
            extracted = [extract(c.text) for c in per]
            per_problem.append({
                "answer": answers[i],
                "correct": correct,
                "extracted": extracted,
                "tokens": [len(c.token_ids) for c in per],
                "texts": [c.text for c in per],  # for task-specific analyses (e.g. re-checked keys)
                "pass@k": {str(k): pass_at_k(s.n, sum(correct), k) for k in s.ks},
                "maj@k": {str(k): maj_at_k(extracted, correct, k) for k in s.ks},
            })
            measured += [(i, episode_trace(tokenizer, c.token_ids, s.splitter)) for c in per[: s.regret_samples]]
        forced: list[list[list[int]]] = [[] for _ in measured]
        if s.forcing_budget:
            forced = _budget_forcing(engine, tokenizer, [list(prompts[i]) for i, _ in measured], [tr for _, tr in measured], s)
        for (i, tr), states in zip(measured, forced):
            bounds = tr.meta_boundaries()
            meta_inputs.append((i, tr.token_ids, bounds, len(bounds)))
            meta_inputs += [(i, ids, [len(ids)], None) for ids in states]
        meta = run_meta_prover(
            engine, [prompts[i] for i, *_ in meta_inputs], [r for _, r, _, _ in meta_inputs],
            [b for _, _, b, _ in meta_inputs], answers=[answers[i] for i, *_ in meta_inputs], grader=grader,
            termination_ids=termination_ids, k=s.meta_k, params=s.meta_params,
        )
        for (i, _, bounds, own), J, answers_at in zip(meta_inputs, meta.J, meta.completions):
            xs = _regret_tokens(s.regret_tokens, len(prompts[i]), bounds, len(termination_ids), answers_at)
            if own is not None:
                curves.append(Curve(i, xs, list(J), own))
            else:  # a budget-forcing point extends the latest curve of this problem
                curves[-1].tokens = _non_decreasing(curves[-1].tokens + xs)
                curves[-1].J += J
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return _summarise(per_problem, curves, s)


def _regret_tokens(convention: str, prompt_len: int, bounds: list[int], termination_len: int,
                   answers_at: list[list[Any]]) -> list[float]:
    """Tokens spent up to each boundary: the response tokens before it (``"response"``), or the
    meta-prover's whole input there plus its mean forced-answer length (``"authors"``), made
    non-decreasing (a boundary whose answers are shorter than the previous one's stays at its x)."""
    if convention == "response":
        return [float(b) for b in bounds]
    xs = [prompt_len + b + termination_len + sum(len(c.token_ids) for c in answers) / len(answers)
          for b, answers in zip(bounds, answers_at)]
    return _non_decreasing(xs)


def _non_decreasing(xs: list[float]) -> list[float]:
    out: list[float] = []
    for x in xs:
        out.append(max(x, out[-1]) if out else x)
    return out


def _summarise(per_problem: list[dict], curves: list[Curve], s: EvalSettings) -> dict:
    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else 0.0

    all_tokens = [t for p in per_problem for t in p["tokens"]]
    result: dict[str, Any] = {
        "num_problems": len(per_problem),
        "n": s.n,
        "pass@1": mean(mean(p["correct"]) for p in per_problem),
        "pass@k": {str(k): mean(p["pass@k"][str(k)] for p in per_problem) for k in s.ks},
        "maj@k": {str(k): mean(p["maj@k"][str(k)] for p in per_problem) for k in s.ks},
        "mean_tokens": mean(all_tokens),
        "meta_k": s.meta_k,
    }
    longest = max([c.tokens[-1] for c in curves] + [max(s.budgets, default=0), s.forcing_budget, 1])
    grid = [round(longest * i / (s.grid_points - 1)) for i in range(s.grid_points)]
    budgets = sorted(set(s.budgets)) or [max(1, round(mean(all_tokens)))]
    result["regret"] = {
        str(b): mean(normalized_regret(c.tokens, c.J, b) for c in curves) for b in budgets
    }
    result["curve"] = {
        "tokens": grid,
        "J": [mean(col) for col in zip(*(curve_on_grid(c.tokens, c.J, grid) for c in curves))],
    }
    result["J_at_empty_prefix"] = mean(c.J[0] for c in curves)
    result["J_at_end_of_thinking"] = mean(c.J[c.forced_from - 1] for c in curves)
    if s.forcing_budget:
        result["budget_forcing"] = {
            "budget": s.forcing_budget,
            "step": s.forcing_step,
            "J_at_end": mean(c.J[-1] for c in curves),
            "tokens_at_end": mean(c.tokens[-1] for c in curves),
        }
    result["curves"] = [
        {"problem": c.problem, "tokens": c.tokens, "J": c.J, "forced_from": c.forced_from} for c in curves
    ]
    result["per_problem"] = per_problem
    return result
