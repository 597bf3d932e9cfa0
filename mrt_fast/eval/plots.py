"""PNG plots of an evaluation result (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

BUDGET_COLORS = ("tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _model_title(model_name: Optional[str]) -> str:
    return f"{model_name}\n" if model_name else ""


def write_plots(result: dict, out_dir: Path, *, model_name: Optional[str] = None) -> list[str]:
    """Write ``regret_curve.png`` (mean meta-prover J vs tokens spent, one labelled line per regret
    budget) and ``regret.png`` (normalised regret vs budget) into ``out_dir``; returns the paths."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    label = result.get("label", "pass@1")
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    curve = result["curve"]
    ax.plot(curve["tokens"], curve["J"], color="tab:blue", label="mean J (meta-prover pass@1)")
    ax.axhline(1.0, color="gray", linestyle=":", label="oracle J* = 1")
    forcing = result.get("budget_forcing")
    train_budget = result.get("config", {}).get("max_new_tokens")
    if forcing and train_budget:
        ax.axvline(train_budget, color="red", linestyle="--", label=f"response budget {train_budget} (forcing beyond)")
    for i, (b, regret) in enumerate(result["regret"].items()):
        ax.axvline(int(b), color=BUDGET_COLORS[i % len(BUDGET_COLORS)], linewidth=0.9, linestyle="-.",
                   label=f"budget {int(b)} tokens: regret {regret:.3f}")
    ax.set_xlabel("tokens spent")
    ax.set_ylabel("J: pass@1 after forced termination")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title(f"{_model_title(model_name)}{label} = {result['pass@1']:.3f}, {result['num_problems']} problems",
                 fontsize=10)
    ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    paths.append(str(out_dir / "regret_curve.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    budgets = [int(b) for b in result["regret"]]
    ax.plot(budgets, list(result["regret"].values()), marker="o")
    ax.set_xlabel("token budget")
    ax.set_ylabel("normalised regret (1 - area / budget)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{_model_title(model_name)}normalised regret by token budget, {result['num_problems']} problems",
                 fontsize=10)
    fig.tight_layout()
    paths.append(str(out_dir / "regret.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths
