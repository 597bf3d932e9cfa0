"""Evaluation: ``python -m mrt_fast.eval`` (pass@k, maj@k, token efficiency, regret curves, plots).

The metric functions are importable on their own; :func:`main` is the command-line entry point.
"""

from mrt_fast.eval.metrics import area_under_curve, curve_on_grid, maj_at_k, normalized_regret, pass_at_k


def main(argv=None) -> int:
    """Command-line entry point (``python -m mrt_fast.eval`` / ``mrt-fast-eval``)."""
    from mrt_fast.eval.cli import main as _main

    return _main(argv)


__all__ = ["area_under_curve", "curve_on_grid", "maj_at_k", "main", "normalized_regret", "pass_at_k"]
