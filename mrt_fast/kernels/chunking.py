"""How many tokens a ``[chunk, V]`` logits block may hold: the memory bound of the chunked paths."""

from __future__ import annotations

import torch

# Blocks of this many bytes keep the GPU matmuls efficient (the fused loss holds an fp32 logits
# block and a bf16 dlogits block: 512 rows at V=131,072) while staying well under the 1 GB
# extra-memory budget of the fused loss.
GPU_CHUNK_BYTES = 512 * 2**20
# On the CPU a smaller block stays in cache-friendly sizes and bounds memory for CPU training.
CPU_CHUNK_BYTES = 64 * 2**20
MIN_CHUNK_ROWS = 16


def chunk_rows(num_tokens: int, vocab: int, bytes_per_elem: int, device: torch.device,
               override: int | None = None) -> int:
    """Tokens per chunk so that the ``[chunk, vocab]`` blocks held at once (``bytes_per_elem``
    bytes per logit, all blocks together) fit the budget."""
    if override is not None:
        if not isinstance(override, int) or isinstance(override, bool):
            raise TypeError(f"chunk_size must be a positive int or None, got {type(override).__name__} ({override!r})")
        if override < 1:
            raise ValueError(f"chunk_size must be >= 1, got {override}")
        return override
    budget = GPU_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES
    rows = max(MIN_CHUNK_ROWS, budget // max(1, vocab * bytes_per_elem))
    # A power of two keeps matmul tiles aligned; never more rows than there are tokens.
    rows = 1 << (rows.bit_length() - 1)
    return max(1, min(rows, num_tokens))
