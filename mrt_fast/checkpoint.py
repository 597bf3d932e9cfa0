"""Sharded training checkpoints and HF exports.

Layout of a run directory::

    <run_dir>/checkpoints/step_N/          one complete checkpoint
        model+optimizer shards             torch.distributed.checkpoint (DCP) files, any world size
        trainer_state.pt                   step, scheduler, data position, world size, fingerprint
        rng_rank{R}.pt                     python / numpy / torch RNG states of rank R
    <run_dir>/checkpoints/latest           text file naming the newest complete checkpoint
    <run_dir>/hf/                          save_pretrained export (safetensors) + tokenizer

A checkpoint is written into ``step_N.incomplete`` and renamed to ``step_N`` only after every rank
has finished writing; the ``latest`` pointer is then replaced atomically (write a temp file, fsync,
``os.replace``). A crash at any point therefore leaves the previous checkpoint as the latest one,
and an ``.incomplete`` directory is never read.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from mrt_fast.distributed import barrier

LATEST = "latest"
INCOMPLETE = ".incomplete"
TRAINER_STATE = "trainer_state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run (missing, incomplete, incompatible)."""


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def model_fingerprint(model: nn.Module) -> dict[str, list[int]]:
    """Parameter names and (global) shapes: what a checkpoint must match to be loaded."""
    return {name: list(p.shape) for name, p in model.named_parameters()}


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # numpy is optional for the trainer
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def save(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    scheduler: Optional[Any] = None,
    trainer_state: Optional[dict[str, Any]] = None,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint ``step`` collectively (every rank calls this) and make it the latest.

    ``trainer_state`` holds small picklable things such as the data position; it is written by
    rank 0. Returns the final directory.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = checkpoint_root(run_dir)
    final = root / f"step_{step}"
    tmp = root / f"step_{step}{INCOMPLETE}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # debris of an earlier interrupted write of the same step
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng_rank{_rank()}.pt")
    if _rank() == 0:
        torch.save(
            {
                "step": step,
                "world_size": _world(),
                "fingerprint": model_fingerprint(model),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "trainer": trainer_state or {},
            },
            tmp / TRAINER_STATE,
        )
    barrier()  # every rank's shards are on disk before the checkpoint is declared complete
    if _rank() == 0:
        _commit(tmp, final)
        _prune(root, keep_last)
    barrier()
    return final


def _commit(tmp: Path, final: Path) -> None:
    """Rename the finished directory into place, then move the pointer (in that order)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(final.parent / LATEST, final.name + "\n")


def _step_of(path: Path) -> int:
    return int(path.name.split("_", 1)[1])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(INCOMPLETE)
            and (p / TRAINER_STATE).is_file()]
    return sorted(done, key=_step_of)


def _prune(root: Path, keep_last: int) -> None:
    done = list_checkpoints(root.parent)
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for debris in root.glob(f"step_*{INCOMPLETE}"):
        shutil.rmtree(debris, ignore_errors=True)


def latest(run_dir: Path) -> Optional[Path]:
    """The checkpoint named by the ``latest`` pointer, or None when the run has none."""
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.is_file():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    if not (path / TRAINER_STATE).is_file():
        raise CheckpointError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def resolve_resume(run_dir: Path, resume: Optional[str]) -> Optional[Path]:
    """``resume`` = None (fresh start), "auto" (latest in run_dir, if any) or a checkpoint path."""
    if resume is None:
        return None
    if resume == "auto":
        return latest(run_dir)
    path = Path(resume)
    if (path / LATEST).is_file() or (path / "checkpoints" / LATEST).is_file():
        path = latest(path.parent if path.name == "checkpoints" else path)
    if path is None or path.name.endswith(INCOMPLETE) or not (path / TRAINER_STATE).is_file():
        raise CheckpointError(
            f"resume={resume!r} is not a complete checkpoint (expected a directory with {TRAINER_STATE})")
    return path


def read_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(Path(path) / TRAINER_STATE, weights_only=False)


def check_compatible(path: Path, model: nn.Module) -> dict[str, Any]:
    """Fail before any compute when the checkpoint belongs to a different model.

    A different world size is fine for the model and optimizer (DCP reshards); only the per-rank
    RNG streams cannot be carried over, and ``load`` then says so.
    """
    state = read_trainer_state(path)
    want, have = model_fingerprint(model), state["fingerprint"]
    if want != have:
        missing = sorted(set(want) - set(have))[:5]
        extra = sorted(set(have) - set(want))[:5]
        shapes = [k for k in set(want) & set(have) if want[k] != have[k]][:5]
        raise CheckpointError(
            f"checkpoint {path} was written for a different model: missing {missing}, "
            f"unexpected {extra}, shape mismatch {shapes}")
    return state


def load(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    scheduler: Optional[Any] = None,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save` in place; returns the trainer state dict
    (``step``, ``trainer``...). Every rank calls this."""
    state = check_compatible(path, model)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    target = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(target, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    rng_file = Path(path) / f"rng_rank{_rank()}.pt"
    if state["world_size"] == _world() and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
        state["rng_restored"] = True
    else:
        state["rng_restored"] = False  # resharded resume: RNG streams restart from the seed
    return state


def export_hf(
    out_dir: Path,
    full_state: dict[str, torch.Tensor],
    hf_model: nn.Module,
    tokenizer: Optional[Any] = None,
    *,
    strip_prefix: str = "",
) -> Path:
    """Write an HF ``save_pretrained`` directory (safetensors) from a full state dict.

    ``hf_model`` supplies the config and class (any unsharded copy of the architecture, e.g. the
    rollout engine's model); its own weights are not used. Call on rank 0 only.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k[len(strip_prefix):] if k.startswith(strip_prefix) else k: v.detach().cpu().contiguous()
          for k, v in full_state.items()}
    hf_model.save_pretrained(out_dir, state_dict=sd, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    (out_dir / "mrt_fast_export.json").write_text(json.dumps({"tensors": len(sd)}) + "\n")
    return out_dir
