"""Training curves: ``<run_dir>/training_curves.png`` from ``metrics.jsonl``.

Six panels against the step: reward (and outcome accuracy), response length, MRT's progress
signals (J and the progress bonus), policy entropy, gradient norm, and the evaluation accuracy.
The trainer writes the figure at the end of a run; ``python -m mrt_fast.curves RUN_DIR`` redraws it
from any run directory, also while the run is going.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional

from mrt_fast.metrics import read_metrics

FILENAME = "training_curves.png"
# (panel title, y label, metric names drawn in it: the first one present in the run is enough)
PANELS = (
    ("reward", "mean per trace", ("reward/mean", "outcome/accuracy")),
    ("response length", "tokens", ("response_length/mean",)),
    ("progress (MRT)", "J / progress", ("reward/progress/mean", "mrt/J_prefix/mean", "mrt/J0/mean",
                                        "mrt/J_final/mean")),
    ("policy entropy", "nats per token", ("actor/entropy",)),
    ("gradient norm", "before clipping", ("actor/grad_norm",)),
    ("evaluation", "pass@1 (settings in eval.json)", ("eval/accuracy",)),
)


def series(rows: list[dict], name: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of one metric, skipping rows without it and non-finite values."""
    steps, values = [], []
    for row in rows:
        value = row.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(int(row["step"]))
            values.append(float(value))
    return steps, values


def write_training_curves(run_dir: Path, *, title: Optional[str] = None) -> Optional[Path]:
    """Draw the run's curves into ``run_dir/training_curves.png``; None when no step was logged."""
    from mrt_fast.eval.plots import _pyplot

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not any(row.get("step", 0) > 0 for row in rows):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (panel, ylabel, names) in zip(axes.flat, PANELS):
        drawn = False
        for name in names:
            steps, values = series(rows, name)
            if steps:
                ax.plot(steps, values, marker="o", markersize=3, label=name)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=ax.transAxes, color="gray")
        else:
            ax.legend(fontsize=7, loc="best")
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
    fig.suptitle(title or str(run_dir), fontsize=11)
    fig.tight_layout()
    path = run_dir / FILENAME
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: python -m mrt_fast.curves RUN_DIR   (writes RUN_DIR/training_curves.png)")
        return 0 if args and args[0] in ("-h", "--help") else 2
    if not (Path(args[0]) / "metrics.jsonl").is_file():
        print(f"error: {args[0]} has no metrics.jsonl", file=sys.stderr)
        return 2
    path = write_training_curves(Path(args[0]))
    print(f"wrote {path}" if path else "no training step logged yet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
