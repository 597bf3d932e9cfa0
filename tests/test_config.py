"""Run configuration: defaults, YAML, dotted overrides, validation errors, dry run."""

import dataclasses
import subprocess
import sys

import pytest
import yaml

from pathlib import Path

from mrt_fast.config import (
    ALGORITHMS,
    RunConfig,
    check_packages,
    dump,
    from_dict,
    help_text,
    load,
    parse_args,
    preflight,
    required_packages,
    save,
    world_batch_check,
)

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_embedded_mrt_rl_job():
    cfg = parse_args([]).config
    assert cfg.algo.name == "mrt-rl" and cfg.model.path == "embedded" and cfg.data.source == "embedded"
    assert cfg.output_dir is None and cfg.resume is None


def test_yaml_then_cli_overrides_with_types(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"algo": {"name": "grpo", "alpha": 0.0},
                                    "optim": {"lr": 3e-6}, "train": {"steps": 5}}))
    args = parse_args(["--config", str(path), "--algo.alpha", "0.5", "--optim.lr=1e-6",
                       "--output-dir", "out/x", "--model.path", "007", "--algo.dual_clip", "3",
                       "--train.steps", "7", "--log.progress_bar", "false", "--dry-run"])
    cfg = args.config
    assert cfg.algo.name == "grpo"  # from the file
    assert cfg.algo.alpha == 0.5 and cfg.optim.lr == 1e-6  # CLI wins; "1e-6" is a float
    assert cfg.output_dir == "out/x" and cfg.model.path == "007"  # strings stay verbatim
    assert cfg.algo.dual_clip == 3.0 and isinstance(cfg.algo.dual_clip, float)
    assert cfg.train.steps == 7 and cfg.log.progress_bar is False and args.dry_run


@pytest.mark.parametrize("argv, error, match", [
    (["--algo.alhpa", "1"], ValueError,
     r"unknown config key 'algo.alhpa' \(did you mean 'algo.alpha'\?\); valid keys: algo.name, algo.alpha"),
    (["--train.lr", "1"], ValueError, r"did you mean 'optim.lr'"),
    (["--optim.learning_rate", "1"], ValueError, r"did you mean 'optim.lr'"),
    (["--nope", "1"], ValueError, r"unknown config key 'nope'; valid keys: model.path"),
    (["--train.steps", "1.5"], TypeError, r"train.steps expects int, got 1.5"),
    (["--log.tensorboard", "maybe"], TypeError, r"log.tensorboard expects bool"),
    (["--algo.name", "ppo"], ValueError, r"algo.name must be one of \['sft', 'grpo', 'mrt-rl', 'mrt-star', 'mrt-online'\]"),
    (["--algo.loss_agg", "sum"], ValueError, r"algo.loss_agg must be one of"),
    (["--train.global_batch_size", "6", "--train.mini_batch_size", "4"], ValueError, r"multiple of"),
    (["--algo.beta", "0.04"], ValueError, r"model.reference_model"),
    (["--optim.lr", "-1"], ValueError, r"optim.lr must be > 0"),
    (["--train.steps", "null"], TypeError, r"train.steps may not be null"),
    (["--algo.name", "grpo", "--rollout.n", "1"], ValueError, r"rollout.n >= 2"),
    (["--resume", "/no/such/dir"], ValueError, r"resume must be 'auto' or an existing"),
    # non-finite and out-of-range values the run would reject or mishandle: caught by the config
    (["--optim.lr", "nan"], ValueError, r"optim.lr must be a finite number, got nan"),
    (["--optim.lr", "inf"], ValueError, r"optim.lr must be a finite number"),
    (["--optim.grad_clip", "nan"], ValueError, r"optim.grad_clip must be a finite number"),
    (["--algo.alpha", "nan"], ValueError, r"algo.alpha must be a finite number"),
    (["--rollout.temperature", "nan"], ValueError, r"rollout.temperature must be a finite number"),
    (["--optim.warmup_ratio", "nan"], ValueError, r"optim.warmup_ratio must be a finite number"),
    (["--algo.eps_low", "nan"], ValueError, r"algo.eps_low must be a finite number"),
    (["--rollout.top_p", "0"], ValueError, r"rollout.top_p must lie in \(0.0, 1.0\]"),
    (["--eval.top_p", "1.5"], ValueError, r"eval.top_p must lie in"),
    (["--rollout.top_k", "-5"], ValueError, r"rollout.top_k must be >= 0"),
    (["--algo.episode_min_gap", "-1"], ValueError, r"algo.episode_min_gap must be >= 0"),
    (["--optim.beta2", "1"], ValueError, r"optim.beta2 must lie in \[0.0, 1.0\)"),
    (["--output-dir", ""], ValueError, r"output_dir \(--output-dir\) must be a directory path"),
    (["--eval.budgets", "64,x"], TypeError, r"eval.budgets\[1\] expects int"),
    (["--algo.loss_agg", "dr_grpo"], ValueError, r"TRL's 'dr_grpo' is 'seq-mean-token-sum-norm' here"),
    (["--config", "/no/such.yaml"], ValueError, r"no such file"),
    (["--algo.alpha"], ValueError, r"needs a value"),
    (["positional"], ValueError, r"unexpected argument"),
])
def test_bad_input_names_the_key(argv, error, match):
    with pytest.raises(error, match=match):
        parse_args(argv)


def test_nested_yaml_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'optim.learning_rate' .*; valid keys: optim.lr"):
        from_dict({"optim": {"learning_rate": 1.0}})
    with pytest.raises(TypeError, match="config section algo must be a mapping"):
        from_dict({"algo": 3})


