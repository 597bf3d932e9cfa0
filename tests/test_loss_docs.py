"""The runnable examples in docs/loss.md run (code blocks whose first line is ``# runnable``)."""

import re
from pathlib import Path

import pytest

from mrt_fast.kernels import use_backend

DOC = Path(__file__).resolve().parents[1] / "docs" / "loss.md"
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S) if b.startswith("# runnable")]


def test_doc_has_runnable_examples():
    assert BLOCKS


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_doc_example_runs(index):
    with use_backend("torch"):
        exec(compile(BLOCKS[index], f"docs/loss.md[{index}]", "exec"), {})
