"""The GPU path around the vLLM engine that runs without a GPU: `mrt_fast.loss` importing with only
torch (and triton), the first-contact script's mechanics and its fp64 reference, the shipped 8-GPU
config, and the Hugging Face math converter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "scripts"))

import convert_hf_math  # noqa: E402
import gpu_check  # noqa: E402

OPTIONAL = ["transformers", "tokenizers", "datasets", "vllm", "flash_attn", "liger_kernel", "math_verify",
            "yaml", "tensorboard", "safetensors", "accelerate", "huggingface_hub"]


def test_loss_imports_and_runs_with_only_torch_and_triton():
    code = (f"import sys\nsys.modules.update(dict.fromkeys({OPTIONAL!r}))\n"
            "import torch, mrt_fast.loss as L\n"
            "h = torch.randn(8, 4, requires_grad=True); w = torch.randn(11, 4, requires_grad=True)\n"
            "loss, _ = L.fused_policy_loss(h, w, torch.randint(0, 11, (8,)), torch.randn(8))\n"
            "loss.backward(); assert h.grad is not None and w.grad is not None; print('ok')\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MRT_FAST_KERNEL_BACKEND": "torch"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_the_kernel_checks_fp64_reference_equals_autograd():
    """gpu_check's chunked closed-form reference (what the kernels are judged against) is itself right."""
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(19, 7, generator=g, dtype=torch.float64), torch.randn(23, 7, generator=g, dtype=torch.float64)
    targets, g_logp = torch.randint(0, 23, (19,), generator=g), torch.randn(19, generator=g, dtype=torch.float64)
    logp, dh, dw = gpu_check._reference_grads(hidden, weight, targets, g_logp, chunk=5)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = torch.log_softmax(h @ w.T, -1).gather(1, targets[:, None]).squeeze(1)
    (want * g_logp).sum().backward()
    torch.testing.assert_close(logp, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dh, h.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw, w.grad, rtol=1e-12, atol=1e-12)


def test_gpu_check_script_reports_parts_and_failures(tmp_path):
    """The shell script's mechanics on the CPU: a part that passes, one that does not apply (vllm
    absent), the summary table and the report file."""
    out = tmp_path / "report.md"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu-dry-run", "--parts", "env,vllm",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    assert report == proc.stdout
    assert "| env | ok |" in report and "| vllm | ok |" in report
    assert "blocked: ok" in report and "### vLLM" in report
    bad = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--parts", "nothing", "--cpu-dry-run"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--parts names none of" in bad.stderr


def test_shipped_8_gpu_config_validates():
    from mrt_fast.config import load, required_packages

    cfg = load(ROOT / "configs" / "gpu_mrt_rl_8xh100.yaml")  # every value validated; paths are the user's to set
    assert cfg.rollout.engine == "vllm" and cfg.vllm.enable_sleep_mode and cfg.algo.name == "mrt-rl"
    assert cfg.vllm.max_model_len >= cfg.rollout.max_new_tokens + cfg.rollout.meta_max_new_tokens + 64
    assert cfg.train.global_batch_size % 8 == 0 and cfg.train.mini_batch_size % 8 == 0
    assert ("vllm", "vllm", "rollout.engine") in required_packages(cfg)  # --dry-run checks it is installed


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_convert_math_gsm8k_and_answer_columns(tmp_path):
    math_dir = tmp_path / "hub" / "data"
    math_dir.mkdir(parents=True)
    _write_jsonl(math_dir / "train-00000.jsonl", [
        {"problem": "Compute $1+1$.", "solution": "We add: $\\boxed{2}$.", "level": "Level 1"},
        {"problem": "Find $\\frac{1}{2}+\\frac{1}{2}$.", "solution": "It is $\\boxed{\\frac{2}{2}} = \\boxed{1}$."},
    ])
    _write_jsonl(math_dir / "test-00000.jsonl", [{"problem": "x", "solution": "\\boxed{3}"}])
    out = tmp_path / "math.jsonl"
    assert convert_hf_math.main(["--input", str(tmp_path / "hub"), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["answer"] for r in rows] == ["2", "1"]  # the train files only; the last \boxed{}
    assert rows[0]["prompt"] == "Compute $1+1$.\n" + convert_hf_math.DEFAULT_INSTRUCTION

    gsm = tmp_path / "gsm8k.jsonl"
    _write_jsonl(gsm, [{"question": "2 apples and 3 more?", "answer": "2 + 3 = 5\n#### 5"}])
    rows, _ = convert_hf_math.convert(convert_hf_math.read_rows(gsm, "train"), instruction="")
    assert rows == [{"prompt": "2 apples and 3 more?", "answer": "5"}]

    plain = tmp_path / "aime.csv"
    plain.write_text("Problem,Answer\nFind n.,204\n")
    rows, _ = convert_hf_math.convert(convert_hf_math.read_rows(plain, "train"), problem_column="Problem",
                                      answer_column="Answer")
    assert rows[0]["answer"] == "204"


def test_convert_math_errors_name_the_problem(tmp_path, capsys):
    src = tmp_path / "d.jsonl"
    _write_jsonl(src, [{"problem": "p", "solution": "no boxed answer here"}, {"problem": "q", "solution": "\\boxed{7}"}])
    assert convert_hf_math.main(["--input", str(src), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "row 0: no answer in column 'solution'" in capsys.readouterr().err
    assert convert_hf_math.main(["--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--skip-unanswered"]) == 0
    assert "1 rows without an answer skipped" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no problem column"):
        convert_hf_math.convert([{"text": "a", "answer": "1"}])
    with pytest.raises(ValueError, match="does not exist"):
        convert_hf_math.read_rows(tmp_path / "missing", "train")


def test_converted_data_trains_with_the_math_grader(tmp_path):
    """The converter's output is what the trainer reads: prompt/answer columns, math grading."""
    from mrt_fast.config import parse_args
    from mrt_fast.train import grader_for, load_examples

    src, out = tmp_path / "d.jsonl", tmp_path / "o.jsonl"
    _write_jsonl(src, [{"problem": "1+1?", "solution": "\\boxed{2}"}])
    assert convert_hf_math.main(["--input", str(src), "--output", str(out)]) == 0
    cfg = parse_args(["--data.source", str(out), "--data.grader", "math", "--eval.num_problems", "0"]).config
    (example,) = load_examples(cfg)
    assert example.answer == "2" and "\\boxed{}" in example.prompt
    pytest.importorskip("math_verify", reason="the math grader needs math-verify")
    assert grader_for(cfg)("so the answer is \\boxed{2}", example.answer)
