"""Measure the embedded task's progress property on a model.

For each problem: sample a trace, read its attempts back (``read_attempts``), and at the empty
prefix and after every attempt force termination (append ``TERMINATION_TEXT``) and sample ``k``
answers. The table groups ``J`` (the fraction of correct forced answers) by the number of
productive attempts completed so far, and reports the mean change of ``J`` over productive and
over redundant (re-check) episodes. ``python -m mrt_fast.data.task_probe`` prints it for the
shipped checkpoint (docs/data.md).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from dataclasses import dataclass

import torch

from .chat import PARAGRAPH_SEP, TERMINATION_TEXT, THINK_END, THINK_START, chat_prompt_text
from .grading import grade
from .synthetic import DEFAULT_DIFFICULTY, GRADER_KIND, generate_problems, read_attempts
from .warm_start import EVAL_SEED, sample_responses


@dataclass
class ProgressTable:
    """Forced-termination accuracy per number of productive attempts, and mean ΔJ per episode kind."""

    j_by_productive: dict[int, tuple[float, int]]  # productive attempts -> (mean J, boundaries)
    delta_productive: float  # mean J_j - J_{j-1} over productive episodes
    delta_redundant: float  # mean J_j - J_{j-1} over unproductive episodes (re-checks, unlisted keys)
    n_productive: int
    n_redundant: int
    accuracy: float  # the sampled traces' own accuracy

    def markdown(self) -> str:
        lines = ["| productive attempts completed | mean J (forced termination) | boundaries |", "|---|---|---|"]
        for n, (j, count) in sorted(self.j_by_productive.items()):
            lines.append(f"| {n} | {j:.3f} | {count} |")
        lines.append("")
        lines.append(
            f"mean ΔJ over productive episodes: {self.delta_productive:+.3f} ({self.n_productive}); "
            f"over unproductive ones (re-checks, keys not in the list): {self.delta_redundant:+.3f} ({self.n_redundant}); "
            f"trace accuracy {self.accuracy:.3f}"
        )
        return "\n".join(lines)


@torch.no_grad()
def forced_termination_accuracy(model, tokenizer, problem, thinking_prefixes, *, k, temperature, seed):
    """J at each thinking prefix: fraction of ``k`` forced answers that grade correct."""
    prompts, answers_per_prefix = [], []
    for prefix in thinking_prefixes:
        sep = PARAGRAPH_SEP if prefix else ""
        prompts.append(chat_prompt_text(problem.prompt) + THINK_START + "\n" + prefix + sep + TERMINATION_TEXT)
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    out = model.generate(
        **enc, max_new_tokens=16, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
        num_return_sequences=k, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    for i in range(len(prompts)):
        answers_per_prefix.append(sum(grade(t, problem.answer, kind=GRADER_KIND) for t in texts[i * k:(i + 1) * k]) / k)
    return answers_per_prefix


def measure_progress(model, tokenizer, *, n_problems=64, k=8, difficulty=DEFAULT_DIFFICULTY,
                     temperature=1.0, seed=EVAL_SEED + 1, max_new_tokens=512) -> ProgressTable:
    problems = generate_problems(n_problems, seed=seed, difficulty=difficulty)
    responses = sample_responses(model, tokenizer, [p.prompt for p in problems],
                                 max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
    by_count: dict[int, list[float]] = defaultdict(list)
    deltas = {True: [], False: []}
    correct = 0
    for i, (problem, response) in enumerate(zip(problems, responses)):
        correct += grade(response, problem.answer, kind=GRADER_KIND)
        body = response[len(THINK_START) + 1:] if response.startswith(THINK_START + "\n") else response
        thinking = body.split(THINK_END)[0].split("Time is up.")[0].rstrip("\n")
        attempts = read_attempts(problem, thinking)
        # Only complete attempts (their verdict line was written) are boundaries.
        attempts = [a for a in attempts if thinking[:a.end].endswith(("so no.", "so yes."))]
        prefixes = [""] + [thinking[:a.end] for a in attempts]
        J = forced_termination_accuracy(model, tokenizer, problem, prefixes, k=k, temperature=temperature, seed=seed + i)
        productive = 0
        by_count[0].append(J[0])
        for j, attempt in enumerate(attempts, start=1):
            productive += attempt.productive
            by_count[productive].append(J[j])
            deltas[attempt.productive].append(J[j] - J[j - 1])
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return ProgressTable(
        j_by_productive={n: (mean(v), len(v)) for n, v in by_count.items()},
        delta_productive=mean(deltas[True]), delta_redundant=mean(deltas[False]),
        n_productive=len(deltas[True]), n_redundant=len(deltas[False]),
        accuracy=correct / len(problems),
    )


def main(argv=None):
    from .tiny_model import load_warm_start

    parser = argparse.ArgumentParser(prog="python -m mrt_fast.data.task_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the shipped one)")
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model, tokenizer = load_warm_start(path=args.model)
    table = measure_progress(model, tokenizer, n_problems=args.problems, k=args.k, temperature=args.temperature)
    print(table.markdown())
    return table


if __name__ == "__main__":
    main()
