"""Convert a local Hugging Face math dataset into the trainer's jsonl: one {"prompt", "answer"} per line.

    python scripts/convert_hf_math.py --input DATA --output math_train.jsonl [--split train]
        [--problem-column C] [--answer-column C] [--instruction TEXT] [--limit N]

``DATA`` is a local copy (nothing is downloaded): a directory written by ``datasets``'
``save_to_disk``, a directory of parquet/json/jsonl files as the Hub stores them (e.g. a
``huggingface-cli download`` snapshot; ``--split`` picks the files whose name contains it), or
one json/jsonl/parquet/csv file. Reading parquet or a ``save_to_disk`` directory needs the
``datasets`` package; json, jsonl and csv do not.

The columns are found by name unless given: the problem from ``problem``, ``question``,
``prompt`` or ``input``; the answer from ``answer`` (GSM8K's ``"... #### 42"`` keeps the part
after ``####``), else the last ``\\boxed{}`` of ``solution`` (MATH, NuminaMath). That covers
MATH / MATH-500, GSM8K, NuminaMath, DeepScaleR, OpenR1-Math and AIME-style files. A row whose
answer cannot be found is an error naming the row (``--skip-unanswered`` drops such rows and
says how many).

The prompt is the problem followed by ``--instruction`` (default: DeepSeek's recommended
"Please reason step by step, and put your final answer within \\boxed{}."), which is what the
``math`` grader reads: the last ``\\boxed{}`` of the response. The trainer wraps the prompt in
the model's chat template.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source tree: use its mrt_fast

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PROBLEM_COLUMNS = ("problem", "question", "prompt", "input")
ANSWER_COLUMNS = ("answer", "final_answer", "solution")
SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")


def read_rows(source: Path, split: str) -> list[dict]:
    """All rows of a local dataset (file, Hub-style directory of files, or save_to_disk directory)."""
    if not source.exists():
        raise ValueError(f"--input {str(source)!r} does not exist")
    if source.is_dir() and any((source / name).exists() for name in ("dataset_info.json", "dataset_dict.json")):
        import datasets

        ds = datasets.load_from_disk(str(source))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"--split {split!r} is not in {list(ds)}")
            ds = ds[split]
        return list(ds)
    files = [source] if source.is_file() else sorted(
        p for p in source.rglob("*") if p.suffix in SUFFIXES and split in p.name and not p.name.startswith("."))
    if not files:
        raise ValueError(f"--input {str(source)!r}: no {'/'.join(SUFFIXES)} file whose name contains {split!r}")
    rows: list[dict] = []
    for path in files:
        rows += _read_file(path)
    return rows


def _read_file(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return data if isinstance(data, list) else data.get("data", data.get("rows", []))
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    if path.suffix == ".parquet":
        import datasets

        return list(datasets.load_dataset("parquet", data_files=str(path), split="train"))
    raise ValueError(f"{path}: unsupported file type {path.suffix!r} (expected one of {SUFFIXES})")


def pick_column(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"--{what}-column {wanted!r} is not a column (columns: {columns})")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(f"no {what} column among {columns}; pass --{what}-column")


def answer_of(value: object, column: str) -> str | None:
    """The reference answer in a cell: GSM8K's text after '####', a solution's last \\boxed{}, else the text."""
    from mrt_fast.data import extract_boxed

    text = str(value).strip() if value is not None else ""
    if not text:
        return None
    if "####" in text:
        return text.rsplit("####", 1)[1].strip() or None
    if column == "solution" or "\\boxed" in text:
        return extract_boxed(text)
    return text


def convert(rows: list[dict], *, problem_column: str | None = None, answer_column: str | None = None,
            instruction: str = DEFAULT_INSTRUCTION, skip_unanswered: bool = False) -> tuple[list[dict], int]:
    """(converted rows, rows skipped for lack of an answer)."""
    if not rows:
        raise ValueError("the input has no rows")
    columns = list(rows[0].keys())
    pcol = pick_column(columns, problem_column, PROBLEM_COLUMNS, "problem")
    acol = pick_column(columns, answer_column, ANSWER_COLUMNS, "answer")
    out, skipped = [], 0
    for i, row in enumerate(rows):
        answer = answer_of(row.get(acol), acol)
        if answer is None:
            if skip_unanswered:
                skipped += 1
                continue
            raise ValueError(f"row {i}: no answer in column {acol!r} ({str(row.get(acol))[:80]!r}); "
                             "pass --skip-unanswered to drop such rows")
        problem = str(row[pcol]).strip()
        out.append({"prompt": f"{problem}\n{instruction}" if instruction else problem, "answer": answer})
    return out, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/convert_hf_math.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, type=Path, help="local dataset: file, Hub snapshot directory or save_to_disk directory")
    parser.add_argument("--output", required=True, type=Path, help="jsonl to write")
    parser.add_argument("--split", default="train", help="split to read (a file-name part for Hub snapshots)")
    parser.add_argument("--problem-column", default=None)
    parser.add_argument("--answer-column", default=None)
    parser.add_argument("--instruction", default=DEFAULT_INSTRUCTION, help="appended to every problem ('' for none)")
    parser.add_argument("--limit", type=int, default=0, help="keep the first N rows (0: all)")
    parser.add_argument("--skip-unanswered", action="store_true", help="drop rows without a findable answer")
    args = parser.parse_args(argv)
    try:
        rows = read_rows(args.input, args.split)
        if args.limit > 0:
            rows = rows[: args.limit]
        out, skipped = convert(rows, problem_column=args.problem_column, answer_column=args.answer_column,
                               instruction=args.instruction, skip_unanswered=args.skip_unanswered)
    except ValueError as exc:
        print(f"convert_hf_math: error: {exc}", file=sys.stderr)
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("w") as f:
        for row in out:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(out)} problems to {args.output}" + (f" ({skipped} rows without an answer skipped)" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
