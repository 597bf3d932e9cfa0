"""Run configuration: typed dataclasses, YAML files and dotted command-line overrides.

A run is described by one :class:`RunConfig`. Values come, in increasing priority, from the
dataclass defaults (the embedded default job), a YAML file (``--config configs/grpo.yaml``) and
dotted overrides on the command line (``--algo.alpha 0.5`` or ``--algo.alpha=0.5``). Every key is
checked against the dataclasses: an unknown key is an error that suggests the nearest valid one,
and a value of the wrong type is an error that names the key and the expected type. Each field
carries a one-line meaning (``help``) and, where it has a fixed vocabulary, its ``choices``:
``python -m mrt_fast.train --help`` prints them all.

Batch sizes are *global* (algorithmic) quantities, counted in prompts, so a run means the same
thing on 1 or 64 GPUs; ``train.max_tokens_per_micro_batch`` is the per-GPU performance knob.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from mrt_fast.kernels.reference import KL_ESTIMATORS, TRL_LOSS_TYPES, VERL_LOSS_AGGS

ALGORITHMS = ("sft", "grpo", "mrt-rl", "mrt-star", "mrt-online")
# The trainer takes verl's aggregation names. Its normaliser is always the whole PPO mini-batch over
# every rank, so TRL's names, which differ from these only in what counts as the batch, add nothing:
# each maps to a verl mode (a constant factor apart for dr_grpo).
LOSS_AGG_MODES = VERL_LOSS_AGGS
TRL_LOSS_AGG_EQUIVALENTS = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dapo": "token-mean",
                            "dr_grpo": "seq-mean-token-sum-norm"}
assert set(TRL_LOSS_AGG_EQUIVALENTS) == set(TRL_LOSS_TYPES)
SCHEDULERS = ("cosine", "constant")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ENGINES = ("hf", "vllm")
ATTN_BACKENDS = ("auto", "flex", "sdpa", "flash_varlen")  # mrt_fast.packing.BACKENDS + auto
GRADERS = ("auto", "math", "exact")

EMBEDDED = "embedded"  # the tiny warm-started model / synthetic task shipped with the package
HELD_OUT = "held-out"  # eval.source: problems kept out of training (see mrt_fast.data.problems)
DATASETS_FORMATS = (".parquet",)  # data files that need the datasets package (json/jsonl/csv do not)


def opt(default: Any, help: str, choices: tuple = ()) -> Any:
    """A config field with its one-line meaning (shown by ``--help``) and optional choices."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    """Which causal LM to train and how to hold it."""

    path: str = opt(EMBEDDED, "local HF model directory, hub name, or 'embedded' (the shipped tiny warm start)")
    dtype: str = opt("auto", "compute dtype: auto = bfloat16 on GPU, float32 on CPU", DTYPES)
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass to save memory")
    attn_backend: str = opt("auto", "packed attention kernel: auto = flex on GPU, sdpa on CPU", ATTN_BACKENDS)
    reference_model: bool = opt(False, "keep a frozen copy of the start model for the KL penalty (needed when algo.beta > 0)")
    trust_remote_code: bool = opt(False, "allow model code shipped with the checkpoint (transformers' trust_remote_code)")


@dataclass
class DataConfig:
    """Training problems: the embedded task or a local table."""

    source: str = opt(EMBEDDED, "'embedded' or a local json/jsonl/csv/parquet file or datasets directory")
    split: str = opt("train", "split of a saved datasets DatasetDict directory")
    prompt_column: str = opt("prompt", "column holding the problem text")
    answer_column: str = opt("answer", "column holding the reference answer")
    response_column: str = opt("response", "column holding the answer text to imitate (sft only)")
    grader: str = opt("auto", "answer checker: auto = the embedded task's own, math for files; math = math-verify "
                      "on the last \\boxed{}; exact = string equality", GRADERS)
    num_problems: int = opt(512, "how many embedded training problems to generate")
    task: str = opt("chain", "embedded task: chain (key search over a map drawn per problem) or recall "
                    "(fixed facts; answerable without thinking)", ("chain", "recall"))
    difficulty: Optional[int] = opt(None, "embedded task difficulty (null: the task's default)")
    shuffle: bool = opt(True, "reshuffle the problems every epoch (seeded)")


@dataclass
class RolloutConfig:
    """Sampling for the policy's own traces and for the meta-prover's forced-termination answers."""

    engine: str = opt("hf", "generation engine: hf (built in) or vllm (needs the vllm package)", ENGINES)
    n: int = opt(4, "traces per prompt (GRPO group size; MRT-RL branches per cut)")
    temperature: float = opt(0.9, "sampling temperature of the traces (0 = greedy)")
    top_p: float = opt(1.0, "nucleus sampling threshold, in (0, 1]")
    top_k: int = opt(0, "keep only the k most likely tokens (0 = all)")
    max_new_tokens: int = opt(512, "token budget of one trace (the embedded task's traces run to about 300)")
    meta_k: int = opt(8, "forced-termination answers at each boundary (the paper's K): J estimates, never trained")
    meta_temperature: float = opt(0.6, "temperature of the forced-termination answers")
    meta_top_p: float = opt(0.95, "nucleus threshold of the forced-termination answers, in (0, 1]")
    meta_max_new_tokens: int = opt(32, "token budget of one forced-termination answer")
    max_kv_tokens: Optional[int] = opt(None, "KV-cache slots the hf engine may hold at once (28 KiB each for a 1.5B "
                                       "Qwen2 in bf16); prompts are prefilled and decoded in waves that fit "
                                       "(null: one wave per batch of prompts)")


@dataclass
class VLLMConfig:
    """vLLM engine settings (used when ``rollout.engine`` is vllm; see docs/gpu.md). Every rank runs
    its own engine on its own GPU, next to its share of the trainer."""

    gpu_memory_utilization: float = opt(0.4, "fraction of the GPU vLLM takes for weights + KV cache, in (0, 1]")
    enable_sleep_mode: bool = opt(False, "free vLLM's GPU memory during each update, take it back for the sync")
    tensor_parallel_size: int = opt(1, "GPUs per engine; > 1 only in a single-process run")
    max_model_len: Optional[int] = opt(None, "prompt + generation context (null: the model's)")
    enforce_eager: bool = opt(False, "no CUDA graphs: faster start-up, slower decoding")
    dtype: str = opt("auto", "auto = the trainer's compute dtype (model.dtype)", DTYPES)


@dataclass
class AlgoConfig:
    """The training algorithm and its loss."""

    name: str = opt("mrt-rl", "training algorithm (see docs/training.md)", ALGORITHMS)
    alpha: float = opt(1.0, "weight of the progress bonus (MRT); 0 with the group baseline is GRPO")
    beta: float = opt(0.0, "KL penalty towards the start model (common: 0.04; needs model.reference_model)")
    kl_estimator: str = opt("k3", "KL estimator of the penalty (Schulman's k1/k2/k3)", KL_ESTIMATORS)
    eps_low: float = opt(0.2, "PPO clip range below 1 for the probability ratio")
    eps_high: float = opt(0.2, "PPO clip range above 1 (a larger value is DAPO's clip-higher)")
    dual_clip: Optional[float] = opt(None, "dual-clip constant c > 1 for negative advantages (null: off)")
    entropy_coef: float = opt(0.0, "entropy bonus weight")
    loss_agg: str = opt("token-mean", "how token losses are averaged (verl's names; TRL's map onto them)",
                        LOSS_AGG_MODES)
    ppo_epochs: int = opt(1, "passes over each step's rollouts")
    train_both_branches: bool = opt(True, "MRT-RL: also train n // 2 answer-now branches (sampled at "
                                         "rollout.temperature, with their sampling log-probs)")
    progress: str = opt("paper", "MRT-RL progress: paper (one measured J gain per continuation) or dense "
                        "(per episode)", ("paper", "dense"))
    normalize_std: str = opt("batch", "advantage scale: batch (divide by the step's RMS advantage, so every "
                             "algorithm takes steps of one size), group (GRPO's per-group std) or none",
                             ("batch", "group", "none"))
    length_penalty: float = opt(0.0, "GRPO: reward -= length_penalty * response tokens / rollout.max_new_tokens")
    episode_min_gap: int = opt(2, "paragraphs a new episode must be past the previous cut")
    episode_max_episodes: int = opt(49, "episode cuts per trace before the rest is one episode (the authors' 49)")
    episode_group_size: int = opt(1, "consecutive episodes merged into one")


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = opt(1e-5, "peak learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    beta1: float = opt(0.9, "AdamW beta1, in [0, 1)")
    beta2: float = opt(0.999, "AdamW beta2, in [0, 1)")
    eps: float = opt(1e-8, "AdamW epsilon")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = no clipping)")
    scheduler: str = opt("cosine", "LR shape after the linear warmup", SCHEDULERS)
    warmup_ratio: float = opt(0.1, "fraction of train.steps spent warming up, in [0, 1]")
    min_lr_ratio: float = opt(0.0, "cosine floor as a fraction of optim.lr, in [0, 1]")


@dataclass
class TrainConfig:
    """How long and how big."""

    steps: int = opt(6, "training steps (one rollout batch each)")
    global_batch_size: int = opt(8, "prompts per step, over all GPUs")
    mini_batch_size: int = opt(8, "prompts per optimizer update (PPO mini-batch), over all GPUs")
    max_tokens_per_micro_batch: int = opt(4096, "packed tokens per forward/backward on one GPU")
    seed: int = opt(0, "seed of data order, sampling and initialisation")


@dataclass
class CheckpointConfig:
    """What is saved, and when."""

    every: int = opt(0, "save every N steps (0: only at the end and on Ctrl-C)")
    keep_last: int = opt(2, "complete checkpoints kept")
    export_hf: bool = opt(True, "write a transformers save_pretrained export (hf/) at the end")
    export_every: int = opt(0, "also export hf-step_N/ every N steps (0: never)")


@dataclass
class EvalConfig:
    """The evaluation the trainer runs, with the same settings and code as ``python -m mrt_fast.eval``."""

    source: str = opt(HELD_OUT, "evaluation problems: held-out (embedded: a separate seed; a file: its last "
                      "eval.num_problems rows, not trained on), embedded, or another file")
    num_problems: int = opt(16, "problems evaluated (0: no evaluation)")
    samples: int = opt(4, "samples per problem (pass@1 averages them)")
    temperature: float = opt(0.6, "sampling temperature (0 = greedy)")
    top_p: float = opt(0.95, "nucleus sampling threshold, in (0, 1]")
    max_new_tokens: int = opt(512, "token budget of one response")
    meta_k: int = opt(4, "forced-termination answers per episode boundary, for J and regret")
    meta_max_new_tokens: int = opt(32, "token budget of one forced-termination answer")
    budgets: list[int] = opt([], "token budgets of the normalised regret (empty: 1/4, 1/2 and all of max_new_tokens)")
    regret_tokens: str = opt("authors", "regret x-axis: authors (meta-prover input + mean forced-answer length) or "
                             "response (response tokens before each boundary)", ("authors", "response"))
    every: int = opt(0, "also evaluate every N steps (0: only before and after training)")
    before_training: bool = opt(True, "evaluate the starting model too (logged as step 0)")


@dataclass
class LogConfig:
    """What the run reports while it runs."""

    tensorboard: bool = opt(True, "also write TensorBoard events when the tensorboard package is installed")
    progress_bar: bool = opt(True, "show progress bars for training and evaluation")
    plots: bool = opt(True, "write training_curves.png into the run directory at the end")
    check_weights: bool = opt(False, "after every step, check that all GPUs hold bit-identical weights")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    output_dir: Optional[str] = opt(None, "run directory (default: runs/<algo>-<UTC time>)")
    resume: Optional[str] = opt(None, "'auto' (the latest checkpoint of output_dir) or a checkpoint directory")


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _get(cfg: RunConfig, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _at_least(cfg: RunConfig, names: tuple, low: int) -> None:
    for name in names:
        value = _get(cfg, name)
        if value < low:
            raise ValueError(f"{name} must be {'> 0' if low == 1 else f'>= {low}'}, got {value!r}")


def _in_range(name: str, value: float, low: float, high: float, *, low_open: bool = False,
              high_open: bool = False) -> None:
    ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        raise ValueError(f"{name} must lie in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}, "
                         f"got {value!r}")


def validate(cfg: RunConfig) -> RunConfig:
    """Check choices, ranges and cross-field constraints; raise ValueError naming the offending key.

    Floats are already finite (:func:`_coerce` rejects NaN and infinity). Paths and installed
    packages are checked by :func:`preflight`, which the trainer and ``--dry-run`` call.
    """
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        for f in dataclasses.fields(value):
            choices = f.metadata.get("choices")
            current = getattr(value, f.name)
            if choices and current not in choices:
                hint = ""
                if f.name == "loss_agg" and current in TRL_LOSS_AGG_EQUIVALENTS:
                    hint = (f"; TRL's {current!r} is {TRL_LOSS_AGG_EQUIVALENTS[current]!r} here, since the trainer "
                            "always normalises over the whole mini-batch (docs/training.md)")
                raise ValueError(f"{section.name}.{f.name} must be one of {list(choices)}, got {current!r}{hint}")
    _at_least(cfg, ("train.steps", "train.global_batch_size", "train.mini_batch_size",
                    "train.max_tokens_per_micro_batch", "rollout.n", "rollout.max_new_tokens", "rollout.meta_k",
                    "rollout.meta_max_new_tokens", "algo.ppo_epochs", "algo.episode_group_size", "checkpoint.keep_last", "eval.samples", "eval.meta_k",
                    "eval.max_new_tokens", "eval.meta_max_new_tokens", "data.num_problems"), 1)
    _at_least(cfg, ("checkpoint.every", "checkpoint.export_every", "eval.num_problems", "eval.every",
                    "rollout.top_k", "algo.episode_min_gap", "algo.episode_max_episodes"), 0)
    if cfg.optim.lr <= 0:
        raise ValueError(f"optim.lr must be > 0, got {cfg.optim.lr!r}")
    for name in ("optim.weight_decay", "optim.grad_clip", "optim.eps", "algo.beta", "algo.alpha",
                 "algo.entropy_coef", "algo.eps_low", "algo.eps_high", "eval.temperature", "rollout.temperature",
                 "rollout.meta_temperature"):
        if _get(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {_get(cfg, name)!r}")
    for name in ("rollout.top_p", "rollout.meta_top_p", "eval.top_p"):
        _in_range(name, _get(cfg, name), 0.0, 1.0, low_open=True)
    for name in ("optim.warmup_ratio", "optim.min_lr_ratio"):
        _in_range(name, _get(cfg, name), 0.0, 1.0)
    for name in ("optim.beta1", "optim.beta2"):
        _in_range(name, _get(cfg, name), 0.0, 1.0, high_open=True)
    if cfg.data.difficulty is not None and cfg.data.difficulty < 1:
        raise ValueError(f"data.difficulty must be >= 1 (or null), got {cfg.data.difficulty}")
    if cfg.rollout.max_kv_tokens is not None:
        if cfg.rollout.max_kv_tokens < 1:
            raise ValueError(f"rollout.max_kv_tokens must be > 0 (or null), got {cfg.rollout.max_kv_tokens!r}")
        if cfg.rollout.engine != "hf":
            raise ValueError("rollout.max_kv_tokens bounds the hf engine's KV cache; vLLM sizes its own "
                             "(vllm.gpu_memory_utilization): unset it with rollout.engine=vllm")
    if any(b <= 0 for b in cfg.eval.budgets):
        raise ValueError(f"eval.budgets must be positive token counts, got {cfg.eval.budgets}")
    if cfg.train.global_batch_size % cfg.train.mini_batch_size:
        raise ValueError(
            f"train.global_batch_size ({cfg.train.global_batch_size}) must be a multiple of "
            f"train.mini_batch_size ({cfg.train.mini_batch_size})")
    if cfg.model.dtype == "float16":  # fp16 gradients underflow without loss scaling, which the trainer has not
        raise ValueError("model.dtype=float16 needs loss scaling, which the trainer does not do; "
                         "use bfloat16 (same memory, fp32's range) or float32")
    if cfg.algo.beta > 0 and not cfg.model.reference_model:
        raise ValueError("algo.beta > 0 (KL penalty) needs model.reference_model: true")
    if cfg.algo.name == "mrt-rl" and cfg.rollout.n < 2:
        raise ValueError("algo.name=mrt-rl needs rollout.n >= 2 (half terminate now, half continue)")
    if cfg.algo.name == "grpo" and cfg.rollout.n < 2:
        raise ValueError("algo.name=grpo needs rollout.n >= 2 (the group baseline)")
    if cfg.algo.dual_clip is not None and cfg.algo.dual_clip <= 1:
        raise ValueError(f"algo.dual_clip must be > 1 (or null), got {cfg.algo.dual_clip}")
    if not cfg.eval.source.strip():
        raise ValueError("eval.source must be 'held-out', 'embedded' or a data file, got ''")
    if cfg.output_dir is not None and not cfg.output_dir.strip():
        raise ValueError("output_dir (--output-dir) must be a directory path, got an empty string "
                         "(omit it for runs/<algo>-<UTC time>)")
    _validate_vllm(cfg)
    if cfg.model.attn_backend == "flash_varlen" and cfg.model.dtype == "float32":
        raise ValueError("model.attn_backend=flash_varlen needs model.dtype bfloat16 or float16 (flash-attn has "
                         "no float32 kernels); use flex or sdpa for float32")
    if cfg.resume is not None and cfg.resume != "auto" and not Path(cfg.resume).exists():
        raise ValueError(f"resume must be 'auto' or an existing checkpoint directory, got {cfg.resume!r}")
    return cfg


def _validate_vllm(cfg: RunConfig) -> None:
    v = cfg.vllm
    _in_range("vllm.gpu_memory_utilization", v.gpu_memory_utilization, 0.0, 1.0, low_open=True)
    _at_least(cfg, ("vllm.tensor_parallel_size",), 1)
    if v.max_model_len is not None and v.max_model_len <= cfg.rollout.max_new_tokens:
        raise ValueError(f"vllm.max_model_len ({v.max_model_len}) must exceed rollout.max_new_tokens "
                         f"({cfg.rollout.max_new_tokens}): it holds the prompt and the generation")


def world_batch_check(cfg: RunConfig, world_size: int) -> None:
    """Global batch sizes are split evenly over ranks: say so early rather than drop prompts."""
    for name, value in (("train.global_batch_size", cfg.train.global_batch_size),
                        ("train.mini_batch_size", cfg.train.mini_batch_size)):
        if value % world_size:
            raise ValueError(f"{name} ({value}) must be divisible by the world size ({world_size})")
    if cfg.rollout.engine == "vllm" and world_size > 1 and cfg.vllm.tensor_parallel_size != 1:
        raise ValueError(f"vllm.tensor_parallel_size must be 1 under torchrun (got {cfg.vllm.tensor_parallel_size}): "
                         "each rank runs its own engine on its own GPU and samples its own prompts")


def looks_local(path: str) -> bool:
    """Whether ``model.path`` names a local directory rather than a hub name such as ``org/model``."""
    return path.startswith((".", "/", "~")) or (os.sep in path and path.count("/") != 1)


def check_paths(cfg: RunConfig) -> None:
    """Every local path the config names exists (the output directory, if any, is a directory)."""
    path = cfg.model.path
    if path != EMBEDDED and looks_local(path) and not Path(path).expanduser().exists():
        raise ValueError(f"model.path={path!r} does not exist")
    for key, source in (("data.source", cfg.data.source), ("eval.source", cfg.eval.source)):
        if source not in (EMBEDDED, HELD_OUT) and not Path(source).exists():
            raise ValueError(f"{key}={source!r} does not exist (expected 'embedded', a json/jsonl/parquet/csv "
                             "file or a directory saved with datasets' save_to_disk)")
    if cfg.output_dir is not None and Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        raise ValueError(f"output_dir (--output-dir) {cfg.output_dir!r} exists and is not a directory")


def needs_datasets(source: str) -> bool:
    """Whether reading a data source needs the ``datasets`` package (parquet, or a saved directory)."""
    path = Path(source)
    return source not in (EMBEDDED, HELD_OUT) and (path.is_dir() or path.suffix.lower() in DATASETS_FORMATS)


def required_packages(cfg: RunConfig) -> list[tuple[str, str, str]]:
    """``(import name, pip name, config key that needs it)`` for every optional package the run uses."""
    needed = []
    for key, source in (("data.source", cfg.data.source), ("eval.source", cfg.eval.source)):
        if needs_datasets(source):
            needed.append(("datasets", "datasets", key))
    grader = cfg.data.grader
    if grader == "math" or (grader == "auto" and cfg.data.source != EMBEDDED):
        needed.append(("math_verify", "math-verify", "data.grader"))
    if cfg.rollout.engine == "vllm":
        needed.append(("vllm", "vllm", "rollout.engine"))
    if cfg.model.attn_backend == "flash_varlen":
        needed.append(("flash_attn", "flash-attn", "model.attn_backend"))
    return needed


def check_packages(cfg: RunConfig) -> None:
    """Fail before any compute when an optional package the config needs is not installed."""
    missing = [(pip, key) for module, pip, key in required_packages(cfg) if importlib.util.find_spec(module) is None]
    if missing:
        raise ValueError("missing package(s): " + "; ".join(
            f"{key} needs '{pip}' (pip install {pip})" for pip, key in missing))


def preflight(cfg: RunConfig) -> None:
    """What ``--dry-run`` checks beyond the values: local paths exist and needed packages are installed."""
    check_paths(cfg)
    check_packages(cfg)


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


def _type_name(tp: Any) -> str:
    optional, base = _is_optional(tp)
    if typing.get_origin(base) is list:
        name = f"list of {typing.get_args(base)[0].__name__}"
    else:
        name = getattr(base, "__name__", str(base))
    return name + (" or null" if optional else "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise naming the key and expected type."""
    optional, base = _is_optional(tp)
    if isinstance(value, _Raw):
        value = value.parse(base)
    if value is None:
        if optional:
            return None
        raise TypeError(f"{key} may not be null (expected {_type_name(base)})")
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
            if not math.isfinite(value):
                raise ValueError(f"{key} must be a finite number, got {value!r}")
            return float(value)
    elif base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        if isinstance(value, str):  # "64,128" (or "" for an empty list)
            value = [_Raw(part.strip()) for part in value.split(",") if part.strip()]
        if isinstance(value, (list, tuple)):
            return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
        raise TypeError(f"{key} expects {_type_name(tp)}, written 64,128 or [64, 128]; got {value!r}")
    raise TypeError(f"{key} expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _valid_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += _valid_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


# Names other trainers use for a key, for the "did you mean" hint.
_SYNONYMS = {"learning_rate": "optim.lr", "max_steps": "train.steps", "num_steps": "train.steps",
             "batch_size": "train.global_batch_size", "num_generations": "rollout.n", "kl_coef": "algo.beta",
             "max_tokens": "rollout.max_new_tokens", "model_name_or_path": "model.path"}


def _unknown_key(full: str, section: type, prefix: str) -> ValueError:
    """'did you mean' (a typo, a key of another section, another trainer's name), then the valid keys."""
    keys = _valid_keys(RunConfig)
    leaf = full.rsplit(".", 1)[-1]
    close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]  # e.g. train.lr for optim.lr
    if not close and leaf in _SYNONYMS:
        close = [_SYNONYMS[leaf]]
    if not close:
        sections = [f.name for f in dataclasses.fields(RunConfig)]
        close = difflib.get_close_matches(full, keys + sections, n=1, cutoff=0.6)
    hint = f" (did you mean {' or '.join(repr(k) for k in close)}?)" if close else ""
    return ValueError(f"unknown config key {full!r}{hint}; valid keys: " + ", ".join(_valid_keys(section, prefix)))


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise TypeError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping, got {data!r}")
    types_ = _field_types(type(obj))
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in types_:
            raise _unknown_key(full, type(obj), prefix)
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
_BOOL_FLAGS = ("dry-run", "export-only", "allow-config-change")


