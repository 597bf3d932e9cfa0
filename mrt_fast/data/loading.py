"""Problems for real runs: a local jsonl / json / parquet file or a ``datasets`` dataset on disk.

Every row becomes a :class:`~mrt_fast.data.synthetic.Problem` with the configured prompt and
answer columns (the answer as a string; the row's other fields go to ``meta``). Nothing is
downloaded: the path must exist locally.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from .grading import GRADER_KINDS, _parse_reference
from .synthetic import Problem

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_problems(
    path: str | Path,
    *,
    prompt_column: str = "problem",
    answer_column: str = "answer",
    split: str = "train",
    limit: int | None = None,
    grader: str | None = None,
) -> list[Problem]:
    """Load problems from a local file or a dataset saved with ``save_to_disk``.

    Args:
        path: a ``.jsonl``/``.json``/``.parquet`` file, or a directory written by
            ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` directory uses ``split``).
        prompt_column / answer_column: the columns holding the question and reference answer.
        split: the split of a saved ``DatasetDict``.
        limit: keep only the first ``limit`` rows.
        grader: if given (``"math"`` or ``"exact"``), check up front that every answer can be
            graded that way, so a bad answer column fails at load time and not mid-training.

    Raises:
        FileNotFoundError: ``path`` does not exist. ValueError: unknown format, missing
        column (the message lists the columns present), empty or ungradeable answers.
    """
    rows, columns = _read_rows(Path(path), split)
    for role, column in (("prompt_column", prompt_column), ("answer_column", answer_column)):
        if column not in columns:
            raise ValueError(
                f"{role}={column!r} is not a column of {path}; columns present: {sorted(columns)}"
            )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    if grader is not None and grader not in GRADER_KINDS:
        raise ValueError(f"grader must be one of {GRADER_KINDS} or None, got {grader!r}")
    problems = []
    for index, row in enumerate(rows):
        if limit is not None and index >= limit:
            break
        problems.append(_row_to_problem(row, index, prompt_column, answer_column, grader))
    return problems


def _read_rows(path: Path, split: str) -> tuple[Iterable[dict[str, Any]], set[str]]:
    if not path.exists():
        raise FileNotFoundError(f"dataset path {path} does not exist (only local data is loaded)")
    import datasets

    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"split={split!r} is not in {path}; splits present: {sorted(loaded)}")
            loaded = loaded[split]
    else:
        builder = FILE_FORMATS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"unsupported dataset file {path.name!r}; expected one of {sorted(FILE_FORMATS)} "
                "or a directory saved with datasets' save_to_disk"
            )
        loaded = datasets.load_dataset(builder, data_files=str(path), split="train")
    return loaded, set(loaded.column_names)


def _row_to_problem(row: dict, index: int, prompt_column: str, answer_column: str, grader: str | None) -> Problem:
    prompt, answer = row[prompt_column], row[answer_column]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"row {index}: {prompt_column!r} must be a non-empty string, got {prompt!r}")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(f"row {index}: {answer_column!r} must be a string or number, got {answer!r}")
    answer = str(answer).strip()
    if not answer:
        raise ValueError(f"row {index}: {answer_column!r} is empty; it cannot be graded")
    if grader == "math" and not _parse_reference(answer):
        raise ValueError(
            f"row {index}: {answer_column!r}={answer!r} cannot be parsed by math-verify; "
            "fix the data or use grader='exact'"
        )
    meta = {k: v for k, v in row.items() if k not in (prompt_column, answer_column)}
    return Problem(prompt=prompt, answer=answer, meta=meta)
