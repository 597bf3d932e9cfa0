"""verl adapter: ``register()`` adds mrt_fast's policy loss (and optionally kernel) to verl >= 0.9.

* :func:`policy_loss` - a verl ``PolicyLossFn``, registered as ``loss_mode=mrt_fast``: the clipped
  PPO/GRPO term of ``compute_policy_loss_vanilla`` (asymmetric clip, dual clip ``clip_ratio_c``,
  rollout importance weights) aggregated exactly as verl's ``agg_loss`` for every
  ``loss_agg_mode`` (``token-mean``, ``token-sum``, ``seq-mean-token-mean``,
  ``seq-mean-token-sum``, ``seq-mean-token-sum-norm``), global-batch normalisers from
  ``config.global_batch_info`` included. As in verl, values at masked positions (NaN and inf
  too) are ignored.
* :func:`linear_cross_entropy` - verl's ``linear_cross_entropy(hidden, weight, labels,
  temperature, reduction, dist_process_group)`` returning flattened ``[N]`` log-probs and entropy
  from :func:`mrt_fast.loss.token_logprobs` (fp32 logits even under autocast). Tensor-parallel vocabularies
  (``dist_process_group`` set) and reductions other than ``"none"`` go to verl's own kernel.
  verl calls it only with ``use_fused_kernels=True`` and ``fused_kernel_options.impl_backend=triton``.

verl runs its actor in Ray worker processes: name :mod:`mrt_fast.integrations.verl_autoload` in
``actor_rollout_ref.model.external_lib`` so each worker registers on start. verl is imported by
:func:`register`, not by importing this module.
"""

from __future__ import annotations

from typing import Any

import torch

from mrt_fast._checks import _check_positive_int, _check_targets
from mrt_fast.integrations._logprobs import logprobs_like_host
from mrt_fast.integrations._patching import Library, Swaps
from mrt_fast.kernels.reference import masked_mean, policy_token_terms, weighted_sum

__all__ = ["SUPPORTED", "VERL_LOSS_AGG_MODES", "linear_cross_entropy", "policy_loss", "register",
           "unregister", "verl_aggregation_weights"]

SUPPORTED = "verl >= 0.9 (tested with 0.9.1)"
VERL_LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum",
                       "seq-mean-token-sum-norm")
_POLICY_LOSS_PARAMS = ("old_log_prob", "log_prob", "advantages", "response_mask", "loss_agg_mode", "config",
                       "rollout_is_weights")
_AGG_LOSS_PARAMS = ("loss_mat", "loss_mask", "loss_agg_mode", "dp_size", "batch_num_tokens", "global_batch_size",
                    "loss_scale_factor")
_KERNEL_PARAMS = ("ctx", "hidden", "weight", "labels", "temperature", "reduction", "dist_process_group")
_KERNEL_MODULE = "verl.utils.kernel.linear_cross_entropy"

_swaps = Swaps()
_registered: dict[str, Any] = {}  # loss name -> what it replaced in verl's registry (None: nothing)
_originals: dict[str, Any] = {}


def _config_get(config: Any, key: str, default: Any = None) -> Any:
    """``config.key`` for verl's ``ActorConfig``, ``DictConfig`` or a plain dict; None counts as unset."""
    if config is None:
        return default
    # verl's configs (ActorConfig, DictConfig) and dicts all have .get
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None else value


def _scalar(value: Any) -> float | None:
    return None if value is None else float(value)


