"""Meta-prover branching: forced-termination answers at every episode boundary of a trace.

MRT's progress estimate J(x, z_{0:j}) needs, at each boundary j of each trace, k answers sampled
after the trace is cut at j and the termination text appended. The contexts of one trace are
prefixes of each other, so their KV caches are too: the embedded engine prefills each trace
once and serves every boundary by cutting that cache, so the work grows with
boundaries x k x answer tokens, not boundaries x k x (prefix + answer) tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import replace

from .params import Completion, SamplingParams
from .protocol import RolloutEngine, check_n, check_token_lists


def check_branch_inputs(
    traces: object,
    boundaries: object,
    termination_ids: object,
    k: object,
    *,
    vocab_size: int | None,
    max_len: int | None,
) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Validate branch_at_boundaries' arguments; errors name the argument and index."""
    check_n(k, "k")
    traces = check_token_lists(traces, "traces", vocab_size=vocab_size, max_len=None, allow_empty_items=True)
    if isinstance(termination_ids, (str, bytes)) or not isinstance(termination_ids, Sequence):
        raise TypeError(f"termination_ids must be a list of token ids, got {type(termination_ids).__name__}")
    termination = list(termination_ids)
    if termination:
        termination = check_token_lists([termination], "termination_ids", vocab_size=vocab_size, max_len=None)[0]
    if isinstance(boundaries, (str, bytes)) or not isinstance(boundaries, Sequence):
        raise TypeError(f"boundaries must be a list (one list of offsets per trace), got {type(boundaries).__name__}")
    if len(boundaries) != len(traces):
        raise ValueError(f"boundaries has {len(boundaries)} lists but traces has {len(traces)} traces")
    out_bounds: list[list[int]] = []
    for i, (trace, bounds) in enumerate(zip(traces, boundaries)):
        if isinstance(bounds, (str, bytes)) or not isinstance(bounds, Sequence):
            raise TypeError(f"boundaries[{i}] must be a list of token offsets, got {type(bounds).__name__}")
        for b in bounds:
            if isinstance(b, bool) or not isinstance(b, int):
                raise TypeError(f"boundaries[{i}] must contain ints, found {type(b).__name__}")
            if not 0 <= b <= len(trace):
                raise ValueError(f"boundaries[{i}] has offset {b}, outside [0, {len(trace)}] (len(traces[{i}]))")
            context_len = b + len(termination)
            if context_len == 0:
                raise ValueError(f"boundaries[{i}] has offset 0 and termination_ids is empty: an empty context")
            if max_len is not None and context_len > max_len:
                raise ValueError(
                    f"boundaries[{i}] offset {b} plus {len(termination)} termination_ids is {context_len} tokens, "
                    f"more than the model's context length {max_len}"
                )
        out_bounds.append(list(bounds))
    return traces, out_bounds, termination


def branch_at_boundaries(
    engine: RolloutEngine,
    traces: list[list[int]],
    boundaries: list[list[int]],
    termination_ids: list[int],
    params: SamplingParams,
    k: int,
) -> list[list[list[Completion]]]:
    """Sample k forced-termination answers at every boundary of every trace.

    Branch (i, b) continues `traces[i][:boundaries[i][b]] + termination_ids` (offset 0 is the
    empty prefix: only the termination text). Result indexed [trace][boundary][answer];
    `Completion.prompt_len` is the branch's context length.

    The embedded HF engine prefills each trace once and cuts its cache at each boundary. Other
    engines get one `fork` call over all contexts (vLLM shares the KV through automatic prefix
    caching). The embedded engine names each answer's random stream by its context, so the
    answers at different boundaries (and of different traces) are independent samples.
    """
    own = getattr(engine, "branch_at_boundaries", None)
    if callable(own):
        return own(traces, boundaries, termination_ids, params, k)
    traces, boundaries, termination = check_branch_inputs(
        traces, boundaries, termination_ids, k, vocab_size=None, max_len=None
    )
    contexts = [trace[:b] + termination for trace, bounds in zip(traces, boundaries) for b in bounds]
    if not contexts:
        return [[] for _ in traces]
    answers = iter(engine.fork(contexts, params, k))
    return [[next(answers) for _ in bounds] for bounds in boundaries]


def fork_within_budget(
    engine: RolloutEngine,
    prefixes: list[list[int]],
    params: SamplingParams,
    n: int,
    budgets: list[int],
) -> list[list[Completion]]:
    """`n` branches per prefix, prefix i's branches generating at most `budgets[i]` tokens.

    Used where a prefix is itself part of a response (an MRT-RL cut of a trace): the branch gets
    what is left of the response budget. Engines whose `fork` takes per-prefix caps (the embedded
    one) decode everything in one call; others get one `fork` call per distinct budget.
    """
    if len(budgets) != len(prefixes):
        raise ValueError(f"budgets ({len(budgets)}) must hold one budget per prefix ({len(prefixes)})")
    for b in budgets:
        check_n(b, "budgets[i]")
    if "max_new_tokens" in inspect.signature(engine.fork).parameters:
        return engine.fork(prefixes, params, n, max_new_tokens=list(budgets))
    out: list[list[Completion] | None] = [None] * len(prefixes)
    for budget in sorted(set(budgets)):
        idx = [i for i, b in enumerate(budgets) if b == budget]
        capped = replace(params, max_new_tokens=min(params.max_new_tokens, budget))
        for i, samples in zip(idx, engine.fork([prefixes[i] for i in idx], capped, n)):
            out[i] = samples
    return out  # type: ignore[return-value]
