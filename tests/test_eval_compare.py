"""`python -m mrt_fast.eval.compare`: mean ± std over seeds, the shared budgets, the table and plots."""

import json
import math

import numpy as np
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


# ----------------------------------------------------------------------------------------------
# Paired bootstrap against a baseline
# ----------------------------------------------------------------------------------------------


def per_problem_result(correct, tokens, curves):
    """An eval.json with per-problem rows: ``correct[p]`` / ``tokens[p]`` per sample, ``curves[p]`` = (tokens, J)."""
    rows = [{"correct": c, "tokens": t} for c, t in zip(correct, tokens)]
    return {"pass@1": 0.0, "mean_tokens": 0.0, "J_at_empty_prefix": 0.0, "J_at_end_of_thinking": 0.0,
            "regret": {"100": 0.0}, "curve": {"tokens": [0, 100], "J": [0.0, 0.0]}, "per_problem": rows,
            "curves": [{"problem": p, "tokens": x, "J": j} for p, (x, j) in enumerate(curves)]}


def test_per_problem_table_by_hand():
    from mrt_fast.eval.compare import per_problem_table

    r = per_problem_result([[True, False], [True, True]], [[10, 30], [20, 20]],
                           [([50, 100], [0.5, 1.0]), ([100], [0.0])])
    t = per_problem_table(r, ["100"])
    # pass@1, tokens, solved, J at the empty prefix, unproductive episodes (no texts: NaN),
    # regret@100 (area: 0.5*50*0.5 + 50*(0.5+1)/2 = 50)
    assert np.isnan(t[:, 4]).all()
    assert t[:, [0, 1, 2, 3, 5]].tolist() == [[0.5, 40.0, 1.0, 0.5, 0.5], [1.0, 40.0, 2.0, 0.0, 1.0]]
    r["per_problem"][0]["texts"] = ["Let me try c.\n\nWait, try c.\n\nWait, try d.", "Let me try d."]
    r["per_problem"][1]["texts"] = ["", ""]
    assert per_problem_table(r, ["100"])[:, 4].tolist() == [0.5, 0.0]  # one re-check of c in 2 samples


def test_paired_bootstrap_exact_shift_has_a_zero_width_interval():
    from mrt_fast.eval.compare import paired_bootstrap

    rng = np.random.default_rng(1)
    base = np.zeros((3, 20, 6))
    base[..., 0] = rng.uniform(0, 0.8, (3, 20))       # pass@1
    base[..., 1] = 100.0                               # tokens
    base[..., 2] = 2.0                                 # solved
    base[..., 4] = 1.0                                 # unproductive episodes per trace
    base[..., 5] = rng.uniform(0.2, 0.9, (3, 20))     # regret
    method = base.copy()
    method[..., 0] += 0.1
    method[..., 1] = 50.0                              # half the tokens for the same solves
    method[..., 4] = 0.25
    method[..., 5] -= 0.05
    out = paired_bootstrap(method, base, ["100"], resamples=200)
    assert out["pass@1"] == pytest.approx((0.1, 0.1, 0.1))
    assert out["regret@100"] == pytest.approx((-0.05, -0.05, -0.05))
    assert out["tokens_per_solve"] == pytest.approx((2.0, 2.0, 2.0))
    assert out["J_at_empty_prefix"] == (0.0, 0.0, 0.0)
    assert out["unproductive_episodes"] == pytest.approx((-0.75, -0.75, -0.75))


def test_paired_bootstrap_interval_covers_the_point_and_reflects_noise():
    from mrt_fast.eval.compare import paired_bootstrap

    rng = np.random.default_rng(2)
    base = np.ones((3, 64, 6))
    base[..., 0] = rng.uniform(0, 1, (3, 64))
    noisy = base.copy()
    noisy[..., 0] = rng.uniform(0, 1, (3, 64))  # unrelated: the interval must include 0
    v, lo, hi = paired_bootstrap(noisy, base, ["100"], resamples=500)["pass@1"]
    assert lo < v < hi and lo < 0 < hi
    shifted = base.copy()
    shifted[..., 0] = np.clip(base[..., 0] + 0.2 + rng.normal(0, 0.05, (3, 64)), 0, 1)
    v, lo, hi = paired_bootstrap(shifted, base, ["100"], resamples=500)["pass@1"]
    assert 0 < lo < v < hi


def test_paired_comparison_needs_matching_seeds_and_per_problem_rows():
    from mrt_fast.eval.compare import paired_comparison

    r = per_problem_result([[True]], [[10]], [([10], [1.0])])
    with pytest.raises(ValueError, match="same seeds"):
        paired_comparison({"grpo": [r, r], "mrt": [r]}, "grpo")
    with pytest.raises(ValueError, match="not one of the groups"):
        paired_comparison({"grpo": [r]}, "mrt")
    with pytest.raises(ValueError, match="per-problem results"):
        paired_comparison({"grpo": GRPO[:1], "mrt": MRT}, "grpo")


def test_cli_baseline_writes_paired_table(tmp_path):
    a = per_problem_result([[True, False], [False, False]], [[10, 30], [20, 20]],
                           [([50, 100], [0.5, 1.0]), ([100], [0.0])])
    b = per_problem_result([[True, True], [True, False]], [[10, 10], [20, 20]],
                           [([50, 100], [1.0, 1.0]), ([100], [0.5])])
    dirs = []
    for name, r in (("g", a), ("m", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps(r))
        dirs.append(str(tmp_path / name))
    out = tmp_path / "cmp"
    main(["--group", "grpo", dirs[0], "--group", "mrt", dirs[1], "--out", str(out), "--baseline", "grpo",
          "--resamples", "100"])
    paired = json.loads((out / "paired.json").read_text())
    assert paired["mrt"]["pass@1"]["estimate"] == pytest.approx(0.75 - 0.25)
    assert paired["mrt"]["tokens_per_solve"]["estimate"] == pytest.approx((80 / 1) / (60 / 3))
    assert "Differences to grpo" in (out / "paired.md").read_text()


def test_cli_keeps_a_single_reference_run_out_of_the_pairing_and_says_so(tmp_path):
    """The experiment's table shows the starting checkpoint (one evaluation) beside arms of several
    seeds; the paired table compares the arms and names the group it left out."""
    a = per_problem_result([[True, False]], [[10, 30]], [([50, 100], [0.5, 1.0])])
    b = per_problem_result([[True, True]], [[10, 10]], [([50, 100], [1.0, 1.0])])
    paths = {}
    for name, r in (("g0", a), ("g1", a), ("m0", b), ("m1", b), ("w", a)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps(r))
        paths[name] = str(tmp_path / name)
    out = tmp_path / "cmp"
    main(["--group", "start", paths["w"], "--group", "grpo", paths["g0"], paths["g1"],
          "--group", "mrt", paths["m0"], paths["m1"], "--out", str(out), "--baseline", "grpo", "--resamples", "100"])
    assert "start" in (out / "compare.md").read_text()
    assert set(json.loads((out / "paired.json").read_text())) == {"mrt"}
    assert "start: 1 evaluation(s) against 2 of grpo, in compare.md but not paired." in (out / "paired.md").read_text()
    with pytest.raises(SystemExit):
        main(["--group", "grpo", paths["g0"], "--out", str(out), "--baseline", "nope"])
