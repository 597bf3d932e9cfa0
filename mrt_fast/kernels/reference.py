"""Plain PyTorch definitions of every quantity the kernels compute.

These functions are the single source of truth for the maths:

* the tests run them in fp64 on full ``[N, V]`` logits and compare the kernels against them;
* the chunked PyTorch backend calls :func:`policy_token_terms` per chunk (with autograd on the
  ``[chunk]`` vectors only, never on logits) so the CPU path and the reference cannot drift apart;
* the from-logits and from-log-probs entry points of :mod:`mrt_fast.loss` are built on them.

The Triton kernels re-derive the same formulas in closed form (they cannot call autograd); the
kernel tests hold them to these definitions.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")

# verl's ``loss_agg_mode`` names first, then TRL's ``GRPOConfig.loss_type`` names.
VERL_LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
LOSS_AGGS = VERL_LOSS_AGGS + TRL_LOSS_TYPES

# verl clamps log(ratio) to +-20 before exp "for stability" (compute_policy_loss_vanilla); we do the
# same so that a stale old_logprob cannot overflow the ratio to inf.
LOG_RATIO_CLAMP = 20.0


def linear_logits(hidden, weight, bias=None, temperature: float = 1.0) -> torch.Tensor:
    """Full ``[N, V]`` tempered logits (reference only: the kernels never build this tensor)."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return logits / temperature


def logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``targets`` and entropy of softmax(logits), per row, in (at least) fp32."""
    logits = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    # A -inf logit (a masked token) has p = 0 and adds 0 * log 0 = 0, as torch.distributions.Categorical.
    # Zeroing its log-prob (not clamping it to the dtype's minimum, whose product with an upstream
    # gradient overflows) keeps 0 * -inf out of the value and of the gradient.
    finite_logp = torch.where(logp_all > float("-inf"), logp_all, torch.zeros_like(logp_all))
    entropy = -(logp_all.exp() * finite_logp).sum(-1)
    return logp, entropy


def kl_estimate(logp: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Schulman's estimators of KL(pi || pi_ref) from one sample (http://joschu.net/blog/kl-approx.html)."""
    if estimator == "k1":
        return logp - ref_logprobs
    if estimator == "k2":
        return 0.5 * (logp - ref_logprobs).square()
    if estimator == "k3":
        d = ref_logprobs - logp
        return torch.exp(d) - d - 1.0
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def policy_token_terms(
    logp: torch.Tensor,
    entropy: torch.Tensor | None,
    advantages: torch.Tensor,
    *,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss term (before aggregation) and per-token statistics.

    ``term = max(-A*r, -A*clip(r, 1-eps_low, 1+eps_high))`` (then ``min(., -A*dual_clip)`` where
    ``A < 0`` when dual clip is on, verl's ``clip_ratio_c``) ``+ beta*KL - entropy_coef*entropy``.
    ``old_logprobs=None`` means on-policy: ``r = exp(logp - logp.detach())``, value 1, gradient of logp.
    Statistics (booleans and the KL) are detached.
    """
    if old_logprobs is None:
        log_ratio = logp - logp.detach()
    else:
        log_ratio = torch.clamp(logp - old_logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    term = torch.maximum(pg_unclipped, pg_clipped)
    # TRL's definitions of the clip metrics (grpo_trainer.py: is_low_clipped / is_high_clipped).
    stats = {
        "low": ((ratio < 1.0 - eps_low) & (advantages < 0)).detach(),
        "high": ((ratio > 1.0 + eps_high) & (advantages > 0)).detach(),
    }
    if dual_clip is not None:
        pg_dual = -advantages * dual_clip
        stats["dual"] = ((advantages < 0) & (term > pg_dual)).detach()
        term = torch.where(advantages < 0, torch.minimum(term, pg_dual), term)
    if ref_logprobs is not None:
        kl = kl_estimate(logp, ref_logprobs, kl_estimator)
        stats["kl"] = kl.detach()
        if beta != 0.0:
            term = term + beta * kl
    if entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("entropy_coef != 0 needs the per-token entropy")
        term = term - entropy_coef * entropy
    return term, stats


def aggregation_weights(
    loss_mask: torch.Tensor,
    seq_ids: torch.Tensor | None,
    loss_agg: str,
    *,
    num_seqs: int | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """``w`` with ``loss = sum_i w_i * term_i``: the aggregation as a per-token weight (fp64).

    Because every supported aggregation is linear in the per-token terms, the kernels only need
    this weight (it is also ``d loss / d term_i``) and it is known before the vocabulary pass.
    Sequences are the values of ``seq_ids`` in ``[0, num_seqs)``. Formulas, for mask ``m``,
    per-sequence mask count ``c_s``, ``S = num_seqs`` and ``S+`` = sequences with ``c_s > 0``:

    ==========================  =========================  =======================================
    loss_agg                    weight of token i in seq s source
    ==========================  =========================  =======================================
    token-mean, bnpo, dapo      m_i / max(sum m, 1)         verl agg_loss; TRL bnpo/dapo (local)
    seq-mean-token-mean         m_i / c_s / max(S+, 1)      verl agg_loss (empty sequences excluded)
    grpo                        m_i / max(c_s, 1) / S       TRL (empty sequences count in the mean)
    seq-mean-token-sum          m_i / max(S+, 1)            verl agg_loss
    seq-mean-token-sum-norm     m_i / max_len               verl agg_loss (no division by S)
    dr_grpo                     m_i / (S * max_len)         TRL
    ==========================  =========================  =======================================

    The ``max(., 1)`` guards make an all-masked batch give weight 0 (loss 0), not NaN.
    ``max_len`` defaults to the longest sequence (mask included), which is verl's
    ``loss_mask.shape[-1]`` for a padded ``[B, T]`` batch flattened with ``seq_ids = row``.
    """
    m = loss_mask.to(torch.float64)
    if loss_agg in ("token-mean", "bnpo", "dapo"):
        return m / m.sum().clamp(min=1.0)
    if seq_ids is None:
        return m / float(max_len)  # seq-mean-token-sum-norm with explicit max_len (validated by caller)
    S = int(num_seqs) if num_seqs is not None else int(seq_ids.max()) + 1 if seq_ids.numel() else 0
    counts = torch.bincount(seq_ids, weights=m)  # S enters only as a number: ids may be sparse
    if max_len is None and loss_agg in ("seq-mean-token-sum-norm", "dr_grpo"):
        max_len = int(torch.bincount(seq_ids, minlength=1).max())
    nonempty = (counts > 0).sum().clamp(min=1).to(torch.float64)
    c = counts[seq_ids]
    if loss_agg == "seq-mean-token-mean":
        return torch.where(m != 0, m / c.clamp(min=1e-30), torch.zeros_like(m)) / nonempty
    if loss_agg == "grpo":
        return m / c.clamp(min=1.0) / max(S, 1)
    if loss_agg == "seq-mean-token-sum":
        return m / nonempty
    if loss_agg == "seq-mean-token-sum-norm":
        return m / float(max(max_len, 1))
    if loss_agg == "dr_grpo":
        return m / float(max(S, 1) * max(max_len, 1))
    raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")


def weighted_sum(term: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i * term_i`` where tokens of weight 0 contribute exactly 0 (even if term is inf)."""
    weights = weights.to(term.dtype)
    return torch.where(weights != 0, weights * term, torch.zeros_like(term)).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over tokens with ``mask != 0`` (0 when there are none), fp32, detached."""
    mask = mask.to(torch.float32)
    values = values.detach().to(torch.float32)
    return torch.where(mask != 0, values * mask, torch.zeros_like(values)).sum() / mask.sum().clamp(min=1.0)
