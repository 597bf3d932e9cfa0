"""Triton row kernel of the fused policy loss: one vocabulary pass does everything per token.

Given one ``[chunk, V]`` block of fp32 logits (from a cuBLAS matmul, see :mod:`.policy_loss`),
each program owns one token row (a 1-D grid over tokens) and

1. walks the row in ``BLOCK_V`` tiles with an online log-sum-exp (running max from -inf,
   columns past V masked to -inf), also accumulating ``sum p*(z - m)`` for the entropy and
   picking up the target logit;
2. computes, as scalars, the token's advantage (by index: per token, per episode or per
   sequence), ratio against ``old_logprobs`` (or on-policy), asymmetric clip, dual clip, KL to
   ``ref_logprobs`` (k1/k2/k3), entropy bonus, and multiplies by the token's aggregation weight
   ``w_i = d loss / d term_i`` (known before this pass, see ``reference.aggregation_weights``);
3. walks the row again and writes ``d loss / d logits`` into ``dlogits_ptr``
   (``g_logp * (onehot - p) - g_ent * p * (logp + H)``, times ``1/T``).

So the loss, its metrics and its gradient all come out of the same pass over the logits; no
separate PyTorch pass over tokens computes the loss. Offsets are int64.
"""

from __future__ import annotations

import triton
import triton.language as tl

KL_CODES = {"k1": 1, "k2": 2, "k3": 3}


@triton.jit
def policy_loss_rows_kernel(
    logits_ptr, dlogits_ptr, stride_logits, stride_dlogits, row_start,
    targets_ptr, weights_ptr, adv_ptr, adv_index_ptr, old_ptr, ref_ptr,
    logp_ptr, entropy_ptr, contrib_ptr, kl_ptr, low_ptr, high_ptr, dual_ptr,
    V, inv_temp, eps_low, eps_high, dual_clip, beta, entropy_coef,
    HAS_ADV_INDEX: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_DUAL: tl.constexpr,
    KL: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tok = row_start + row  # index into the per-token [N] arrays
    z_row = logits_ptr + row * stride_logits
    target = tl.load(targets_ptr + tok)

    # Pass 1: online log-sum-exp and entropy over the vocabulary.
    m = float("-inf")
    s = 0.0
    t = 0.0  # sum exp(z - m) * (z - m)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, axis=0))
        shift = tl.where(m == float("-inf"), 0.0, m - m_new)
        alpha = tl.exp(shift)
        # -inf logits (past V, or masked by a -inf bias) get zm = 0 and e = 0: e * zm is never 0 * inf.
        live = mask & (z > float("-inf"))
        zm = tl.where(live, z - m_new, 0.0)
        e = tl.where(live, tl.exp(zm), 0.0)
        t = alpha * (t + s * shift) + tl.sum(e * zm, axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
    lse = m + tl.log(s)
    entropy = tl.log(s) - t / s
    logp = tl.load(z_row + target).to(tl.float32) * inv_temp - lse

    # Per-token policy term and its derivatives w.r.t. logp and entropy (closed form of
    # reference.policy_token_terms; the kernel tests hold the two together).
    if HAS_ADV_INDEX:
        adv = tl.load(adv_ptr + tl.load(adv_index_ptr + tok)).to(tl.float32)
    else:
        adv = tl.load(adv_ptr + tok).to(tl.float32)
    if HAS_OLD:
        log_ratio = logp - tl.load(old_ptr + tok).to(tl.float32)
        inside = (log_ratio > -20.0) & (log_ratio < 20.0)  # verl's clamp: no gradient outside
        ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, -20.0), 20.0))
        d_ratio = tl.where(inside, ratio, 0.0)
    else:  # on-policy: ratio = exp(logp - logp.detach()) = 1, d ratio / d logp = 1
        ratio = tl.zeros_like(logp) + 1.0  # an fp32 tensor, like the off-policy branch's
        d_ratio = ratio
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
    # When the clipped branch wins strictly, the ratio is outside the clip range and its gradient is 0.
    term = tl.maximum(pg_unclipped, pg_clipped)
    d_term = tl.where(pg_unclipped >= pg_clipped, -adv * d_ratio, 0.0)
    tl.store(low_ptr + tok, ((ratio < 1.0 - eps_low) & (adv < 0.0)).to(tl.float32))
    tl.store(high_ptr + tok, ((ratio > 1.0 + eps_high) & (adv > 0.0)).to(tl.float32))
    if HAS_DUAL:
        pg_dual = -adv * dual_clip
        dual_active = (adv < 0.0) & (term > pg_dual)
        term = tl.where(dual_active, pg_dual, term)
        d_term = tl.where(dual_active, 0.0, d_term)
        tl.store(dual_ptr + tok, dual_active.to(tl.float32))
    if HAS_REF:
        d = tl.load(ref_ptr + tok).to(tl.float32) - logp  # ref - logp
        if KL == 1:
            kl = -d
            d_kl = 1.0
        elif KL == 2:
            kl = 0.5 * d * d
            d_kl = -d
        else:
            kl = tl.exp(d) - d - 1.0
            d_kl = 1.0 - tl.exp(d)
        tl.store(kl_ptr + tok, kl)
        term += beta * kl
        d_term += beta * d_kl
    term -= entropy_coef * entropy

    w = tl.load(weights_ptr + tok).to(tl.float32)
    active = w != 0.0  # masked tokens contribute exactly 0, even where a term overflows
    tl.store(logp_ptr + tok, logp)
    tl.store(entropy_ptr + tok, entropy)
    tl.store(contrib_ptr + tok, tl.where(active, w * term, 0.0))

    if WRITE_GRAD:
        # Pass 2: d loss / d logits for this row (zeros for masked tokens).
        g_logp = tl.where(active, w * d_term, 0.0)
        g_ent = tl.where(active, -w * entropy_coef, 0.0)
        d_row = dlogits_ptr + row * stride_dlogits
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
            mask = cols < V
            z = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
            live = mask & (z > float("-inf"))  # p = 0 there, and p * logp must be 0, not 0 * -inf
            logp_all = tl.where(live, z - lse, 0.0)
            p = tl.where(live, tl.exp(logp_all), 0.0)
            dz = g_logp * (tl.where(cols == target, 1.0, 0.0) - p) - g_ent * p * (logp_all + entropy)
            tl.store(d_row + cols, (dz * inv_temp).to(dlogits_ptr.dtype.element_ty), mask=mask)
