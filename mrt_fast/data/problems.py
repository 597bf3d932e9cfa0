"""The problems a run trains and evaluates on: loading, checking, ordering, encoding.

:func:`load_examples` returns the training examples and :func:`load_eval_examples` the held-out
ones, both checked completely at load time (columns present, every prompt a string, every answer
usable by the grader), so a bad row fails before any model is loaded rather than hours into a
run. Errors name the config key to change (``data.source``, ``data.grader``...).

Where evaluation problems come from (``eval.source``):

- ``held-out`` with the embedded task: problems generated from :data:`EMBEDDED_EVAL_SEED`, the
  same set ``python -m mrt_fast.eval`` uses, disjoint from the training stream;
- ``held-out`` with a data file: the last ``eval.num_problems`` rows of ``data.source``, which
  are then left out of training;
- a file path: that file (same columns as ``data.source``), all of it, or its first
  ``eval.num_problems`` rows.

json, jsonl and csv files are read with the standard library; parquet files and directories saved
by ``datasets`` need the ``datasets`` package, imported only for them.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from mrt_fast.config import DATASETS_FORMATS, EMBEDDED, HELD_OUT

# The embedded evaluation problems: the same seed as `python -m mrt_fast.eval`, far from the small
# seeds of the training streams.
EMBEDDED_EVAL_SEED = 10_000
STDLIB_FORMATS = (".json", ".jsonl", ".csv")
MAX_REPORTED_ROWS = 5


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    response: Optional[str] = None


# ---------------------------------------------------------------------------------------------
# Reading tables
# ---------------------------------------------------------------------------------------------


def read_rows(source: str, *, key: str, split: str = "train") -> list[dict]:
    """All rows of a local json/jsonl/csv/parquet file or a ``datasets`` directory.

    ``key`` is the config key or flag that named ``source``; every error message starts with it.
    """
    path = Path(source)
    if not str(source).strip() or not path.exists():
        raise ValueError(f"{key}={source!r} does not exist (expected 'embedded', a json/jsonl/parquet/csv "
                         "file or a directory saved with datasets' save_to_disk)")
    suffix = path.suffix.lower()
    if path.is_dir():
        rows = _read_saved_dataset(path, key, split)
    elif suffix == ".jsonl":
        rows = _read_jsonl(path, key)
    elif suffix == ".json":
        rows = _read_json(path, key)
    elif suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    elif suffix in DATASETS_FORMATS:
        datasets = _import_datasets(key)
        rows = list(datasets.load_dataset("parquet", data_files=str(path), split="train"))
    else:
        raise ValueError(f"{key}={source!r}: unsupported file type {suffix!r} (expected one of "
                         f"{list(STDLIB_FORMATS + DATASETS_FORMATS)} or a saved dataset directory)")
    if not rows:
        raise ValueError(f"{key}={source!r} has no rows")
    return rows


def _read_jsonl(path: Path, key: str) -> list[dict]:
    rows = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{key}={str(path)!r}: line {number} is not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{key}={str(path)!r}: line {number} is not a JSON object, got {row!r:.80}")
            rows.append(row)
    return rows


def _read_json(path: Path, key: str) -> list[dict]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{key}={str(path)!r} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if isinstance(data, dict):  # {"column": [values...]}
        if not all(isinstance(v, list) for v in data.values()):
            raise ValueError(f"{key}={str(path)!r}: a JSON object must map column names to lists")
        return [dict(zip(data, values)) for values in zip(*data.values())]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{key}={str(path)!r}: expected a list of objects or an object of columns")
    return data


def _read_saved_dataset(path: Path, key: str, split: str) -> list[dict]:
    datasets = _import_datasets(key)
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise ValueError(f"{key}={str(path)!r} is a directory but not one saved by datasets' save_to_disk "
                         f"({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"data.split={split!r} is not a split of {key}={str(path)!r}; splits: {list(loaded)}")
        loaded = loaded[split]
    return list(loaded)


def _import_datasets(key: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{key} names a parquet file or a saved dataset directory, which needs the "
                         "'datasets' package: pip install datasets (json, jsonl and csv files do not)") from None
    return datasets


# ---------------------------------------------------------------------------------------------
# Checking rows
# ---------------------------------------------------------------------------------------------


def grader_kind(grader: str, source: str) -> str:
    """The grader a config means: ``auto`` is the embedded task's own, ``math`` for data files."""
    if grader != "auto":
        return grader
    if source == EMBEDDED:
        from mrt_fast.data.synthetic import GRADER_KIND

        return GRADER_KIND
    return "math"


def check_answers(answers: list[str], kind: str, *, where: str) -> None:
    """Every reference answer must be usable by the ``kind`` grader; lists the bad rows otherwise."""
    from mrt_fast.data import grade

    bad = []
    for i, answer in enumerate(answers):
        try:
            grade("\\boxed{0}", answer, kind=kind)
        except ValueError as exc:
            bad.append(f"row {i}: {exc}")
    if bad:
        shown = "; ".join(bad[:MAX_REPORTED_ROWS]) + (f"; ... ({len(bad)} rows in all)" if len(bad) > MAX_REPORTED_ROWS else "")
        raise ValueError(f"data.grader={kind!r} cannot grade {len(bad)} answer(s) of {where}: {shown}. Fix the "
                         "data, or set data.grader to 'exact' (string equality of the final \\boxed{} answer)")


