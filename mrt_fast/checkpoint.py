"""Sharded training checkpoints and HF exports.

Layout of a run directory::

    <run_dir>/checkpoints/step_N/          one complete checkpoint
        model+optimizer shards             torch.distributed.checkpoint (DCP) files, any world size
        trainer_state.pt                   step, scheduler, data position, world size, fingerprint
        rng_rank{R}.pt                     python / numpy / torch RNG states of rank R
        manifest.json                      size and sha256 of every file above
    <run_dir>/checkpoints/latest           text file naming the newest complete checkpoint
    <run_dir>/hf/                          save_pretrained export (safetensors) + tokenizer

Writing: the weights are checked to be finite first (a non-finite model is never saved). Every
rank writes into ``step_N.incomplete``; rank 0 adds the manifest, renames the directory to
``step_N`` and then replaces the ``latest`` pointer atomically (temp file, fsync, ``os.replace``).
Re-saving an existing step first moves the old copy aside to ``step_N.previous`` and deletes it
only after the pointer names the new copy, so a kill at any moment leaves one complete copy. A
failed write (a full disk, say) removes its ``.incomplete`` directory and says what happened.

Reading: ``--resume auto`` takes the checkpoint the pointer names, or the newest complete one when
the pointer is missing or names nothing usable (and says so). Every file is checked against the
manifest; a damaged checkpoint is skipped, with a message, in favour of the previous complete one.
An ``.incomplete`` directory is never read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from mrt_fast.distributed import all_reduce_max, barrier, broadcast_object

LATEST = "latest"
INCOMPLETE = ".incomplete"
PREVIOUS = ".previous"  # an older copy of a step being re-saved, until the pointer moves
TRAINER_STATE = "trainer_state.pt"
MANIFEST = "manifest.json"
_HASH_BLOCK = 8 * 2**20
# DCP reports a failed write or read as CheckpointException, a BaseException.
_FAILURES = (Exception, CheckpointException)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run (missing, incomplete, damaged, incompatible),
    or one that could not be written."""


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _say(message: str) -> None:
    """Messages about checkpoint choices go to stderr, once (rank 0)."""
    if _rank() == 0:
        print(f"[mrt_fast.checkpoint] {message}", file=sys.stderr, flush=True)


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


# --------------------------------------------------------------------------------------------
# Integrity: finite weights before a save, a sha256 manifest after it
# --------------------------------------------------------------------------------------------


def non_finite_weights(model: nn.Module) -> dict[str, int]:
    """Parameters holding NaN/inf and how many such values (this rank's shards; not collective)."""
    bad = {}
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        count = int((~torch.isfinite(local.detach())).sum()) if local.is_floating_point() else 0
        if count:
            bad[name] = count
    return bad


def _block_digest(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(_HASH_BLOCK)).digest()


def _digests(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Size and digest of each file: sha256 over the sha256 of its 8 MiB blocks, hashed in parallel
    threads (hashlib releases the GIL), so one large shard does not take one core's time."""
    sizes = {n: (directory / n).stat().st_size for n in names}
    tasks = [(n, off) for n in names for off in range(0, max(sizes[n], 1), _HASH_BLOCK)]
    with ThreadPoolExecutor(max_workers=max(1, min(16, os.cpu_count() or 1, len(tasks)))) as pool:
        blocks = list(pool.map(lambda task: _block_digest(directory / task[0], task[1]), tasks))
    per_file: dict[str, list[bytes]] = {n: [] for n in names}
    for (n, _), digest in zip(tasks, blocks):
        per_file[n].append(digest)
    return {n: {"size": sizes[n], "sha256": hashlib.sha256(b"".join(per_file[n])).hexdigest()} for n in names}


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path) -> None:
    """Record the size and digest of every file of a checkpoint."""
    names = _files(directory)
    text = json.dumps({"files": _digests(directory, names), "hash": "sha256 of 8 MiB block sha256s"}, indent=1)
    with open(directory / MANIFEST, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())


def verify(path: Path) -> list[str]:
    """What is wrong with checkpoint ``path`` (empty: intact). Checkpoints written before manifests
    existed are only checked for their trainer state."""
    path = Path(path)
    if not (path / TRAINER_STATE).is_file():
        return [f"{TRAINER_STATE} is missing"]
    manifest = path / MANIFEST
    if not manifest.is_file():
        return []
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        return [f"{MANIFEST} is unreadable ({exc})"]
    names = sorted(files)
    present = [n for n in names if (path / n).is_file()]
    problems = [f"{n} is missing" for n in names if n not in present]
    digests = _digests(path, present)
    for n in present:
        want, got = files[n], digests[n]
        if got["size"] != want["size"]:
            problems.append(f"{n} has {got['size']} bytes, {want['size']} were written")
        elif got["sha256"] != want["sha256"]:
            problems.append(f"{n} does not match its sha256 (its bytes changed after the save)")
    return problems


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def _disk_full(exc: BaseException, where: Path) -> bool:
    """ENOSPC somewhere in the exception chain, or (writers such as torch.save's zip writer report
    a failed write in their own words) less than 1 MiB left where the checkpoint was written."""
    seen: set[int] = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    try:
        return shutil.disk_usage(where).free < 2**20
    except OSError:
        return False


