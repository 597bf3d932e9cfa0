"""``python -m mrt_fast.eval``: accuracy, token efficiency and regret curves for a model on a dataset.

Examples::

    python -m mrt_fast.eval                                   # the shipped warm-started tiny model, embedded task
    python -m mrt_fast.eval --model runs/mrt --out runs/mrt/eval
    python -m mrt_fast.eval --model /ckpt/DeepScaleR-1.5B --dataset aime.jsonl --grader math \\
        --n 8 --ks 1,4,8 --max-new-tokens 8192 --budgets 2048,4096,8192 --forcing-budget 16384

``--model`` is ``embedded``, an HF model directory (or hub name), or a trainer run directory (its
``hf/`` export is loaded). ``--dataset`` is ``embedded`` or a local json/jsonl/csv/parquet file with
a prompt and an answer column. Writes ``eval.json`` and PNG plots to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from mrt_fast.mrt.episodes import DEFAULT_MAX_EPISODES, DEFAULT_MIN_GAP

EMBEDDED = "embedded"
EMBEDDED_EVAL_SEED = 10_000  # disjoint from the training problem streams


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mrt_fast.eval",
        description="Evaluate pass@k, maj@k, tokens and regret (meta-prover J at every episode boundary).",
    )
    p.add_argument("--model", default=EMBEDDED, help="'embedded', an HF model path, or a run directory")
    p.add_argument("--dataset", default=EMBEDDED, help="'embedded' or a local json/jsonl/csv/parquet file")
    p.add_argument("--prompt-column", default="prompt")
    p.add_argument("--answer-column", default="answer")
    p.add_argument("--grader", choices=("math", "exact"), default=None, help="default: exact for embedded, else math")
    p.add_argument("--num-problems", type=int, default=16, help="problems to evaluate (0: all rows of a file)")
    p.add_argument("--difficulty", type=int, default=None, help="embedded task difficulty")
    p.add_argument("--n", type=int, default=4, help="samples per problem")
    p.add_argument("--ks", type=_int_list, default=None, help="k values for pass@k and maj@k (default 1,..,n powers of 2)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=256, help="the training budget of a response")
    p.add_argument("--meta-k", type=int, default=4, help="forced-termination answers per boundary")
    p.add_argument("--meta-max-new-tokens", type=int, default=32)
    p.add_argument("--regret-samples", type=int, default=1, help="traces per problem measured at every boundary")
    p.add_argument("--budgets", type=_int_list, default=None, help="token budgets for normalised regret")
    p.add_argument("--regret-tokens", choices=("authors", "response"), default="authors",
                   help="regret x-axis: authors (meta-prover input + mean forced-answer length, as the authors' "
                        "regret.ipynb) or response (response tokens before each boundary)")
    p.add_argument("--forcing-budget", type=int, default=0, help="budget forcing up to this many tokens (0: off)")
    p.add_argument("--forcing-step", type=int, default=64)
    p.add_argument("--episode-min-gap", type=int, default=DEFAULT_MIN_GAP, help="paragraphs a cue must be past the previous cut")
    p.add_argument("--episode-max-episodes", type=int, default=DEFAULT_MAX_EPISODES, help="cuts before the rest is one episode")
    p.add_argument("--episode-group-size", type=int, default=1, help="consecutive episodes merged into one")
    p.add_argument("--batch-size", type=int, default=8, help="problems sampled together")
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="mrt_eval", help="output directory for eval.json and plots")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


# ----------------------------------------------------------------------------------------------
# Model and data
# ----------------------------------------------------------------------------------------------


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
        if (path / "hf" / "config.json").is_file():
            path = path / "hf"
        else:
            raise FileNotFoundError(
                f"--model {spec}: no config.json there and no hf/ export of a run (train with checkpoint.export_hf)"
            )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"--model {spec}: {path} has a model config but no tokenizer "
                                f"(none of {', '.join(TOKENIZER_FILES)}); save the tokenizer next to the model")
    return path


def load_model(spec: str, device: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``embedded``, an HF directory / hub name, or a run directory."""
    if spec == EMBEDDED:
        from mrt_fast.data import load_warm_start

        return load_warm_start(device=device)
    src = str(resolve_model_dir(spec))
    from transformers import AutoModelForCausalLM

    from ..data.tokenizer import load_tokenizer  # AutoTokenizer mis-loads the tiny task tokenizer

    try:
        tokenizer = load_tokenizer(src)
        model = AutoModelForCausalLM.from_pretrained(src)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise ValueError(f"--model {spec}: cannot be loaded as an HF causal LM + tokenizer: {e}") from e
    model = model.to(device)
    model.eval()
    return model, tokenizer


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


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open() as f:
            return [json.loads(line) for line in f if line.strip()]
    if suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict):  # {"column": [values...]}
            columns = list(data)
            return [dict(zip(columns, values)) for values in zip(*data.values())]
        return list(data)
    if suffix == ".csv":
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    if suffix == ".parquet":
        import datasets

        return list(datasets.load_dataset("parquet", data_files=str(path), split="train"))
    raise ValueError(f"--dataset {path}: unsupported file type {suffix!r} (expected .json, .jsonl, .csv or .parquet)")


