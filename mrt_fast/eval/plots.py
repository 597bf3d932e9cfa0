"""PNG plots of an evaluation result (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path


def write_plots(result: dict, out_dir: Path) -> list[str]:
    """Write ``regret_curve.png`` (mean meta-prover J vs tokens spent) and ``regret.png`` (normalised
    regret vs budget) into ``out_dir``; returns the file paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    curve = result["curve"]
    ax.plot(curve["tokens"], curve["J"], label="mean J (meta-prover pass@1)")
    ax.axhline(1.0, color="gray", linestyle=":", label="oracle J* = 1")
    forcing = result.get("budget_forcing")
    train_budget = result.get("config", {}).get("max_new_tokens")
    if forcing and train_budget:
        ax.axvline(train_budget, color="red", linestyle="--", label="training budget (forcing beyond)")
    for b in result["regret"]:
        ax.axvline(int(b), color="lightgray", linewidth=0.8)
    ax.set_xlabel("tokens spent")
    ax.set_ylabel("J: pass@1 after forced termination")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title(f"pass@1 {result['pass@1']:.3f}, {result['num_problems']} problems")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    paths.append(str(out_dir / "regret_curve.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    budgets = [int(b) for b in result["regret"]]
    ax.plot(budgets, list(result["regret"].values()), marker="o")
    ax.set_xlabel("token budget")
    ax.set_ylabel("normalised regret (1 - area / budget)")
    ax.set_ylim(0, 1.05)
    fig.tight_layout()
    paths.append(str(out_dir / "regret.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths
