"""`python -m mrt_fast.eval.compare`: mean ± std over seeds, the shared budgets, the table and plots."""

import json
import math

import pytest

from mrt_fast.eval.compare import main, markdown_table, mean_std, shared_budgets, summarise


def result(pass1, tokens, j0, jend, regret, curve_j):
    """An eval.json-shaped dict with only the fields the comparison reads."""
    return {"pass@1": pass1, "mean_tokens": tokens, "J_at_empty_prefix": j0, "J_at_end_of_thinking": jend,
            "regret": regret, "curve": {"tokens": [0, 50, 100], "J": curve_j}}


GRPO = [result(0.25, 120.0, 0.1, 0.3, {"64": 0.8, "128": 0.7}, [0.1, 0.2, 0.3]),
        result(0.35, 100.0, 0.2, 0.4, {"64": 0.6, "128": 0.5, "256": 0.4}, [0.2, 0.3, 0.4])]
MRT = [result(0.5, 80.0, 0.3, 0.6, {"64": 0.4, "128": 0.3}, [0.3, 0.5, 0.6])]


def test_mean_and_sample_std_by_hand():
    assert mean_std([0.25, 0.35]) == pytest.approx((0.3, math.sqrt(0.005)))
    assert mean_std([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        mean_std([])


def test_summary_uses_only_budgets_every_result_has():
    groups = {"grpo": GRPO, "mrt-rl": MRT}
    assert shared_budgets(groups) == ["64", "128"]
    table = summarise(groups)
    assert table["grpo"]["pass@1"] == pytest.approx((0.3, math.sqrt(0.005)))
    assert table["grpo"]["mean_tokens"] == pytest.approx((110.0, math.sqrt(200.0)))
    assert table["grpo"]["regret@128"] == pytest.approx((0.6, math.sqrt(0.02)))
    assert table["mrt-rl"]["regret@64"] == (0.4, 0.0)
    assert "regret@256" not in table["grpo"]
    md = markdown_table(table)
    assert md.splitlines()[0].startswith("| method | seeds | accuracy (pass@1) | mean tokens |")
    assert "| grpo | 2 | 0.300 ± 0.071 | 110.0 ± 14.1 |" in md


def test_empty_group_is_an_error():
    with pytest.raises(ValueError, match="at least one evaluation"):
        summarise({"grpo": []})


def test_cli_writes_table_json_and_plots(tmp_path):
    dirs = []
    for i, r in enumerate(GRPO + MRT):
        d = tmp_path / f"run{i}"
        d.mkdir()
        (d / "eval.json").write_text(json.dumps(r))
        dirs.append(str(d))
    out = tmp_path / "cmp"
    main(["--group", "grpo", dirs[0], dirs[1], "--group", "mrt-rl", dirs[2], "--out", str(out)])
    assert (out / "compare.md").read_text() == markdown_table(summarise({"grpo": GRPO, "mrt-rl": MRT}))
    saved = json.loads((out / "compare.json").read_text())
    assert saved["mrt-rl"]["pass@1"] == {"mean": 0.5, "std": 0.0}
    for name in ("compare_curves.png", "compare_regret.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_missing_eval_json_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no eval.json"):
        main(["--group", "grpo", str(tmp_path), "--out", str(tmp_path / "cmp")])
