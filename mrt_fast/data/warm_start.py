"""Warm-start SFT of the tiny model on the embedded task; writes an HF-loadable directory.

    python -m mrt_fast.data.warm_start --out DIR [--steps N] [--seed S]

reproduces the checkpoint shipped in ``mrt_fast/data/assets/tiny`` (docs/data.md gives the
exact command and the accuracy it reaches). The loop is plain PyTorch: cross-entropy on the
assistant tokens of freshly generated problems and traces (every batch is new data, so there
is no epoch and no overfitting to a fixed set), AdamW with warmup and cosine decay.
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

from .chat import IM_END, chat_prompt_text
from .grading import grade
from .synthetic import (
    DEFAULT_DIFFICULTY,
    GRADER_KIND,
    Problem,
    TraceStyle,
    generate_problems,
    iter_problems,
    sft_trace,
)
from .tiny_model import tiny_model_config
from .tokenizer import build_tiny_tokenizer

IGNORE_INDEX = -100
EVAL_SEED = 10_000  # problem stream for evaluation: disjoint seed from every training seed


@dataclass
class WarmStartConfig:
    """Everything that determines the warm-started checkpoint."""

    steps: int = 1200
    batch_size: int = 16
    lr: float = 1e-3  # 5e-3 stalls on the loss plateau (docs/data.md)
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    difficulty: int = DEFAULT_DIFFICULTY
    threads: int = 1  # CPU float reductions depend on the thread count: fixed for reproducibility
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
    """Mean cross-entropy of the next token over the labelled (assistant) positions."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # Low-precision logits are upcast for the softmax; fp32/fp64 stay as they are.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1),
        batch["labels"][:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
    )


def lr_at(step: int, cfg: WarmStartConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


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


def train(cfg: WarmStartConfig, *, log=print, snapshot_dir: str | Path | None = None):
    """Run the warm-start SFT; returns ``(model, tokenizer, history)``.

    With ``cfg.eval_every``, the model is also evaluated (and saved under ``snapshot_dir``,
    if given) every ``eval_every`` steps; neither changes the training itself.
    """
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    tokenizer = build_tiny_tokenizer()
    config = tiny_model_config(len(tokenizer), **(cfg.model_overrides or {}))
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    if cfg.init_from:
        model = AutoModelForCausalLM.from_pretrained(cfg.init_from, attn_implementation="sdpa")
        if model.config.vocab_size != len(tokenizer):
            raise ValueError(f"init_from={cfg.init_from!r} has vocab_size {model.config.vocab_size}, "
                             f"expected {len(tokenizer)} (the tiny tokenizer)")
    else:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98),
    )
    problems = iter_problems(seed=cfg.seed, difficulty=cfg.difficulty)
    trace_rng = random.Random(f"mrt-fast/warm-start-traces/{cfg.seed}")
    history = []
    model.train()
    start = time.perf_counter()
    for step in range(cfg.steps):
        batch = []
        for _ in range(cfg.batch_size):
            problem = next(problems)
            batch.append(encode_example(tokenizer, problem.prompt, sft_trace(problem, trace_rng, TraceStyle())))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = sft_loss(model, collate(batch, tokenizer.pad_token_id))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append({"step": step + 1, "loss": loss.item(), "seconds": time.perf_counter() - start})
        if (step + 1) % 25 == 0 or step + 1 == cfg.steps:
            log(f"step {step + 1}/{cfg.steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)")
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            model.eval()
            probe = generate_problems(64, seed=EVAL_SEED, difficulty=cfg.difficulty)
            accuracy = task_accuracy(model, tokenizer, probe, max_new_tokens=cfg.max_new_tokens)
            history[-1]["accuracy_t1"] = accuracy
            log(f"step {step + 1}: accuracy at T=1 on 64 problems {accuracy:.3f}")
            if snapshot_dir is not None:
                model.save_pretrained(Path(snapshot_dir) / f"step{step + 1}")
                tokenizer.save_pretrained(Path(snapshot_dir) / f"step{step + 1}")
            model.train()
    model.eval()
    return model, tokenizer, history


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m mrt_fast.data.warm_start", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory to write the checkpoint to")
    defaults = WarmStartConfig()
    for name in ("steps", "batch_size", "seed", "difficulty", "threads", "eval_problems", "max_new_tokens",
                 "eval_every", "warmup_steps"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--init-from", default=None, help="continue training this checkpoint directory")
    parser.add_argument("--model-overrides", type=json.loads, default=None,
                        help='JSON object of Qwen2Config fields, e.g. \'{"num_hidden_layers": 2}\'')
    args = parser.parse_args(argv)
    cfg = WarmStartConfig(**{k: v for k, v in vars(args).items() if k != "out"})
    out = Path(args.out)
    model, tokenizer, history = train(cfg, snapshot_dir=out / "snapshots" if cfg.eval_every else None)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    report = {"config": asdict(cfg), "final_loss": history[-1]["loss"], "train_seconds": history[-1]["seconds"]}
    if cfg.eval_problems:
        problems = generate_problems(cfg.eval_problems, seed=EVAL_SEED, difficulty=cfg.difficulty)
        for name, temperature in (("accuracy_t1", 1.0), ("accuracy_greedy", 0.0)):
            report[name] = task_accuracy(
                model, tokenizer, problems, max_new_tokens=cfg.max_new_tokens, temperature=temperature
            )
        print(f"accuracy at T=1: {report['accuracy_t1']:.3f}, greedy: {report['accuracy_greedy']:.3f}")
    (out / "warm_start.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
