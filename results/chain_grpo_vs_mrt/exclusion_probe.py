"""Can the forced guess exclude the keys already tried? Two measurements behind the README's
diagnosis (the progress signal needs it: J should rise by 1/(6-c) - 1/(7-c) with each failed
attempt, not only with the find).

    python results/chain_grpo_vs_mrt/exclusion_probe.py mass [MODEL]
        Teacher-forced, after c = 0..5 failed attempts in the task's own format: the forced guess's
        probability mass on the keys already tried, and J (its probability of the answer).
    python results/chain_grpo_vs_mrt/exclusion_probe.py guesses OUT [--steps 400] [--lr 1e-3]
        Fine-tunes the shipped warm start on guess drills alone (``warm_start.encode_guess_drill``,
        batch 32), then prints the mass table.
    python results/chain_grpo_vs_mrt/exclusion_probe.py listed OUT [--steps 600] [--lr 1e-3]
        A trace format where every step is a copy from the text (``TraceStyle(list_untried=True)``):
        keys are tried in the question's order, and after each failed attempt the trace writes the
        keys not tried yet ("Keys not tried: U, Z, N, Q."), whose first key is tried next and among
        which a give-up guesses. Fine-tunes the shipped warm start on such traces (with a quarter of recall drills),
        then reports how often the lists are written right (teacher-forced), the same mass table
        on prefixes in this format, and pass@1 at T=1.

The listed format is ``synthetic.TraceStyle(list_untried=True)``; the shipped warm start does not use it (yet).
"""

import argparse
import random
import statistics

import torch

from mrt_fast.data import TERMINATION_TEXT, THINK_START, chat_prompt_text, load_warm_start
from mrt_fast.data.chat import PARAGRAPH_SEP
from mrt_fast.data.grading import grade
from mrt_fast.data.synthetic import (GRADER_KIND, UNTRIED_HEAD, TraceStyle, answer_text, attempt_opening,
                                     attempt_steps, generate_problems, iter_problems, sft_trace, shorter_map,
                                     untried_text)
from mrt_fast.data.warm_start import (WarmStartConfig, collate, encode_drill, encode_example, encode_guess_drill,
                                      fit_phase, sample_responses)

MASS_SEED, LIST_SEED, PASS_SEED, TRAIN_SEED, GUESS_SEED = 4242, 4545, 4343, 79, 77
LISTED = TraceStyle(list_untried=True)


@torch.no_grad()
def guess_mass(model, tokenizer, *, listed: bool, n_problems: int = 60) -> list[str]:
    """Markdown rows: c, prefixes, mass on the keys tried, J, chance among the untried keys."""
    head = answer_text("\0").split("\0")[0]
    rng = random.Random(MASS_SEED)
    rows = {c: [0.0, 0.0, 0] for c in range(6)}
    for problem in generate_problems(n_problems, seed=MASS_SEED):
        keys = problem.meta["keys"]
        wrong = keys[:keys.index(problem.answer)] if listed else rng.sample([k for k in keys if k != problem.answer], 5)
        ids = {k: tokenizer(k, add_special_tokens=False)["input_ids"][0] for k in keys}
        paragraphs: list[str] = []
        for c in range(len(wrong) + 1):
            sep = PARAGRAPH_SEP if paragraphs else ""
            text = (chat_prompt_text(problem.prompt) + THINK_START + "\n" + PARAGRAPH_SEP.join(paragraphs) + sep
                    + TERMINATION_TEXT + head)
            probs = model(input_ids=tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
                          ).logits[0, -1].softmax(-1)
            rows[c][0] += sum(probs[ids[k]].item() for k in wrong[:c])
            rows[c][1] += probs[ids[problem.answer]].item()
            rows[c][2] += 1
            if c < len(wrong):
                paragraphs += [attempt_opening(rng, wrong[c], first=not paragraphs, recheck=False),
                               *attempt_steps(problem, wrong[c])]
                if listed:
                    paragraphs.append(untried_text(problem, wrong[:c + 1]))
    lines = ["| failed attempts c | prefixes | guess mass on the keys tried | J | 1/(6-c) |", "|---|---|---|---|---|"]
    lines += [f"| {c} | {n} | {tried / n:.3f} | {j / n:.3f} | {1 / (6 - c):.3f} |" for c, (tried, j, n) in rows.items() if n]
    return lines


