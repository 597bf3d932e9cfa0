"""Test-wide setup.

Triton decides at decoration time whether a kernel is compiled or interpreted, so
TRITON_INTERPRET must be set before any mrt_fast kernel module is imported. Without a GPU we
run the Triton kernels through the interpreter (numpy on the CPU): that is how CI checks them.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
