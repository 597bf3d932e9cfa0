"""Layer 2, the fused policy loss: hidden states + LM head -> scalar loss, metrics, gradients.

Algorithm (chosen: 6*N*H*V FLOPs for forward + backward). The loss is a final scalar, so
``d loss / d logits`` is fully known as soon as a token's logits have been seen. We therefore
compute the gradients eagerly in the forward, one ``[chunk, V]`` block of tokens at a time:

    logits = h_c @ W.T (+ b)                   2*C*H*V   (cuBLAS, fp32 output)
    one row pass: lse, logp, entropy, ratio/clip/dual-clip, KL, entropy bonus, weight,
                  and dlogits written out    (Triton row kernel, or PyTorch on the CPU path)
    dh_c = dlogits @ W                         2*C*H*V
    dW  += dlogits.T @ h_c ;  db += sum(dlogits)   2*C*H*V

and backward only scales the stored ``dh``, ``dW``, ``db`` by the incoming scalar gradient. The
8*N*H*V alternative (store nothing, recompute logits in backward) buys nothing here: the
upstream gradient of a scalar loss is a single number. On an H100 the three matmuls are the
floor (6NHV at ~800 TFLOP/s is ~33 ms at N=8192, H=4096, V=131072); the row pass is memory
bound and small next to them, so the three big GEMMs are left to cuBLAS rather than re-written
as one Triton kernel whose dW needs atomics across token blocks.

Memory: never ``[N, V]``; at most one fp32 logits block plus one block of dlogits in the operand
dtype, sized by :func:`.chunking.chunk_rows`. ``dW`` accumulates in the weight's dtype, like
Liger-Kernel: an fp32 ``[V, H]`` buffer alone would be 2 GB at V=131072, H=4096 and break the
1 GB extra-memory budget; each chunk's addmm accumulates in fp32 inside cuBLAS and rounds once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import reference
from .chunking import chunk_rows
from .logprobs import block_logits_fp32, block_stats, dlogits_from_probs, without_autocast


@dataclass(frozen=True)
class PolicyConfig:
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None
    beta: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    temperature: float = 1.0


@dataclass
class TokenInputs:
    """Validated per-token inputs, all of length N except ``advantages`` (N, E or S)."""

    targets: torch.Tensor  # int64 [N]
    weights: torch.Tensor  # aggregation weight w_i (fp32, fp64 for fp64 inputs) [N]
    advantages: torch.Tensor  # [N] or [E] or [S]
    adv_index: torch.Tensor | None  # int64 [N] into advantages, None when per token
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None


@dataclass
class TokenOutputs:
    """Per-token results of the row pass (detached)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor
    contrib: torch.Tensor  # w_i * term_i; the loss is their sum
    kl: torch.Tensor
    clip_low: torch.Tensor
    clip_high: torch.Tensor
    clip_dual: torch.Tensor

    @classmethod
    def empty(cls, n: int, dtype: torch.dtype, device: torch.device) -> "TokenOutputs":
        return cls(*(torch.zeros(n, dtype=dtype, device=device) for _ in range(7)))


