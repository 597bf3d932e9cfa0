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

import numpy as np

from .metrics import curve_on_grid, normalized_regret

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


# ----------------------------------------------------------------------------------------------
# Paired bootstrap against a baseline method
# ----------------------------------------------------------------------------------------------


def unproductive_episodes(row: dict) -> float:
    """Mean re-checked attempts per sample of one problem of the embedded task (NaN without texts)."""
    from mrt_fast.data.synthetic import rechecks

    texts = row.get("texts")
    return statistics.fmean(rechecks(t) for t in texts) if texts else float("nan")


def per_problem_table(result: dict, budgets: list[str]) -> np.ndarray:
    """``[P, F]`` per held-out problem: pass@1, tokens generated, samples solved, J at the empty
    prefix, unproductive episodes per trace (embedded task; NaN otherwise), then normalised regret
    at each budget (mean over that problem's measured traces)."""
    rows = result.get("per_problem")
    curves = result.get("curves")
    if not rows or curves is None:
        raise ValueError("a paired comparison needs per-problem results: evaluate with python -m mrt_fast.eval "
                         "(its eval.json holds 'per_problem' and 'curves')")
    embedded = result.get("config", {}).get("dataset", "embedded") == "embedded"
    by_problem: dict[int, list[dict]] = {}
    for c in curves:
        by_problem.setdefault(int(c["problem"]), []).append(c)
    table = []
    for p, row in enumerate(rows):
        mine = by_problem.get(p, [])
        if not mine:
            raise ValueError(f"problem {p} has no measured trace (curve) in this eval.json")
        values = [statistics.fmean(map(float, row["correct"])), float(sum(row["tokens"])),
                  float(sum(row["correct"])), statistics.fmean(c["J"][0] for c in mine),
                  unproductive_episodes(row) if embedded else float("nan")]
        values += [statistics.fmean(normalized_regret(c["tokens"], c["J"], float(b)) for c in mine) for b in budgets]
        table.append(values)
    return np.asarray(table, dtype=np.float64)


def _statistics(x: np.ndarray, budgets: list[str]) -> dict[str, float]:
    """Method-level statistics of a ``[S, P, F]`` block (seeds x problems x fields)."""
    stats = {"pass@1": float(x[..., 0].mean()), "J_at_empty_prefix": float(x[..., 3].mean())}
    solved = x[..., 2].sum()
    stats["tokens_per_solve"] = float(x[..., 1].sum() / solved) if solved > 0 else float("inf")
    if not np.isnan(x[..., 4]).any():
        stats["unproductive_episodes"] = float(x[..., 4].mean())
    for i, b in enumerate(budgets):
        stats[f"regret@{b}"] = float(x[..., 5 + i].mean())
    return stats


