"""Triton kernels of the log-prob provider: ``(hidden, weight, bias, targets) -> (logp, entropy)``.

Flash-attention style over the vocabulary: a program owns ``BLOCK_N`` tokens, walks the
vocabulary in ``BLOCK_V`` tiles, builds each ``[BLOCK_N, BLOCK_V]`` logits tile with ``tl.dot``
over ``BLOCK_H`` slices of the hidden size, and folds it into an online log-sum-exp. No
``[N, V]`` tensor exists at any time, not even per chunk.

FLOP count (chosen: 10*N*H*V for forward + backward). This layer is a *provider*: the caller's
loss after it is arbitrary, so the gradient w.r.t. the logits is unknown until backward, and
storing logits is what we must not do. Backward therefore recomputes the logits: once in a
token-block kernel that produces dh (2NHV recompute + 2NHV), once in a vocab-block kernel that
produces dW and dbias (2NHV + 2NHV); a single backward kernel would need atomics on the
``[V, H]`` weight gradient from every token block. When the loss is known up front, use the fused
policy loss (6*N*H*V), which computes the gradients eagerly in its forward.

Numerics: fp32 accumulation everywhere; the running max starts at -inf and columns past V are
-inf, so they contribute exp(-inf) = 0; offsets are int64 (N*H and V*H exceed 2**31 at real
sizes); grids are 1-D over token blocks (forward, dh) or vocab blocks (dW), so there is no
65,535 limit. fp32 operands follow ``torch.get_float32_matmul_precision()`` like torch's own
matmuls ("highest", the default: full fp32 via ``input_precision="ieee"``; "high"/"medium":
tf32, ~3e-4 relative error); bf16/fp16 operands go to tensor cores with fp32 accumulation. Under ``TRITON_INTERPRET=1`` ``UPCAST`` turns every dot
operand into fp32, because the interpreter's bf16 ``tl.dot`` returns wrong values (seen with triton 3.9).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w, inv_temp,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Tempered logits ``(h[rows] @ w[cols].T + b[cols]) / T`` as fp32, -inf in columns >= V."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H).to(tl.int64)
        k_mask = ks < H
        a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_mask[None, :], acc * inv_temp, float("-inf"))


@triton.jit
def _dlogits_tile(z, cols, col_mask, tgt, lse, ent, g_logp, g_ent, inv_temp):
    """d loss / d raw logits for one tile, from upstream grads of logp and entropy.

    With ``logp_j = z_j - lse`` and ``p_j = exp(logp_j)``:
    ``d logp_t / d z_j = [j == t] - p_j`` and ``d H / d z_j = -p_j * (logp_j + H)``;
    the raw logits are ``T * z`` so the chain rule adds a factor ``1/T``.
    """
    # Columns past V and tokens masked by a -inf logit have p = 0 and contribute nothing (not 0 * -inf).
    live = col_mask[None, :] & (z > float("-inf"))
    logp_all = tl.where(live, z - lse[:, None], 0.0)
    p = tl.where(live, tl.exp(logp_all), 0.0)
    onehot = (cols[None, :] == tgt[:, None]).to(tl.float32)
    dz = g_logp[:, None] * (onehot - p) - g_ent[:, None] * p * (logp_all + ent[:, None])
    return dz * inv_temp


@triton.jit
def logprobs_fwd_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, logp_ptr, ent_ptr, lse_ptr,
    N, V, H, stride_h, stride_w, inv_temp,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=0)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # running max
    s = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(z - m)
    t = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(z - m) * (z - m): entropy without cancellation
    z_tgt = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < V
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w, inv_temp,
                         HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PRECISION)
        z_tgt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # Rescale the running sums to the new max; on the first tile m = -inf and s = t = 0.
        shift = tl.where(m == float("-inf"), 0.0, m - m_new)
        alpha = tl.exp(shift)
        # -inf logits (past V, or masked by a -inf bias) get zm = 0 and e = 0: e * zm is never 0 * inf.
        live = col_mask[None, :] & (z > float("-inf"))
        zm = tl.where(live, z - m_new[:, None], 0.0)
        e = tl.where(live, tl.exp(zm), 0.0)
        t = alpha * (t + s * shift) + tl.sum(e * zm, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
    lse = m + tl.log(s)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(logp_ptr + rows, z_tgt - lse, mask=row_mask)
    # H = lse - E[z] = log(s) - t / s  (both relative to m, so logits of 1e4 lose nothing).
    tl.store(ent_ptr + rows, tl.log(s) - t / s, mask=row_mask)


@triton.jit
def logprobs_bwd_dh_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr, dh_ptr,
    N, V, H, stride_h, stride_w, stride_dh, inv_temp,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dh[rows] = sum over vocab tiles of dlogits_tile @ W[tile]; this program owns its rows of dh (fp32)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=0)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
    g_logp = tl.load(glogp_ptr + rows, mask=row_mask, other=0.0)
    g_ent = tl.load(gent_ptr + rows, mask=row_mask, other=0.0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < V
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w, inv_temp,
                         HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PRECISION)
        dz = _dlogits_tile(z, cols, col_mask, tgt, lse, ent, g_logp, g_ent, inv_temp)
        if not UPCAST:
            dz = dz.to(w_ptr.dtype.element_ty)  # tensor-core operand; accumulation stays fp32
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H).to(tl.int64)
            k_mask = ks < H
            w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            out = dh_ptr + rows[:, None] * stride_dh + ks[None, :]
            out_mask = row_mask[:, None] & k_mask[None, :]
            acc = tl.load(out, mask=out_mask, other=0.0)
            acc = tl.dot(dz, w, acc, input_precision=DOT_PRECISION)
            tl.store(out, acc, mask=out_mask)


@triton.jit
def logprobs_bwd_dw_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr, dw_ptr, db_ptr,
    N, V, H, stride_h, stride_w, stride_dw, inv_temp,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dW[cols] = sum over token tiles of dlogits_tile.T @ h[tile]; this program owns its rows of dW (fp32)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    col_mask = cols < V
    db = tl.zeros((BLOCK_V,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_mask = rows < N
        tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=0)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        g_logp = tl.load(glogp_ptr + rows, mask=row_mask, other=0.0)
        g_ent = tl.load(gent_ptr + rows, mask=row_mask, other=0.0)
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w, inv_temp,
                         HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PRECISION)
        # Rows past N have g = 0, so their dz is 0 and they add nothing.
        dz = _dlogits_tile(z, cols, col_mask, tgt, lse, ent, g_logp, g_ent, inv_temp)
        db += tl.sum(dz, axis=0)
        if not UPCAST:
            dz = dz.to(h_ptr.dtype.element_ty)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H).to(tl.int64)
            k_mask = ks < H
            h = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
            out = dw_ptr + cols[:, None] * stride_dw + ks[None, :]
            out_mask = col_mask[:, None] & k_mask[None, :]
            acc = tl.load(out, mask=out_mask, other=0.0)
            acc = tl.dot(tl.trans(dz), h, acc, input_precision=DOT_PRECISION)
            tl.store(out, acc, mask=out_mask)
    if HAS_BIAS:
        tl.store(db_ptr + cols, db, mask=col_mask)