def verl_aggregation_weights(
    response_mask: torch.Tensor, loss_agg_mode: str, *, dp_size: int = 1, batch_num_tokens: Any = None,
    global_batch_size: Any = None, loss_scale_factor: Any = None,
) -> torch.Tensor:
    """``w [B, T]`` (fp64) with ``verl agg_loss(x, mask, mode, ...) == sum(w * x)``.

    Local normalisers (token count, non-empty sequences, ``T``) apply when verl's global ones
    are None; ``dp_size`` multiplies every mode, as verl's data-parallel gradient averaging
    expects. Unlike verl, an all-masked micro-batch gives weights 0, not NaN.
    """
    m = response_mask.to(torch.float64)
    dp = float(dp_size)
    # verl refuses local normalisers under data parallelism: each rank would divide by its own count.
    if dp > 1 and loss_agg_mode == "token-mean" and batch_num_tokens is None:
        raise ValueError("loss_agg_mode='token-mean' with dp_size > 1 needs global_batch_info['batch_num_tokens']")
    if dp > 1 and loss_agg_mode.startswith("seq-mean") and global_batch_size is None:
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r} with dp_size > 1 needs global_batch_info['global_batch_size']")
    if loss_agg_mode == "token-mean":
        tokens = _scalar(batch_num_tokens) if batch_num_tokens is not None else float(m.sum().clamp(min=1.0))
        return m / tokens * dp
    if loss_agg_mode == "token-sum":
        return m * dp
    counts = m.sum(-1, keepdim=True)
    sequences = (_scalar(global_batch_size) if global_batch_size is not None
                 else float((counts > 0).sum().clamp(min=1)))
    if loss_agg_mode == "seq-mean-token-mean":
        # verl adds 1e-8 to the counts in the mask's dtype; for its bool masks that is float32, where
        # 1e-8 vanishes next to a count >= 1, so the exact count is verl's value.
        return torch.where(m != 0, m / counts.clamp(min=1.0), torch.zeros_like(m)) / sequences * dp
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        w = m / sequences * dp
        if loss_agg_mode == "seq-mean-token-sum-norm":
            _check_positive_int("config.loss_scale_factor", loss_scale_factor, "verl's constant sequence length")
            w = w / (_scalar(loss_scale_factor) if loss_scale_factor is not None else float(m.shape[-1]))
        return w
    raise ValueError(f"loss_agg_mode must be one of {VERL_LOSS_AGG_MODES}, got {loss_agg_mode!r}")


def policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl ``PolicyLossFn`` (``[B, T]`` tensors) -> ``(pg_loss, metrics)``, as ``compute_policy_loss_vanilla``.

    Reads ``clip_ratio`` (default 0.2), ``clip_ratio_low``, ``clip_ratio_high``, ``clip_ratio_c``
    (dual clip, default 3.0) and ``global_batch_info`` (``dp_size``, ``batch_num_tokens``,
    ``global_batch_size``, ``loss_scale_factor``, filled by verl's ``ppo_loss``) from ``config``.
    Metrics: ``actor/pg_clipfrac``, ``actor/pg_clipfrac_lower``, ``actor/ppo_kl`` (floats).
    """
    tensors = {"old_log_prob": old_log_prob, "log_prob": log_prob, "advantages": advantages,
               "response_mask": response_mask}
    if rollout_is_weights is not None:
        tensors["rollout_is_weights"] = rollout_is_weights
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape != getattr(log_prob, "shape", None):
            expected = tuple(log_prob.shape) if isinstance(log_prob, torch.Tensor) and log_prob.dim() == 2 else "(B, T)"
            raise ValueError(f"{name} must have shape [B, T] = {expected} (log_prob's), "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
    if loss_agg_mode not in VERL_LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {VERL_LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    clip = _config_get(config, "clip_ratio", 0.2)
    clip_c = float(_config_get(config, "clip_ratio_c", 3.0))
    if not clip_c > 1.0:
        raise ValueError(f"config.clip_ratio_c must be > 1 (dual clip), got {clip_c}")
    mask = response_mask.bool()

    def kept(t: torch.Tensor) -> torch.Tensor:
        # verl's masked sums ignore masked positions whatever they hold (NaN, inf, garbage).
        return torch.where(mask, t, torch.zeros_like(t))

    logp, old = kept(log_prob), kept(old_log_prob)
    term, stats = policy_token_terms(logp, None, kept(advantages), old_logprobs=old,
                                     eps_low=float(_config_get(config, "clip_ratio_low", clip)),
                                     eps_high=float(_config_get(config, "clip_ratio_high", clip)), dual_clip=clip_c)
    if rollout_is_weights is not None:
        term = term * kept(rollout_is_weights)
    batch_info = dict(_config_get(config, "global_batch_info", {}) or {})
    weights = verl_aggregation_weights(mask, loss_agg_mode, **batch_info)
    loss = weighted_sum(term, weights)
    log_ratio = torch.clamp(logp - old, -20.0, 20.0).detach()
    metrics = {
        # verl counts a token as clipped when the clipped branch is the larger one: TRL's low | high.
        "actor/pg_clipfrac": float(masked_mean((stats["low"] | stats["high"]).float(), mask.float())),
        "actor/ppo_kl": float(masked_mean(-log_ratio, mask.float())),
        "actor/pg_clipfrac_lower": float(masked_mean(stats["dual"].float(), mask.float())),
    }
    return loss, metrics


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
    reduction: str = "none", dist_process_group: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``linear_cross_entropy``: ``hidden [..., H]``, ``labels [...]`` -> ``(log_probs [N], entropy [N])``.

    Flattened like verl's (``N`` = ``labels.numel()``), fp32 (fp64 for fp64 inputs on the CPU).
    """
    if reduction != "none" or dist_process_group is not None:
        return _verl_kernel()(hidden, weight, labels, temperature, reduction, dist_process_group)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
        raise ValueError(f"hidden must be a tensor of shape [..., H], got {getattr(hidden, 'shape', type(hidden))}")
    if not isinstance(labels, torch.Tensor) or labels.numel() * hidden.shape[-1] != hidden.numel():
        raise ValueError(f"labels must hold one id per row of hidden {tuple(hidden.shape[:-1])}, "
                         f"got {getattr(labels, 'shape', type(labels))}")
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:  # name verl's argument, not ours
        _check_targets(labels.reshape(-1), labels.numel(), weight.shape[0], name="labels")
    return logprobs_like_host(hidden.reshape(-1, hidden.shape[-1]), weight, None, labels.reshape(-1), temperature)


def _verl_kernel():
    if "linear_cross_entropy" not in _originals:
        import importlib

        _originals["linear_cross_entropy"] = importlib.import_module(_KERNEL_MODULE).linear_cross_entropy
    return _originals["linear_cross_entropy"]


def _check_contract(kernel: bool):
    library = Library("verl", SUPPORTED, minimum=(0, 9))
    import importlib

    core_algos = importlib.import_module("verl.trainer.ppo.core_algos")
    for name in ("register_policy_loss", "get_policy_loss_fn", "POLICY_LOSS_REGISTRY"):
        library.attribute(core_algos, name)
    library.parameters(library.attribute(core_algos, "compute_policy_loss_vanilla"), _POLICY_LOSS_PARAMS,
                       "verl.trainer.ppo.core_algos.compute_policy_loss_vanilla (the PolicyLossFn contract)")
    library.parameters(library.attribute(core_algos, "agg_loss"), _AGG_LOSS_PARAMS,
                       "verl.trainer.ppo.core_algos.agg_loss")
    kernel_module = None
    if kernel:
        kernel_module = importlib.import_module(_KERNEL_MODULE)
        library.attribute(kernel_module, "linear_cross_entropy")
        library.parameters(library.attribute(kernel_module, "LinearCrossEntropy").forward, _KERNEL_PARAMS,
                           f"{_KERNEL_MODULE}.LinearCrossEntropy.forward")
    return core_algos, kernel_module


def register(name: str = "mrt_fast", *, kernel: bool = False) -> None:
    """Register :func:`policy_loss` as verl ``loss_mode=name``; with ``kernel=True`` also swap in :func:`linear_cross_entropy`.

    Idempotent. The kernel swap replaces ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy``
    and the copies already bound by loaded ``verl.*`` modules (Megatron's forward imports it by name).

    Raises:
        UnsupportedVersionError: verl is missing, older than 0.9, or a target's signature differs;
            nothing is changed then.
        ValueError: ``name`` is already a different verl loss.
    """
    core_algos, kernel_module = _check_contract(kernel)
    registry = core_algos.POLICY_LOSS_REGISTRY
    if registry.get(name) not in (None, policy_loss):
        raise ValueError(f"verl loss_mode {name!r} is already registered to {registry[name]!r}; pick another name")
    if name not in _registered:
        _registered[name] = registry.get(name)
        core_algos.register_policy_loss(name)(policy_loss)
    if kernel_module is not None and not _swaps:
        original = _verl_kernel()
        _swaps.replace(kernel_module, "linear_cross_entropy", linear_cross_entropy)
        _swaps.replace_bound_copies("verl", "linear_cross_entropy", original, linear_cross_entropy)


def unregister() -> None:
    """Remove what :func:`register` added to verl (a no-op when nothing is registered)."""
    _swaps.undo()
    if _registered:
        import importlib

        registry = importlib.import_module("verl.trainer.ppo.core_algos").POLICY_LOSS_REGISTRY
        for name, previous in _registered.items():
            registry.pop(name, None)
            if previous is not None:
                registry[name] = previous
        _registered.clear()
