"""Warm-start SFT of the tiny model on an embedded task; writes an HF-loadable directory.

    python -m mrt_fast.data.warm_start --out DIR

reproduces the checkpoint shipped in ``mrt_fast/data/assets/tiny`` (docs/data.md gives the
exact command, its run time and what the checkpoint reaches). Two phases, plain PyTorch, every
batch freshly generated (no epoch, no overfitting to a fixed set), AdamW with warmup and cosine
decay in each:

1. recall drills: a problem's prompt, then many single lookups written as the traces write a
   step (``EB.``), with the loss only on the looked-up letter. Trained on whole traces alone, a
   tiny model did not learn to read values from the prompt; drills on the lookup alone did
   (docs/data.md gives both measurements and how many drill steps that takes).
2. trace fine-tuning: cross-entropy on the whole assistant turn of warm-start traces
   (``synthetic.sft_trace``), with a share of drills mixed into every batch.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .chat import IM_END, PARAGRAPH_SEP, TERMINATION_TEXT, THINK_START, chat_prompt_text
from .grading import grade
from .synthetic import (
    DEFAULT_DIFFICULTY,
    DEFAULT_TASK,
    GRADER_KIND,
    Problem,
    TraceStyle,
    answer_text,
    attempt_opening,
    attempt_steps,
    generate_problems,
    iter_problems,
    lookups,
    sft_trace,
    shorter_map,
    verdict,
)
from .tiny_model import tiny_model_config
from .tokenizer import build_tiny_tokenizer

IGNORE_INDEX = -100
EVAL_SEED = 10_000  # problem stream for evaluation: disjoint seed from every training seed


@dataclass
class WarmStartConfig:
    """Everything that determines the warm-started checkpoint."""

    task: str = DEFAULT_TASK
    drill_steps: int = 600  # phase 1
    drill_batch_size: int = 64
    drill_lookups: int = 16  # lookups per drill example
    drill_verdicts: float = 0.0  # share of drilled lookups followed by a verdict paragraph
    drill_lr: float = 1e-3
    drill_min_links: int = 2  # drills list between this many links and all of a problem's links
    steps: int = 1500  # phase 2: traces
    batch_size: int = 16
    lr: float = 1e-3
    drill_share: float = 0.25  # fraction of every phase-2 batch that is drills
    guess_drills: float = 0.0  # fraction of every phase-2 batch that is forced guesses after failed attempts
    warmup_steps: int = 100  # of each phase
    weight_decay: float = 0.01
    seed: int = 0
    difficulty: int = DEFAULT_DIFFICULTY
    threads: int = 2  # CPU float reductions depend on the thread count: fixed for reproducibility
    eval_problems: int = 128
    max_new_tokens: int = 512
    init_from: str | None = None  # continue from this checkpoint directory instead of a fresh init
    eval_every: int = 0  # evaluate accuracy (T=1, 64 problems) every this many steps; 0: never
    model_overrides: dict | None = None


def encode_example(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt + response (closed by ``<|im_end|>``) and labels on the response."""
    prompt_ids = tokenizer(chat_prompt_text(prompt), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response + IM_END, add_special_tokens=False)["input_ids"]
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def encode_drill(
    tokenizer, problem: Problem, rng: random.Random, n_lookups: int, verdict_share: float = 0.0
) -> tuple[list[int], list[int]]:
    """A drill: the prompt, then ``n_lookups`` random lookups written as step paragraphs.

    With ``verdict_share``, that fraction of the lookups is followed by the verdict paragraph an
    attempt would close with if that step were its last (``B is not G, so no.``); half of those
    look up a link into the target (when the map has one), so both verdicts are drilled. Labels
    are on the looked-up fact (``B`` of ``EB.``) and on the verdict; the rest is context.
    """
    facts = lookups(problem)
    target = str(problem.meta["target"])
    into_target = [f for f in facts if f[1] == target]
    segments: list[tuple[str, bool]] = []  # (text, labelled)
    for i in range(n_lookups):
        with_verdict = verdict_share > 0 and rng.random() < verdict_share
        pool = into_target if with_verdict and into_target and rng.random() < 0.5 else facts
        query, fact = rng.choice(pool)
        if i:
            segments.append((PARAGRAPH_SEP, False))
        segments += [(query, False), (fact, True), (".", False)]
        if with_verdict:
            segments += [(PARAGRAPH_SEP, False), (verdict(fact, target), True)]
    prompt = chat_prompt_text(problem.prompt) + THINK_START + "\n"
    spans, pos = [], len(prompt)
    for text, labelled in segments:
        if labelled:
            spans.append((pos, pos + len(text)))
        pos += len(text)
    enc = tokenizer(prompt + "".join(text for text, _ in segments), add_special_tokens=False,
                    return_offsets_mapping=True)
    labels = [tid if any(a <= s and e <= b for a, b in spans) else IGNORE_INDEX
              for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])]
    return enc["input_ids"], labels