@torch.no_grad()
def list_accuracy(model, tokenizer, n_problems: int = 96) -> float:
    """Fraction of ``Keys not tried`` lists of listed traces whose every token is the argmax, teacher-forced."""
    rng = random.Random(LIST_SEED)
    right = total = 0
    for problem in generate_problems(n_problems, seed=LIST_SEED):
        response, prompt = sft_trace(problem, rng, LISTED), chat_prompt_text(problem.prompt)
        enc = tokenizer(prompt + response, add_special_tokens=False, return_offsets_mapping=True, return_tensors="pt")
        hits = model(input_ids=enc["input_ids"]).logits[0, :-1].argmax(-1) == enc["input_ids"][0, 1:]
        starts = enc["offset_mapping"][0, 1:, 0]
        at = response.find(UNTRIED_HEAD)
        while at >= 0:
            end = response.index("\n", at)
            inside = (starts >= len(prompt) + at + len(UNTRIED_HEAD)) & (starts < len(prompt) + end)
            right += bool(hits[inside].all())
            total += 1
            at = response.find(UNTRIED_HEAD, end)
    return right / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    mass = sub.add_parser("mass")
    mass.add_argument("model", nargs="?", default=None)
    for command, steps in (("guesses", 400), ("listed", 600)):
        fine_tune = sub.add_parser(command)
        fine_tune.add_argument("out")
        fine_tune.add_argument("--steps", type=int, default=steps)
        fine_tune.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.command == "mass":
        model, tokenizer = load_warm_start(path=args.model)
        print("\n".join(guess_mass(model, tokenizer, listed=False)))
        return
    model, tokenizer = load_warm_start()
    cfg = WarmStartConfig(warmup_steps=min(50, args.steps))
    log = lambda message: print(message, flush=True)  # noqa: E731
    if args.command == "guesses":
        problems, rng = iter_problems(seed=GUESS_SEED), random.Random(GUESS_SEED)
        fit_phase(model, lambda: collate([encode_guess_drill(tokenizer, next(problems), rng) for _ in range(32)],
                                         tokenizer.pad_token_id),
                  steps=args.steps, peak=args.lr, cfg=cfg, phase="guesses", log=log)
        model.save_pretrained(args.out)
        tokenizer.save_pretrained(args.out)
        print("\n".join(guess_mass(model, tokenizer, listed=False)))
        return
    problems, rng = iter_problems(seed=TRAIN_SEED), random.Random(TRAIN_SEED)

    def batch():
        examples = []
        for _ in range(12):
            problem = next(problems)
            examples.append(encode_example(tokenizer, problem.prompt, sft_trace(problem, rng, LISTED)))
        for _ in range(4):
            problem = next(problems)
            small = shorter_map(problem, rng.randint(2, len(problem.meta["links"])))
            examples.append(encode_drill(tokenizer, small, rng, 16))
        return collate(examples, tokenizer.pad_token_id)

    fit_phase(model, batch, steps=args.steps, peak=args.lr, cfg=cfg, phase="listed", log=log)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"lists written right (teacher-forced, every token the argmax): {list_accuracy(model, tokenizer):.3f}")
    print("\n".join(guess_mass(model, tokenizer, listed=True)))
    pass_problems = generate_problems(64, seed=PASS_SEED)
    responses = sample_responses(model, tokenizer, [p.prompt for p in pass_problems], temperature=1.0, seed=0)
    accuracy = statistics.fmean(grade(r, p.answer, kind=GRADER_KIND) for r, p in zip(responses, pass_problems))
    print(f"pass@1 at T=1 (64 problems): {accuracy:.3f}")


if __name__ == "__main__":
    main()
