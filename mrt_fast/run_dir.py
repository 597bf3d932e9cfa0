"""What the trainer may do with an output directory that already holds a run.

A run directory belongs to one run, possibly trained in several segments (a first start, then
``--resume`` after each interruption). The rules:

* starting without ``--resume`` in a directory that already holds a run (its config, metrics or
  checkpoints) is refused, with the two ways forward: ``--resume auto`` or a new directory;
* every segment keeps its config: ``config.yaml`` for the first, ``config.resume-<step>.yaml`` for
  a segment resumed at ``<step>``; a resume prints what changed since the previous segment and
  refuses changes a resume cannot honour (the algorithm, the data, the seed, the optimizer, whose
  state comes from the checkpoint) unless ``--allow-config-change`` is given;
* ``metrics.jsonl`` is cut back to the resumed step, so a step re-run after a resume is logged once.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from mrt_fast import checkpoint

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SEGMENT_PREFIX = "config.resume-"
# Settings a resume cannot honour: the plan and loss of the algorithm, which data position means
# what, the seed streams, and the optimizer / LR schedule whose state the checkpoint restores.
NOT_HONOURED = ("algo.name", "data.source", "data.split", "data.prompt_column", "data.answer_column",
                "data.response_column", "data.num_problems", "data.difficulty", "data.shuffle", "train.seed",
                "optim.")
# Where the run is, not what it computes.
IGNORED = ("output_dir", "resume")


class RunDirError(ValueError):
    """The output directory and the command line disagree (a rerun over a run, an unhonoured change)."""


def run_artifacts(run_dir: Path) -> list[str]:
    """What in ``run_dir`` shows that a run already used it."""
    run_dir = Path(run_dir)
    found = [name for name in (CONFIG, METRICS) if (run_dir / name).is_file()]
    found += sorted(p.name for p in run_dir.glob(f"{SEGMENT_PREFIX}*.yaml"))
    found += [f"checkpoints/{p.name}" for p in checkpoint.list_checkpoints(run_dir)]
    return found


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def _segment_step(path: Path) -> int:
    try:
        return int(path.name[len(SEGMENT_PREFIX):-len(".yaml")])
    except ValueError:
        return -1


def last_segment_config(run_dir: Path) -> Optional[Path]:
    """The config file of the newest segment of the run in ``run_dir`` (None: no run there)."""
    run_dir = Path(run_dir)
    segments = sorted(run_dir.glob(f"{SEGMENT_PREFIX}*.yaml"), key=_segment_step)
    if segments:
        return segments[-1]
    return run_dir / CONFIG if (run_dir / CONFIG).is_file() else None


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """``key -> (old, new)`` for every dotted key whose value differs (IGNORED keys left out)."""
    a, b = _flat(old), _flat(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in IGNORED}


def _not_honoured(key: str) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in NOT_HONOURED)


def check(cfg: Any, run_dir: Path, *, export_only: bool = False, allow_config_change: bool = False,
          say: Callable[[str], None] = print) -> None:
    """Refuse a command that would overwrite or silently half-continue the run in ``run_dir``.

    Reads only; call it on every rank before any compute (each takes the same decision).
    """
    run_dir = Path(run_dir)
    found = run_artifacts(run_dir)
    if cfg.resume is None:
        if not found:
            return
        shown = ", ".join(found[:6]) + (", ..." if len(found) > 6 else "")
        if export_only:
            raise RunDirError(f"--export-only without --resume would export the initial weights, but {run_dir} "
                              f"holds checkpoints ({shown}); pass --resume auto (or --resume PATH)")
        raise RunDirError(f"--output-dir {run_dir} already holds a run ({shown}). Continue it with --resume auto, "
                          "or choose a new --output-dir; starting over there would mix two runs' metrics and "
                          "checkpoints")
    if export_only:
        return
    owner = run_dir
    if cfg.resume != "auto":  # a checkpoint of another run: compare with that run's config
        path = Path(cfg.resume)
        owner = path.parent.parent if path.parent.name == "checkpoints" else path
        if last_segment_config(owner) is None:
            owner = run_dir
    previous = last_segment_config(owner)
    if previous is None:
        return
    changes = config_changes(yaml.safe_load(previous.read_text()) or {}, dataclasses.asdict(cfg))
    if not changes:
        return
    say(f"[mrt_fast.train] resuming with settings changed since {previous}:")
    for key, (old, new) in changes.items():
        say(f"  {key}: {old!r} -> {new!r}")
    refused = [k for k in changes if _not_honoured(k)]
    if refused and not allow_config_change:
        raise RunDirError(
            f"a resume cannot honour a change of {', '.join(refused)}: the algorithm, the data order, the seed "
            "streams and the optimizer/LR-schedule state continue from the checkpoint. Start a new run in a new "
            "--output-dir, or pass --allow-config-change to continue anyway")
    if refused:
        say(f"[mrt_fast.train] --allow-config-change: continuing; note that {', '.join(refused)} "
            "only partly take effect (optimizer and LR-schedule state come from the checkpoint)")


def start_segment(cfg: Any, run_dir: Path, step: int, *, resumed: bool) -> Path:
    """Record this segment's config and cut ``metrics.jsonl`` back to ``step``; rank 0 only.

    ``resumed=False`` (a fresh start at step 0) writes ``config.yaml`` and drops earlier metrics;
    a resume at ``step`` writes ``config.resume-<step>.yaml`` and keeps the rows up to ``step``.
    """
    from mrt_fast.config import dump

    run_dir = Path(run_dir)
    path = run_dir / (f"{SEGMENT_PREFIX}{step}.yaml" if resumed else CONFIG)
    path.write_text(dump(cfg))
    truncate_metrics(run_dir / METRICS, step if resumed else -1)
    return path


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the rows of ``metrics.jsonl`` logged after ``step`` (atomically); returns how many."""
    import json

    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines(keepends=True):
        try:
            row_step = json.loads(line).get("step", 0)
        except ValueError:  # a line cut short by a kill: it belongs to a step being redone
            dropped += 1
            continue
        if isinstance(row_step, (int, float)) and row_step > step:
            dropped += 1
        else:
            kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return dropped
