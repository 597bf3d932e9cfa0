"""Drop-in loss API: token log-probs and the fused clipped policy loss, never ``[N, V]`` logits.

Two layers (see docs/loss.md for TRL and verl recipes):

* :func:`token_logprobs` - ``(hidden [N, H], weight [V, H], targets [N]) -> logprobs [N]``
  (and entropy), differentiable, for codebases that build their own loss (TRL's chunked
  log-prob function, verl's ``linear_cross_entropy``).
* :func:`fused_policy_loss` / :class:`MRTPolicyLoss` - log-probs, PPO/GRPO clipped ratio
  (asymmetric eps, dual clip), advantages per token / episode / sequence, KL to a reference
  policy, entropy bonus, verl/TRL loss aggregations; one vocabulary pass, gradients computed
  eagerly (6*N*H*V FLOPs).

From-logits variants (:func:`logprobs_from_logits`, :func:`policy_loss_from_logits`) serve code
that already holds logits. TRL and verl adapters are in :mod:`mrt_fast.integrations`
(``TRLChunkedLogProbs``, ``linear_cross_entropy`` and ``verl_policy_loss`` remain importable here).

Backend per call: CUDA tensors run Triton, CPU tensors a chunked PyTorch path, and with
``TRITON_INTERPRET=1`` the Triton kernels run on the CPU. Override with
``mrt_fast.kernels.use_backend(...)`` or ``MRT_FAST_KERNEL_BACKEND``.

Input checks (:mod:`mrt_fast._checks`) raise ``ValueError`` or ``TypeError`` naming the argument.
The range and finiteness checks read values (one device sync each on CUDA, a few microseconds next
to a ~50 ms loss).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mrt_fast._checks import (
    FLOAT_DTYPES,
    _autocast,
    _is_number,
    _check_chunk_size,
    _check_finite,
    _check_float_vector,
    _check_ids,
    _check_len,
    _check_linear,
    _check_loss_mask,
    _check_not_meta,
    _check_positive_int,
    _check_same_device,
    _check_seq_ids,
    _check_targets,
    _check_temperature,
    _check_tensor,
)
from mrt_fast.kernels.backend import resolve_backend
from mrt_fast.kernels.logprobs import LogitsLogprobs, linear_logprobs
from mrt_fast.kernels.policy_loss import PolicyConfig, TokenInputs, fused_policy_loss_core
from mrt_fast.kernels.reference import (
    KL_ESTIMATORS,
    LOSS_AGGS,
    aggregation_weights,
    masked_mean,
    policy_token_terms,
    weighted_sum,
)

__all__ = [
    "KL_ESTIMATORS",
    "LOSS_AGGS",
    "MRTPolicyLoss",
    "policy_loss_from_logprobs",
    "fused_policy_loss",
    "logprobs_from_logits",
    "policy_loss_from_logits",
    "token_logprobs",
]

SEQ_AGGS = ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "grpo", "dr_grpo")


# --------------------------------------------------------------------------------------------
# Layer 1: log-prob provider
# --------------------------------------------------------------------------------------------


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    return_entropy: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of ``targets`` under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: ``[N, H]`` bf16/fp16/fp32/fp64 final hidden states (one row per predicted token).
        weight: ``[V, H]`` LM head (possibly tied to the embeddings), same dtype as ``hidden``.
        targets: ``[N]`` int64 token ids in ``[0, V)``.
        temperature: divides the logits (sampling temperature of the rollout).
        bias: optional ``[V]`` LM-head bias.
        return_entropy: also return the entropy of each row's distribution.
        chunk_size: tokens per ``[chunk, V]`` block on the PyTorch path (default: by memory budget).

    Returns:
        ``logprobs`` fp32 ``[N]`` (fp64 for fp64 inputs on the PyTorch path), or
        ``(logprobs, entropy)``. Differentiable w.r.t. hidden, weight and bias; ``[N, V]`` is never
        materialised (Triton: not even per block; PyTorch: one ``[chunk, V]`` block at a time).
    """
    _check_not_meta(hidden=hidden, weight=weight, bias=bias)
    hidden, weight, bias = _autocast(hidden, weight, bias)
    n, _, vocab = _check_linear(hidden, weight, bias)
    _check_same_device(hidden.device, targets=targets)
    targets = _check_targets(targets, n, vocab)
    temperature = _check_temperature(temperature)
    chunk_size = _check_chunk_size(chunk_size)
    logp, entropy = linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                    backend=resolve_backend(hidden.device), chunk_size=chunk_size)
    return (logp, entropy) if return_entropy else logp