def torch_rows(logits, sl: slice, inp: TokenInputs, out: TokenOutputs, cfg: PolicyConfig, write_grad: bool):
    """PyTorch version of the row pass (the CPU path); same outputs as the Triton kernel.

    Returns the block's dlogits (a reused temporary of the logits' dtype), or None.

    The per-token term comes from ``reference.policy_token_terms`` with autograd on the
    ``[chunk]`` vectors only, so the CPU path shares its maths with the reference.
    """
    inv_temp = 1.0 / cfg.temperature
    targets = inp.targets[sl]
    _, logp_all, p, logp, entropy = block_stats(logits * inv_temp if inv_temp != 1.0 else logits, targets)
    adv = inp.advantages[inp.adv_index[sl]] if inp.adv_index is not None else inp.advantages[sl]
    w = inp.weights[sl].to(logp.dtype)
    old = inp.old_logprobs[sl] if inp.old_logprobs is not None else None
    ref = inp.ref_logprobs[sl] if inp.ref_logprobs is not None else None
    with torch.enable_grad():
        lp = logp.detach().requires_grad_()
        ent = entropy.detach().requires_grad_()
        term, stats = reference.policy_token_terms(
            lp, ent, adv.to(logp.dtype), old_logprobs=None if old is None else old.to(logp.dtype),
            ref_logprobs=None if ref is None else ref.to(logp.dtype), eps_low=cfg.eps_low, eps_high=cfg.eps_high,
            dual_clip=cfg.dual_clip, beta=cfg.beta, kl_estimator=cfg.kl_estimator, entropy_coef=cfg.entropy_coef,
        )
        active = w != 0
        contrib = torch.where(active, w * term, torch.zeros_like(term))
        if write_grad:
            g_logp, g_ent = torch.autograd.grad(contrib.sum(), (lp, ent), allow_unused=True)
    out.logprobs[sl] = logp.to(out.logprobs.dtype)
    out.entropy[sl] = entropy.to(out.entropy.dtype)
    out.contrib[sl] = contrib.detach().to(out.contrib.dtype)
    out.clip_low[sl] = stats["low"].to(out.clip_low.dtype)
    out.clip_high[sl] = stats["high"].to(out.clip_high.dtype)
    if "dual" in stats:
        out.clip_dual[sl] = stats["dual"].to(out.clip_dual.dtype)
    if "kl" in stats:
        out.kl[sl] = stats["kl"].to(out.kl.dtype)
    if not write_grad:
        return None
    zero = torch.zeros_like(logp)
    g_logp = zero if g_logp is None else torch.where(active, g_logp, zero)
    g_ent = None if g_ent is None else torch.where(active, g_ent, zero)
    return dlogits_from_probs(logp_all, p, entropy, targets, g_logp, g_ent, inv_temp)


def _row_block_v() -> int:
    from .backend import interpreter_block_sizes, triton_interpreting

    if triton_interpreting():
        return interpreter_block_sizes()[1]
    return 2048  # a 128-thread x 16-element vector per tile: wide loads on a memory-bound pass


def triton_rows(logits, sl: slice, inp: TokenInputs, out: TokenOutputs, cfg: PolicyConfig, write_grad: bool,
                grad_dtype: torch.dtype | None = None):
    """Launch the Triton row kernel over the rows of one block (grid = rows, 1-D); returns dlogits or None.

    When ``grad_dtype`` is the logits' dtype (fp32 operands) the kernel overwrites the logits in
    place (each row is read before it is written, by one program). For 16-bit operands it writes a
    separate block in that dtype, which feeds the tensor-core matmuls directly.
    """
    from .policy_loss_triton import KL_CODES, policy_loss_rows_kernel

    rows, V = logits.shape
    dlogits = None
    if write_grad:
        same = grad_dtype in (None, logits.dtype)
        dlogits = logits if same else torch.empty(logits.shape, dtype=grad_dtype, device=logits.device)
    dummy = out.logprobs  # stands in for absent optional pointers (never dereferenced)
    policy_loss_rows_kernel[(rows,)](
        logits, dlogits if dlogits is not None else logits, logits.stride(0),
        (dlogits if dlogits is not None else logits).stride(0), sl.start,
        inp.targets, inp.weights, inp.advantages,
        inp.adv_index if inp.adv_index is not None else inp.targets,
        inp.old_logprobs if inp.old_logprobs is not None else dummy,
        inp.ref_logprobs if inp.ref_logprobs is not None else dummy,
        out.logprobs, out.entropy, out.contrib, out.kl, out.clip_low, out.clip_high, out.clip_dual,
        V, 1.0 / cfg.temperature, cfg.eps_low, cfg.eps_high, float(cfg.dual_clip or 0.0), cfg.beta, cfg.entropy_coef,
        HAS_ADV_INDEX=inp.adv_index is not None, HAS_OLD=inp.old_logprobs is not None,
        HAS_REF=inp.ref_logprobs is not None, HAS_DUAL=cfg.dual_clip is not None,
        KL=KL_CODES[cfg.kl_estimator], WRITE_GRAD=dlogits is not None, BLOCK_V=_row_block_v(),
    )
    return dlogits