def _agree(failure: Optional[BaseException]) -> bool:
    """True on every rank when any rank failed (so that no rank waits in a barrier alone)."""
    return bool(all_reduce_max(torch.tensor([0.0 if failure is None else 1.0])).item() > 0)


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
    rank 0. Returns the final directory. Raises :class:`CheckpointError` (and writes nothing)
    when a weight is not finite, and when the write fails (then the partial directory is removed).
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    bad = non_finite_weights(model)
    if _agree(RuntimeError() if bad else None):
        shown = ", ".join(f"{k} ({v})" for k, v in list(bad.items())[:5])
        last = latest(run_dir)
        raise CheckpointError(f"refusing to save step {step}: the weights are not all finite"
                              + (f" (non-finite values in {shown})" if bad else " on another rank")
                              + f"; last good checkpoint: {last if last is not None else 'none'}")
    root = checkpoint_root(run_dir)
    final = root / f"step_{step}"
    tmp = root / f"step_{step}{INCOMPLETE}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # debris of an earlier interrupted write of the same step
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()

    failure: Optional[BaseException] = None
    try:
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
    except _FAILURES as exc:  # reported below, after every rank agreed
        failure = exc
    if not _agree(failure):  # every rank's shards are on disk: seal and commit on rank 0
        try:
            if _rank() == 0:
                write_manifest(tmp)
                _commit(tmp, final)
                _prune(root, keep_last, keep=final)
        except _FAILURES as exc:
            failure = exc
        if not _agree(failure):
            return final
    _fail(step, tmp, root, failure)


def _fail(step: int, tmp: Path, root: Path, failure: Optional[BaseException]) -> None:
    full = failure is not None and _disk_full(failure, root)
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    if failure is None:
        raise CheckpointError(f"checkpoint step {step} failed on another rank; its partial directory was removed")
    if full:
        free = shutil.disk_usage(root).free if root.exists() else 0
        raise CheckpointError(
            f"the disk is full: checkpoint step {step} could not be written to {root} ({free} bytes free now); "
            f"the partial directory was removed and the previous checkpoint is still the latest. Free some space "
            "(or lower checkpoint.keep_last) and resume with --resume auto") from failure
    raise CheckpointError(f"writing checkpoint step {step} to {root} failed ({type(failure).__name__}: {failure}); "
                          "the partial directory was removed") from failure


def _commit(tmp: Path, final: Path) -> None:
    """Rename the finished directory into place, then move the pointer (in that order).

    An existing copy of the step is renamed aside first and deleted only once the pointer names
    the new one: a kill between the two renames leaves it as ``step_N.previous``, which
    :func:`list_checkpoints` serves in place of the missing ``step_N``.
    """
    previous = final.with_name(final.name + PREVIOUS)
    if final.exists():
        if previous.exists():
            shutil.rmtree(previous)
        os.replace(final, previous)
    os.replace(tmp, final)
    _write_atomic(final.parent / LATEST, final.name + "\n")
    if previous.exists():
        shutil.rmtree(previous)


def _step_of(path: Path) -> int:
    return int(path.name.split("_", 1)[1].split(".", 1)[0])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (``step_N.previous`` stands in for a missing ``step_N``)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    by_step: dict[int, Path] = {}
    for p in root.glob("step_*"):
        number = p.name[len("step_"):]
        suffix = number.lstrip("0123456789")
        if number == suffix or suffix not in ("", PREVIOUS) or not p.is_dir() or not (p / TRAINER_STATE).is_file():
            continue
        step = _step_of(p)
        if suffix == "" or step not in by_step:
            by_step[step] = p
    return [by_step[s] for s in sorted(by_step)]


