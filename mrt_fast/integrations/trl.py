"""TRL adapter: ``patch()`` routes TRL's per-token log-probs through mrt_fast's kernels.

Two targets in ``trl.trainer.utils`` (TRL >= 1.15):

* ``_ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature, chunk_size,
  final_logit_softcapping, logit_scale, outputs)``, which every trainer's fused LM head
  (``add_fused_lm_head``: GRPO, RLOO, SFT, DPO, KTO) calls and which returns
  ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``. We compute log-probs and
  entropy; logits are ``z * logit_scale / temperature``, so a positive ``logit_scale`` folds into
  the temperature. Calls that ask for anything else (``log_sum_sq_probs``, ``mean_logits``,
  ``is_top1``, Gemma's ``final_logit_softcapping``, ``logit_scale <= 0``, DeepSpeed ZeRO-3
  partitioned weights) go to TRL's own function, unchanged.
* ``selective_log_softmax(logits, index, temperature=1.0, row_mask=None)`` with ``index``
  ``[...]`` or ``[..., K]``, also replaced in the ``trl.*`` modules that imported it by name.

``call_counts`` counts the calls each path served, so a run can show the patch took effect.
TRL is imported by :func:`patch`, not by importing this module.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from mrt_fast.integrations._patching import Library, Swaps
from mrt_fast.integrations._logprobs import logprobs_like_host
from mrt_fast.loss import logprobs_from_logits

__all__ = ["ChunkedLogProbs", "SUPPORTED", "call_counts", "patch", "selective_log_softmax", "unpatch"]

SUPPORTED = "trl >= 1.15 (tested with 1.16.0)"
# TRL's optional outputs of the chunked function; we compute the first.
TRL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_CHUNKED_PARAMS = ("ctx", "hidden", "weight", "bias", "targets", "temperature", "chunk_size",
                   "final_logit_softcapping", "logit_scale", "outputs")
_SELECTIVE_PARAMS = ("logits", "index", "temperature", "row_mask")

call_counts: Counter[str] = Counter()
_swaps = Swaps()
_originals: dict[str, Any] = {}


def _trl_original(name: str) -> Any:
    """TRL's own function ``name`` of ``trl.trainer.utils`` (the saved one while patched)."""
    if name not in _originals:
        import trl.trainer.utils

        _originals[name] = getattr(trl.trainer.utils, name)
    return _originals[name]


def _hand_back_reason(weight, temperature, final_logit_softcapping, logit_scale, outputs) -> str | None:
    extra = sorted(set(outputs) - {"log_probs", "entropy"})
    if extra:
        return f"outputs {extra}"
    if final_logit_softcapping is not None:
        return "final_logit_softcapping"
    if not (isinstance(logit_scale, (int, float)) and logit_scale > 0):
        return f"logit_scale={logit_scale!r}"
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        return f"temperature={temperature!r}"
    if hasattr(weight, "ds_id"):  # ZeRO-3 partitioned: TRL gathers it again in its own backward
        return "DeepSpeed ZeRO-3 weight"
    return None


