"""Layer 1, the log-prob provider: ``(hidden, weight, targets) -> (logp, entropy)`` without ``[N, V]``.

Two implementations behind one autograd contract, chosen by :mod:`.backend`:

* ``ChunkedTorchLogprobs`` - PyTorch over ``[chunk, V]`` logits blocks (the CPU path). Forward
  keeps only the per-token log-sum-exp and entropy; backward recomputes each block's logits.
* ``TritonLogprobs`` - the flash-style kernels of :mod:`.logprobs_triton` (never even a block).

Both compute ``logp_t = z_t - logsumexp(z)`` and ``H = -sum_j p_j log p_j`` with
``z = (h @ W.T + b) / temperature``, in fp32, and return fp32.
"""

from __future__ import annotations

import functools
import warnings

import torch

from .chunking import chunk_rows


def block_stats(z: torch.Tensor, targets: torch.Tensor):
    """Per-row statistics of a ``[chunk, V]`` block of tempered logits.

    Returns ``(lse, logp_all, p, logp, entropy)``; ``logp_all`` and ``p`` are ``[chunk, V]``
    temporaries that :func:`dlogits_from_probs` may reuse in place.
    """
    logp_all = torch.log_softmax(z, dim=-1)
    lse = torch.logsumexp(z, dim=-1)  # (z - logp_all at any one column is NaN where that logit is -inf)
    p = logp_all.exp()
    logp = logp_all.gather(1, targets[:, None]).squeeze(1)
    entropy = -torch.linalg.vecdot(p, _finite_logp(logp_all))
    return lse, logp_all, p, logp, entropy


def _finite_logp(logp_all: torch.Tensor) -> torch.Tensor:
    """Clamp -inf log-probs (tokens masked by a -inf logit or bias) in place to the dtype's minimum.

    Their probability is 0, so every ``p * logp`` term becomes 0 (0 * log 0 = 0, as in
    ``torch.distributions.Categorical``) instead of 0 * -inf = NaN, in the entropy and its gradient.
    """
    return logp_all.clamp_(min=torch.finfo(logp_all.dtype).min)


def dlogits_from_probs(logp_all, p, entropy, targets, grad_logp, grad_entropy, inv_temp: float) -> torch.Tensor:
    """d loss / d raw logits of a block, overwriting ``logp_all``/``p`` (see ``_dlogits_tile``).

    ``d logp_t / d z_j = [j == t] - p_j``, ``d H / d z_j = -p_j (logp_j + H)``, and the raw
    logits are ``T * z``. ``grad_entropy=None`` skips the entropy term (one pass fewer).
    """
    if grad_entropy is None:
        dz = p.mul_(-grad_logp[:, None])
    else:
        dz = logp_all.add_(entropy[:, None]).mul_(p).mul_(-grad_entropy[:, None])
        dz.addcmul_(p, grad_logp[:, None], value=-1.0)
    dz.scatter_add_(1, targets[:, None], grad_logp[:, None])
    return dz.mul_(inv_temp) if inv_temp != 1.0 else dz


def dlogits_from_grads(z, lse, entropy, targets, grad_logp, grad_entropy, inv_temp: float) -> torch.Tensor:
    """Backward recomputation: d loss / d raw logits from a block's logits and saved lse (``z`` is overwritten)."""
    logp_all = z.sub_(lse[:, None])
    p = logp_all.exp()
    return dlogits_from_probs(_finite_logp(logp_all), p, entropy, targets, grad_logp, grad_entropy, inv_temp)


_warned_bf16_logits = False


def mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of 16-bit operands with an fp32 result, accumulated and stored without rounding
    to 16 bits. Where ``torch.mm(..., out_dtype=)`` is missing (older torch, some devices) the
    product is rounded to the operands' dtype first; that costs accuracy, so it warns (once)."""
    global _warned_bf16_logits
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError) as exc:  # NotImplementedError is a RuntimeError
        if not _warned_bf16_logits:
            _warned_bf16_logits = True
            warnings.warn(f"torch.mm(out_dtype=float32) is unavailable here ({type(exc).__name__}); logits are "
                          f"rounded to {a.dtype} before the fp32 softmax (about 0.1 of log-prob error at "
                          "logits of size 20). Use a torch with mm out_dtype for exact fp32 logits.",
                          RuntimeWarning, stacklevel=2)
        return (a @ b).float()


def without_autocast(method):
    """Run an autograd Function's ``forward``/``backward`` with autocast off on its tensors' device.

    The kernels choose their own precisions (fp32 logits and accumulators from 16-bit operands);
    under ``torch.autocast`` an fp32 matmul would silently be run and rounded in 16 bits again.
    """

    @functools.wraps(method)
    def wrapper(ctx, *args):
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return method(ctx, *args)

    return wrapper