def _contrast(method: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """Differences method - baseline, except tokens per solve: baseline / method (> 1 = fewer tokens)."""
    out = {k: method[k] - baseline[k] for k in method if k != "tokens_per_solve"}
    out["tokens_per_solve"] = baseline["tokens_per_solve"] / method["tokens_per_solve"]
    return out


def paired_bootstrap(method: np.ndarray, baseline: np.ndarray, budgets: list[str], *, resamples: int = 2000,
                     seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """``{statistic: (point, low, high)}``: the contrast of two ``[S, P, F]`` blocks with a paired
    bootstrap 95% interval (seeds and problems resampled with replacement, the same draws for both)."""
    if method.shape != baseline.shape:
        raise ValueError(f"paired blocks must have the same seeds x problems x fields, got {method.shape} "
                         f"and {baseline.shape}")
    if resamples < 100:
        raise ValueError(f"resamples must be >= 100, got {resamples}")
    point = _contrast(_statistics(method, budgets), _statistics(baseline, budgets))
    rng = np.random.default_rng(seed)
    n_seeds, n_problems = method.shape[:2]
    draws: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(resamples):
        s = rng.integers(0, n_seeds, n_seeds)[:, None]
        p = rng.integers(0, n_problems, n_problems)[None, :]
        c = _contrast(_statistics(method[s, p], budgets), _statistics(baseline[s, p], budgets))
        for k, v in c.items():
            draws[k].append(v)
    # inverted_cdf picks observed values (no interpolation), so a resample with no solved problem
    # (tokens per solve = inf) cannot turn a bound into NaN.
    return {k: (v, *(float(q) for q in np.quantile(draws[k], [0.025, 0.975], method="inverted_cdf")))
            for k, v in point.items()}


def paired_comparison(groups: dict[str, list[dict]], baseline: str, **kwargs) -> dict[str, dict]:
    """Every method against ``baseline`` with :func:`paired_bootstrap` over the budgets all results share."""
    if baseline not in groups:
        raise ValueError(f"--baseline {baseline!r} is not one of the groups {list(groups)}")
    budgets = shared_budgets(groups)
    base = np.stack([per_problem_table(r, budgets) for r in groups[baseline]])
    out = {}
    for label, results in groups.items():
        if label == baseline:
            continue
        if len(results) != len(groups[baseline]):
            raise ValueError(f"group {label!r} has {len(results)} seeds but the baseline {baseline!r} has "
                             f"{len(groups[baseline])}: pairing needs the same seeds")
        block = np.stack([per_problem_table(r, budgets) for r in results])
        out[label] = paired_bootstrap(block, base, budgets, **kwargs)
    return out


def paired_markdown(paired: dict[str, dict], baseline: str) -> str:
    """One row per method: point estimate and [2.5%, 97.5%] of each contrast to the baseline."""
    if not paired:
        return ""
    columns = list(next(iter(paired.values())))
    names = {"tokens_per_solve": f"tokens per solve ({baseline} / method)"}
    header = ["method"] + [names.get(c, f"Δ {c}") for c in columns]
    lines = [f"Differences to {baseline} (paired bootstrap 95% intervals over seeds and problems)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in paired.items():
        lines.append("| " + " | ".join([label] + [f"{v:+.3f} [{lo:+.3f}, {hi:+.3f}]" if c != "tokens_per_solve"
                                                    else f"{v:.2f}x [{lo:.2f}, {hi:.2f}]"
                                                    for c, (v, lo, hi) in row.items()]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m mrt_fast.eval.compare", description=__doc__.split("\n")[0])
    parser.add_argument("--group", nargs="+", action="append", required=True, metavar=("LABEL", "DIR"),
                        help="a method's label and the eval directories (or eval.json files) of its seeds")
    parser.add_argument("--out", required=True, help="directory for compare.md, compare.json and the plots")
    parser.add_argument("--baseline", default=None, metavar="LABEL",
                        help="also compare every group with this one (paired bootstrap; writes paired.md/json)")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default: 2000)")
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
    written = [str(out / "compare.md"), str(out / "compare.json"), *plots]
    if args.baseline is not None:
        if args.baseline not in groups:
            parser.error(f"--baseline {args.baseline!r} is not one of the groups {list(groups)}")
        # A group with another number of evaluations than the baseline (a single reference run such
        # as the starting checkpoint) is in the table and plots but cannot be paired: say so.
        seeds = len(groups[args.baseline])
        unpaired = [label for label, results in groups.items() if len(results) != seeds]
        paired = paired_comparison({k: v for k, v in groups.items() if k not in unpaired}, args.baseline,
                                   resamples=args.resamples)
        note = "".join(f"\n{label}: {len(groups[label])} evaluation(s) against {seeds} of {args.baseline}, "
                       f"in compare.md but not paired.\n" for label in unpaired)
        (out / "paired.md").write_text(paired_markdown(paired, args.baseline) + note)
        (out / "paired.json").write_text(json.dumps(
            {label: {k: {"estimate": v, "low": lo, "high": hi} for k, (v, lo, hi) in row.items()}
             for label, row in paired.items()}, indent=2) + "\n")
        print(paired_markdown(paired, args.baseline) + note, end="")
        written += [str(out / "paired.md"), str(out / "paired.json")]
    print("wrote " + ", ".join(written))
    return table


if __name__ == "__main__":
    main()
