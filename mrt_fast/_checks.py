"""Input checks of the loss API: each raises a ``ValueError`` (wrong value or shape) or a
``TypeError`` (wrong kind of object) that names the argument and says what was expected.

The range and finiteness checks read values: one device sync each on CUDA, a few microseconds
next to a loss pass over the vocabulary.
"""

from __future__ import annotations

import math
from typing import Any

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
INT_DTYPES = (torch.int32, torch.int64)
# Below this a temperature overflows tempered logits (|z| / T > 3e38 in fp32 for |z| ~ 1e3 at
# T ~ 1e-35) or leaves only the argmax; 1e-5 is vLLM's cut-off for "greedy" as well.
MIN_TEMPERATURE = 1e-5


def _is_number(value: Any) -> bool:
    """A real number that is not a bool (True would read as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_tensor(name: str, t: Any, *, ndim: int, shape_doc: str, dtypes=None, dtype_doc: str = "") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(t).__name__}"
                        + (" (convert it with torch.tensor)" if isinstance(t, (list, tuple)) else ""))
    if t.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (shapes only, no values): materialise it "
                         "(e.g. model.to_empty(device=...) and load the weights) before computing a loss")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_doc}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype {dtype_doc}, got {t.dtype}")
    return t


def _check_same_device(device: torch.device, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device != device:
            raise ValueError(f"{name} is on {t.device} but hidden/logits are on {device}; all inputs must share a device")


def _check_len(name: str, t: torch.Tensor | None, n: int, what: str = "N") -> None:
    if t is not None and t.shape[0] != n:
        raise ValueError(f"{name} must have shape [{what}] with {what}={n}, got {tuple(t.shape)}")


def _check_finite(name: str, t: torch.Tensor | None) -> None:
    if t is not None and t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")


def _check_ids(name: str, ids: torch.Tensor, upper: int, upper_doc: str) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= upper):
        raise ValueError(
            f"{name} must lie in [0, {upper_doc}) = [0, {upper}), got values in [{int(ids.min())}, {int(ids.max())}]"
        )


def _check_float_vector(name: str, t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if t is None:
        return None
    _check_tensor(name, t, ndim=1, shape_doc="[N]", dtypes=FLOAT_DTYPES, dtype_doc="a floating dtype")
    _check_len(name, t, n)
    _check_finite(name, t)
    return t


def _check_targets(targets: torch.Tensor, n: int, vocab: int, name: str = "targets") -> torch.Tensor:
    _check_tensor(name, targets, ndim=1, shape_doc="[N]", dtypes=INT_DTYPES, dtype_doc="int64 (or int32)")
    _check_len(name, targets, n)
    _check_ids(name, targets, vocab, "V")
    return targets.long().contiguous()


def _check_linear(hidden, weight, bias) -> tuple[int, int, int]:
    _check_tensor("hidden", hidden, ndim=2, shape_doc="[N, H]", dtypes=FLOAT_DTYPES, dtype_doc="bf16/fp16/fp32/fp64")
    _check_tensor("weight", weight, ndim=2, shape_doc="[V, H]", dtypes=FLOAT_DTYPES, dtype_doc="bf16/fp16/fp32/fp64")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must have shape [V, H] with H={hidden.shape[1]} (hidden's H), got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    if bias is not None:
        _check_tensor("bias", bias, ndim=1, shape_doc="[V]", dtypes=(hidden.dtype,), dtype_doc=str(hidden.dtype))
        _check_len("bias", bias, weight.shape[0], "V")
    _check_same_device(hidden.device, weight=weight, bias=bias)
    # A NaN hidden state poisons every log-prob of its row; one pass over [N, H], no [N, V].
    _check_finite("hidden", hidden)
    return hidden.shape[0], hidden.shape[1], weight.shape[0]


def _check_not_meta(**tensors: Any) -> None:
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device.type == "meta":
            _check_tensor(name, t, ndim=t.dim(), shape_doc="")


def _check_temperature(temperature: Any) -> float:
    if not _is_number(temperature):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__} ({temperature!r})")
    if not math.isfinite(temperature) or temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be a finite number >= {MIN_TEMPERATURE} (smaller values overflow the "
                         f"tempered logits), got {temperature!r}")
    return float(temperature)


def _check_chunk_size(chunk_size: Any) -> int | None:
    if chunk_size is None:
        return None
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool):
        raise TypeError(f"chunk_size must be a positive int (tokens per logits block) or None, "
                        f"got {type(chunk_size).__name__} ({chunk_size!r})")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


def _check_loss_mask(loss_mask: Any, n: int, device: torch.device) -> torch.Tensor:
    """``[N]`` of 0/1 (bool, integer or floating); None means every token counts."""
    if loss_mask is None:
        return torch.ones(n, device=device)
    _check_tensor("loss_mask", loss_mask, ndim=1, shape_doc="[N]")
    _check_len("loss_mask", loss_mask, n)
    if loss_mask.dtype.is_complex:
        raise ValueError(f"loss_mask must be bool, integer or floating, got {loss_mask.dtype}")
    if loss_mask.dtype != torch.bool and loss_mask.numel() and not bool(((loss_mask == 0) | (loss_mask == 1)).all()):
        bad = loss_mask[(loss_mask != 0) & (loss_mask != 1)]
        raise ValueError(f"loss_mask must hold only 0 and 1 (bool or 0/1 numbers), got {bad[:5].tolist()}")
    return loss_mask


def _check_seq_ids(name: str, ids: Any, n: int) -> torch.Tensor | None:
    if ids is None:
        return None
    _check_tensor(name, ids, ndim=1, shape_doc="[N]", dtypes=INT_DTYPES, dtype_doc="int64 (or int32)")
    _check_len(name, ids, n)
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"{name} must be >= 0, got a minimum of {int(ids.min())}")
    return ids.long()


def _check_positive_int(name: str, value: Any, doc: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int ({doc}), got {value!r}")
    return value


def _autocast(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Under ``torch.autocast`` cast hidden/weight/bias to the autocast dtype, as ``nn.Linear`` would.

    (fp32 master weights with bf16 activations is the usual mixed-precision set-up; the cast is
    differentiable, so gradients still reach the fp32 weight.)
    """
    first = tensors[0]
    if not isinstance(first, torch.Tensor) or not torch.is_autocast_enabled(first.device.type):
        return list(tensors)
    dtype = torch.get_autocast_dtype(first.device.type)
    return [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors]