def encode_guess_drill(tokenizer, problem: Problem, rng: random.Random) -> tuple[list[int], list[int]]:
    """A forced guess after failed attempts: the prompt, 0 to N-1 attempts on wrong keys (a quarter of
    them re-checks), the termination text, and a guess drawn among the keys not tried yet.

    The label is on the guessed key only: its best prediction is uniform over the untried keys, so
    J (the forced answer's accuracy) rises by a failed attempt: 1/N, 1/(N-1), ... up to 1.
    """
    keys = problem.meta["keys"]
    wrong = rng.sample([k for k in keys if k != problem.answer], len(keys) - 1)
    tried = wrong[:rng.randint(0, len(wrong))]
    paragraphs: list[str] = []
    for i, key in enumerate(tried):
        for again in ([False, True] if i and rng.random() < 0.25 else [False]):
            recheck_key = rng.choice(tried[:i]) if again else key
            paragraphs += [attempt_opening(rng, recheck_key, first=not paragraphs, recheck=again),
                           *attempt_steps(problem, recheck_key)]
    guess = rng.choice([k for k in keys if k not in tried])
    head, tail = answer_text("\0").split("\0")
    thinking = PARAGRAPH_SEP.join(paragraphs) + (PARAGRAPH_SEP if paragraphs else "")
    context = chat_prompt_text(problem.prompt) + THINK_START + "\n" + thinking + TERMINATION_TEXT + head
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    guess_ids = tokenizer(guess, add_special_tokens=False)["input_ids"]
    tail_ids = tokenizer(tail + IM_END, add_special_tokens=False)["input_ids"]
    labels = [IGNORE_INDEX] * len(context_ids) + guess_ids + [IGNORE_INDEX] * len(tail_ids)
    return context_ids + guess_ids + tail_ids, labels


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of (ids, labels) into batch tensors."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def sft_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the next token over the labelled (assistant) positions.

    Logits are computed only where a label is (drills label a few tokens of each example).
    """
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    # Low-precision logits are upcast for the softmax; fp32/fp64 stay as they are.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.nn.functional.cross_entropy(logits, targets[keep])


def lr_at(step: int, *, peak: float, steps: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def sample_responses(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 512,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> list[str]:
    """Sample one assistant response per prompt with ``model.generate`` (temperature 0: greedy)."""
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    responses: list[str] = []
    for start in range(0, len(prompts), batch_size):
        texts = [chat_prompt_text(p) for p in prompts[start : start + batch_size]]
        enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        enc = {k: v.to(model.device) for k, v in enc.items()}
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **(sampling if temperature > 0 else dict(do_sample=False)),
        )
        new = out[:, enc["input_ids"].shape[1] :]
        responses += tokenizer.batch_decode(new, skip_special_tokens=True)
    return responses


def task_accuracy(
    model,
    tokenizer,
    problems: list[Problem],
    *,
    max_new_tokens: int = 512,
    temperature: float = 1.0,
    seed: int = 0,
) -> float:
    """Fraction of ``problems`` the model answers correctly (one sample each)."""
    responses = sample_responses(
        model, tokenizer, [p.prompt for p in problems],
        max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
    )
    return sum(grade(r, p.answer, kind=GRADER_KIND) for r, p in zip(responses, problems)) / len(problems)


def fit_phase(model, next_batch, *, steps: int, peak: float, cfg: WarmStartConfig, phase: str, log, on_step=None):
    """One training phase: AdamW from scratch, warmup + cosine, grad clip 1.0; returns its history."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=peak, betas=(0.9, 0.98),
    )
    history = []
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, peak=peak, steps=steps, warmup=cfg.warmup_steps)
        loss = sft_loss(model, next_batch())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append({"phase": phase, "step": step + 1, "loss": loss.item(),
                        "seconds": time.perf_counter() - start})
        if (step + 1) % 25 == 0 or step + 1 == steps:
            log(f"{phase} step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)")
        if on_step is not None:
            model.eval()
            on_step(step + 1, history[-1])
            model.train()
    model.eval()
    return history


