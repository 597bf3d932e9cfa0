"""The trainer's collectives on a process group built the way a GPU run builds it.

On GPUs a plain ``"nccl"`` group has a backend for CUDA tensors only, and the trainer reduces CPU
tensors (metrics, the non-finite check, stop requests, the plan's metrics). CI has no NCCL, so
these tests map devices to gloo the same way: ``"cuda:gloo"`` stands for a plain NCCL group (no
CPU backend: the failure every multi-GPU run hit), and the trainer's own backend string with
NCCL swapped for gloo stands for the group the trainer builds now.
"""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mrt_fast.distributed import collective_device, process_group_backend

WORLD = 2


def _join(rank: int, store_path: str, backend: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group(backend, store=store, rank=rank, world_size=WORLD)


def _cuda_only_group(rank: int, store_path: str, errors) -> None:
    """A group with a backend for CUDA only: reducing a CPU tensor through it fails."""
    _join(rank, store_path, "cuda:gloo")
    try:
        try:
            dist.all_reduce(torch.ones(1))
            errors.put((rank, "no error"))
        except RuntimeError as exc:
            errors.put((rank, str(exc)))
        errors.put((rank, f"collective device {collective_device().type}"))
    finally:
        dist.destroy_process_group()


def _trainer_group(rank: int, store_path: str, results) -> None:
    """Every CPU-tensor collective of the trainer, on the trainer's own group layout."""
    from mrt_fast.distributed import (
        all_gather_objects,
        all_reduce_max,
        all_reduce_sum,
        broadcast_object,
        full_state_dict,
        full_state_items,
        shard,
    )
    from mrt_fast.metrics import reduce_mean
    from mrt_fast.packing import PrefixGroup
    from mrt_fast.train import Plan, StopRequest, clip_and_check, gather_plan

    _join(rank, store_path, process_group_backend("cuda").replace("nccl", "gloo"))
    stop = StopRequest()
    try:
        out = {}
        out["sum"] = all_reduce_sum(torch.tensor([1.0 + rank, 10.0])).tolist()
        out["max"] = all_reduce_max(torch.tensor([float(rank)])).tolist()
        out["objects"] = all_gather_objects(("rank", rank))
        out["broadcast"] = broadcast_object(f"from {rank}")
        # Rank 1 holds a key rank 0 lacks, and weights its value by 3.
        metrics = {"a": 2.0 + rank} if rank == 0 else {"a": 4.0, "b": 7.0}
        out["mean"] = reduce_mean(metrics, {"a": 1.0 + 2 * rank, "b": 3.0})
        stop.requested = rank == 1
        out["stop"] = stop.agreed()
        model = nn.Linear(3, 2)
        model(torch.ones(1, 3) * (rank + 1)).sum().backward()
        out["grad_norm"] = float(clip_and_check(model, 1.0, {"actor/pg_loss": 0.5}))
        # Weight sync: gathered one tensor at a time in the compute dtype == the full state, cast.
        torch.manual_seed(0)
        sharded = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
        shard(sharded, [sharded[0]], param_dtype=torch.float32)
        full = {k: v.to(torch.bfloat16) for k, v in full_state_dict(sharded).items()}
        items = list(full_state_items(sharded, torch.bfloat16))
        out["sync"] = ([k for k, _ in items] == list(full)
                       and all(torch.equal(v, full[k]) and v.dtype == torch.bfloat16 for k, v in items))
        plan = Plan([PrefixGroup([1, 2], [[3 + rank]])], [[0.5 * rank]], "sequence", {"reward/mean": float(rank)})
        gathered, plan_metrics = gather_plan(plan)
        out["plan"] = ([g.continuations for g in gathered.groups], gathered.advantages, plan_metrics)
        results.put((rank, out))
    finally:
        stop.restore()
        dist.destroy_process_group()


def _run(target, tmp_path) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, str(tmp_path / "store"), queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    out: dict = {}
    while not queue.empty():
        rank, value = queue.get()
        out.setdefault(rank, []).append(value)
    return out


def test_backend_string_maps_cpu_and_cuda():
    assert process_group_backend("cuda") == "cpu:gloo,cuda:nccl"
    assert process_group_backend("cpu") == "gloo"


def test_cuda_only_group_cannot_reduce_cpu_tensors(tmp_path):
    """The failure of a plain NCCL group, reproduced; the helpers would stage on the GPU there."""
    out = _run(_cuda_only_group, tmp_path)
    for rank in range(WORLD):
        assert "No backend type associated with device type cpu" in out[rank][0]
        assert out[rank][1] == "collective device cuda"


def test_trainer_collectives_on_the_trainer_group(tmp_path):
    out = _run(_trainer_group, tmp_path)
    r0, r1 = out[0][0], out[1][0]
    for r in (r0, r1):
        assert r["sum"] == [3.0, 20.0]
        assert r["max"] == [1.0]
        assert r["objects"] == [("rank", 0), ("rank", 1)]
        assert r["broadcast"] == "from 0"
        assert r["mean"]["a"] == pytest.approx((2.0 * 1 + 4.0 * 3) / 4)
        assert r["mean"]["b"] == pytest.approx(7.0)
        assert r["stop"] is True
        assert r["sync"] is True
        assert r["plan"][0] == [[[3]], [[4]]] and r["plan"][1] == [[0.0], [0.5]]
        assert r["plan"][2] == {"reward/mean": 0.5}
    # Not FSDP here: each rank clips its own gradients, whose norms differ.
    assert r0["grad_norm"] == pytest.approx(math.sqrt(2 * 3 * 1.0 + 2))
    assert r1["grad_norm"] == pytest.approx(math.sqrt(2 * 3 * 4.0 + 2))