class ChunkedLogProbs:
    """Stand-in for ``trl.trainer.utils._ChunkedLogProbFunction`` (same ``apply`` and 5-tuple)."""

    @staticmethod
    def apply(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
              temperature: float, chunk_size: int, final_logit_softcapping: float | None = None,
              logit_scale: float = 1.0, outputs: tuple[str, ...] = TRL_OUTPUTS):
        if _hand_back_reason(weight, temperature, final_logit_softcapping, logit_scale, outputs):
            call_counts["chunked_log_probs/trl"] += 1
            return _trl_original("_ChunkedLogProbFunction").apply(
                hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale, outputs)
        call_counts["chunked_log_probs"] += 1
        # chunk_size is TRL's vocabulary tile; our kernels choose their own blocks.
        logp, entropy = logprobs_like_host(hidden, weight, bias, targets, float(temperature) / float(logit_scale))
        return logp, (entropy if "entropy" in outputs else None), None, None, None


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0,
                          row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """TRL's ``selective_log_softmax``: ``log_softmax(logits / temperature)`` gathered at ``index``.

    ``index`` is ``[...]`` (one id per row) or ``[..., K]`` (K ids per row); ``row_mask``, of
    ``index``'s shape, zeroes the entries where it is 0 (their ids are not read). The log-softmax
    runs in row blocks (:func:`mrt_fast.loss.logprobs_from_logits`); the K-1 further ids of a row
    reuse its normaliser: ``logp_k = logp_0 + (z_k - z_0) / temperature``. Returns fp32
    (fp64 for fp64 logits) of ``index``'s shape.
    """
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
        raise ValueError("logits must be a tensor of shape [..., V]")
    rows = tuple(logits.shape[:-1])
    if not isinstance(index, torch.Tensor) or tuple(index.shape[: len(rows)]) != rows or index.dim() - len(rows) > 1:
        got = tuple(index.shape) if isinstance(index, torch.Tensor) else type(index).__name__
        raise ValueError(f"index must have shape {rows} or {rows + ('K',)} (logits without V), got {got}")
    if row_mask is not None and tuple(row_mask.shape) != tuple(index.shape):
        raise ValueError(f"row_mask must have index's shape {tuple(index.shape)}, got {tuple(row_mask.shape)}")
    call_counts["selective_log_softmax"] += 1
    per_row = index.dim() == len(rows)
    ids = index.unsqueeze(-1) if per_row else index
    keep = None if row_mask is None else (row_mask != 0).reshape(ids.shape)
    if keep is not None:
        ids = ids.masked_fill(~keep, 0)
    if ids.shape[-1] == 0:
        return torch.zeros(index.shape, dtype=torch.float32, device=logits.device)
    logp = logprobs_from_logits(logits, ids[..., 0], temperature).unsqueeze(-1)
    if ids.shape[-1] > 1:
        z = logits.gather(-1, ids).to(logp.dtype)
        logp = logp + (z - z[..., :1]) / temperature
    if keep is not None:
        logp = logp.masked_fill(~keep, 0.0)
    return logp.squeeze(-1) if per_row else logp


def _check_contract():
    library = Library("trl", SUPPORTED, minimum=(1, 15))
    import trl.trainer.utils as utils

    chunked = library.attribute(utils, "_ChunkedLogProbFunction")
    library.parameters(chunked.forward, _CHUNKED_PARAMS, "trl.trainer.utils._ChunkedLogProbFunction.forward")
    library.parameters(library.attribute(utils, "selective_log_softmax"), _SELECTIVE_PARAMS,
                       "trl.trainer.utils.selective_log_softmax")
    library.attribute(utils, "add_fused_lm_head")  # the caller of the chunked function
    return utils


def patch(*, lm_head: bool = True, from_logits: bool = True) -> None:
    """Route TRL's log-probs through mrt_fast (process-wide, every TRL trainer; undo with :func:`unpatch`).

    Args:
        lm_head: replace ``_ChunkedLogProbFunction`` (the fused LM head every trainer uses).
        from_logits: replace ``selective_log_softmax`` (code that holds logits).

    A second call while patched changes nothing (call :func:`unpatch` first to change the selection).

    Raises:
        UnsupportedVersionError: TRL is missing, older than 1.15, or a target's signature differs;
            nothing is replaced then.
    """
    if _swaps:
        return
    utils = _check_contract()
    _originals["_ChunkedLogProbFunction"] = utils._ChunkedLogProbFunction
    _originals["selective_log_softmax"] = utils.selective_log_softmax
    if lm_head:
        _swaps.replace(utils, "_ChunkedLogProbFunction", ChunkedLogProbs)
    if from_logits:
        _swaps.replace_bound_copies("trl", "selective_log_softmax", utils.selective_log_softmax,
                                    selective_log_softmax)


def unpatch() -> None:
    """Put TRL's own functions back (a no-op when not patched)."""
    _swaps.undo()
