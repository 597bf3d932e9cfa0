"""``python -m mrt_fast.eval`` on a model, device or output it cannot use: exit 2 with a message that
names the flag, before any model is loaded or any sample drawn."""

import pytest
import torch
from test_eval_cli import run_dir  # noqa: F401 - the module fixture is used by name

from mrt_fast.eval import main


@pytest.fixture
def no_sampling(monkeypatch):
    """Any of these errors must come before sampling: reaching the sampler fails the test."""
    import mrt_fast.eval.runner as runner

    def sampling_started(*args, **kwargs):
        raise AssertionError("sampling started before the bad input was reported")

    monkeypatch.setattr(runner, "evaluate", sampling_started)


def cases(run_dir, tmp_path):  # noqa: F811
    (tmp_path / "a_file").write_text("not a directory\n")
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text((run_dir / "hf" / "config.json").read_text())
    (tmp_path / "empty").mkdir()
    cases = {
        "model missing": (["--model", "/nonexistent/model"], "--model /nonexistent/model: no such directory"),
        "model a file": (["--model", str(tmp_path / "a_file")], "not a directory"),
        "model without config": (["--model", str(tmp_path / "empty")], "no config.json there, and no hf/ or hf-step_N/ export"),
        "model without tokenizer": (["--model", str(tmp_path / "config_only")], "has a model config but no tokenizer"),
        "out an existing file": (["--out", str(tmp_path / "a_file")], "exists and is not a directory"),
        "device nonsense": (["--device", "gpu0"], "--device 'gpu0': not a device name"),
    }
    if not torch.cuda.is_available():
        cases["cuda without CUDA"] = (["--device", "cuda"], "--device cuda: CUDA is not available here")
    return cases


CASES = ["model missing", "model a file", "model without config", "model without tokenizer", "out an existing file",
         "device nonsense", "cuda without CUDA"]


@pytest.mark.parametrize("case", CASES)
def test_eval_unusable_model_device_or_out_fails_before_sampling(run_dir, tmp_path, capsys, no_sampling, case):  # noqa: F811
    table = cases(run_dir, tmp_path)
    if case not in table:
        pytest.skip("CUDA is available here")
    extra, message = table[case]
    argv = ["--model", str(run_dir), "--dataset", str(run_dir / "data.jsonl"), "--prompt-column", "question",
            "--grader", "exact", "--out", str(tmp_path / "out"), "--no-progress", "--n", "1", *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
