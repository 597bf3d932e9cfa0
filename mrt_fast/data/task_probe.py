"""Check the embedded task's properties on a model: the numbers docs/data.md reports.

``python -m mrt_fast.data.task_probe`` measures, for the shipped checkpoint (or ``--model DIR``):

* hop accuracy (:func:`hop_accuracy`): teacher-forced argmax accuracy of single lookups read
  from the prompt, on fresh problems;
* verdict accuracy (:func:`verdict_accuracy`): how often a warm-start trace's verdict lines
  (``S is not G, so no.``), teacher-forced, are all argmax-correct;
* pass@1 at T=1 on fresh problems;
* progress (:func:`measure_progress`): for each problem, sample a trace, read its attempts back
  (``read_attempts``), and at the empty prefix and after every complete attempt force
  termination (append ``TERMINATION_TEXT``) and sample ``k`` answers. The table groups ``J`` (the
  fraction of correct forced answers) by the number of productive attempts completed so far, and
  reports the mean change of ``J`` over productive and over unproductive episodes;
* scripted progress (:func:`scripted_progress`): the same J, on thinking prefixes written by the
  task itself (keys tried in a random order until the answer is found, no give-ups), so the
  model's own stopping does not select which prefixes are measured: J after each failed attempt,
  right after the attempt that finds the answer, and the change a re-check of the last key makes;
* the shortcut (:func:`direct_answer_probe`): fine-tune a copy on answers without thinking
  (``<think>\n</think>`` then the answer) and measure how often its direct answer is right.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
from collections import defaultdict
from dataclasses import dataclass

import torch

from .chat import PARAGRAPH_SEP, TERMINATION_TEXT, THINK_END, THINK_START, chat_prompt_text
from .grading import grade
from .synthetic import (
    DEFAULT_DIFFICULTY,
    DEFAULT_TASK,
    GRADER_KIND,
    Problem,
    answer_text,
    attempt_opening,
    attempt_steps,
    generate_problems,
    iter_problems,
    read_attempts,
    sft_trace,
    verdict_spans,
)
from .warm_start import (
    EVAL_SEED,
    IGNORE_INDEX,
    WarmStartConfig,
    collate,
    encode_drill,
    encode_example,
    fit_phase,
    sample_responses,
    task_accuracy,
)

# Fresh problem streams of the probes: seeds used neither by training (0) nor by the warm start's
# own evaluation (EVAL_SEED).
PROGRESS_SEED = EVAL_SEED + 1
PASS_SEED = EVAL_SEED + 2
HOP_SEED = EVAL_SEED + 3
DIRECT_SEED = EVAL_SEED + 4
SCRIPTED_SEED = EVAL_SEED + 5


@dataclass
class ProgressTable:
    """Forced-termination accuracy per number of productive attempts, and mean ΔJ per episode kind."""

    j_by_productive: dict[int, tuple[float, int]]  # productive attempts -> (mean J, boundaries)
    # (productive attempts, was the last attempt productive) -> (mean J, boundaries); the empty
    # prefix counts as "productive" (nothing unproductive came before it)
    j_by_last: dict[tuple[int, bool], tuple[float, int]]
    delta_productive: float  # mean J_j - J_{j-1} over productive episodes
    delta_redundant: float  # mean J_j - J_{j-1} over unproductive episodes (re-checks, unlisted keys)
    n_productive: int
    n_redundant: int
    accuracy: float  # the sampled traces' own accuracy

    def markdown(self) -> str:
        lines = ["| productive attempts completed | mean J (forced termination) | boundaries "
                 "| J right after a productive attempt | J right after an unproductive one |",
                 "|---|---|---|---|---|"]
        nan = (float("nan"), 0)
        for n, (j, count) in sorted(self.j_by_productive.items()):
            (jp, cp), (ju, cu) = self.j_by_last.get((n, True), nan), self.j_by_last.get((n, False), nan)
            lines.append(f"| {n} | {j:.3f} | {count} | {jp:.3f} ({cp}) | {ju:.3f} ({cu}) |")
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


def measure_progress(model, tokenizer, *, n_problems=64, k=8, difficulty=DEFAULT_DIFFICULTY, task=DEFAULT_TASK,
                     temperature=1.0, seed=PROGRESS_SEED, max_new_tokens=512) -> ProgressTable:
    """J at every attempt boundary of ``n_problems`` sampled traces (see the module docstring)."""
    problems = generate_problems(n_problems, seed=seed, difficulty=difficulty, task=task)
    responses = sample_responses(model, tokenizer, [p.prompt for p in problems],
                                 max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
    by_count: dict[int, list[float]] = defaultdict(list)
    by_last: dict[tuple[int, bool], list[float]] = defaultdict(list)
    deltas = {True: [], False: []}
    correct = 0
    for i, (problem, response) in enumerate(zip(problems, responses)):
        correct += grade(response, problem.answer, kind=GRADER_KIND)
        body = response[len(THINK_START) + 1:] if response.startswith(THINK_START + "\n") else response
        thinking = body.split(THINK_END)[0].split("Time is up.")[0].rstrip("\n")
        attempts = read_attempts(problem, thinking)
        # Only complete attempts (their verdict line was written) are boundaries.
        attempts = [a for a in attempts if a.complete]
        prefixes = [""] + [thinking[:a.end] for a in attempts]
        J = forced_termination_accuracy(model, tokenizer, problem, prefixes, k=k, temperature=temperature, seed=seed + i)
        productive = 0
        by_count[0].append(J[0])
        by_last[0, True].append(J[0])
        for j, attempt in enumerate(attempts, start=1):
            productive += attempt.productive
            by_count[productive].append(J[j])
            by_last[productive, attempt.productive].append(J[j])
            deltas[attempt.productive].append(J[j] - J[j - 1])
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return ProgressTable(
        j_by_productive={n: (mean(v), len(v)) for n, v in by_count.items()},
        j_by_last={key: (mean(v), len(v)) for key, v in by_last.items()},
        delta_productive=mean(deltas[True]), delta_redundant=mean(deltas[False]),
        n_productive=len(deltas[True]), n_redundant=len(deltas[False]),
        accuracy=correct / len(problems),
    )


@dataclass
class ScriptedProgress:
    """J on scripted prefixes (see :func:`scripted_progress`)."""

    j_failed: dict[int, tuple[float, int]]  # failed attempts so far (answer not tried) -> (mean J, prefixes)
    j_found: float  # right after the attempt that finds the answer
    delta_recheck: float  # mean change of J when the last attempt is re-checked
    n_problems: int
    difficulty: int

    def j_by_productive(self) -> dict[int, float]:
        """Expected J after ``c`` productive attempts in a random order: the answer is among them
        with probability c / difficulty (J then is ``j_found``), else J is ``j_failed[c]``."""
        n = self.difficulty
        return {c: c / n * self.j_found + (n - c) / n * j for c, (j, _) in self.j_failed.items()}

    def markdown(self) -> str:
        n = self.difficulty
        lines = ["| productive attempts | J, answer not yet tried | prefixes | chance among the untried keys "
                 "| expected J in a random order |", "|---|---|---|---|---|"]
        expected = self.j_by_productive()
        for c, (j, count) in sorted(self.j_failed.items()):
            lines.append(f"| {c} | {j:.3f} | {count} | {1 / (n - c):.3f} | {expected[c]:.3f} |")
        lines.append("")
        lines.append(f"J right after the attempt that finds the answer: {self.j_found:.3f} ({self.n_problems}); "
                     f"mean change of J when the last attempt is re-checked: {self.delta_recheck:+.3f}")
        return "\n".join(lines)


def scripted_progress(model, tokenizer, *, n_problems=64, k=8, difficulty=DEFAULT_DIFFICULTY, task=DEFAULT_TASK,
                      temperature=1.0, seed=SCRIPTED_SEED) -> ScriptedProgress:
    """J along thinking prefixes written by the task: every key tried once, in a random order,
    up to the one that finds the answer; beside each prefix, the same prefix with its last attempt
    re-checked (an unproductive episode)."""
    problems = generate_problems(n_problems, seed=seed, difficulty=difficulty, task=task)
    rng = random.Random(seed)
    failed: dict[int, list[float]] = defaultdict(list)
    found, rechecks = [], []
    for i, problem in enumerate(problems):
        keys = problem.meta["keys"]
        paragraphs: list[str] = []
        prefixes, rechecked = [""], []
        for key in rng.sample(keys, len(keys)):
            attempt = [attempt_opening(rng, key, first=not paragraphs, recheck=False), *attempt_steps(problem, key)]
            paragraphs += attempt
            again = [attempt_opening(rng, key, first=False, recheck=True), *attempt_steps(problem, key)]
            prefixes.append(PARAGRAPH_SEP.join(paragraphs))
            rechecked.append(PARAGRAPH_SEP.join(paragraphs + again))
            if key == problem.answer:
                break
        J = forced_termination_accuracy(model, tokenizer, problem, prefixes + rechecked, k=k,
                                        temperature=temperature, seed=seed + i)
        own, again = J[:len(prefixes)], J[len(prefixes):]
        for c, j in enumerate(own[:-1]):
            failed[c].append(j)
        found.append(own[-1])
        rechecks += [b - a for a, b in zip(own[1:], again)]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return ScriptedProgress({c: (mean(v), len(v)) for c, v in failed.items()}, mean(found), mean(rechecks),
                            n_problems, difficulty)


@torch.no_grad()
def hop_accuracy(model, tokenizer, problems: list[Problem], *, lookups_per_problem: int = 8, seed: int = 0) -> float:
    """Teacher-forced argmax accuracy of single lookups (``EB.``: is ``b`` the most likely token?)."""
    rng = random.Random(seed)
    examples = [encode_drill(tokenizer, p, rng, lookups_per_problem) for p in problems]
    correct = total = 0
    for start in range(0, len(examples), 32):
        batch = collate(examples[start:start + 32], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE_INDEX
        correct += int((logits[:, :-1].argmax(-1)[keep] == labels[keep]).sum())
        total += int(keep.sum())
    return correct / total


@torch.no_grad()
def verdict_accuracy(model, tokenizer, problems: list[Problem], *, seed: int = 0) -> float:
    """Fraction of verdict lines in warm-start traces whose every token is the argmax, teacher-forced.

    The verdict compares the letter an attempt reached with the target read from the question:
    the second retrieval of every attempt, and what decides whether a found key is recognised.
    """
    rng = random.Random(seed)
    correct = total = 0
    for problem in problems:
        response = sft_trace(problem, rng)
        prompt = chat_prompt_text(problem.prompt)
        enc = tokenizer(prompt + response, add_special_tokens=False, return_offsets_mapping=True,
                        return_tensors="pt")
        predicted = model(input_ids=enc["input_ids"]).logits[0, :-1].argmax(-1)
        hits = predicted == enc["input_ids"][0, 1:]
        starts = enc["offset_mapping"][0, 1:, 0]
        for start, end in verdict_spans(response):
            inside = (starts >= len(prompt) + start) & (starts < len(prompt) + end)
            correct += bool(hits[inside].all())
            total += 1
    return correct / max(total, 1)


DIRECT_PREFIX = THINK_START + "\n" + THINK_END + "\n\n"


@torch.no_grad()
def direct_accuracy(model, tokenizer, problems: list[Problem], *, batch_size: int = 64) -> float:
    """How often the most likely answer right after an empty thinking part is the right key."""
    lead = DIRECT_PREFIX + answer_text("\0").split("\0")[0]  # "<think>\n</think>\n\nThe answer is \\boxed{"
    correct = 0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        rows = [tokenizer(chat_prompt_text(p.prompt) + lead, add_special_tokens=False)["input_ids"] for p in chunk]
        batch = collate([(ids, ids) for ids in rows], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        last = torch.tensor([len(ids) - 1 for ids in rows])
        best = logits[torch.arange(len(rows)), last].argmax(-1).tolist()
        correct += sum(tokenizer.decode([b]) == p.answer for b, p in zip(best, chunk))
    return correct / len(problems)


def direct_answer_probe(model, tokenizer, *, steps: int = 800, batch_size: int = 16, lr: float = 1e-3,
                        n_eval: int = 512, task: str = DEFAULT_TASK, difficulty: int = DEFAULT_DIFFICULTY,
                        seed: int = DIRECT_SEED, eval_every: int = 200, log=print) -> dict:
    """Fine-tune a copy of ``model`` on answers without thinking; its direct accuracy along the way.

    The no-shortcut check: a task where thinking is necessary keeps this near chance (1/difficulty).
    """
    probe = copy.deepcopy(model)
    stream = iter_problems(seed=seed, difficulty=difficulty, task=task)
    held_out = generate_problems(n_eval, seed=seed + 1, difficulty=difficulty, task=task)
    curve = {0: direct_accuracy(probe, tokenizer, held_out)}

    def batch():
        problems = [next(stream) for _ in range(batch_size)]
        examples = [encode_example(tokenizer, p.prompt, DIRECT_PREFIX + answer_text(p.answer)) for p in problems]
        return collate(examples, tokenizer.pad_token_id)

    def on_step(step: int, _record: dict) -> None:
        if step % eval_every == 0 or step == steps:
            curve[step] = direct_accuracy(probe, tokenizer, held_out)
            log(f"direct-answer probe step {step}: accuracy {curve[step]:.3f}")

    cfg = WarmStartConfig(warmup_steps=min(100, steps))
    history = fit_phase(probe, batch, steps=steps, peak=lr, cfg=cfg, phase="direct", log=log, on_step=on_step)
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "problems": n_eval, "seed": seed,
            "chance": 1 / difficulty, "direct_accuracy_before": curve[0], "direct_accuracy_after": curve[steps],
            "curve": curve, "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"]}


def progress_tables(model, tokenizer, *, n_problems: int, k: int, task: str, temperature: float,
                    log=lambda m: print(m, flush=True)) -> dict:
    """Both progress tables (own traces, then task-written prefixes) as one JSON-ready dict."""
    table = measure_progress(model, tokenizer, n_problems=n_problems, k=k, task=task, temperature=temperature)
    log(table.markdown())
    scripted = scripted_progress(model, tokenizer, n_problems=n_problems, k=k, task=task, temperature=temperature)
    log(scripted.markdown())
    return {"progress": {"j_by_productive": table.j_by_productive,
                         "j_by_last": {f"{n},{'productive' if p else 'unproductive'}": v
                                       for (n, p), v in table.j_by_last.items()},
                         "delta_productive": table.delta_productive,
                         "delta_unproductive": table.delta_redundant, "n_productive": table.n_productive,
                         "n_unproductive": table.n_redundant, "trace_accuracy": table.accuracy},
            "scripted_progress": {"j_failed": scripted.j_failed, "j_found": scripted.j_found,
                                  "delta_recheck": scripted.delta_recheck,
                                  "j_by_productive": scripted.j_by_productive()},
            "problems": n_problems, "k": k}


def _task_checks(model, tokenizer, args) -> dict:
    """Hop accuracy, pass@1 and the progress table, printed as they come."""
    results = {"hop_accuracy": hop_accuracy(model, tokenizer, generate_problems(128, seed=HOP_SEED, task=args.task))}
    print(f"hop accuracy (128 problems x 8 lookups): {results['hop_accuracy']:.3f}", flush=True)
    results["verdict_accuracy"] = verdict_accuracy(model, tokenizer, generate_problems(128, seed=HOP_SEED, task=args.task))
    print(f"verdict accuracy (128 traces, teacher-forced): {results['verdict_accuracy']:.3f}", flush=True)
    results["pass_at_1_t1"] = task_accuracy(
        model, tokenizer, generate_problems(args.pass_problems, seed=PASS_SEED, task=args.task), temperature=1.0)
    print(f"pass@1 at T=1 ({args.pass_problems} problems): {results['pass_at_1_t1']:.3f}", flush=True)
    results.update(progress_tables(model, tokenizer, n_problems=args.problems, k=args.k, task=args.task,
                                   temperature=args.temperature))
    return results


def main(argv=None):
    from .tiny_model import load_warm_start

    parser = argparse.ArgumentParser(prog="python -m mrt_fast.data.task_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the shipped one)")
    parser.add_argument("--task", default=DEFAULT_TASK)
    parser.add_argument("--problems", type=int, default=64, help="problems of the progress table")
    parser.add_argument("--pass-problems", type=int, default=128)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--direct-steps", type=int, default=800, help="0: skip the direct-answer probe")
    parser.add_argument("--only-direct", action="store_true", help="only the direct-answer probe")
    parser.add_argument("--only-progress", action="store_true",
                        help="only the two progress tables (how J changes along thinking, e.g. over training)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_warm_start(path=args.model)
    if args.only_direct and args.only_progress:
        parser.error("--only-direct and --only-progress exclude each other")
    results = {}
    if args.only_progress:
        results.update(progress_tables(model, tokenizer, n_problems=args.problems, k=args.k, task=args.task,
                                       temperature=args.temperature))
    elif not args.only_direct:
        results.update(_task_checks(model, tokenizer, args))
    if args.direct_steps and not args.only_progress:
        results["direct"] = direct_answer_probe(model, tokenizer, steps=args.direct_steps, task=args.task,
                                                log=lambda m: print(m, flush=True) if "accuracy" in m else None)
        print("direct-answer probe: " + json.dumps(results["direct"]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