def load_dataset_rows(
    spec: str, *, prompt_column: str, answer_column: str, num_problems: int, difficulty: int | None, grader: str
) -> list[tuple[str, str]]:
    """``(prompt, answer)`` pairs; every answer is checked to be gradeable before sampling starts."""
    from mrt_fast.data import grade

    if spec == EMBEDDED:
        from mrt_fast.data.synthetic import DEFAULT_DIFFICULTY, generate_problems

        problems = generate_problems(
            max(num_problems, 1), seed=EMBEDDED_EVAL_SEED,
            difficulty=DEFAULT_DIFFICULTY if difficulty is None else difficulty,
        )
        rows = [(p.prompt, p.answer) for p in problems]
    else:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"--dataset {spec}: no such file")
        raw = _read_rows(path)
        if not raw:
            raise ValueError(f"--dataset {spec}: no rows")
        missing = [c for c in (prompt_column, answer_column) if c not in raw[0]]
        if missing:
            raise ValueError(
                f"--dataset {spec}: missing column(s) {missing}; it has {sorted(raw[0])} "
                "(set --prompt-column / --answer-column)"
            )
        if num_problems:
            raw = raw[:num_problems]
        rows = []
        for i, r in enumerate(raw):
            for column in (prompt_column, answer_column):
                if column not in r or r[column] is None or isinstance(r[column], (dict, list)):
                    raise ValueError(f"--dataset {spec}: row {i} has no usable {column!r} value (got {r.get(column)!r})")
            rows.append((str(r[prompt_column]), str(r[answer_column])))
    for i, (_, answer) in enumerate(rows):
        try:
            grade("\\boxed{0}", answer, kind=grader)
        except ValueError as e:
            raise ValueError(f"--dataset {spec}: row {i} has an answer the {grader!r} grader cannot use: {e}") from None
    return rows


def encode_prompts(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """Chat-template each problem as one user turn with the generation prompt, then tokenize."""
    out = []
    for p in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    import torch

    from mrt_fast.data import extract_boxed, grade
    from mrt_fast.eval.plots import write_plots
    from mrt_fast.eval.runner import EvalSettings, evaluate
    from mrt_fast.mrt.episodes import make_splitter
    from mrt_fast.mrt.progress import termination_token_ids
    from mrt_fast.rollout import SamplingParams, make_engine

    for name in ("n", "meta_k", "regret_samples", "batch_size", "max_new_tokens", "meta_max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_problems < 0:
        raise ValueError(f"--num-problems must be >= 0, got {args.num_problems}")
    grader_kind = args.grader or ("exact" if args.dataset == EMBEDDED else "math")
    device = resolve_device(args.device)
    out = prepare_out_dir(args.out)
    if args.model != EMBEDDED:
        resolve_model_dir(args.model)
    torch.manual_seed(args.seed)

    rows = load_dataset_rows(
        args.dataset, prompt_column=args.prompt_column, answer_column=args.answer_column,
        num_problems=args.num_problems, difficulty=args.difficulty, grader=grader_kind,
    )
    model, tokenizer = load_model(args.model, device)
    engine = make_engine(args.engine, model=model, tokenizer=tokenizer)
    ks = args.ks or [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= args.n]
    budgets = args.budgets or sorted({max(1, args.max_new_tokens // 4), max(1, args.max_new_tokens // 2), args.max_new_tokens}
                                     | ({args.forcing_budget} if args.forcing_budget else set()))
    settings = EvalSettings(
        params=SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed),
        meta_params=SamplingParams(
            temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.meta_max_new_tokens, seed=args.seed + 1
        ),
        n=args.n, ks=ks, meta_k=args.meta_k, regret_samples=args.regret_samples, budgets=budgets,
        forcing_budget=args.forcing_budget, forcing_step=args.forcing_step, batch_size=args.batch_size,
        regret_tokens=args.regret_tokens, splitter=make_splitter(min_gap=args.episode_min_gap, max_episodes=args.episode_max_episodes,
                               group_size=args.episode_group_size),
    )

    def grader(response: str, answer: str) -> bool:
        return grade(response, answer, kind=grader_kind)

    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        def bar(total):
            return tqdm(total=total, desc="eval", unit="problem")

    result = evaluate(
        engine, tokenizer, encode_prompts(tokenizer, [p for p, _ in rows]), [a for _, a in rows],
        grader=grader, termination_ids=termination_token_ids(tokenizer), settings=settings,
        extract=extract_boxed, progress=bar,
    )
    result["config"] = {k: v for k, v in vars(args).items()} | {"grader": grader_kind, "ks": ks, "budgets": budgets}
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_plots:
        result["plots"] = write_plots(result, out)
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
    print(f"wrote {Path(args.out) / 'eval.json'}")
    return 0