def _prune(root: Path, keep_last: int, *, keep: Path) -> None:
    """Keep ``keep`` (just written, named by the pointer) and the ``keep_last - 1`` newest others."""
    others = [p for p in list_checkpoints(root.parent) if p != keep]
    for old in others[: max(0, len(others) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for debris in root.glob(f"step_*{INCOMPLETE}"):
        shutil.rmtree(debris, ignore_errors=True)
    for previous in root.glob(f"step_*{PREVIOUS}"):  # a re-save cut short: restore the name it had
        plain = previous.with_name(previous.name.removesuffix(PREVIOUS))
        if plain.exists():
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(previous, plain)


# --------------------------------------------------------------------------------------------
# Choosing a checkpoint to resume from
# --------------------------------------------------------------------------------------------


def _pointer_target(run_dir: Path) -> Optional[str]:
    pointer = checkpoint_root(run_dir) / LATEST
    try:
        return pointer.read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def latest(run_dir: Path) -> Optional[Path]:
    """The checkpoint ``--resume auto`` starts from, before integrity checks: the one the
    ``latest`` pointer names, else the newest complete one; None when the run has none."""
    done = list_checkpoints(run_dir)
    named = _pointer_target(run_dir)
    for p in done:
        if named is not None and p.name.removesuffix(PREVIOUS) == named:
            return p
    return done[-1] if done else None


def _choose(run_dir: Path) -> tuple[Optional[Path], list[str]]:
    """The newest intact checkpoint, the pointer's choice first; and what was skipped and why."""
    root = checkpoint_root(run_dir)
    done = list_checkpoints(run_dir)
    named = _pointer_target(run_dir)
    first = latest(run_dir)
    notes = []
    if first is not None and (named is None or first.name.removesuffix(PREVIOUS) != named):
        what = f"{root / LATEST} is missing" if named is None else f"{root / LATEST} names {named}, which is not a complete checkpoint"
        notes.append(f"{what}; using the newest complete checkpoint, {first.name}")
    elif first is not None and first.name.endswith(PREVIOUS):
        notes.append(f"{named} was being re-saved when the run stopped; using its previous copy {first.name}")
    if first is None:
        if named is not None:
            raise CheckpointError(f"{root / LATEST} names {named}, but {root} holds no complete checkpoint")
        return None, notes
    for path in [first] + [p for p in reversed(done) if p != first]:
        problems = verify(path)
        if not problems:
            return path, notes
        notes.append(f"checkpoint {path} is damaged ({'; '.join(problems[:3])}); trying the previous one")
    raise CheckpointError(f"no intact checkpoint in {root}:\n  " + "\n  ".join(notes))


def resolve_resume(run_dir: Path, resume: Optional[str]) -> Optional[Path]:
    """``resume`` = None (fresh start), "auto" (the newest intact checkpoint of run_dir, if any) or a
    checkpoint path (a run directory or its ``checkpoints/`` directory mean "auto" there).

    Rank 0 reads and verifies the files; every rank gets its answer (or its error).
    """
    if resume is None:
        return None
    answer: Any = None
    if _rank() == 0:
        try:
            answer = _resolve(Path(run_dir), resume)
        except CheckpointError as exc:
            answer = exc
    answer = broadcast_object(answer)
    if isinstance(answer, CheckpointError):
        raise answer
    path, notes = answer
    for note in notes:
        _say(note)
    return path


def _resolve(run_dir: Path, resume: str) -> tuple[Optional[Path], list[str]]:
    if resume == "auto":
        return _choose(run_dir)
    path = Path(resume)
    if (path / LATEST).is_file() or (path / "checkpoints").is_dir():
        chosen, notes = _choose(path.parent if path.name == "checkpoints" else path)
        if chosen is None:
            raise CheckpointError(f"resume={resume!r} holds no complete checkpoint")
        return chosen, notes
    if path.name.endswith(INCOMPLETE) or not (path / TRAINER_STATE).is_file():
        raise CheckpointError(
            f"resume={resume!r} is not a complete checkpoint (expected a directory with {TRAINER_STATE})")
    problems = verify(path)
    if problems:
        raise CheckpointError(f"checkpoint {path} is damaged: " + "; ".join(problems)
                              + " (resume from an earlier checkpoint, or --resume auto to pick the newest intact one)")
    return path, []


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def read_trainer_state(path: Path) -> dict[str, Any]:
    file = Path(path) / TRAINER_STATE
    try:
        return torch.load(file, weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing: {path} is not a complete checkpoint") from None
    except Exception as exc:  # noqa: BLE001 - unpickling a damaged file raises many types
        raise CheckpointError(f"{file} is unreadable ({type(exc).__name__}: {exc})") from exc


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
    (``step``, ``trainer``..., and ``rng_restored`` with ``rng_note`` saying why not). Every rank
    calls this."""
    state = check_compatible(path, model)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    target = {"model": model_sd, "optimizer": optim_sd}
    try:
        dcp.load(target, checkpoint_id=str(path))
    except _FAILURES as exc:  # DCP wraps every reader failure
        raise CheckpointError(f"the model/optimizer shards of {path} are unreadable ({type(exc).__name__}: "
                              f"{str(exc)[:300]}); resume from an earlier checkpoint") from exc
    set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    rng_file = Path(path) / f"rng_rank{_rank()}.pt"
    state["rng_restored"] = False  # RNG streams then restart from the seed
    if state["world_size"] != _world():
        state["rng_note"] = (f"written by {state['world_size']} ranks, resumed on {_world()}: "
                             "RNG streams restart from the seed")
    elif not rng_file.is_file():
        state["rng_note"] = f"{rng_file.name} is missing from {path}: RNG streams restart from the seed"
    else:
        try:
            set_rng_state(torch.load(rng_file, weights_only=False))
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{rng_file} is unreadable ({type(exc).__name__}: {exc})") from exc
        state["rng_restored"] = True
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