def logprobs_from_logits(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, *, return_entropy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``log_softmax(logits / temperature)`` gathered at ``targets``, for callers holding logits.

    ``logits`` ``[..., V]`` with ``targets`` ``[...]`` (e.g. TRL's ``[B, T, V]`` / ``[B, T]``). Works
    in row blocks and saves no second ``[*, V]`` tensor for backward (unlike ``log_softmax``).
    Returns fp32 (fp64 for fp64 logits) of ``targets``' shape, and the entropy when asked.
    """
    rank = logits.dim() if isinstance(logits, torch.Tensor) and logits.dim() >= 1 else 1
    _check_tensor("logits", logits, ndim=rank, shape_doc="[..., V]", dtypes=FLOAT_DTYPES, dtype_doc="a floating dtype")
    want = tuple(logits.shape[:-1])
    if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != want:
        _check_tensor("targets", targets, ndim=len(want), shape_doc=f"{want} (logits without V)")
        raise ValueError(f"targets must have shape {want} (logits without V), got {tuple(targets.shape)}")
    _check_same_device(logits.device, targets=targets)
    vocab = logits.shape[-1]
    flat_targets = _check_targets(targets.reshape(-1), targets.numel(), vocab)
    temperature = _check_temperature(temperature)
    logp, entropy = LogitsLogprobs.apply(logits.reshape(-1, vocab), flat_targets, temperature, None)
    logp, entropy = logp.view(targets.shape), entropy.view(targets.shape)
    return (logp, entropy) if return_entropy else logp


# --------------------------------------------------------------------------------------------
# Layer 2: fused policy loss
# --------------------------------------------------------------------------------------------


def _policy_config(eps_low, eps_high, dual_clip, beta, kl_estimator, entropy_coef, temperature, loss_agg,
                   ref_logprobs) -> PolicyConfig:
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    for name, value in (("eps_low", eps_low), ("eps_high", eps_high), ("beta", beta), ("entropy_coef", entropy_coef)):
        if not _is_number(value) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
    if dual_clip is not None and (not _is_number(dual_clip) or not dual_clip > 1.0):
        raise ValueError(f"dual_clip must be None or a number > 1 (verl's clip_ratio_c), got {dual_clip!r}")
    if beta != 0.0 and ref_logprobs is None:
        raise ValueError("beta != 0 needs ref_logprobs [N] (log-probs of the targets under the reference policy)")
    return PolicyConfig(float(eps_low), float(eps_high), None if dual_clip is None else float(dual_clip),
                        float(beta), kl_estimator, float(entropy_coef), _check_temperature(temperature))


def _token_layout(n, device, advantages, loss_mask, seq_ids, episode_ids, loss_agg, max_len):
    """Validate the per-token tensors; return (adv, adv_index, mask, seq_ids, num_seqs).

    ``seq_ids`` come back renumbered ``0..K-1`` (``torch.unique``'s inverse) unless they index
    per-sequence advantages, so that ids such as 10**12 cost no memory; ``num_seqs`` stays
    ``max(seq_ids) + 1``, the documented S.
    """
    _check_tensor("advantages", advantages, ndim=1, shape_doc="[N], [E] or [S]", dtypes=FLOAT_DTYPES,
                  dtype_doc="a floating dtype")
    _check_same_device(device, advantages=advantages, loss_mask=loss_mask, seq_ids=seq_ids, episode_ids=episode_ids)
    _check_finite("advantages", advantages)
    seq_ids = _check_seq_ids("seq_ids", seq_ids, n)
    episode_ids = _check_seq_ids("episode_ids", episode_ids, n)
    loss_mask = _check_loss_mask(loss_mask, n, device)

    # Advantage layout: [E] by episode_ids, else [N] per token, else [S] by seq_ids.
    if episode_ids is not None:
        adv_index = episode_ids
        _check_ids("episode_ids", adv_index, advantages.shape[0], "E = len(advantages)")
    elif advantages.shape[0] == n:
        adv_index = None
    elif seq_ids is not None:
        adv_index = seq_ids
        _check_ids("seq_ids", seq_ids, advantages.shape[0], "S = len(advantages)")
    else:
        raise ValueError(
            f"advantages must have shape [N]={n} (per token), or [E] with episode_ids, or [S] with seq_ids; "
            f"got {tuple(advantages.shape)} and neither episode_ids nor seq_ids"
        )
    num_seqs = None
    if seq_ids is not None and adv_index is seq_ids:
        num_seqs = advantages.shape[0]
    elif seq_ids is not None:
        num_seqs = int(seq_ids.max()) + 1 if n else 0
        seq_ids = torch.unique(seq_ids, return_inverse=True)[1]
    if loss_agg in SEQ_AGGS and seq_ids is None and not (loss_agg == "seq-mean-token-sum-norm" and max_len is not None):
        raise ValueError(f"loss_agg={loss_agg!r} aggregates per sequence and needs seq_ids [N]")
    _check_positive_int("max_len", max_len, "Dr. GRPO's constant length")
    return advantages, adv_index, loss_mask, seq_ids, num_seqs


def _metrics(per_token: Mapping[str, torch.Tensor], mask: torch.Tensor, cfg: PolicyConfig, has_ref: bool):
    metrics = {
        "logprobs": per_token["logprobs"].detach(),
        "clip_ratio/low": masked_mean(per_token["clip_low"], mask),
        "clip_ratio/high": masked_mean(per_token["clip_high"], mask),
        "entropy": masked_mean(per_token["entropy"], mask),
    }
    metrics["clip_ratio/region"] = metrics["clip_ratio/low"] + metrics["clip_ratio/high"]
    if cfg.dual_clip is not None:
        metrics["clip_ratio/dual"] = masked_mean(per_token["clip_dual"], mask)
    if has_ref:
        metrics["kl"] = masked_mean(per_token["kl"], mask)
    return metrics


def fused_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    *,
    loss_mask: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    episode_ids: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    loss_agg: str = "token-mean",
    max_len: int | None = None,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy-gradient loss straight from hidden states and the LM head.

    Per token ``i`` (logits ``z = (h_i @ W.T + b) / temperature``, ``logp_i`` of ``targets[i]``):
    ``r = exp(logp_i - old_logprobs[i])`` (``old_logprobs=None``: on-policy, r = 1 with the
    gradient of logp); ``term = max(-A r, -A clip(r, 1-eps_low, 1+eps_high))``, then with
    ``dual_clip=c`` and ``A < 0``: ``min(term, -A c)``; ``+ beta * KL_k(logp, ref)`` and
    ``- entropy_coef * entropy``. The loss aggregates ``term`` over tokens by ``loss_agg``.

    Args:
        hidden, weight, targets, bias, temperature: as in :func:`token_logprobs`.
        advantages: ``[N]`` per token; ``[E]`` per episode with ``episode_ids [N]``; or ``[S]`` per
            sequence with ``seq_ids [N]`` (``[N]`` always means per token). Broadcast by index
            inside the kernel.
        loss_mask: ``[N]`` (bool/int/float), 0 drops a token; default all ones.
        old_logprobs, ref_logprobs: ``[N]`` log-probs of ``targets`` under the behaviour and reference policies.
        seq_ids: ``[N]`` sequence of each token in ``[0, S)``, for per-sequence aggregation/advantages.
        eps_low, eps_high: asymmetric clip range (DAPO clip-higher).
        dual_clip: verl's ``clip_ratio_c`` (> 1) or None.
        beta, kl_estimator: KL penalty weight and estimator ``k1``/``k2``/``k3``.
        entropy_coef: entropy bonus (subtracted, aggregated like the policy term).
        loss_agg: verl's ``token-mean``, ``seq-mean-token-mean``, ``seq-mean-token-sum``,
            ``seq-mean-token-sum-norm`` or TRL's ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``
            (formulas in ``mrt_fast.kernels.reference.aggregation_weights``).
        max_len: the constant length of ``seq-mean-token-sum-norm`` / ``dr_grpo`` (default: the
            longest sequence in ``seq_ids``).
        chunk_size: tokens per ``[chunk, V]`` logits block (default: by memory budget).

    Returns:
        ``(loss, metrics)``: scalar loss (0 with zero gradients when every token is masked) and
        detached metrics ``logprobs [N]``, ``clip_ratio/low``, ``clip_ratio/high``,
        ``clip_ratio/region``, ``entropy``, plus ``kl`` with ``ref_logprobs`` and
        ``clip_ratio/dual`` with ``dual_clip`` (token means over ``loss_mask``).
    """
    _check_not_meta(hidden=hidden, weight=weight, bias=bias)
    hidden, weight, bias = _autocast(hidden, weight, bias)
    n, _, vocab = _check_linear(hidden, weight, bias)
    chunk_size = _check_chunk_size(chunk_size)
    _check_same_device(hidden.device, targets=targets, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs)
    targets = _check_targets(targets, n, vocab)
    old_logprobs = _check_float_vector("old_logprobs", old_logprobs, n)
    ref_logprobs = _check_float_vector("ref_logprobs", ref_logprobs, n)
    cfg = _policy_config(eps_low, eps_high, dual_clip, beta, kl_estimator, entropy_coef, temperature, loss_agg,
                         ref_logprobs)
    advantages, adv_index, mask, seq_ids, num_seqs = _token_layout(
        n, hidden.device, advantages, loss_mask, seq_ids, episode_ids, loss_agg, max_len
    )
    backend = resolve_backend(hidden.device)
    acc = torch.float64 if hidden.dtype == torch.float64 and backend == "torch" else torch.float32
    weights = aggregation_weights(mask, seq_ids, loss_agg, num_seqs=num_seqs, max_len=max_len).to(acc)

    def vec(t):
        return None if t is None else t.to(acc).contiguous()

    inputs = TokenInputs(targets, weights.contiguous(), vec(advantages),
                         None if adv_index is None else adv_index.contiguous(), vec(old_logprobs), vec(ref_logprobs))
    loss, per_token = fused_policy_loss_core(hidden, weight, bias, inputs, cfg, backend=backend, chunk_size=chunk_size)
    return loss, _metrics(per_token, mask, cfg, ref_logprobs is not None)


def policy_loss_from_logprobs(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    entropy: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    episode_ids: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    loss_agg: str = "token-mean",
    max_len: int | None = None,
    token_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The same loss from per-token log-probs ``[N]`` (and entropy, for ``entropy_coef``).

    ``token_scale`` ``[N]`` multiplies each token's policy term (verl's rollout importance weights).
    """
    _check_tensor("logprobs", logprobs, ndim=1, shape_doc="[N]", dtypes=FLOAT_DTYPES, dtype_doc="a floating dtype")
    n = logprobs.shape[0]
    _check_finite("logprobs", logprobs)
    _check_same_device(logprobs.device, entropy=entropy, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                       token_scale=token_scale)
    old_logprobs = _check_float_vector("old_logprobs", old_logprobs, n)
    ref_logprobs = _check_float_vector("ref_logprobs", ref_logprobs, n)
    token_scale = _check_float_vector("token_scale", token_scale, n)
    if entropy is not None:
        _check_tensor("entropy", entropy, ndim=1, shape_doc="[N]", dtypes=FLOAT_DTYPES, dtype_doc="a floating dtype")
        _check_len("entropy", entropy, n)
        _check_finite("entropy", entropy)
    elif entropy_coef != 0.0:
        raise ValueError("entropy_coef != 0 needs entropy [N]")
    cfg = _policy_config(eps_low, eps_high, dual_clip, beta, kl_estimator, entropy_coef, 1.0, loss_agg, ref_logprobs)
    advantages, adv_index, mask, seq_ids, num_seqs = _token_layout(
        n, logprobs.device, advantages, loss_mask, seq_ids, episode_ids, loss_agg, max_len
    )
    dtype = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    adv = advantages if adv_index is None else advantages[adv_index]
    term, stats = policy_token_terms(
        logprobs.to(dtype), None if entropy is None else entropy.to(dtype), adv.to(dtype),
        old_logprobs=None if old_logprobs is None else old_logprobs.to(dtype),
        ref_logprobs=None if ref_logprobs is None else ref_logprobs.to(dtype),
        eps_low=cfg.eps_low, eps_high=cfg.eps_high, dual_clip=cfg.dual_clip, beta=cfg.beta,
        kl_estimator=cfg.kl_estimator, entropy_coef=cfg.entropy_coef,
    )
    if token_scale is not None:
        term = term * token_scale.to(dtype)
    weights = aggregation_weights(mask, seq_ids, loss_agg, num_seqs=num_seqs, max_len=max_len)
    loss = weighted_sum(term, weights)
    zeros = torch.zeros(n, device=logprobs.device)
    per_token = {
        "logprobs": logprobs, "entropy": zeros if entropy is None else entropy,
        "clip_low": stats["low"], "clip_high": stats["high"],
        "clip_dual": stats.get("dual", zeros), "kl": stats.get("kl", zeros),
    }
    metrics = _metrics(per_token, mask, cfg, ref_logprobs is not None)
    if entropy is None:
        del metrics["entropy"]
    return loss, metrics


def policy_loss_from_logits(
    logits: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor, *, temperature: float = 1.0, **options: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`fused_policy_loss` for callers that already hold ``logits [N, V]``.

    ``options`` are those of :func:`fused_policy_loss` (loss_mask, old_logprobs, ref_logprobs,
    seq_ids, episode_ids, eps_low, eps_high, dual_clip, beta, kl_estimator, entropy_coef,
    loss_agg, max_len). Gradients flow to ``logits``.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must have shape [N, V], got {getattr(logits, 'shape', type(logits).__name__)}")
    logp, entropy = logprobs_from_logits(logits, targets, temperature, return_entropy=True)
    return policy_loss_from_logprobs(logp, advantages, entropy=entropy, **options)


class MRTPolicyLoss(nn.Module):
    """``nn.Module`` over :func:`fused_policy_loss`; the constructor takes the configuration.

    >>> loss_fn = MRTPolicyLoss(eps_high=0.28, beta=0.04, loss_agg="seq-mean-token-mean")
    >>> loss, metrics = loss_fn(hidden, lm_head.weight, targets, advantages, seq_ids=seq_ids)
    """

    def __init__(self, *, eps_low: float = 0.2, eps_high: float = 0.2, dual_clip: float | None = None,
                 beta: float = 0.0, kl_estimator: str = "k3", entropy_coef: float = 0.0, temperature: float = 1.0,
                 loss_agg: str = "token-mean", max_len: int | None = None, chunk_size: int | None = None):
        super().__init__()
        # Validate at construction so a bad config fails before the first batch (beta=0 here:
        # ref_logprobs arrive per batch, and forward checks beta against them).
        _policy_config(eps_low, eps_high, dual_clip, 0.0, kl_estimator, entropy_coef, temperature, loss_agg, None)
        self.config = dict(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, beta=beta,
                           kl_estimator=kl_estimator, entropy_coef=entropy_coef, temperature=temperature,
                           loss_agg=loss_agg, max_len=max_len, chunk_size=chunk_size)

    def forward(self, hidden, weight, targets, advantages, *, bias=None, loss_mask=None, old_logprobs=None,
                ref_logprobs=None, seq_ids=None, episode_ids=None):
        return fused_policy_loss(hidden, weight, targets, advantages, bias=bias, loss_mask=loss_mask,
                                 old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, seq_ids=seq_ids,
                                 episode_ids=episode_ids, **self.config)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())


# Adapters for other libraries live in mrt_fast.integrations; these names stay importable from
# here, loaded on first use (the adapters import this module).
_MOVED = {
    "TRLChunkedLogProbs": ("mrt_fast.integrations.trl", "ChunkedLogProbs"),
    "linear_cross_entropy": ("mrt_fast.integrations.verl", "linear_cross_entropy"),
    "verl_policy_loss": ("mrt_fast.integrations.verl", "policy_loss"),
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        module, attr = _MOVED[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
