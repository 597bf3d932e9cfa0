"""Test-wide setup.

Triton decides at decoration time whether a kernel is compiled or interpreted, so
TRITON_INTERPRET must be set before any mrt_fast kernel module is imported. Without a GPU we
run the Triton kernels through the interpreter (numpy on the CPU): that is how CI checks them.

The interpreter is slow, so only the kernel and loss test files exercise it; every other test
file runs the loss through the chunked PyTorch path (MRT_FAST_KERNEL_BACKEND=torch), which the
kernel tests prove equal to the Triton kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

KERNEL_TEST_PREFIXES = ("test_kernels", "test_loss")


@pytest.fixture(autouse=True)
def _seed_and_backend(request, monkeypatch):
    torch.manual_seed(0)
    if not request.node.path.name.startswith(KERNEL_TEST_PREFIXES):
        monkeypatch.setenv("MRT_FAST_KERNEL_BACKEND", "torch")
    yield
