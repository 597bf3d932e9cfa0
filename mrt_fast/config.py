"""Run configuration: typed dataclasses, YAML files and dotted command-line overrides.

A run is described by one :class:`RunConfig`. Values come, in increasing priority, from the
dataclass defaults (the embedded default job), a YAML file (``--config run.yaml``) and dotted
overrides on the command line (``--algo.alpha 0.5`` or ``--algo.alpha=0.5``). Every key is
checked against the dataclasses: an unknown key is an error that lists the valid ones, and a
value of the wrong type is an error that names the key and the expected type.

Batch sizes are *global* (algorithmic) quantities, counted in prompts, so a run means the same
thing on 1 or 64 GPUs; ``train.max_tokens_per_micro_batch`` is the per-GPU performance knob.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

ALGORITHMS = ("sft", "grpo", "mrt-rl", "mrt-star", "mrt-online")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
SCHEDULERS = ("cosine", "constant")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ENGINES = ("hf", "vllm")
ATTN_BACKENDS = ("auto", "flex", "sdpa", "flash_varlen")  # mrt_fast.packing.BACKENDS + auto

EMBEDDED = "embedded"  # the tiny warm-started model / synthetic task shipped with the package


@dataclass
class ModelConfig:
    """Which causal LM to train and how to hold it."""

    path: str = EMBEDDED  # local directory, hub name, or "embedded" (mrt_fast.data.synthetic warm start)
    dtype: str = "auto"  # parameter dtype for compute: auto = bfloat16 on GPU, float32 on CPU
    gradient_checkpointing: bool = False
    attn_backend: str = "auto"  # packed attention: auto (flex on GPU, sdpa on CPU) | flex | sdpa | flash_varlen
    reference_model: bool = False  # keep a frozen copy for the KL penalty (needed when algo.beta > 0)
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    """Training problems. ``source`` is "embedded" or a local dataset (json/jsonl/parquet/csv file or
    a directory saved by ``datasets``)."""

    source: str = EMBEDDED
    split: str = "train"
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    response_column: str = "response"  # used by sft: the assistant text to imitate
    grader: str = "auto"  # auto (the embedded task's own; math for files) | math (last \boxed{}) | exact
    num_problems: int = 512  # size of the generated embedded training set
    task: str = "chain"  # embedded task variant: chain (in-context key search) | recall (fixed facts)
    difficulty: Optional[int] = None  # embedded task difficulty (None = the task's default)
    shuffle: bool = True


@dataclass
class RolloutConfig:
    """Sampling for the policy's own traces and for the meta-prover's forced-termination answers."""

    engine: str = "hf"
    n: int = 4  # traces per prompt (GRPO group size / MRT-RL branches per prefix)
    temperature: float = 0.9
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512  # the embedded task's warm-start traces run to ~300 tokens
    meta_k: int = 4  # forced-termination answers per boundary (the paper's K)
    meta_temperature: float = 0.6
    meta_top_p: float = 0.95
    meta_max_new_tokens: int = 32


@dataclass
class AlgoConfig:
    """The training algorithm and its loss."""

    name: str = "mrt-rl"  # sft | grpo | mrt-rl | mrt-star | mrt-online (per-episode dense progress)
    alpha: float = 1.0  # weight of the progress bonus (MRT); 0 with the group baseline is GRPO
    beta: float = 0.0  # KL penalty to the reference model (paper/TRL: 0.04; needs model.reference_model)
    kl_estimator: str = "k3"
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: Optional[float] = None
    entropy_coef: float = 0.0
    loss_agg: str = "token-mean"
    ppo_epochs: int = 1
    train_both_branches: bool = True  # MRT-RL: train on the terminate-now branch too
    episode_min_gap: int = 2
    episode_max_episodes: int = 64
    episode_group_size: int = 1


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0
    scheduler: str = "cosine"  # cosine | constant (both after linear warmup)
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0


@dataclass
class TrainConfig:
    steps: int = 6  # training steps (one rollout batch each); the default fits the 10-minute CPU job
    global_batch_size: int = 8  # prompts per step, over all ranks
    mini_batch_size: int = 8  # prompts per optimizer update (PPO mini-batch), over all ranks
    max_tokens_per_micro_batch: int = 4096  # per GPU: packed tokens per forward/backward
    seed: int = 0


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N steps (0: only at the end and on Ctrl-C)
    keep_last: int = 2
    export_hf: bool = True  # write an HF save_pretrained export at the end of the run
    export_every: int = 0  # also export every N steps (0: never)


@dataclass
class EvalConfig:
    """The short evaluation on held-out problems (``mrt_fast.eval``): accuracy, tokens, regret."""

    num_problems: int = 16  # held-out problems (0: no evaluation)
    samples: int = 1  # samples per problem
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    meta_k: int = 4  # forced-termination answers per episode boundary, for J and regret
    budgets: list[int] = field(default_factory=list)  # token budgets for normalised regret (default: max_new_tokens)
    every: int = 0  # also evaluate every N steps (0: only at the end)
    before_training: bool = True  # evaluate the starting model too (logged as step 0)


@dataclass
class LogConfig:
    tensorboard: bool = True  # also write TensorBoard events when tensorboard is installed
    progress_bar: bool = True
    check_weights: bool = False  # after every step, verify all ranks' rollout weights are bit-identical


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    output_dir: Optional[str] = None  # run directory (default: runs/<algo>-<timestamp>)
    resume: Optional[str] = None  # "auto" (latest in output_dir) or a checkpoint directory


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def validate(cfg: RunConfig) -> RunConfig:
    """Check cross-field constraints; raise ValueError naming the offending key."""
    _choice("algo.name", cfg.algo.name, ALGORITHMS)
    _choice("algo.loss_agg", cfg.algo.loss_agg, LOSS_AGG_MODES)
    _choice("algo.kl_estimator", cfg.algo.kl_estimator, KL_ESTIMATORS)
    _choice("optim.scheduler", cfg.optim.scheduler, SCHEDULERS)
    _choice("model.dtype", cfg.model.dtype, DTYPES)
    _choice("rollout.engine", cfg.rollout.engine, ENGINES)
    _choice("model.attn_backend", cfg.model.attn_backend, ATTN_BACKENDS)
    _choice("data.grader", cfg.data.grader, ("auto", "math", "exact"))
    for name in ("train.steps", "train.global_batch_size", "train.mini_batch_size",
                 "train.max_tokens_per_micro_batch", "rollout.n", "rollout.max_new_tokens",
                 "rollout.meta_k", "rollout.meta_max_new_tokens", "algo.ppo_epochs", "optim.lr",
                 "checkpoint.keep_last", "eval.samples", "eval.meta_k", "eval.max_new_tokens", "data.num_problems"):
        section, key = name.split(".")
        _positive(name, getattr(getattr(cfg, section), key))
    for name in ("optim.weight_decay", "optim.grad_clip", "optim.warmup_ratio", "optim.min_lr_ratio",
                 "algo.beta", "algo.alpha", "algo.entropy_coef", "algo.eps_low", "algo.eps_high",
                 "checkpoint.every", "checkpoint.export_every", "eval.num_problems", "eval.every",
                 "eval.temperature", "rollout.temperature", "rollout.meta_temperature"):
        section, key = name.split(".")
        _positive(name, getattr(getattr(cfg, section), key), allow_zero=True)
    if any(b <= 0 for b in cfg.eval.budgets):
        raise ValueError(f"eval.budgets must be positive token counts, got {cfg.eval.budgets}")
    if cfg.optim.warmup_ratio > 1 or cfg.optim.min_lr_ratio > 1:
        raise ValueError("optim.warmup_ratio and optim.min_lr_ratio must lie in [0, 1]")
    if cfg.train.global_batch_size % cfg.train.mini_batch_size:
        raise ValueError(
            f"train.global_batch_size ({cfg.train.global_batch_size}) must be a multiple of "
            f"train.mini_batch_size ({cfg.train.mini_batch_size})")
    if cfg.algo.beta > 0 and not cfg.model.reference_model:
        raise ValueError("algo.beta > 0 (KL penalty) needs model.reference_model: true")
    if cfg.algo.name in ("mrt-rl",) and cfg.rollout.n < 2:
        raise ValueError("algo.name=mrt-rl needs rollout.n >= 2 (half terminate now, half continue)")
    if cfg.algo.name == "grpo" and cfg.rollout.n < 2:
        raise ValueError("algo.name=grpo needs rollout.n >= 2 (the group baseline)")
    if cfg.algo.dual_clip is not None and cfg.algo.dual_clip <= 1:
        raise ValueError(f"algo.dual_clip must be > 1 (or null), got {cfg.algo.dual_clip}")
    if cfg.resume is not None and cfg.resume != "auto" and not Path(cfg.resume).exists():
        raise ValueError(f"resume must be 'auto' or an existing checkpoint directory, got {cfg.resume!r}")
    return cfg


def world_batch_check(cfg: RunConfig, world_size: int) -> None:
    """Global batch sizes are split evenly over ranks: say so early rather than drop prompts."""
    for name, value in (("train.global_batch_size", cfg.train.global_batch_size),
                        ("train.mini_batch_size", cfg.train.mini_batch_size)):
        if value % world_size:
            raise ValueError(f"{name} ({value}) must be divisible by the world size ({world_size})")


# ---------------------------------------------------------------------------------------------
# Building a config from dicts (YAML) and dotted overrides
# ---------------------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise naming the key and expected type."""
    optional, base = _is_optional(tp)
    if isinstance(value, _Raw):
        value = value.parse(base)
    if value is None:
        if optional:
            return None
        raise TypeError(f"{key} may not be null (expected {getattr(base, '__name__', base)})")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        if isinstance(value, (list, tuple)):
            return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    raise TypeError(f"{key} expects {getattr(base, '__name__', base)}"
                    f"{' or null' if optional else ''}, got {value!r} ({type(value).__name__})")