def train(cfg: WarmStartConfig, *, log=print, snapshot_dir: str | Path | None = None):
    """Run the two warm-start phases; returns ``(model, tokenizer, history)``.

    With ``cfg.eval_every``, the model is also evaluated (and saved under ``snapshot_dir``,
    if given) every ``eval_every`` steps of each phase; neither changes the training itself.
    """
    from transformers import AutoModelForCausalLM

    from .task_probe import hop_accuracy, verdict_accuracy

    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    tokenizer = build_tiny_tokenizer()
    config = tiny_model_config(len(tokenizer), **(cfg.model_overrides or {}))
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    # Eager attention: on the CPU it is faster than SDPA at these sizes.
    if cfg.init_from:
        model = AutoModelForCausalLM.from_pretrained(cfg.init_from, attn_implementation="eager")
        if model.config.vocab_size != len(tokenizer):
            raise ValueError(f"init_from={cfg.init_from!r} has vocab_size {model.config.vocab_size}, "
                             f"expected {len(tokenizer)} (the tiny tokenizer)")
    else:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    problems = iter_problems(seed=cfg.seed, difficulty=cfg.difficulty, task=cfg.task)
    drill_rng = random.Random(f"mrt-fast/warm-start-drills/{cfg.seed}")
    trace_rng = random.Random(f"mrt-fast/warm-start-traces/{cfg.seed}")
    eval_problems = generate_problems(64, seed=EVAL_SEED, difficulty=cfg.difficulty, task=cfg.task)

    def drills(n: int) -> list:
        # A random number of links per drill: on small maps the lookup is found quickly (drills on
        # full maps alone stayed at chance for longer), and it carries over to the full ones.
        batch = []
        for _ in range(n):
            problem = next(problems)
            n_links = drill_rng.randint(cfg.drill_min_links, max(cfg.drill_min_links, len(problem.meta.get("links", ()))))
            batch.append(encode_drill(tokenizer, shorter_map(problem, n_links), drill_rng, cfg.drill_lookups,
                                      cfg.drill_verdicts))
        return batch

    def traces(n: int) -> list:
        batch = []
        for _ in range(n):
            problem = next(problems)
            batch.append(encode_example(tokenizer, problem.prompt, sft_trace(problem, trace_rng, TraceStyle())))
        return batch

    def guesses(n: int) -> list:
        return [encode_guess_drill(tokenizer, next(problems), drill_rng) for _ in range(n)]

    def evaluate(phase: str):
        def on_step(step: int, record: dict) -> None:
            if not cfg.eval_every or step % cfg.eval_every:
                return
            record["hop_accuracy"] = hop_accuracy(model, tokenizer, eval_problems)
            record["verdict_accuracy"] = verdict_accuracy(model, tokenizer, eval_problems)
            message = (f"{phase} step {step}: hop accuracy {record['hop_accuracy']:.3f}, "
                       f"verdict accuracy {record['verdict_accuracy']:.3f}")
            if phase == "traces":
                record["accuracy_t1"] = task_accuracy(model, tokenizer, eval_problems, max_new_tokens=cfg.max_new_tokens)
                message += f", accuracy at T=1 on 64 problems {record['accuracy_t1']:.3f}"
            log(message)
            if snapshot_dir is not None:
                model.save_pretrained(Path(snapshot_dir) / f"{phase}{step}")
                tokenizer.save_pretrained(Path(snapshot_dir) / f"{phase}{step}")
        return on_step

    pad = tokenizer.pad_token_id
    n_drills = round(cfg.drill_share * cfg.batch_size)
    n_guesses = round(cfg.guess_drills * cfg.batch_size)
    if n_drills + n_guesses >= cfg.batch_size:
        raise ValueError(f"drill_share + guess_drills must leave traces in the batch of {cfg.batch_size}, "
                         f"got {cfg.drill_share} + {cfg.guess_drills}")
    history = fit_phase(model, lambda: collate(drills(cfg.drill_batch_size), pad), steps=cfg.drill_steps,
                        peak=cfg.drill_lr, cfg=cfg, phase="drills", log=log, on_step=evaluate("drills"))
    history += fit_phase(model, lambda: collate(traces(cfg.batch_size - n_drills - n_guesses) + drills(n_drills)
                                                + guesses(n_guesses), pad),
                         steps=cfg.steps, peak=cfg.lr, cfg=cfg, phase="traces", log=log, on_step=evaluate("traces"))
    return model, tokenizer, history


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m mrt_fast.data.warm_start", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory to write the checkpoint to")
    defaults = WarmStartConfig()
    for name in ("drill_steps", "drill_batch_size", "drill_lookups", "steps", "batch_size", "seed", "difficulty",
                 "threads", "eval_problems", "max_new_tokens", "eval_every", "warmup_steps"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("drill_lr", "lr", "drill_share", "drill_verdicts", "guess_drills"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    parser.add_argument("--task", default=defaults.task, help="embedded task variant: chain (default) or recall")
    parser.add_argument("--init-from", default=None, help="continue training this checkpoint directory")
    parser.add_argument("--model-overrides", type=json.loads, default=None,
                        help='JSON object of Qwen2Config fields, e.g. \'{"num_hidden_layers": 2}\'')
    args = parser.parse_args(argv)
    cfg = WarmStartConfig(**{k: v for k, v in vars(args).items() if k != "out"})
    out = Path(args.out)
    start = time.perf_counter()
    model, tokenizer, history = train(cfg, snapshot_dir=out / "snapshots" if cfg.eval_every else None)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    phase_seconds = {h["phase"]: h["seconds"] for h in history}  # each phase's clock, at its last step
    report = {"config": asdict(cfg), "final_loss": history[-1]["loss"], "train_seconds": sum(phase_seconds.values())}
    if cfg.eval_problems:
        from .task_probe import hop_accuracy, verdict_accuracy

        problems = generate_problems(cfg.eval_problems, seed=EVAL_SEED, difficulty=cfg.difficulty, task=cfg.task)
        report["hop_accuracy"] = hop_accuracy(model, tokenizer, problems)
        report["verdict_accuracy"] = verdict_accuracy(model, tokenizer, problems)
        for name, temperature in (("accuracy_t1", 1.0), ("accuracy_greedy", 0.0)):
            report[name] = task_accuracy(
                model, tokenizer, problems, max_new_tokens=cfg.max_new_tokens, temperature=temperature
            )
        print(f"hop accuracy {report['hop_accuracy']:.3f}; verdict accuracy {report['verdict_accuracy']:.3f}; accuracy at T=1: {report['accuracy_t1']:.3f}, "
              f"greedy: {report['accuracy_greedy']:.3f}")
    report["wall_seconds"] = time.perf_counter() - start
    (out / "warm_start.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
