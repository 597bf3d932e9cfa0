"""Log-probs in the host library's compute dtype, shared by the TRL and verl adapters."""

from __future__ import annotations

import torch

from mrt_fast.loss import token_logprobs


def logprobs_like_host(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                       temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs(..., return_entropy=True)`` with operands in the dtype the host computes in.

    TRL and verl run the LM head under autocast; their dtype is the autocast dtype, else
    ``hidden``'s (so a bf16 head meets fp32 hidden states as fp32). Autocast is then switched off
    so that it cannot round our fp32 logits back to 16 bits.
    """
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    with torch.autocast(device, enabled=False):
        return token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, return_entropy=True)
