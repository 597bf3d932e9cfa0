"""Training curves of the grid, per arm: the mean over seeds (thick) and each seed (thin) of
outcome accuracy, response length, entropy, the progress reward and the advantages' scale, against the step. Writes
training_curves.png and training.md (first 5 and last 10 steps of each, mean over seeds).

    python results/chain_grpo_vs_mrt/training_curves.py RUNS OUT grpo mrt-rl mrt-online grpo-lp
"""

import json
import statistics
import sys
from pathlib import Path

CURVES = (
    ("outcome/accuracy", "outcome accuracy"),
    ("response_length/mean", "response tokens"),
    ("actor/entropy", "entropy"),
    ("reward/progress/mean", "progress reward"),
    ("advantage/abs_mean", "mean |advantage|"),
)


def read_metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return sorted((r for r in rows if "step" in r), key=lambda r: r["step"])


def main(runs: Path, out: Path, arms: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = {arm: [read_metrics(d) for d in sorted(runs.glob(f"{arm}-[0-9]*")) if (d / "metrics.jsonl").is_file()]
             for arm in arms}
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 4))
    lines = ["| arm | " + " | ".join(f"{label} (first 5 -> last 10)" for _, label in CURVES) + " |",
             "|---|" + "---|" * len(CURVES)]
    for color, arm in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], arms):
        cells = []
        for ax, (key, label) in zip(axes, CURVES):
            series = [[r.get(key, 0.0) for r in rows] for rows in seeds[arm]]
            for s in series:
                ax.plot(range(1, len(s) + 1), s, color=color, alpha=0.25, linewidth=0.8)
            length = min(map(len, series), default=0)
            mean = [statistics.fmean(s[i] for s in series) for i in range(length)]
            ax.plot(range(1, length + 1), mean, color=color, linewidth=2, label=arm)
            ax.set_title(label)
            ax.set_xlabel("step")
            cells.append(f"{statistics.fmean(mean[:5]):.3f} -> {statistics.fmean(mean[-10:]):.3f}" if length else "-")
        lines.append(f"| {arm} ({len(seeds[arm])} seeds) | " + " | ".join(cells) + " |")
    axes[0].legend()
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "training_curves.png", dpi=100)
    (out / "training.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
