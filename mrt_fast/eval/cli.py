"""``python -m mrt_fast.eval``: accuracy, token efficiency and regret curves for a model on a dataset.

Examples::

    python -m mrt_fast.eval                                   # the shipped warm-started tiny model, embedded task
    python -m mrt_fast.eval --model runs/mrt --out runs/mrt/eval
    python -m mrt_fast.eval --model /ckpt/DeepScaleR-1.5B --dataset aime.jsonl --grader math \\
        --n 8 --ks 1,4,8 --max-new-tokens 8192 --budgets 2048,4096,8192 --forcing-budget 16384

``--model`` is ``embedded``, an HF model directory (or hub name), or a trainer run directory (its
``hf/`` export, else its newest ``hf-step_N/``). ``--dataset`` is ``embedded`` (the trainer's
held-out problems) or a local json/jsonl/csv/parquet file with a prompt and an answer column.
Writes ``eval.json`` and PNG plots to ``--out`` and prints their paths. The sampling defaults are
the trainer's ``eval.*`` defaults (:mod:`mrt_fast.eval.settings`), so both report the same numbers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from mrt_fast.config import EvalConfig
from mrt_fast.mrt.episodes import DEFAULT_MAX_EPISODES, DEFAULT_MIN_GAP

EMBEDDED = "embedded"
DEFAULTS = EvalConfig()  # the trainer's eval.* defaults: both entry points measure the same thing


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 64,128, got {text!r}") from None


class _DefaultsFormatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` after each option's help, except for flags and options without one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings != ["-h", "--help"]:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mrt_fast.eval",
        description="Evaluate pass@k, maj@k, tokens and regret (meta-prover J at every episode boundary). "
                    "The defaults are the trainer's eval.* defaults, so its numbers and these agree.",
        formatter_class=_DefaultsFormatter,
    )
    p.add_argument("--model", default=EMBEDDED,
                   help="'embedded', an HF model directory or hub name, or a trainer run directory (its hf/ export, "
                        "else its newest hf-step_N/)")
    p.add_argument("--dataset", default=EMBEDDED, help="'embedded' or a local json/jsonl/csv/parquet file")
    p.add_argument("--prompt-column", default="prompt", help="dataset column holding the problem")
    p.add_argument("--answer-column", default="answer", help="dataset column holding the reference answer")
    p.add_argument("--grader", choices=("math", "exact"), default=None,
                   help="answer checker (default: exact for the embedded task, else math)")
    p.add_argument("--num-problems", type=int, default=DEFAULTS.num_problems, help="problems to evaluate (0: all rows of a file)")
    p.add_argument("--difficulty", type=int, default=None, help="embedded task difficulty (default: the task's)")
    p.add_argument("--task", choices=("chain", "recall"), default="chain", help="embedded task variant (data.task)")
    p.add_argument("--n", type=int, default=DEFAULTS.samples, help="samples per problem")
    p.add_argument("--ks", type=_int_list, default=None, help="k values for pass@k and maj@k, e.g. 1,4,8 (default: powers of 2 up to n)")
    p.add_argument("--temperature", type=float, default=DEFAULTS.temperature, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=DEFAULTS.top_p, help="nucleus sampling threshold")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens, help="token budget of a response")
    p.add_argument("--meta-k", type=int, default=DEFAULTS.meta_k, help="forced-termination answers per boundary")
    p.add_argument("--meta-max-new-tokens", type=int, default=DEFAULTS.meta_max_new_tokens,
                   help="token budget of a forced-termination answer")
    p.add_argument("--regret-samples", type=int, default=1, help="traces per problem measured at every boundary")
    p.add_argument("--budgets", type=_int_list, default=None,
                   help="token budgets for normalised regret, e.g. 128,256,512 (default: 1/4, 1/2, 1 x max-new-tokens)")
    p.add_argument("--regret-tokens", choices=("authors", "response"), default=DEFAULTS.regret_tokens,
                   help="regret x-axis: authors (meta-prover input + mean forced-answer length, as the authors' "
                        "regret.ipynb) or response (response tokens before each boundary)")
    p.add_argument("--forcing-budget", type=int, default=0, help="budget forcing up to this many tokens (0: off)")
    p.add_argument("--forcing-step", type=int, default=64, help="tokens per budget-forcing step")
    p.add_argument("--episode-min-gap", type=int, default=DEFAULT_MIN_GAP, help="paragraphs a cue must be past the previous cut")
    p.add_argument("--episode-max-episodes", type=int, default=DEFAULT_MAX_EPISODES, help="cuts before the rest is one episode")
    p.add_argument("--episode-group-size", type=int, default=1, help="consecutive episodes merged into one")
    p.add_argument("--batch-size", type=int, default=8, help="problems sampled together")
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf", help="generation engine")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the trainer uses train.seed)")
    p.add_argument("--out", default="mrt_eval", help="output directory for eval.json and plots")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


# ----------------------------------------------------------------------------------------------
# Model and data
# ----------------------------------------------------------------------------------------------


def find_export(run_dir: Path) -> Path | None:
    """A run directory's HF export: ``hf/`` (end of training), else the newest ``hf-step_N/``."""
    if (run_dir / "hf" / "config.json").is_file():
        return run_dir / "hf"
    steps = [(int(p.name.removeprefix("hf-step_")), p) for p in run_dir.glob("hf-step_*")
             if p.name.removeprefix("hf-step_").isdigit() and (p / "config.json").is_file()]
    return max(steps)[1] if steps else None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _looks_like_path(spec: str) -> bool:
    """A local path rather than a hub name ``org/name``."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec


def resolve_model_dir(spec: str) -> Path | str:
    """The directory (or hub name) ``--model`` names, checked before anything is loaded or sampled."""
    path = Path(spec).expanduser()
    if not path.exists():
        if _looks_like_path(spec):
            raise FileNotFoundError(f"--model {spec}: no such directory")
        return spec  # a hub name; the loader says whether it can be had
    if not path.is_dir():
        raise ValueError(f"--model {spec}: not a directory (expected an HF model directory or a run directory)")
    if not (path / "config.json").is_file():
        export = find_export(path)
        if export is None:
            raise FileNotFoundError(
                f"--model {spec}: no config.json there, and no hf/ or hf-step_N/ export of a run; export a "
                f"checkpoint with: python -m mrt_fast.train --config {path / 'config.yaml'} --resume auto --export-only"
            )
        print(f"[mrt_fast.eval] model: {export}", file=sys.stderr)
        path = export
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"--model {spec}: {path} has a model config but no tokenizer "
                                f"(none of {', '.join(TOKENIZER_FILES)}); save the tokenizer next to the model")
    return path


def load_engine(spec: str, model_dir: Path | str | None, device: str, engine: str) -> tuple[Any, Any]:
    """``(engine, tokenizer)`` for ``--model`` (``model_dir``: its checked directory, None for embedded)."""
    from mrt_fast.rollout import make_engine

    from ..data.tokenizer import ASSETS_DIR, load_tokenizer  # AutoTokenizer mis-loads the tiny task tokenizer

    src = str(ASSETS_DIR if model_dir is None else model_dir)
    if engine == "vllm":  # vLLM loads the weights itself; our tokenizer decodes what it samples
        tokenizer = load_tokenizer(src)
        return make_engine("vllm", model_path=src, tokenizer=tokenizer), tokenizer
    if model_dir is None:
        from mrt_fast.data import load_warm_start

        model, tokenizer = load_warm_start(device=device)
    else:
        from transformers import AutoModelForCausalLM

        try:
            tokenizer = load_tokenizer(src)
            model = AutoModelForCausalLM.from_pretrained(src)
        except (OSError, ValueError, KeyError, ImportError) as e:
            raise ValueError(f"--model {spec}: cannot be loaded as an HF causal LM + tokenizer: {e}") from e
        model = model.to(device).eval()
    return make_engine("hf", model=model, tokenizer=tokenizer), tokenizer


def resolve_device(spec: str | None) -> str:
    """``--device``, or cuda when available; a device this machine lacks is an error here."""
    import torch

    if spec is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise ValueError(f"--device {spec!r}: not a device name (cpu, cuda, cuda:1, ...): {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: CUDA is not available here (torch {torch.__version__}, "
                             f"CUDA build {torch.version.cuda}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {spec}: MPS is not available here; use --device cpu")
    return spec


def prepare_out_dir(spec: str) -> Path:
    """Create ``--out`` now, so that an unusable one fails before any sampling."""
    out = Path(spec)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {spec}: exists and is not a directory (eval.json and plots go in a directory)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {spec}: cannot create the directory: {e}") from None
    return out


def load_dataset_rows(
    spec: str, *, prompt_column: str, answer_column: str, num_problems: int, difficulty: int | None, grader: str,
    task: str = "chain",
) -> list[tuple[str, str]]:
    """``(prompt, answer)`` pairs; every answer is checked to be gradeable before sampling starts.

    The embedded problems are the trainer's held-out evaluation set (same seed and difficulty).
    """
    from mrt_fast.data.problems import EMBEDDED_EVAL_SEED, check_answers, embedded_examples, read_rows, rows_to_examples

    if spec == EMBEDDED:
        examples = embedded_examples(max(num_problems, 1), seed=EMBEDDED_EVAL_SEED, difficulty=difficulty, task=task,
                                     with_responses=False)
    else:
        if not Path(spec).is_file():
            raise FileNotFoundError(f"--dataset {spec}: no such file")
        rows = read_rows(spec, key="--dataset")
        examples = rows_to_examples(rows[:num_problems] if num_problems else rows, source_key="--dataset", source=spec,
                                    columns={"--prompt-column": prompt_column, "--answer-column": answer_column})
    check_answers([ex.answer for ex in examples], grader, where=f"--dataset {spec} (--grader)")
    return [(ex.prompt, ex.answer) for ex in examples]


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def eval_config(args: argparse.Namespace) -> EvalConfig:
    """The ``eval.*`` settings these arguments mean (the trainer's names)."""
    return EvalConfig(num_problems=args.num_problems, samples=args.n, temperature=args.temperature, top_p=args.top_p,
                      max_new_tokens=args.max_new_tokens, meta_k=args.meta_k,
                      meta_max_new_tokens=args.meta_max_new_tokens, budgets=list(args.budgets or []),
                      regret_tokens=args.regret_tokens)


def run(args: argparse.Namespace) -> dict:
    import torch

    from mrt_fast.eval.plots import write_plots
    from mrt_fast.eval.settings import accuracy_label, eval_settings, evaluate_problems
    from mrt_fast.mrt.episodes import make_splitter
    for name in ("n", "meta_k", "regret_samples", "batch_size", "max_new_tokens", "meta_max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_problems < 0:
        raise ValueError(f"--num-problems must be >= 0, got {args.num_problems}")
    grader_kind = args.grader or ("exact" if args.dataset == EMBEDDED else "math")
    if grader_kind == "math" and importlib.util.find_spec("math_verify") is None:
        raise ValueError("--grader math (the default for a dataset file) needs the 'math-verify' package: "
                         "pip install math-verify")
    if args.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError("--engine vllm needs the 'vllm' package: pip install vllm")
    device = resolve_device(args.device)
    out = prepare_out_dir(args.out)
    model_dir = None if args.model == EMBEDDED else resolve_model_dir(args.model)
    torch.manual_seed(args.seed)

    rows = load_dataset_rows(
        args.dataset, prompt_column=args.prompt_column, answer_column=args.answer_column,
        num_problems=args.num_problems, difficulty=args.difficulty, grader=grader_kind, task=args.task,
    )
    engine, tokenizer = load_engine(args.model, model_dir, device, args.engine)
    e = eval_config(args)
    settings = eval_settings(
        e, seed=args.seed, ks=args.ks, regret_samples=args.regret_samples, forcing_budget=args.forcing_budget,
        forcing_step=args.forcing_step, batch_size=args.batch_size,
        splitter=make_splitter(min_gap=args.episode_min_gap, max_episodes=args.episode_max_episodes,
                               group_size=args.episode_group_size),
    )

    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = lambda total: tqdm(total=total, desc="eval", unit="problem")  # noqa: E731

    result = evaluate_problems(engine, tokenizer, [p for p, _ in rows], [a for _, a in rows], grader_kind=grader_kind,
                               settings=settings, progress=bar)
    result["label"] = accuracy_label(e)
    result["config"] = {k: v for k, v in vars(args).items()} | {
        "grader": grader_kind, "ks": list(settings.ks), "budgets": list(settings.budgets)}
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_plots:
        result["plots"] = write_plots(result, out, model_name=args.model)
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {k: result[k] for k in ("num_problems", "pass@1", "pass@k", "maj@k", "mean_tokens", "regret")}
    print(json.dumps(summary, indent=2))
    print(f"{result['label']}: {result['pass@1']:.3f} on {result['num_problems']} problems")
    print(f"wrote {Path(args.out) / 'eval.json'}")
    for path in result.get("plots", []):
        print(f"wrote {path}")
    return 0
