"""Which implementation runs a kernel: Triton (GPU, or the CPU interpreter) or chunked PyTorch.

The choice is made per call, from the tensors' device and two user overrides:

* ``use_backend("torch" | "triton" | "auto")``, a context manager (innermost wins), and
* the environment variable ``MRT_FAST_KERNEL_BACKEND`` (read at call time, so a test or a
  launcher may set it after import).

``auto`` means: CUDA tensors run Triton; CPU tensors run the chunked PyTorch path, unless
``TRITON_INTERPRET=1`` is set, in which case the Triton kernels run in the interpreter on the CPU
(that is how CI checks them without a GPU).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "MRT_FAST_KERNEL_BACKEND"

_local = threading.local()


def _stack() -> list[str]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def _check_name(name: str, where: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{where} must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every mrt_fast kernel inside the block on ``name`` ("torch", "triton" or "auto")."""
    _stack().append(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _stack().pop()


def requested_backend() -> str:
    """The backend asked for right now: innermost ``use_backend``, else the env var, else auto."""
    if _stack():
        return _stack()[-1]
    return _check_name(os.environ.get(ENV_VAR, "auto") or "auto", f"${ENV_VAR}")


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:  # e.g. macOS, where triton has no wheel
        return False
    return True


def resolve_backend(device: torch.device) -> str:
    """The concrete backend ("torch" or "triton") for tensors on ``device``."""
    name = requested_backend()
    if name == "auto":
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            name = "triton"
        else:
            name = "torch"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("the Triton backend was requested but triton is not installed")
        if device.type == "cpu" and not triton_interpreting():
            raise RuntimeError(
                "the Triton backend on CPU tensors needs TRITON_INTERPRET=1 set before mrt_fast.kernels "
                "is imported; use the 'torch' backend for CPU training"
            )
    return name


def interpreter_block_sizes() -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_H) under the interpreter: small, so odd test shapes span several
    tiles (16 is the smallest legal ``tl.dot`` tile). ``MRT_FAST_INTERPRET_BLOCKS="16,32,16"`` overrides."""
    return tuple(int(x) for x in os.environ.get("MRT_FAST_INTERPRET_BLOCKS", "16,32,16").split(","))