def test_save_load_round_trip(tmp_path):
    cfg = parse_args(["--algo.name", "sft", "--train.seed", "3"]).config
    save(cfg, tmp_path / "config.yaml")
    assert load(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load(dump(cfg))["algo"]["name"] == "sft"


def test_every_algorithm_validates():
    for name in ALGORITHMS:
        assert from_dict({"algo": {"name": name}}).algo.name == name


def test_global_batch_must_split_over_ranks():
    cfg = RunConfig()
    cfg.train.global_batch_size = 6
    cfg.train.mini_batch_size = 6
    world_batch_check(cfg, 3)
    with pytest.raises(ValueError, match=r"train.global_batch_size \(6\) must be divisible by the world size \(4\)"):
        world_batch_check(cfg, 4)


def test_cli_dry_run_prints_config_and_rejects_unknown_keys():
    ok = subprocess.run([sys.executable, "-m", "mrt_fast.train", "--dry-run", "--algo.alpha", "0.25"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    printed = yaml.safe_load(ok.stdout.split("[mrt_fast.train]")[0])
    assert printed["algo"]["alpha"] == 0.25
    bad = subprocess.run([sys.executable, "-m", "mrt_fast.train", "--algo.alhpa", "1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown config key 'algo.alhpa' (did you mean 'algo.alpha'?)" in bad.stderr


def test_lists_are_written_with_commas_or_brackets(tmp_path):
    assert parse_args(["--eval.budgets", "64,128"]).config.eval.budgets == [64, 128]
    assert parse_args(["--eval.budgets=[64, 128]"]).config.eval.budgets == [64, 128]
    assert parse_args(["--eval.budgets", "256"]).config.eval.budgets == [256]
    assert from_dict({"eval": {"budgets": "32, 64"}}).eval.budgets == [32, 64]
    with pytest.raises(TypeError, match=r"eval.budgets expects list of int, written 64,128 or \[64, 128\]"):
        from_dict({"eval": {"budgets": {"a": 1}}})


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("algo:\n  name: grpo\n  alpha: [1, 2\n")
    with pytest.raises(ValueError, match=r"--config .*broken.yaml: not valid YAML at line \d+, column \d+"):
        parse_args(["--config", str(path)])
    proc = subprocess.run([sys.executable, "-m", "mrt_fast.train", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "broken.yaml: not valid YAML" in proc.stderr and "Traceback" not in proc.stderr


def test_help_lists_every_key_with_type_default_and_meaning():
    text = help_text()
    for section in ("model", "data", "rollout", "algo", "optim", "train", "checkpoint", "eval", "log"):
        for f in dataclasses.fields(getattr(RunConfig(), section)):
            line = next(ln for ln in text.splitlines() if ln.strip().startswith(f"--{section}.{f.name} ("))
            assert "default " in line, line
            meaning = text.splitlines()[text.splitlines().index(line) + 1].strip()
            assert meaning and not meaning.startswith("--"), f"{section}.{f.name} has no meaning"
    assert "--algo.loss_agg (token-mean | seq-mean-token-mean" in text  # choices are shown
    assert "--eval.budgets (list of int, default [])" in text
    for flag in ("--output-dir", "--resume", "--dry-run", "--export-only"):
        assert flag in text


def test_every_shipped_config_loads_and_validates():
    files = sorted((REPO / "configs").glob("**/*.yaml"))
    assert len(files) >= 3, files
    for path in files:
        cfg = load(path)
        assert isinstance(cfg, RunConfig), path


def test_default_job_needs_no_optional_package():
    assert required_packages(parse_args([]).config) == []


def test_missing_optional_packages_are_named_with_their_config_key(tmp_path, monkeypatch):
    import importlib.util

    data = tmp_path / "d.parquet"
    data.write_bytes(b"")
    cfg = parse_args(["--data.source", str(data), "--rollout.engine", "vllm"]).config
    needed = {(pip, key) for _, pip, key in required_packages(cfg)}
    assert needed == {("datasets", "data.source"), ("math-verify", "data.grader"), ("vllm", "rollout.engine")}
    real = importlib.util.find_spec
    absent = {"datasets", "math_verify", "vllm"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in absent else real(name, *a))
    with pytest.raises(ValueError, match=r"data.source needs 'datasets'.*data.grader needs 'math-verify'.*"
                                         r"rollout.engine needs 'vllm'"):
        check_packages(cfg)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("")
    check_packages(parse_args(["--data.source", str(jsonl), "--data.grader", "exact"]).config)  # needs neither


@pytest.mark.parametrize("argv, message", [
    (["--model.path", "/no/such/model"], "model.path='/no/such/model' does not exist"),
    (["--data.source", "/no/such.jsonl"], "data.source='/no/such.jsonl' does not exist"),
    (["--eval.source", "/no/eval.jsonl"], "eval.source='/no/eval.jsonl' does not exist"),
])
def test_preflight_checks_paths(argv, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        preflight(parse_args(argv).config)


def test_dry_run_checks_paths_and_output_dir(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for argv, message in ((["--model.path", "/no/such/model"], "model.path='/no/such/model' does not exist"),
                          (["--output-dir", str(a_file)], "exists and is not a directory"),
                          (["--output-dir", ""], "must be a directory path")):
        proc = subprocess.run([sys.executable, "-m", "mrt_fast.train", "--dry-run", *argv],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
