"""Process groups and FSDP2 sharding for the trainer.

One code path for every launch: ``torchrun`` (any number of processes and nodes) sets the usual
environment variables; ``python -m mrt_fast.train`` runs as a one-process group. On GPUs the group
maps CUDA tensors to NCCL and CPU tensors to gloo (``"cpu:gloo,cuda:nccl"``): the trainer's small
control reductions (metrics, the non-finite check, stop requests) and object collectives run on
CPU tensors, and a plain ``"nccl"`` group has no backend for them. On the CPU everything is gloo.
The model is always sharded with FSDP2 (``fully_shard``) per transformer block and once more at
the root; torch 2.13's FSDP2 runs on the CPU with gloo, so CI exercises the same sharded path as a
GPU cluster.

Why the root wrapper matters: FSDP2 only un-shards a module's parameters inside that module's
forward. The fused loss reads ``lm_head.weight`` itself instead of asking the model for logits, so
the loss must be computed *inside* the forward of the module that is sharded at the root (see
``ActorWithLoss`` in train.py); otherwise the weight would still be a shard and its gradient would
bypass the reduce-scatter.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_group_backend(device_type: str) -> str:
    """The backend string of the default group: every device type the trainer communicates on
    gets a backend (CPU control tensors included)."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def init_distributed(timeout_minutes: float = 30.0, *, backend: Optional[str] = None) -> DistEnv:
    """Join (or create) the default process group from torchrun's environment.

    Without torchrun variables this is a one-process group on an in-memory store, so single-process
    runs take the same FSDP2 code path. ``backend`` overrides :func:`process_group_backend`.
    """
    use_cuda = torch.cuda.is_available()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = backend or process_group_backend(device.type)
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timeout, device_id=device if use_cuda else None)
        else:
            if world_size != 1:
                raise RuntimeError(f"WORLD_SIZE={world_size} but no MASTER_ADDR: launch with torchrun")
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """The object of rank ``src`` on every rank (pickled; for small control data only)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def collective_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """Where a small tensor must live to be reduced over ``group`` (default: the default group).

    The CPU when the group has a CPU backend; otherwise this rank's GPU. A group created as plain
    ``"nccl"`` (by a caller that built its own) has no CPU backend, and reducing a CPU tensor
    through it fails with "No backend type associated with device type cpu".
    """
    config = dist.get_backend_config(group)  # e.g. "cpu:gloo,cuda:nccl"
    device_types = {part.split(":")[0] for part in config.split(",")}
    if "cpu" in device_types:
        return torch.device("cpu")
    return torch.device(sorted(device_types)[0])  # no index: the current device of that type


def _all_reduce(values: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    """A reduced copy of ``values`` on ``values``' device (the input is untouched)."""
    out = values.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        staged = out.to(collective_device())
        dist.all_reduce(staged, op=op)
        out.copy_(staged)
    return out


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over ranks (returns a new tensor; input untouched)."""
    return _all_reduce(values, dist.ReduceOp.SUM)


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum of a small tensor over ranks (returns a new tensor; input untouched)."""
    return _all_reduce(values, dist.ReduceOp.MAX)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks of an HF model, found through its ``_no_split_modules``.

    HF models name the classes that must stay whole on one device; those are exactly the units FSDP
    should shard one by one (one all-gather per block, freed after the block runs).
    """
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(
            f"cannot find the transformer blocks of {type(model).__name__}: it declares no "
            "_no_split_modules; pass an HF causal LM (e.g. Qwen2ForCausalLM)")
    return blocks


def shard(
    root: nn.Module,
    blocks: Iterable[nn.Module],
    *,
    param_dtype: torch.dtype,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Apply FSDP2 to every block and then to ``root`` (which owns everything left: embeddings,
    final norm, LM head). Compute runs in ``param_dtype``; master weights, optimizer state and
    gradient reduction stay in the parameters' dtype (fp32 for the trained policy).

    ``reshard_after_forward`` applies to the blocks. The root keeps FSDP2's default (no reshard
    after forward): its parameters are the first the backward needs, so resharding them would
    only all-gather embeddings and LM head (0.93 GB for Qwen2-1.5B in bf16) again at once."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # cast_forward_inputs=False: the blocks already receive hidden states in param_dtype (the root's
    # embeddings run in it), and FSDP's input cast rebuilds dataclass arguments, which would hand
    # each layer a copy of the packed-attention context instead of the shared one.
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in blocks:
        fully_shard(block, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(root, mp_policy=mp)
    return root


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """``model.dtype`` resolved: auto = bf16 on GPU (fp32 master weights), fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def full_state_dict(module: nn.Module, *, cpu: bool = False) -> dict[str, torch.Tensor]:
    """Unsharded parameters and buffers of an FSDP2 module on every rank (an all-gather).

    Used to sync the rollout engine after each update and to export HF checkpoints.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # broadcast_from_rank0 / cpu_offload(rank0-only) would leave other ranks empty; the engine on
    # every rank needs the weights, so gather everywhere.
    opts = StateDictOptions(full_state_dict=True, cpu_offload=False)
    sd = get_model_state_dict(module, options=opts)
    if cpu:
        sd = {k: v.detach().cpu() for k, v in sd.items()}
    return sd


def full_state_items(module: nn.Module, dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, unsharded tensor)`` for each entry of ``module.state_dict()``, gathered one at a time.

    Floating-point entries are cast to ``dtype`` before their all-gather, so the traffic and the
    transient memory are one tensor in that dtype at a time, never the whole fp32 state (7.1 GB
    for a 1.8B model). Every rank must consume the items in the same order (each is a collective).
    """
    from torch.distributed.tensor import DTensor

    for name, tensor in module.state_dict().items():
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        yield name, tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def max_memory_allocated_gb(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None