def rows_to_examples(rows: list[dict], *, source_key: str, source: str, columns: dict[str, str]) -> list[Example]:
    """Examples from table rows. ``columns`` maps the option naming each column to the column, in
    the order prompt, answer[, response]; a missing column or a non-text value fails naming them."""
    present = sorted(rows[0])
    missing = {k: c for k, c in columns.items() if c not in present}
    if missing:
        raise ValueError(f"{source_key}={source!r} is missing column(s) {list(missing.values())} (columns: {present}); "
                         f"set {', '.join(missing)}")
    examples = []
    for i, row in enumerate(rows):
        values = []
        for position, column in enumerate(columns.values()):
            value = row.get(column)
            if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
                raise ValueError(f"{source_key}={source!r}: row {i} has no usable {column!r} value (got {value!r:.80})")
            values.append(str(value).strip() if position == 1 else str(value))
        examples.append(Example(*values))
    return examples


# ---------------------------------------------------------------------------------------------
# What a run trains and evaluates on
# ---------------------------------------------------------------------------------------------


def embedded_examples(n: int, *, seed: int, difficulty: Optional[int], with_responses: bool,
                      task: str = "chain") -> list[Example]:
    from mrt_fast.data import synthetic

    kwargs = {} if difficulty is None else {"difficulty": difficulty}
    problems = synthetic.generate_problems(n, seed=seed, task=task, **kwargs)
    rng = random.Random(seed)
    return [Example(p.prompt, p.answer, synthetic.sft_trace(p, rng) if with_responses else None) for p in problems]


def _file_examples(cfg: Any, source: str, source_key: str, *, with_responses: bool) -> list[Example]:
    data = cfg.data
    rows = read_rows(source, key=source_key, split=data.split)
    columns = {"data.prompt_column": data.prompt_column, "data.answer_column": data.answer_column}
    if with_responses:
        columns["data.response_column"] = data.response_column
    examples = rows_to_examples(rows, source_key=source_key, source=source, columns=columns)
    check_answers([ex.answer for ex in examples], grader_kind(data.grader, data.source), where=f"{source_key}={source!r}")
    return examples


def load_examples(cfg: Any) -> list[Example]:
    """The training examples (a held-out tail of a data file excluded), every row checked."""
    data = cfg.data
    sft = cfg.algo.name == "sft"
    if data.source == EMBEDDED:
        return embedded_examples(data.num_problems, seed=cfg.train.seed, difficulty=data.difficulty, with_responses=sft,
                                 task=data.task)
    examples = _file_examples(cfg, data.source, "data.source", with_responses=sft)
    held = held_out_count(cfg)
    if held and held >= len(examples):
        raise ValueError(f"data.source={data.source!r} has {len(examples)} rows: too few to hold out "
                         f"eval.num_problems={held} for evaluation and still train; lower eval.num_problems "
                         "or set eval.source to a separate file")
    return examples[: len(examples) - held]


def held_out_count(cfg: Any) -> int:
    """Rows at the end of a data file kept for evaluation (0 for the embedded task or another eval file)."""
    if cfg.data.source == EMBEDDED or cfg.eval.source != HELD_OUT:
        return 0
    return cfg.eval.num_problems


def load_eval_examples(cfg: Any) -> list[Example]:
    """The evaluation examples (see the module docstring for where they come from)."""
    e, data = cfg.eval, cfg.data
    if e.num_problems == 0:
        return []
    if e.source == HELD_OUT and data.source == EMBEDDED:
        return embedded_examples(e.num_problems, seed=EMBEDDED_EVAL_SEED, difficulty=data.difficulty,
                                 with_responses=False, task=data.task)
    if e.source == HELD_OUT:
        examples = _file_examples(cfg, data.source, "data.source", with_responses=False)
        return examples[len(examples) - e.num_problems:]
    if e.source == EMBEDDED:
        return embedded_examples(e.num_problems, seed=EMBEDDED_EVAL_SEED, difficulty=data.difficulty,
                                 with_responses=False, task=data.task)
    return _file_examples(cfg, e.source, "eval.source", with_responses=False)[: e.num_problems]


def describe_eval_source(cfg: Any) -> str:
    """One line saying which problems the evaluation uses."""
    e, data = cfg.eval, cfg.data
    if e.num_problems == 0:
        return "no evaluation (eval.num_problems is 0)"
    if (e.source == HELD_OUT and data.source == EMBEDDED) or e.source == EMBEDDED:
        return (f"{e.num_problems} embedded problems from the evaluation seed {EMBEDDED_EVAL_SEED} "
                "(not in the training stream; the same set as python -m mrt_fast.eval)")
    if e.source == HELD_OUT:
        return f"the last {e.num_problems} rows of {data.source}, held out of training"
    return f"the first {e.num_problems} rows of {e.source}"


def grader_for(cfg: Any) -> Callable[[str, str], bool]:
    """``grade(response, answer) -> bool`` for the configured data."""
    from mrt_fast.data import grade

    kind = grader_kind(cfg.data.grader, cfg.data.source)
    return lambda response, answer: bool(grade(response, answer, kind=kind))


def prompt_token_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt tokens through the chat template, with the assistant turn opened."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]


class DataStream:
    """A deterministic, resumable order over the examples: reshuffled every epoch from the seed.

    ``position`` counts prompts handed out over all ranks; it is all a checkpoint needs to resume.
    """

    def __init__(self, n: int, *, seed: int, shuffle: bool, position: int = 0) -> None:
        if n <= 0:
            raise ValueError(f"the dataset is empty (n={n})")
        self.n, self.seed, self.shuffle, self.position = n, seed, shuffle, position
        self._epoch, self._cached = -1, []

    def _order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self._epoch, self._cached = epoch, list(range(self.n))
            if self.shuffle:
                random.Random(self.seed * 7919 + epoch).shuffle(self._cached)
        return self._cached

    def take(self, count: int) -> list[int]:
        out = []
        for _ in range(count):
            epoch, i = divmod(self.position, self.n)
            out.append(self._order(epoch)[i])
            self.position += 1
        return out
