"""`python -m mrt_fast.eval` end to end on a tiny random model saved like a trainer run, and its errors."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from mrt_fast.eval import main, normalized_regret, pass_at_k

needs_math_verify = pytest.mark.skipif(importlib.util.find_spec("math_verify") is None,
                                       reason="the math grader needs the optional math-verify package")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with an hf/ export (random tiny Qwen2 + the tiny tokenizer) and a jsonl dataset."""
    from transformers import AutoModelForCausalLM

    from mrt_fast.data import build_tiny_tokenizer
    from mrt_fast.data.tiny_model import tiny_model_config

    root = tmp_path_factory.mktemp("run")
    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = tiny_model_config(len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    rows = [{"question": "Find the key whose value is 3.\nKeys: b=3, c=4.", "answer": "b"},
            {"question": "Find the key whose value is 4.\nKeys: b=3, c=4.", "answer": "c"}]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_eval_writes_json_and_plots_with_consistent_numbers(run_dir, tmp_path):
    out = tmp_path / "eval"
    rc = main([
        "--model", str(run_dir), "--dataset", str(run_dir / "data.jsonl"), "--prompt-column", "question",
        "--grader", "exact", "--n", "2", "--max-new-tokens", "12", "--meta-k", "2", "--meta-max-new-tokens", "4",
        "--budgets", "6,12,30", "--forcing-budget", "30", "--forcing-step", "8", "--out", str(out), "--no-progress",
        "--regret-tokens", "response",  # x = response tokens: the first point at 0
    ])
    assert rc == 0
    result = json.loads((out / "eval.json").read_text())
    assert (out / "regret_curve.png").stat().st_size > 0 and (out / "regret.png").stat().st_size > 0
    assert result["num_problems"] == 2 and set(result["pass@k"]) == {"1", "2"}
    per = result["per_problem"]
    assert result["pass@1"] == pytest.approx(sum(sum(p["correct"]) / 2 for p in per) / 2)
    assert result["pass@k"]["2"] == pytest.approx(sum(pass_at_k(2, sum(p["correct"]), 2) for p in per) / 2)
    assert result["mean_tokens"] == pytest.approx(sum(sum(p["tokens"]) for p in per) / 4)
    curves = result["curves"]
    assert len(curves) == 2  # --regret-samples 1: one curve per problem
    for c in curves:
        assert c["tokens"][0] == 0 and c["tokens"] == sorted(c["tokens"])
        assert all(j in (0.0, 0.5, 1.0) for j in c["J"])  # k = 2 forced answers
        assert c["forced_from"] < len(c["tokens"])  # budget forcing added points past the trace
        assert c["tokens"][-1] >= 30 - 8  # it ran to (about) the forcing budget
    for b, value in result["regret"].items():
        expected = sum(normalized_regret(c["tokens"], c["J"], int(b)) for c in curves) / 2
        assert value == pytest.approx(expected)
    assert len(result["curve"]["tokens"]) == len(result["curve"]["J"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt-column", "prompt"], "missing column"),
        pytest.param(["--prompt-column", "question", "--grader", "math", "--ks", "0"], "k must be >= 1",
                     marks=needs_math_verify),
        (["--prompt-column", "question", "--n", "0"], "--n must be >= 1"),
        (["--prompt-column", "question", "--ks", "3", "--n", "2"], "k=3 needs at least k samples"),
    ],
)
def test_eval_bad_input_is_a_clear_error(run_dir, tmp_path, capsys, extra, message):
    rc = main(["--model", str(run_dir), "--dataset", str(run_dir / "data.jsonl"), "--grader", "exact",
               "--out", str(tmp_path), "--no-progress", *extra])
    assert rc == 2 and message in capsys.readouterr().err


@needs_math_verify
@pytest.mark.parametrize("answer", ["  ", None])
def test_eval_ungradeable_answers_are_rejected_before_sampling(run_dir, tmp_path, capsys, answer):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "2+2?", "answer": "4"}) + "\n" + json.dumps({"prompt": "1+1?", "answer": answer}))
    rc = main(["--model", str(run_dir), "--dataset", str(data), "--grader", "math", "--max-new-tokens", "2",
               "--out", str(tmp_path)])
    assert rc == 2 and "row 1" in capsys.readouterr().err


def test_module_entry_point_runs_and_help_shows_the_trainers_defaults():
    from mrt_fast.config import EvalConfig

    proc = subprocess.run([sys.executable, "-m", "mrt_fast.eval", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--forcing-budget" in proc.stdout
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    defaults = EvalConfig()
    for flag, value in (("--temperature TEMPERATURE", defaults.temperature), ("--top-p TOP_P", defaults.top_p),
                        ("--n N", defaults.samples), ("--max-new-tokens MAX_NEW_TOKENS", defaults.max_new_tokens),
                        ("--num-problems NUM_PROBLEMS", defaults.num_problems)):
        after = text[text.index(flag + " "):]
        assert f"(default: {value})" in after[:300], flag
    assert "(default: None)" not in text


def test_eval_prints_plot_paths_and_labels_the_accuracy(run_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    rc = main(["--model", str(run_dir), "--dataset", str(run_dir / "data.jsonl"), "--prompt-column", "question",
               "--grader", "exact", "--n", "1", "--temperature", "0", "--max-new-tokens", "8", "--meta-k", "1",
               "--meta-max-new-tokens", "2", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "pass@1 (greedy, 1 sample, 8 tokens): " in printed
    for name in ("eval.json", "regret_curve.png", "regret.png"):
        assert f"wrote {out / name}" in printed


def test_run_directory_without_any_export_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["--model", str(tmp_path / "run"), "--out", str(tmp_path / "ev"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no hf/ or hf-step_N/ export" in err and "--resume auto --export-only" in err