def block_logits_fp32(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``h @ W.T + b`` with an fp32 (fp64 for fp64 inputs) result.

    On CUDA, bf16/fp16 operands use ``torch.mm(..., out_dtype=float32)`` so the logits are never
    rounded to 16 bits (rounding logits of size ~20 to bf16 costs ~0.1 in log-prob).
    """
    if h.dtype in (torch.float32, torch.float64):
        out = h @ weight.T
    elif h.is_cuda:
        out = mm_fp32_out(h, weight.T)
    else:
        out = h.float() @ weight.float().T
    if bias is not None:
        out += bias.to(out.dtype)
    return out


def _rows(t: torch.Tensor | None, start: int, size: int) -> torch.Tensor | None:
    return None if t is None else t[start : start + size]


class ChunkedTorchLogprobs(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, hidden, weight, bias, targets, temperature: float, chunk_size: int | None):
        N, V = hidden.shape[0], weight.shape[0]
        acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        lse = torch.empty(N, dtype=acc_dtype, device=hidden.device)
        logp = torch.empty_like(lse)
        entropy = torch.empty_like(lse)
        # logits, log-probs and probabilities of a block are alive together.
        C = chunk_rows(N, V, 3 * lse.element_size(), hidden.device, chunk_size)
        inv_temp = 1.0 / temperature
        for s in range(0, N, C):
            z = block_logits_fp32(hidden[s : s + C], weight, bias) * inv_temp
            lse[s : s + C], _, _, logp[s : s + C], entropy[s : s + C] = block_stats(z, targets[s : s + C])
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature, ctx.chunk = temperature, C
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: skip its term
        return logp, entropy.clone()  # fp32 (fp64 for fp64 inputs)

    @staticmethod
    @without_autocast
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.to(lse.dtype)
        grad_entropy = None if grad_entropy is None else grad_entropy.to(lse.dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros_like(weight, dtype=lse.dtype) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=lse.dtype, device=weight.device) if need_b else None
        inv_temp, C = 1.0 / ctx.temperature, ctx.chunk
        for s in range(0, hidden.shape[0], C):
            h = hidden[s : s + C]
            z = block_logits_fp32(h, weight, bias) * inv_temp
            dz = dlogits_from_grads(z, lse[s : s + C], entropy[s : s + C], targets[s : s + C],
                                    grad_logp[s : s + C], _rows(grad_entropy, s, C), inv_temp)
            if need_h:
                dh[s : s + C] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                dw.addmm_(dz.T, h.to(dz.dtype))
            if need_b:
                db += dz.sum(0)
        dw = dw.to(weight.dtype) if need_w else None
        db = db.to(bias.dtype) if need_b else None
        return dh, dw, db, None, None, None


def triton_block_sizes(device: torch.device, dtype: torch.dtype) -> tuple[int, int, int, bool, str]:
    """(BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PRECISION) for the log-prob kernels."""
    from .backend import interpreter_block_sizes, triton_interpreting

    # fp32 dots follow torch's global knob, so this kernel is as exact as torch's matmuls are;
    # for 16-bit operands the setting has no effect and stays at Triton's default.
    full_fp32 = dtype in (torch.float32, torch.float64) and torch.get_float32_matmul_precision() == "highest"
    precision = "ieee" if full_fp32 else "tf32"
    if triton_interpreting():
        return (*interpreter_block_sizes(), True, precision)
    # GPU: 64x128 logits tile, 64-wide K slices; fp64 operands are cast to fp32 (fp32 accumulation anyway).
    return 64, 128, 64, dtype == torch.float64, precision


class TritonLogprobs(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, hidden, weight, bias, targets, temperature: float, chunk_size: int | None):
        from .logprobs_triton import logprobs_fwd_kernel

        hidden, weight = hidden.contiguous(), weight.contiguous()
        N, H = hidden.shape
        V = weight.shape[0]
        BN, BV, BH, upcast, precision = triton_block_sizes(hidden.device, hidden.dtype)
        logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
        entropy, lse = torch.empty_like(logp), torch.empty_like(logp)
        grid = (triton_cdiv(N, BN),)
        logprobs_fwd_kernel[grid](
            hidden, weight, bias if bias is not None else weight, targets, logp, entropy, lse,
            N, V, H, hidden.stride(0), weight.stride(0), 1.0 / temperature,
            HAS_BIAS=bias is not None, BLOCK_N=BN, BLOCK_V=BV, BLOCK_H=BH, UPCAST=upcast,
            DOT_PRECISION=precision,
        )
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature = temperature
        return logp, entropy.clone()

    @staticmethod
    @without_autocast
    def backward(ctx, grad_logp, grad_entropy):
        from .logprobs_triton import logprobs_bwd_dh_kernel, logprobs_bwd_dw_kernel

        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        N, H = hidden.shape
        V = weight.shape[0]
        zeros = torch.zeros_like(lse)
        grad_logp = zeros if grad_logp is None else grad_logp.float().contiguous()
        grad_entropy = zeros if grad_entropy is None else grad_entropy.float().contiguous()
        BN, BV, BH, upcast, precision = triton_block_sizes(hidden.device, hidden.dtype)
        common = dict(HAS_BIAS=bias is not None, BLOCK_N=BN, BLOCK_V=BV, BLOCK_H=BH, UPCAST=upcast,
                      DOT_PRECISION=precision)
        b = bias if bias is not None else weight
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = dw = db = None
        if need_h:
            dh = torch.zeros(N, H, dtype=torch.float32, device=hidden.device)
            logprobs_bwd_dh_kernel[(triton_cdiv(N, BN),)](
                hidden, weight, b, targets, lse, entropy, grad_logp, grad_entropy, dh,
                N, V, H, hidden.stride(0), weight.stride(0), dh.stride(0), 1.0 / ctx.temperature, **common,
            )
            dh = dh.to(hidden.dtype)
        if need_w or need_b:
            dw = torch.zeros(V, H, dtype=torch.float32, device=weight.device)
            db = torch.zeros(V, dtype=torch.float32, device=weight.device)
            logprobs_bwd_dw_kernel[(triton_cdiv(V, BV),)](
                hidden, weight, b, targets, lse, entropy, grad_logp, grad_entropy, dw, db,
                N, V, H, hidden.stride(0), weight.stride(0), dw.stride(0), 1.0 / ctx.temperature, **common,
            )
            dw = dw.to(weight.dtype) if need_w else None
            db = db.to(bias.dtype) if need_b else None
        return dh, dw, db, None, None, None


def triton_cdiv(a: int, b: int) -> int:
    return max(1, -(-a // b))


def linear_logprobs(hidden, weight, targets, *, bias=None, temperature: float = 1.0,
                    backend: str = "torch", chunk_size: int | None = None):
    """(logp fp32 [N], entropy fp32 [N]) on the given concrete backend; inputs already validated."""
    fn = TritonLogprobs if backend == "triton" else ChunkedTorchLogprobs
    return fn.apply(hidden, weight, bias, targets, float(temperature), chunk_size)


class LogitsLogprobs(torch.autograd.Function):
    """(logp, entropy) from logits a caller already holds, ``[R, V]``, in row chunks.

    Saves only the caller's logits and two ``[R]`` vectors (``torch.log_softmax`` would save a
    second ``[R, V]`` tensor, in fp32 for 16-bit logits); backward writes the logits gradient
    block by block in the logits' dtype.
    """

    @staticmethod
    @without_autocast
    def forward(ctx, logits, targets, temperature: float, chunk_size: int | None):
        R, V = logits.shape
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        lse = torch.empty(R, dtype=acc, device=logits.device)
        logp, entropy = torch.empty_like(lse), torch.empty_like(lse)
        C = chunk_rows(R, V, 3 * lse.element_size(), logits.device, chunk_size)
        inv_temp = 1.0 / temperature
        for s in range(0, R, C):
            z = logits[s : s + C].to(acc) * inv_temp
            lse[s : s + C], _, _, logp[s : s + C], entropy[s : s + C] = block_stats(z, targets[s : s + C])
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.temperature, ctx.chunk = temperature, C
        ctx.set_materialize_grads(False)
        return logp, entropy.clone()

    @staticmethod
    @without_autocast
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, lse, entropy = ctx.saved_tensors
        grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.to(lse.dtype)
        grad_entropy = None if grad_entropy is None else grad_entropy.to(lse.dtype)
        grad = torch.empty_like(logits)
        inv_temp, C = 1.0 / ctx.temperature, ctx.chunk
        for s in range(0, logits.shape[0], C):
            z = logits[s : s + C].to(lse.dtype) * inv_temp
            grad[s : s + C] = dlogits_from_grads(z, lse[s : s + C], entropy[s : s + C], targets[s : s + C],
                                                 grad_logp[s : s + C], _rows(grad_entropy, s, C), inv_temp)
        return grad, None, None, None