def _valid_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += _valid_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise TypeError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping, got {data!r}")
    types_ = _field_types(type(obj))
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in types_:
            sect = type(obj)
            raise ValueError(f"unknown config key {full!r}; valid keys: "
                             + ", ".join(_valid_keys(sect, prefix)))
        tp = types_[key]
        if dataclasses.is_dataclass(tp):
            _apply(getattr(obj, key), value, f"{full}.")
        else:
            setattr(obj, key, _coerce(full, value, tp))


def from_dict(data: dict) -> RunConfig:
    """A validated RunConfig from a nested dict (defaults for missing keys)."""
    cfg = RunConfig()
    _apply(cfg, data or {})
    return validate(cfg)


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"cannot set {dotted}: {part} is not a section")
        node = nxt
    node[parts[-1]] = value


# Top-level flags that are spelled with dashes on the command line.
_FLAG_ALIASES = {"output-dir": "output_dir", "output_dir": "output_dir", "resume": "resume"}
_BOOL_FLAGS = ("dry-run", "export-only")


@dataclass
class CLIArgs:
    config: RunConfig
    dry_run: bool = False
    export_only: bool = False


USAGE = """usage: python -m mrt_fast.train [--config run.yaml] [--section.key VALUE ...]
                               [--output-dir DIR] [--resume auto|PATH] [--dry-run] [--export-only]

With no arguments: the embedded default job (tiny warm-started model, synthetic task, MRT-RL,
short evaluation). Every config key can be overridden with a dotted flag, e.g. --algo.alpha 0.5.
"""


