"""Compare evaluations across methods and seeds: a markdown table and overlaid plots.

    python -m mrt_fast.eval.compare --group grpo runs/exp/grpo-*/eval \\
        --group mrt-rl runs/exp/mrt-rl-*/eval --out results/mrt_vs_grpo

Every ``--group LABEL DIR [DIR ...]`` names one method and the ``eval.json`` directories of its
seeds (written by ``python -m mrt_fast.eval --out DIR``). The table gives each method's mean and
sample standard deviation over seeds of pass@1, mean response tokens, meta-prover J at the empty
prefix and at ``</think>``, and normalised regret at every budget the evaluations share. The
plots overlay the methods' mean J-vs-tokens curves (one thin line per seed) and regret-vs-budget.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from .metrics import curve_on_grid

METRICS = (
    ("pass@1", "accuracy (pass@1)"),
    ("mean_tokens", "mean tokens"),
    ("J_at_empty_prefix", "J at empty prefix"),
    ("J_at_end_of_thinking", "J at </think>"),
)


def load_result(path: str | Path) -> dict:
    """The ``eval.json`` in directory ``path`` (or ``path`` itself when it is the file)."""
    path = Path(path)
    file = path / "eval.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no eval.json at {path} (write one with python -m mrt_fast.eval --out DIR)")
    return json.loads(file.read_text())


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def shared_budgets(groups: dict[str, list[dict]]) -> list[str]:
    """Regret budgets present in every result, in increasing order."""
    sets = [set(r["regret"]) for results in groups.values() for r in results]
    return sorted(set.intersection(*sets), key=int) if sets else []


def summarise(groups: dict[str, list[dict]]) -> dict[str, dict[str, tuple[float, float]]]:
    """``{label: {metric: (mean, std)}}`` over each group's seeds; regret metrics are ``regret@B``."""
    if not groups or any(not results for results in groups.values()):
        raise ValueError("every group needs at least one evaluation result")
    budgets = shared_budgets(groups)
    table = {}
    for label, results in groups.items():
        row = {key: mean_std([float(r[key]) for r in results]) for key, _ in METRICS}
        for b in budgets:
            row[f"regret@{b}"] = mean_std([float(r["regret"][b]) for r in results])
        row["seeds"] = (float(len(results)), 0.0)
        table[label] = row
    return table


def markdown_table(table: dict[str, dict[str, tuple[float, float]]]) -> str:
    """One row per method, ``mean ± std`` per metric."""
    columns = [key for key in next(iter(table.values())) if key != "seeds"]
    names = dict(METRICS)
    header = ["method", "seeds"] + [names.get(c, c) for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in table.items():
        cells = [label, str(int(row["seeds"][0]))]
        for c in columns:
            mean, std = row[c]
            digits = 1 if c == "mean_tokens" else 3
            cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_comparison_plots(groups: dict[str, list[dict]], out_dir: str | Path) -> list[str]:
    """``compare_curves.png`` (J vs tokens per method) and ``compare_regret.png``; returns paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    paths = []

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (label, results) in enumerate(groups.items()):
        color = colors[i % len(colors)]
        for r in results:
            ax.plot(r["curve"]["tokens"], r["curve"]["J"], color=color, alpha=0.3, linewidth=0.8)
        # Seeds' grids end at their longest trace: resample every seed on the first one's grid.
        grid = results[0]["curve"]["tokens"]
        per_seed = [curve_on_grid(r["curve"]["tokens"], r["curve"]["J"], grid) for r in results]
        mean_j = [statistics.fmean(column) for column in zip(*per_seed)]
        ax.plot(grid, mean_j, color=color, linewidth=2, label=f"{label} (mean of {len(results)})")
    ax.set_xlabel("tokens spent")
    ax.set_ylabel("J: pass@1 after forced termination")
    ax.set_ylim(-0.02, 1.05)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    paths.append(str(out_dir / "compare_curves.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    budgets = shared_budgets(groups)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (label, results) in enumerate(groups.items()):
        means = [mean_std([r["regret"][b] for r in results]) for b in budgets]
        ax.errorbar([int(b) for b in budgets], [m for m, _ in means], yerr=[s for _, s in means],
                    marker="o", capsize=3, color=colors[i % len(colors)], label=label)
    ax.set_xlabel("token budget")
    ax.set_ylabel("normalised regret (mean ± std over seeds)")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    paths.append(str(out_dir / "compare_regret.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m mrt_fast.eval.compare", description=__doc__.split("\n")[0])
    parser.add_argument("--group", nargs="+", action="append", required=True, metavar=("LABEL", "DIR"),
                        help="a method's label and the eval directories (or eval.json files) of its seeds")
    parser.add_argument("--out", required=True, help="directory for compare.md, compare.json and the plots")
    args = parser.parse_args(argv)
    groups: dict[str, list[dict]] = {}
    for label, *dirs in args.group:
        if not dirs:
            parser.error(f"--group {label}: give at least one evaluation directory after the label")
        if label in groups:
            parser.error(f"--group {label} given twice")
        groups[label] = [load_result(d) for d in dirs]
    table = summarise(groups)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(markdown_table(table))
    (out / "compare.json").write_text(json.dumps(
        {label: {k: {"mean": m, "std": s} for k, (m, s) in row.items()} for label, row in table.items()},
        indent=2) + "\n")
    plots = write_comparison_plots(groups, out)
    print(markdown_table(table), end="")
    print(f"wrote {out / 'compare.md'}, {out / 'compare.json'}, " + ", ".join(plots))
    return table


if __name__ == "__main__":
    main()
