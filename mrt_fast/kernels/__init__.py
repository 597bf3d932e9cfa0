"""Triton kernels and their PyTorch references for the mrt_fast loss.

Layout (one op, one place): ``reference`` (plain PyTorch definitions, used by tests in fp64 and
by the CPU path), ``logprobs`` + ``logprobs_triton`` (layer 1, the log-prob provider),
``policy_loss`` + ``policy_loss_triton`` (layer 2, the fused policy loss), ``backend``
(dispatch), ``chunking`` (memory bound of the chunked paths). This package imports nothing from
the rest of mrt_fast; the public API is :mod:`mrt_fast.loss`.
"""

from .backend import ENV_VAR, requested_backend, resolve_backend, triton_interpreting, use_backend

__all__ = ["ENV_VAR", "requested_backend", "resolve_backend", "triton_interpreting", "use_backend"]