@dataclass
class CLIArgs:
    config: RunConfig
    dry_run: bool = False
    export_only: bool = False
    allow_config_change: bool = False  # resume despite settings a resume cannot honour (mrt_fast.run_dir)


USAGE = """usage: python -m mrt_fast.train [--config FILE.yaml] [--section.key VALUE ...]
                               [--output-dir DIR] [--resume auto|PATH] [--dry-run] [--export-only]
                               [--allow-config-change]

With no arguments: the embedded default job (the shipped tiny warm-started model on its synthetic
task, MRT-RL for a few steps, an evaluation before and after). Example configs: configs/*.yaml.

run flags:
  --config FILE.yaml   YAML file of settings (command-line keys override it)
  --output-dir DIR     run directory (default: runs/<algo>-<UTC time>)
  --resume auto|PATH   continue from the latest checkpoint of --output-dir, or from PATH
  --dry-run            check the config, its paths and packages; print it; run nothing
  --export-only        with --resume: write an HF export of that checkpoint and stop
  -h, --help           this text

Every setting below can be given as --section.key VALUE or --section.key=VALUE; lists as 64,128.
"""


def help_text() -> str:
    """The usage, then every key with its type, default, choices and meaning."""
    lines = [USAGE]
    defaults = RunConfig()
    for section in dataclasses.fields(RunConfig):
        value = getattr(defaults, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        doc = (type(value).__doc__ or "").strip().splitlines()[0]
        lines.append(f"{section.name}: {doc}")
        hints = _field_types(type(value))
        for f in dataclasses.fields(value):
            choices = f.metadata.get("choices")
            kind = " | ".join(choices) if choices else _type_name(hints[f.name])
            default = yaml.safe_dump(getattr(value, f.name), default_flow_style=True).strip().removesuffix("...").strip()
            lines.append(f"  --{section.name}.{f.name} ({kind}, default {default})")
            lines.append(f"      {f.metadata.get('help', '')}")
    return "\n".join(lines) + "\n"


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
            print(help_text(), end="")
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

    data = read_yaml(config_path) if config_path is not None else {}
    for key, raw in overrides:
        _set_dotted(data, key, _Raw(raw))
    return CLIArgs(config=from_dict(data), dry_run=flags["dry-run"], export_only=flags["export-only"],
                   allow_config_change=flags["allow-config-change"])


def read_yaml(path: str | Path) -> dict:
    """A YAML config file as a dict; a missing file or a syntax error names the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config: no such file {str(path)!r}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"--config {path}: not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TypeError(f"--config {path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


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
        if typing.get_origin(base) is list and not text.lstrip().startswith("["):
            return text  # "64,128": split by _coerce
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            return text  # _coerce reports the type it expected


def dump(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save(cfg: RunConfig, path: Path) -> None:
    path.write_text(dump(cfg))


def load(path: Path) -> RunConfig:
    """A saved or hand-written YAML config, validated (paths and packages are not checked)."""
    return from_dict(read_yaml(path))
