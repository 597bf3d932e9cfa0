"""Run configuration: defaults, YAML, dotted overrides, validation errors, dry run."""

import subprocess
import sys

import pytest
import yaml

from mrt_fast.config import ALGORITHMS, RunConfig, dump, from_dict, load, parse_args, save, world_batch_check


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
    (["--algo.alhpa", "1"], ValueError, r"unknown config key 'algo.alhpa'; valid keys: algo.name, algo.alpha"),
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
    (["--config", "/no/such.yaml"], ValueError, r"no such file"),
    (["--algo.alpha"], ValueError, r"needs a value"),
    (["positional"], ValueError, r"unexpected argument"),
])
def test_bad_input_names_the_key(argv, error, match):
    with pytest.raises(error, match=match):
        parse_args(argv)


def test_nested_yaml_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'optim.learning_rate'; valid keys: optim.lr"):
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
    assert bad.returncode == 2 and "unknown config key 'algo.alhpa'" in bad.stderr
