"""Data for mrt-fast: graders, chat conventions, dataset loading, the embedded task, the tiny model.

Public API (docs/contracts.md)::

    grade(response, answer, kind="math" | "exact") -> bool
    extract_boxed(text) -> str | None
    loading.load_problems(path, prompt_column=..., answer_column=...) -> list[Problem]
    synthetic.generate_problems(n, seed=..., difficulty=..., task="chain" | "recall") / synthetic.sft_trace(problem, rng)
    load_tiny_tokenizer(), tiny_model_config(), load_warm_start()
    python -m mrt_fast.data.warm_start --out DIR
"""

from .chat import (
    ANSWER_LEAD_IN,
    CHAT_TEMPLATE,
    CUES,
    PARAGRAPH_SEP,
    TERMINATION_TEXT,
    THINK_END,
    THINK_START,
    chat_prompt_text,
)
from .grading import GRADER_KINDS, extract_boxed, grade
from .synthetic import DEFAULT_DIFFICULTY, Problem, generate_problems, iter_problems, sft_trace
from .tiny_model import load_warm_start, tiny_model_config
from .tokenizer import build_tiny_tokenizer, load_tiny_tokenizer, load_tokenizer

__all__ = [
    "ANSWER_LEAD_IN",
    "CHAT_TEMPLATE",
    "CUES",
    "DEFAULT_DIFFICULTY",
    "GRADER_KINDS",
    "PARAGRAPH_SEP",
    "Problem",
    "TERMINATION_TEXT",
    "THINK_END",
    "THINK_START",
    "build_tiny_tokenizer",
    "chat_prompt_text",
    "extract_boxed",
    "generate_problems",
    "grade",
    "iter_problems",
    "load_tiny_tokenizer",
    "load_tokenizer",
    "load_warm_start",
    "sft_trace",
    "tiny_model_config",
]