class FusedPolicyLossFunction(torch.autograd.Function):
    """Forward computes loss, per-token outputs and (eagerly) dh, dW, db; backward scales them."""

    @staticmethod
    @without_autocast
    def forward(ctx, hidden, weight, bias, inp: TokenInputs, cfg: PolicyConfig, backend: str, chunk_size,
                grad_enabled: bool):
        # needs_input_grad stays True under torch.no_grad(); the caller's grad mode says whether
        # anyone will call backward, and without it the forward skips 4 of its 6 N*H*V FLOPs.
        need_h, need_w, need_b = (grad_enabled and need for need in ctx.needs_input_grad[:3])
        need_grad = need_h or need_w or need_b
        N, V = hidden.shape[0], weight.shape[0]
        # The Triton kernels accumulate in fp32 whatever the input; the PyTorch path keeps fp64 inputs in fp64.
        acc = torch.float64 if hidden.dtype == torch.float64 and backend == "torch" else torch.float32
        out = TokenOutputs.empty(N, acc, hidden.device)
        dh = torch.empty_like(hidden) if need_h else None
        dw = db = None  # the first block assigns them (no zero-fill pass over [V, H])
        # Held at once per logit: the fp32 (fp64) block, plus a dlogits block for 16-bit operands.
        logits_bytes = 8 if hidden.dtype == torch.float64 else 4
        dlogits_bytes = hidden.element_size() if hidden.element_size() < logits_bytes else 0
        C = chunk_rows(N, V, logits_bytes + dlogits_bytes, hidden.device, chunk_size)
        for s in range(0, N, C):
            sl = slice(s, min(s + C, N))
            h = hidden[sl]
            logits = block_logits_fp32(h, weight, bias)
            if backend == "triton":
                dlogits = triton_rows(logits, sl, inp, out, cfg, need_grad, grad_dtype=hidden.dtype)
            else:
                dlogits = torch_rows(logits, sl, inp, out, cfg, need_grad)
            if dlogits is None:
                continue
            dlogits = dlogits.to(weight.dtype)  # no-op except for 16-bit inputs on the PyTorch path
            if need_h:
                dh[sl] = dlogits @ weight
            if need_w:
                dw = dlogits.T @ h if dw is None else dw.addmm_(dlogits.T, h)
            if need_b:
                db = dlogits.sum(0, dtype=acc) if db is None else db.add_(dlogits.sum(0, dtype=acc))
        ctx.save_for_backward(dh, dw, db)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        loss = out.contrib.sum()
        per_token = (out.logprobs, out.entropy, out.kl, out.clip_low, out.clip_high, out.clip_dual)
        ctx.mark_non_differentiable(*per_token)
        return (loss, *per_token)

    @staticmethod
    @without_autocast
    def backward(ctx, grad_loss, *_unused):
        dh, dw, db = ctx.saved_tensors
        # A Python scalar multiplies in fp32 and rounds once, to the gradient's dtype; a 0-dim
        # tensor cast to bf16 would first round the scale itself (up to 0.4% off, e.g. a 1/3
        # micro-batch weight), the same systematic error on every element. One host sync.
        scale = float(grad_loss)

        def scaled(g):
            if g is None:
                return None
            return g if scale == 1.0 else g * scale

        db = scaled(db)
        return scaled(dh), scaled(dw), None if db is None else db.to(ctx.bias_dtype), None, None, None, None, None


def fused_policy_loss_core(hidden, weight, bias, inp: TokenInputs, cfg: PolicyConfig, *, backend: str,
                           chunk_size: int | None = None):
    """``(loss, per-token dict)`` on a concrete backend; inputs already validated by mrt_fast.loss.

    The dict holds detached ``[N]`` tensors: logprobs, entropy, kl, clip_low, clip_high, clip_dual.
    """
    loss, *per_token = FusedPolicyLossFunction.apply(hidden, weight, bias, inp, cfg, backend, chunk_size,
                                                     torch.is_grad_enabled())
    return loss, dict(zip(("logprobs", "entropy", "kl", "clip_low", "clip_high", "clip_dual"), per_token))
