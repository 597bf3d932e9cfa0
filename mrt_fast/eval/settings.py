"""One evaluation for the trainer and ``python -m mrt_fast.eval``: same defaults, same code, same label.

The defaults live once, in :class:`mrt_fast.config.EvalConfig` (the trainer's ``eval.*`` keys);
the command line takes its defaults from there. :func:`evaluate_problems` encodes the prompts,
grades, and runs :func:`mrt_fast.eval.runner.evaluate`, so the same model, problems, settings and
seed give the same numbers from either entry point. :func:`accuracy_label` names the settings
next to every accuracy printed, e.g. ``pass@1 (T=0.6, top-p 0.95, 4 samples, 512 tokens)``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from mrt_fast.config import EvalConfig


def default_ks(n: int) -> list[int]:
    """pass@k / maj@k for the powers of two up to ``n``."""
    return [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= n]


def default_budgets(max_new_tokens: int, forcing_budget: int = 0) -> list[int]:
    """Regret budgets: a quarter, a half and all of the response budget (and the forcing budget)."""
    budgets = {max(1, max_new_tokens // 4), max(1, max_new_tokens // 2), max_new_tokens}
    return sorted(budgets | ({forcing_budget} if forcing_budget else set()))


def eval_settings(e: EvalConfig, *, seed: int, ks: Optional[Sequence[int]] = None, regret_samples: int = 1,
                  forcing_budget: int = 0, forcing_step: int = 64, batch_size: int = 8, splitter: Any = None) -> Any:
    """:class:`~mrt_fast.eval.runner.EvalSettings` from ``eval.*`` values (+ the CLI-only extras)."""
    from mrt_fast.eval.runner import EvalSettings
    from mrt_fast.mrt.episodes import make_splitter
    from mrt_fast.rollout import SamplingParams

    return EvalSettings(
        params=SamplingParams(temperature=e.temperature, top_p=e.top_p, max_new_tokens=e.max_new_tokens, seed=seed),
        meta_params=SamplingParams(temperature=e.temperature, top_p=e.top_p, max_new_tokens=e.meta_max_new_tokens,
                                   seed=seed + 1),
        n=e.samples, ks=list(ks) if ks else default_ks(e.samples), meta_k=e.meta_k, regret_samples=regret_samples,
        budgets=list(e.budgets) or default_budgets(e.max_new_tokens, forcing_budget), forcing_budget=forcing_budget,
        forcing_step=forcing_step, batch_size=batch_size, splitter=splitter or make_splitter(),
        regret_tokens=e.regret_tokens,
    )


def accuracy_label(e: EvalConfig) -> str:
    """What a pass@1 number means: ``pass@1 (T=0.6, top-p 0.95, 4 samples, 512 tokens)``."""
    sampling = "greedy" if e.temperature == 0 else f"T={e.temperature:g}, top-p {e.top_p:g}"
    return f"pass@1 ({sampling}, {e.samples} sample{'s' if e.samples != 1 else ''}, {e.max_new_tokens} tokens)"


def evaluate_problems(engine: Any, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], *,
                      grader_kind: str, settings: Any, progress: Optional[Callable[[int], Any]] = None) -> dict:
    """Chat-template the prompts, sample, grade with ``grader_kind`` and measure J and regret."""
    from mrt_fast.data import extract_boxed, grade
    from mrt_fast.data.problems import prompt_token_ids
    from mrt_fast.eval.runner import evaluate
    from mrt_fast.mrt.progress import termination_token_ids

    def grader(response: str, answer: str) -> bool:
        return grade(response, answer, kind=grader_kind)

    return evaluate(engine, tokenizer, [prompt_token_ids(tokenizer, p) for p in prompts], list(answers),
                    grader=grader, termination_ids=termination_token_ids(tokenizer), settings=settings,
                    extract=extract_boxed, progress=progress)