def parse_args(argv: Optional[list[str]] = None) -> CLIArgs:
    """Parse ``--config``, dotted overrides and the run flags into a validated config."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = None
    overrides: list[tuple[str, str]] = []
    flags = {name: False for name in _BOOL_FLAGS}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(USAGE + "\nvalid keys:\n  " + "\n  ".join(_valid_keys(RunConfig)))
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; options look like --section.key VALUE\n{USAGE}")
        key, eq, value = arg[2:].partition("=")
        if key in _BOOL_FLAGS:
            flags[key] = True if not eq else _coerce(key, value, bool)
            i += 1
            continue
        if not eq:
            if i + 1 >= len(argv):
                raise ValueError(f"--{key} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if key == "config":
            config_path = value
        else:
            overrides.append((_FLAG_ALIASES.get(key, key), value))

    data: dict = {}
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ValueError(f"--config: no such file {config_path!r}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise TypeError(f"--config {config_path}: expected a mapping at the top level")
    for key, raw in overrides:
        _set_dotted(data, key, _Raw(raw))
    return CLIArgs(config=from_dict(data), dry_run=flags["dry-run"], export_only=flags["export-only"])


class _Raw(str):
    """A command-line value: parsed according to the type of the field it lands in."""

    def parse(self, base: Any) -> Any:
        text = str(self)
        if text.lower() in ("null", "none", "~"):
            return None
        if base is str:
            return text  # keep paths such as "1e3" or "007" verbatim
        if base is float:
            try:  # PyYAML (YAML 1.1) would read "1e-6" without a dot as a string
                return float(text)
            except ValueError:
                return text
        return yaml.safe_load(text)


def dump(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save(cfg: RunConfig, path: Path) -> None:
    path.write_text(dump(cfg))


def load(path: Path) -> RunConfig:
    return from_dict(yaml.safe_load(Path(path).read_text()))
