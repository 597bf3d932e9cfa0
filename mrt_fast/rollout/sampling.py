"""Choosing the next token from logits, with per-row reproducible randomness.

Randomness: every sampled row owns a stream of uniforms drawn up front from its own
`torch.Generator` (on the CPU, so a seed gives the same uniforms on every device). A token is
drawn by inverting the CDF of the filtered distribution at the row's uniform for that step. One
uniform per row per step keeps rows independent of the batch they happen to share.

A stream is named by (seed, context identity, occurrence, sample index) (`row_stream_keys`): the
context identity is a hash of the row's context token ids, so two different prompts (or a trace and
a branch cut from it) never share uniforms, while the same seed and context give the same samples.
`occurrence` tells apart equal contexts passed twice in one call.
"""

from __future__ import annotations

import hashlib

import torch

from .params import SamplingParams


def stream_seed(*key: int) -> int:
    """A well-mixed 63-bit seed for the random stream named by `key` (e.g. (seed, sample))."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def context_hash(token_ids: list[int]) -> int:
    """A 63-bit identity of a context (its token ids), for naming random streams."""
    digest = hashlib.blake2b(b",".join(str(t).encode() for t in token_ids), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def context_keys(contexts: list[list[int]]) -> list[tuple[int, int]]:
    """(context hash, occurrence) per context: equal contexts in one call get occurrences 0, 1, ..."""
    seen: dict[int, int] = {}
    keys = []
    for ctx in contexts:
        h = context_hash(ctx)
        keys.append((h, seen.get(h, 0)))
        seen[h] = seen.get(h, 0) + 1
    return keys


def derive_seed(seed: int | None, *salt: int | str) -> int | None:
    """A seed for a distinct purpose derived from `seed` (None stays None: fresh randomness).

    Used where two samplings from the same context must not share a stream, e.g. an old trace and
    the continuations forked at its empty prefix.
    """
    return None if seed is None else stream_seed(seed, *salt)


def uniform_streams(keys: list[tuple[int, ...]], length: int, device: torch.device) -> torch.Tensor:
    """[len(keys), length] uniforms in [0, 1); rows with equal keys get equal streams."""
    cache: dict[tuple[int, ...], torch.Tensor] = {}
    rows = []
    for key in keys:
        if key not in cache:
            gen = torch.Generator().manual_seed(stream_seed(*key))
            cache[key] = torch.rand(length, generator=gen, dtype=torch.float64)
        rows.append(cache[key])
    return torch.stack(rows).to(device)


def sample_next(
    logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row.

    Args:
        logits: [R, V] next-token logits (any float dtype; computed in fp32).
        params: temperature / top-k / top-p.
        uniforms: [R] fp64 uniforms in [0, 1), one per row (ignored when greedy).

    Returns:
        (tokens [R] int64, logprobs [R] fp32) where logprobs are `log_softmax(logits / T)` at
        the chosen token: temperature applied, *before* top-k/top-p renormalisation (T = 1 for
        greedy decoding).
    """
    logits = logits.float()
    if params.greedy:
        tokens = logits.argmax(dim=-1)
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
        return tokens, logprobs

    logprobs_all = torch.log_softmax(logits / params.temperature, dim=-1)
    vocab = logprobs_all.shape[-1]
    if params.top_k > 0 or params.top_p < 1.0:
        # Filters act on the distribution sorted by probability, where both keep a prefix.
        sorted_lp, order = logprobs_all.sort(dim=-1, descending=True, stable=True)
        probs = sorted_lp.exp()
        if 0 < params.top_k < vocab:
            probs[:, params.top_k :] = 0.0
        if params.top_p < 1.0:
            # top-p acts on the top-k-renormalised distribution (as HF and vLLM do); the mass
            # before each token decides whether it is still needed to reach top_p.
            renorm = probs / probs.sum(dim=-1, keepdim=True)
            mass_before = renorm.cumsum(dim=-1) - renorm
            probs = probs.masked_fill(mass_before >= params.top_p, 0.0)
        index = _invert_cdf(probs, uniforms)
        tokens = order.gather(-1, index[:, None]).squeeze(-1)
    else:
        tokens = _invert_cdf(logprobs_all.exp(), uniforms)
    logprobs = logprobs_all.gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs


def _invert_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index i with cdf[i-1] <= u * total < cdf[i]: a draw from the (unnormalised) `probs`."""
    cdf = probs.double().cumsum(dim=-1)
    target = (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # Rounding can put the target at the very end; fall back to the last token with mass.
    last_with_mass = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(dim=-1)
    return torch.minimum(index, last_with_mass)
