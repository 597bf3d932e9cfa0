"""The mrt-fast training recipe: ``python -m mrt_fast.train`` / ``torchrun -m mrt_fast.train``.

:func:`run` reads top to bottom:

1. setup       check the config's paths, packages and data (before any compute), print the run
               directory and plan, then process group, model + tokenizer, FSDP2 actor, optimizer,
               LR schedule, rollout engine (an unsharded copy of the policy), reference model, resume
2. step loop   prompts -> rollouts + the algorithm's plan (PrefixGroups + advantages)
               -> pack with shared prefixes, balance over ranks -> fused loss inside the sharded
               forward -> gradient accumulation, clipping, AdamW, LR schedule (PPO epochs and
               mini-batches) -> weight sync to the engine -> metrics, checkpoints
3. finish      final checkpoint, HF export, evaluation, training-curves plot, where the outputs are

With no arguments it runs the embedded default job: the tiny warm-started model of
``mrt_fast.data.synthetic`` on its synthetic task, MRT-RL for a few steps, an evaluation before
and after. Exit codes: 0 finished, 1 stopped on a non-finite loss or gradient, 2 bad config or
data (nothing ran), 128 + signal number (130 Ctrl-C, 143 SIGTERM) stopped by a signal after
checkpointing; the resume command is printed.
"""

from __future__ import annotations

import copy
import json
import math
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from mrt_fast import checkpoint, run_dir as run_dir_policy
from mrt_fast.config import (
    EMBEDDED,
    RunConfig,
    dump,
    looks_local,
    parse_args,
    preflight,
    world_batch_check,
)
from mrt_fast.data.problems import (  # noqa: F401  (Example, DataStream, grader_for: importable from here)
    DataStream,
    Example,
    describe_eval_source,
    grader_for,
    grader_kind,
    load_eval_examples,
    load_examples,
    prompt_token_ids,
)
from mrt_fast.distributed import (
    DistEnv,
    all_gather_objects,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    broadcast_object,
    compute_dtype,
    destroy_distributed,
    full_state_dict,
    full_state_items,
    init_distributed,
    max_memory_allocated_gb,
    shard,
    transformer_blocks,
)
from mrt_fast.metrics import MetricsWriter, ModelShape, ProgressBar, Timer, mfu, micro_batch_flops, reduce_mean

# ============================================================================================
# 1. The recipe
# ============================================================================================


@dataclass
class RunState:
    """Everything the step loop and the finish need, built once by :func:`setup`."""

    cfg: RunConfig
    env: DistEnv
    run_dir: Path
    examples: list
    eval_examples: list
    grader: Callable[[str, str], bool]
    tokenizer: Any
    actor: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    engine: Any
    rollout_model: nn.Module
    reference: Optional[nn.Module]
    step: int
    data: DataStream
    writer: MetricsWriter
    last_metrics: dict = field(default_factory=dict)
    evals: dict = field(default_factory=dict)  # "before" / "after" evaluation results

    def say(self, text: str) -> None:
        if self.env.is_main:
            print(f"[mrt_fast.train] {text}", flush=True)


def run(cfg: RunConfig, *, export_only: bool = False, allow_config_change: bool = False) -> dict[str, Any]:
    """Train (or, with ``export_only``, only export a checkpoint); returns a summary dict.

    ``allow_config_change`` lets a resume go on with settings it cannot fully honour (see
    :mod:`mrt_fast.run_dir`).

    ``summary["status"]`` is ``completed`` or ``interrupted`` (then ``summary["signal"]`` names the
    signal); a non-finite loss or gradient raises ``SystemExit(1)`` after naming the last good
    checkpoint.
    """
    # --- setup -----------------------------------------------------------------------------
    state = setup(cfg, export_only=export_only, allow_config_change=allow_config_change)
    if export_only:
        return export_checkpoint(state)

    # --- step loop -------------------------------------------------------------------------
    if cfg.eval.before_training and state.eval_examples and state.step == 0:
        state.evals["before"] = evaluate(state, desc="eval before training")
        state.writer.log(0, state.evals["before"])
    bar = ProgressBar(cfg.train.steps, state.step, enabled=state.env.is_main and cfg.log.progress_bar)
    stop = StopRequest()
    status = "completed"
    try:
        while state.step < cfg.train.steps:
            metrics = train_step(state)
            bar.update(state.step, metrics)
            if cfg.eval.every and state.step % cfg.eval.every == 0 and state.eval_examples:
                metrics.update(evaluate(state, desc=f"eval at step {state.step}", leave=False))
                bar.unpause()  # the evaluation's time is not a step's: keep it out of the estimate
            state.writer.log(state.step, metrics)
            state.last_metrics = metrics
            save_periodic(state)
            if stop.agreed():
                status = "interrupted"
                break
    except NonFiniteError as exc:
        bar.close()
        last = checkpoint.latest(state.run_dir)
        state.say(f"stopped at step {state.step + 1}: {exc}. Last good checkpoint: "
                  f"{last if last is not None else 'none (no checkpoint was written yet)'}")
        state.writer.close()
        destroy_distributed()
        raise SystemExit(1) from exc
    finally:
        stop.restore()
    bar.close()

    # --- finish ----------------------------------------------------------------------------
    return finish(state, status, stop.signal_name)


def setup(cfg: RunConfig, *, export_only: bool = False, allow_config_change: bool = False) -> RunState:
    """Everything up to the first step. Config, paths, packages and data fail here, before any compute."""
    preflight(cfg)
    if export_only and cfg.resume is None:
        raise ValueError("--export-only exports a checkpoint: add --resume auto (the latest checkpoint of "
                         "--output-dir) or --resume PATH")
    env = init_distributed()
    world_batch_check(cfg, env.world_size)
    run_dir = resolve_run_dir(cfg, env)
    if env.is_main:
        print(describe_run(cfg, run_dir, env, export_only=export_only), flush=True)
    examples = load_examples(cfg)
    eval_examples = load_eval_examples(cfg)
    grader = grader_for(cfg)
    resume_from = checkpoint.resolve_resume(run_dir, cfg.resume)
    if export_only and resume_from is None:
        raise ValueError(f"--export-only: {run_dir} has no checkpoint to export (train first, or pass "
                         "--resume PATH to a checkpoint directory)")
    run_dir_policy.check(cfg, run_dir, export_only=export_only, allow_config_change=allow_config_change,
                         say=print if env.is_main else (lambda *a, **k: None))
    torch.manual_seed(cfg.train.seed + env.rank)
    random.seed(cfg.train.seed + env.rank)

    model, tokenizer = load_model_and_tokenizer(cfg)
    if resume_from is not None:  # incompatible checkpoints fail here, before any compute
        checkpoint.check_compatible(resume_from, Actor(model))  # names as the sharded actor has them
    # The engine samples from an unsharded copy (vLLM holds its own; the copy then stays on the CPU
    # and only serves as the HF export template).
    engine_device = env.device if cfg.rollout.engine == "hf" else torch.device("cpu")
    rollout_model = copy.deepcopy(model).to(engine_device, compute_dtype(cfg.model.dtype, env.device)).eval()
    reference = None
    if cfg.model.reference_model:
        # Frozen, so no fp32 master copy: held in the compute dtype it runs in (same values as the
        # policy's fp32 weights cast by FSDP's mixed precision; half the memory).
        frozen = copy.deepcopy(model).to(compute_dtype(cfg.model.dtype, env.device))
        reference = build_actor(frozen, cfg, env).eval()
        reference.requires_grad_(False)
    actor = build_actor(model, cfg, env)
    optimizer, scheduler = build_optimizer(actor, cfg)

    step, data_position = 0, 0
    if resume_from is not None:
        loaded = checkpoint.load(resume_from, actor, optimizer, scheduler=scheduler)
        step, data_position = loaded["step"], loaded["trainer"].get("data_position", 0)
        if env.is_main:
            print(f"[mrt_fast.train] resumed from {resume_from} at step {step}"
                  + ("" if loaded["rng_restored"] else f" ({loaded['rng_note']})"), flush=True)
    if env.is_main and not export_only:
        run_dir_policy.start_segment(cfg, run_dir, step, resumed=resume_from is not None)
    engine = build_engine(cfg, rollout_model, tokenizer, env)
    sync_engine(engine, actor)
    return RunState(
        cfg=cfg, env=env, run_dir=run_dir, examples=examples, eval_examples=eval_examples, grader=grader,
        tokenizer=tokenizer, actor=actor, optimizer=optimizer, scheduler=scheduler, engine=engine,
        rollout_model=rollout_model, reference=reference, step=step,
        data=DataStream(len(examples), seed=cfg.train.seed, shuffle=cfg.data.shuffle, position=data_position),
        writer=MetricsWriter(run_dir, enabled=env.is_main and not export_only, tensorboard=cfg.log.tensorboard),
    )


def train_step(state: RunState) -> dict[str, Any]:
    """One step: rollouts and the plan, the update, the weight sync; returns the step's metrics."""
    cfg, env, timer = state.cfg, state.env, Timer()
    t0 = time.perf_counter()
    per_rank = cfg.train.global_batch_size // env.world_size
    indices = state.data.take(cfg.train.global_batch_size)[env.rank * per_rank:(env.rank + 1) * per_rank]
    with timer("gen"):
        plan = make_plan(cfg, [state.examples[i] for i in indices], state.engine, state.tokenizer, state.grader,
                         seed=step_seed(cfg.train.seed, state.step, env.rank))
    plan, rollout_metrics = gather_plan(plan)
    # vLLM's sleep mode: the engine hands its GPU memory to the update and takes it back for the sync.
    sleeps = cfg.rollout.engine == "vllm" and cfg.vllm.enable_sleep_mode
    if sleeps:
        state.engine.sleep(level=1)
    with timer("update_actor"):
        state.actor.train()
        if plan.groups:
            update_metrics = update(state.actor, state.optimizer, plan, cfg, env, state.reference)
            state.optimizer.zero_grad(set_to_none=True)  # free the gradients: generation needs the memory
        else:  # e.g. MRT-STaR kept no trace this step: nothing to train on
            update_metrics = {"actor/grad_norm": 0.0, "perf/total_num_tokens": 0.0,
                              "perf/packed_num_tokens": 0.0, "train/empty_step": 1.0}
        lr = state.scheduler.get_last_lr()[0]
        state.scheduler.step()
    with timer("sync_weights"):
        if sleeps:
            state.engine.wake_up(["weights"])  # weights first: no KV cache in memory during the sync
        sync_engine(state.engine, state.actor)
        if sleeps:
            state.engine.wake_up(["kv_cache"])
    state.step += 1
    # With vLLM, rollout_model is not what samples: check the engine's own weights.
    digest = (check_rank_consistency(state.engine if cfg.rollout.engine == "vllm" else state.rollout_model, state.step)
              if cfg.log.check_weights else None)
    elapsed = time.perf_counter() - t0
    metrics = {**rollout_metrics, **update_metrics, "actor/lr": lr, **timer.pop()}
    metrics["perf/throughput"] = metrics["perf/total_num_tokens"] / elapsed / env.world_size
    metrics["perf/time_per_step"] = elapsed
    # perf/model_flops: this GPU's share of the update's model FLOPs (no-grad forwards included), all
    # inside the update_actor window.
    util = mfu(metrics.get("perf/model_flops", 0.0) / max(metrics["timing_s/update_actor"], 1e-9))
    if util is not None:
        metrics["perf/mfu"] = util
    if digest is not None:
        metrics["debug/weights_sha256"] = digest
    mem = max_memory_allocated_gb(env.device)
    if mem is not None:
        metrics["perf/max_memory_allocated_gb"] = mem
    return metrics


def save_periodic(state: RunState) -> None:
    """Checkpoints every ``checkpoint.every`` steps and HF exports every ``checkpoint.export_every``."""
    cfg, step = state.cfg, state.step
    if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.train.steps:
        checkpoint.save(state.run_dir, step, state.actor, state.optimizer, scheduler=state.scheduler,
                        trainer_state={"data_position": state.data.position}, keep_last=cfg.checkpoint.keep_last)
    if cfg.checkpoint.export_every and step % cfg.checkpoint.export_every == 0:
        export(state, name=f"hf-step_{step}")


def finish(state: RunState, status: str, signal_name: Optional[str]) -> dict[str, Any]:
    """Final checkpoint; when completed, HF export and evaluation; the curves plot; the summary."""
    cfg, run_dir = state.cfg, state.run_dir
    ckpt = checkpoint.save(run_dir, state.step, state.actor, state.optimizer, scheduler=state.scheduler,
                           trainer_state={"data_position": state.data.position}, keep_last=cfg.checkpoint.keep_last)
    summary: dict[str, Any] = {"run_dir": str(run_dir), "status": status, "step": state.step, "checkpoint": str(ckpt),
                               "metrics": str(run_dir / "metrics.jsonl")}
    if signal_name is not None:
        summary["signal"] = signal_name
    if status == "completed":
        if cfg.checkpoint.export_hf:
            summary["hf_export"] = str(export(state, name="hf"))
        if state.eval_examples:
            state.evals["after"] = evaluate(state, desc="eval after training")
            state.writer.log(state.step, state.evals["after"])
            summary["eval"] = state.evals["after"]
            if "before" in state.evals:
                summary["eval_before"] = state.evals["before"]
            if state.env.is_main:
                (run_dir / "eval.json").write_text(json.dumps(
                    {"label": _eval_label(cfg), "problems": describe_eval_source(cfg),
                     "before": state.evals.get("before"), "after": state.evals["after"], "step": state.step},
                    indent=2) + "\n")
    state.writer.close()
    if state.env.is_main and cfg.log.plots:
        from mrt_fast.curves import write_training_curves

        curves = write_training_curves(run_dir, title=f"{run_dir}: {cfg.algo.name} on {_short(cfg.model.path)}")
        if curves is not None:
            summary["curves"] = str(curves)
    summary["last_metrics"] = {k: v for k, v in state.last_metrics.items() if isinstance(v, float)}
    if state.env.is_main:
        print(summary_text(summary, cfg, world_size=state.env.world_size), flush=True)
    destroy_distributed()
    return summary


def export_checkpoint(state: RunState) -> dict[str, Any]:
    """``--export-only``: the resumed checkpoint as an HF export, nothing trained."""
    path = export(state, name=f"hf-step_{state.step}")
    state.say(f"HF export of step {state.step}: {path}\n"
              f"  evaluate it with: python -m mrt_fast.eval --model {state.run_dir}")
    destroy_distributed()
    return {"run_dir": str(state.run_dir), "hf_export": str(path), "step": state.step}


# ============================================================================================
# 2. Model: loading, and the actor that computes the loss inside FSDP2's root forward
# ============================================================================================


def load_model_and_tokenizer(cfg: RunConfig) -> tuple[nn.Module, Any]:
    """The policy in fp32 (master weights) on the CPU, and its tokenizer; fails fast and clearly."""
    path = cfg.model.path
    if path == EMBEDDED:
        from mrt_fast.data import load_warm_start

        try:
            model, tokenizer = load_warm_start(device="cpu")
        except FileNotFoundError as exc:
            raise ValueError(f"model.path='embedded': the shipped warm start is missing ({exc})") from exc
    else:
        import transformers

        from mrt_fast.data.tokenizer import load_tokenizer

        if looks_local(path) and not Path(path).expanduser().exists():
            raise ValueError(f"model.path={path!r} does not exist")
        try:
            # Not AutoTokenizer: next to a qwen2 config.json it swaps in Qwen2Tokenizer and changes
            # the ids of tokenizers saved as plain PreTrainedTokenizerFast (the tiny task's).
            tokenizer = load_tokenizer(path, trust_remote_code=cfg.model.trust_remote_code)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"model.path={path!r} cannot be loaded as an HF causal LM + tokenizer: {exc}") from exc
    model = model.to(torch.float32)
    model.config.use_cache = False
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


class Actor(nn.Module):
    """The policy and its loss in one forward.

    FSDP2 un-shards the root's parameters (embeddings, final norm, LM head) only inside the root
    module's forward. The fused loss reads ``lm_head.weight`` directly, so it runs here, inside
    that forward; its gradient then goes through FSDP's reduce-scatter like every other one.
    """

    compute_dtype: Optional[torch.dtype] = None  # set by build_actor: FSDP's param_dtype

    def __init__(self, policy: nn.Module, attn_backend: str = "auto") -> None:
        super().__init__()
        self.policy = policy
        self.attn_backend = attn_backend

    def forward(self, batch: Any, mode: str, **loss_kwargs: Any) -> Any:
        from mrt_fast.loss import fused_policy_loss, token_logprobs
        from mrt_fast.packing import packed_hidden

        head = self.policy.get_output_embeddings()
        hidden = packed_hidden(self.policy, batch, backend=self.attn_backend)
        bias = getattr(head, "bias", None)
        if mode == "logprobs":  # old / reference log-probs, no loss
            return token_logprobs(hidden, head.weight, batch.targets, bias=bias,
                                  temperature=loss_kwargs.get("temperature", 1.0))
        if mode == "sft":  # negative log-likelihood of the continuation tokens, token mean
            # Its gradient is known before the backward: the policy loss with advantage 1, on-policy
            # ratio 1 and nothing clipped has exactly the token-mean NLL's gradient, so SFT takes the
            # fused path (gradients in the forward, no logits recomputed). That loss's value is -1;
            # the value reported is the NLL, from the log-probs it returns.
            ones = torch.ones(batch.num_targets, dtype=torch.float32, device=hidden.device)
            surrogate, m = fused_policy_loss(hidden, head.weight, batch.targets, ones, bias=bias,
                                             loss_mask=batch.target_loss_mask)
            mask = batch.target_loss_mask.to(m["logprobs"].dtype)
            nll = -(m["logprobs"] * mask).sum() / mask.sum().clamp_min(1.0)
            return surrogate + (nll - surrogate).detach(), {"logprobs": m["logprobs"]}
        if mode == "policy":
            return fused_policy_loss(hidden, head.weight, batch.targets, bias=bias,
                                     loss_mask=batch.target_loss_mask, **loss_kwargs)
        raise ValueError(f"mode must be 'logprobs', 'sft' or 'policy', got {mode!r}")


def build_actor(model: nn.Module, cfg: RunConfig, env: DistEnv) -> Actor:
    """Shard the policy with FSDP2 (per block + root) and move it to this rank's device."""
    blocks = transformer_blocks(model)
    actor = Actor(model, cfg.model.attn_backend).to(env.device)
    actor.compute_dtype = compute_dtype(cfg.model.dtype, env.device)
    shard(actor, blocks, param_dtype=actor.compute_dtype)
    return actor


def build_optimizer(actor: nn.Module, cfg: RunConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over fp32 master weights, with linear warmup then cosine decay (or constant)."""
    o = cfg.optim
    params = [p for p in actor.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                  weight_decay=o.weight_decay)
    total = cfg.train.steps
    warmup = int(round(o.warmup_ratio * total))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup  # step 0 already trains, at a small LR
        if o.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def loss_options(cfg: RunConfig) -> dict[str, Any]:
    """The policy loss's options (:func:`mrt_fast.loss.fused_policy_loss`), spelled once from the config."""
    a = cfg.algo
    return dict(eps_low=a.eps_low, eps_high=a.eps_high, dual_clip=a.dual_clip, beta=a.beta,
                kl_estimator=a.kl_estimator, entropy_coef=a.entropy_coef, temperature=cfg.rollout.temperature,
                loss_agg=a.loss_agg,
                max_len=cfg.rollout.max_new_tokens if a.loss_agg == "seq-mean-token-sum-norm" else None)


# ============================================================================================
# 3. One step: rollouts and the algorithm's plan -> packed micro-batches -> update
# ============================================================================================


@dataclass
class Plan:
    """What the trainer trains on in one step (the same on every rank after :func:`gather_plan`).

    ``groups`` are PrefixGroups. RL advantages are either per continuation (``level="sequence"``:
    ``advantages[g][k]``) or per episode (``level="episode"``: ``advantages[0][e]`` indexed by the
    groups' episode ids). SFT and MRT-STaR ignore them. ``metrics`` are rollout statistics.
    """

    groups: list
    advantages: list[list[float]]
    level: str
    metrics: dict[str, float]


def step_seed(seed: int, step: int, rank: int) -> int:
    """The sampling seed of one rank's step: a hash, so no two (seed, step, rank) share one."""
    from mrt_fast.rollout.sampling import stream_seed

    return stream_seed(seed, step, rank)


def sampling_params(cfg: RunConfig, tokenizer: Any, seed: int, *, meta: bool = False) -> Any:
    from mrt_fast.rollout import SamplingParams
    from mrt_fast.rollout.sampling import derive_seed

    r = cfg.rollout
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if meta:  # the meta-prover's forced-termination answers: J estimates, never trained
        return SamplingParams(temperature=r.meta_temperature, top_p=r.meta_top_p,
                              max_new_tokens=r.meta_max_new_tokens, stop_token_ids=stop,
                              seed=derive_seed(seed, "meta"))
    return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                          max_new_tokens=r.max_new_tokens, stop_token_ids=stop, seed=seed)


def episode_splitter(cfg: RunConfig) -> Any:
    """The episode splitter of ``algo.episode_*``, shared by the plans and the evaluation."""
    from mrt_fast.mrt.episodes import make_splitter

    a = cfg.algo
    return make_splitter(min_gap=a.episode_min_gap, max_episodes=a.episode_max_episodes,
                         group_size=a.episode_group_size)


def make_plan(cfg: RunConfig, examples: Sequence[Example], engine: Any, tokenizer: Any, grader: Any,
              seed: int) -> Plan:
    """This rank's share of the step: SFT data, or rollouts scored by the algorithm's plan."""
    from mrt_fast.packing import PrefixGroup

    prompts = [prompt_token_ids(tokenizer, ex.prompt) for ex in examples]
    name = cfg.algo.name
    if name == "sft":
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        groups = [PrefixGroup(p, [tokenizer.encode(ex.response, add_special_tokens=False) + eos])
                  for p, ex in zip(prompts, examples)]
        lengths = [len(g.continuations[0]) for g in groups]
        return Plan(groups, [[1.0] for _ in groups], "sequence",
                    {"response_length/mean": sum(lengths) / max(1, len(lengths))})

    from mrt_fast.mrt import plans
    from mrt_fast.mrt.progress import termination_token_ids

    answers = [ex.answer for ex in examples]
    common = dict(grader=grader, params=sampling_params(cfg, tokenizer, seed), splitter=episode_splitter(cfg))
    meta = dict(meta_params=sampling_params(cfg, tokenizer, seed, meta=True), n=cfg.rollout.n,
                k=cfg.rollout.meta_k, termination_ids=termination_token_ids(tokenizer))
    a = cfg.algo
    if name == "grpo":
        rl = plans.grpo_plan(engine, tokenizer, prompts, answers, n=cfg.rollout.n, normalize_std=a.normalize_std,
                             length_penalty=a.length_penalty, **common)
    elif name == "mrt-rl":
        rl = plans.mrt_rl_plan(engine, tokenizer, prompts, answers, alpha=a.alpha, progress=a.progress,
                               train_terminate=a.train_both_branches, normalize_std=a.normalize_std,
                               rng=random.Random(seed), **meta, **common)
    elif name == "mrt-star":
        kept, metrics = plans.mrt_star_plan(engine, tokenizer, prompts, answers, **meta, **common)
        return Plan([ex.to_prefix_group() for ex in kept], [[1.0] for _ in kept], "sequence", metrics)
    elif name == "mrt-online":
        rl = plans.mrt_online_plan(engine, tokenizer, prompts, answers, alpha=a.alpha,
                                   normalize_std=a.normalize_std, **meta, **common)
    else:
        raise ValueError(f"algo.name={name!r} has no plan")
    if a.normalize_std == "batch":
        _one_batch_scale(rl)
    adv = rl.advantages.tolist()
    if rl.level == "episode":
        return Plan(rl.groups, [adv], "episode", rl.metrics)
    per_group, i = [], 0
    for g in rl.groups:  # [S] in plan order -> per group, per continuation
        per_group.append(adv[i:i + len(g.continuations)])
        i += len(g.continuations)
    return Plan(rl.groups, per_group, "sequence", rl.metrics)


def _one_batch_scale(rl: Any) -> None:
    """``normalize_std=batch`` over the whole step: each rank's plan divided its advantages by its own
    RMS; rescale them to the RMS over every rank's trained tokens (collective; a no-op on one rank)."""
    tokens = float(sum(sum(g.loss_mask(k)) for g in rl.groups for k in range(len(g.continuations))))
    squares, total = all_reduce_sum(torch.tensor([rl.advantage_scale ** 2 * tokens, tokens],
                                                 dtype=torch.float64)).tolist()
    if squares <= 0:
        return
    overall = math.sqrt(squares / total)
    factor = rl.advantage_scale / overall  # 0 for a rank whose advantages are all 0 (they stay 0)
    rl.advantages = rl.advantages * factor
    rl.advantage_scale = overall
    for key in ("advantage/mean", "advantage/abs_mean"):
        rl.metrics[key] *= factor


def gather_plan(plan: Plan) -> tuple[Plan, dict[str, float]]:
    """Every rank's groups and advantages, in rank order; rollout metrics averaged over ranks.

    Episode ids are unique within one rank's plan; they are shifted here so that they stay unique
    over the gathered plan (and index the concatenated per-episode advantages).
    """
    from mrt_fast.packing import PrefixGroup

    parts = all_gather_objects((plan.groups, plan.advantages))
    groups, advantages = [], []
    if plan.level == "sequence":
        for gs, adv in parts:
            groups += gs
            advantages += adv
    else:
        flat: list[float] = []
        for gs, adv in parts:
            shift = len(flat)
            groups += [PrefixGroup(g.prefix, g.continuations, loss_masks=g.loss_masks,
                                   episode_ids=[[e + shift for e in ids] for ids in g.episode_ids])
                       for g in gs]
            flat += adv[0]
        advantages = [flat]
    metrics = reduce_mean(plan.metrics, {k: len(plan.groups) for k in plan.metrics})
    return Plan(groups, advantages, plan.level, plan.metrics), metrics


def _advantage_kwargs(batch: Any, plan_part: list, level: str, device: torch.device) -> dict[str, torch.Tensor]:
    """Advantages and batch-local sequence ids for one packed micro-batch.

    Sequence ids are renumbered ``0..S_batch-1`` so that per-sequence aggregation counts only the
    sequences of this micro-batch.
    """
    local = {sid: i for i, sid in enumerate(batch.seq_ids)}
    seq = torch.tensor([local[int(s)] for s in batch.target_seq_ids.tolist()], dtype=torch.long, device=device)
    if level == "episode":
        adv = torch.tensor(plan_part[0], dtype=torch.float32, device=device)
        return {"advantages": adv, "seq_ids": seq, "episode_ids": batch.target_episode_ids.to(device)}
    adv = torch.tensor([plan_part[g][k] for g, k in batch.sequence_keys], dtype=torch.float32, device=device)
    return {"advantages": adv, "seq_ids": seq}


class NonFiniteError(RuntimeError):
    """The loss or the gradients stopped being finite."""


def update(actor: Actor, optimizer: torch.optim.Optimizer, plan: Plan, cfg: RunConfig, env: DistEnv,
           reference: Optional[Actor] = None) -> dict[str, float]:
    """PPO epochs over mini-batches of the (global) plan; one optimizer step per mini-batch.

    Each mini-batch is packed once (identically on every rank), split over ranks with equal
    micro-batch counts, and every micro-batch loss is scaled so that the accumulated, FSDP-averaged
    gradient is the gradient of the loss over the whole mini-batch: token-mean over its loss
    tokens, or the mean over its sequences for the seq-mean modes.
    """
    return _update(actor, optimizer, plan, cfg, env, reference)


def _update(actor: Actor, optimizer: torch.optim.Optimizer, plan: Plan, cfg: RunConfig, env: DistEnv,
            reference: Optional[Actor]) -> dict[str, float]:
    from mrt_fast.packing import balance_micro_batches, pack, packing_metrics

    sft = cfg.algo.name in ("sft", "mrt-star")
    seq_mode = cfg.algo.loss_agg != "token-mean" and not sft
    n_mini = cfg.train.global_batch_size // cfg.train.mini_batch_size
    needs_old = not sft and (cfg.algo.ppo_epochs > 1 or n_mini > 1)
    temperature = cfg.rollout.temperature
    per_mini = max(1, math.ceil(len(plan.groups) / n_mini))
    options = loss_options(cfg)

    def share(b: Any) -> float:
        """This micro-batch's part of the mini-batch normaliser: its loss tokens for token-mean, its
        sequences with loss tokens for the seq-mean modes. (seq-mean-token-sum-norm's kernel loss is
        a plain sum / max_len, so its micro-batches add up and only the sequence total divides.)"""
        if seq_mode:
            return float(len(set(b.target_seq_ids[b.target_loss_mask > 0].tolist())))
        return float(b.target_loss_mask.sum())

    summed = cfg.algo.loss_agg == "seq-mean-token-sum-norm" and not sft
    shape = ModelShape.of(actor.policy)
    flops = 0.0  # this rank's model FLOPs, for perf/mfu

    # Pack every mini-batch once; old/reference log-probs are taken before any update.
    minis, all_batches = [], []
    for start in range(0, len(plan.groups), per_mini):
        groups = plan.groups[start:start + per_mini]
        advs = plan.advantages if plan.level == "episode" else plan.advantages[start:start + per_mini]
        # flash-attn's varlen kernels cannot attend to a shared prefix: give each continuation its own copy.
        batches = pack(groups, max_tokens=cfg.train.max_tokens_per_micro_batch,
                       share_prefix=cfg.model.attn_backend != "flash_varlen")
        all_batches += batches
        total = sum(share(b) for b in batches)
        mine = [b.to(env.device) for b in balance_micro_batches(batches, env.world_size)[env.rank]]
        extras = []
        for b in mine:
            flops += micro_batch_flops(shape, b, backward=False) * (needs_old + (reference is not None))
            flops += micro_batch_flops(shape, b) * cfg.algo.ppo_epochs
            kw: dict[str, Any] = {}
            with torch.no_grad():
                if needs_old:
                    kw["old_logprobs"] = actor(b, "logprobs", temperature=temperature)
                if reference is not None:
                    kw["ref_logprobs"] = reference(b, "logprobs", temperature=temperature)
            extras.append(kw)
        minis.append((mine, advs, total, extras))

    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    grad_norm = torch.tensor(0.0)
    for _epoch in range(cfg.algo.ppo_epochs):
        for mine, advs, total, extras in minis:
            optimizer.zero_grad(set_to_none=True)
            for b, kw in zip(mine, extras):
                if sft:
                    loss, m = actor(b, "sft")
                else:
                    loss, m = actor(b, "policy", **_advantage_kwargs(b, advs, plan.level, env.device),
                                    **options, **kw)
                # FSDP averages gradients over ranks: multiplying by world_size undoes that; the
                # share then weights this micro-batch within the whole mini-batch.
                weight = (1.0 if summed else share(b)) / max(total, 1.0)
                (loss * (weight * env.world_size)).backward()
                n_tok = float(b.target_loss_mask.sum())
                if n_tok == 0:
                    continue
                _accumulate(sums, weights, "train/loss" if sft else "actor/pg_loss", float(loss.detach()), n_tok)
                for key, name in (("clip_ratio/low", "actor/pg_clipfrac_low"),
                                  ("clip_ratio/high", "actor/pg_clipfrac_high"),
                                  ("kl", "actor/kl_loss"), ("entropy", "actor/entropy")):
                    if key in m:
                        _accumulate(sums, weights, name, float(m[key]), n_tok)
                if not sft:  # verl's ppo_kl: mean(old - new log-prob) over loss tokens; 0 on-policy
                    old = kw.get("old_logprobs")
                    mask = b.target_loss_mask > 0
                    ppo_kl = float((old - m["logprobs"])[mask].mean()) if old is not None else 0.0
                    _accumulate(sums, weights, "actor/ppo_kl", ppo_kl, n_tok)
            grad_norm = clip_and_check(actor, cfg.optim.grad_clip, sums)
            optimizer.step()

    names = [k for k in sums if weights[k] > 0]
    out = reduce_mean({**{k: sums[k] / weights[k] for k in names}, "perf/model_flops": flops},
                      {**{k: weights[k] for k in names}, "perf/model_flops": 1.0})
    if "actor/pg_clipfrac_low" in out:
        out["actor/pg_clipfrac"] = out["actor/pg_clipfrac_low"] + out.get("actor/pg_clipfrac_high", 0.0)
    out["actor/grad_norm"] = float(grad_norm)
    # Throughput counts tokens as separate sequences would hold them (prompt + response, verl's
    # convention), so the savings of prefix sharing show up as a higher figure.
    out["perf/total_num_tokens"] = float(sum(b.unshared_tokens for b in all_batches))
    out["perf/packed_num_tokens"] = float(sum(b.num_tokens for b in all_batches))
    out.update({k: float(v) for k, v in packing_metrics(all_batches).items()})
    return out


def _accumulate(sums: dict, weights: dict, key: str, value: float, weight: float) -> None:
    sums[key] = sums.get(key, 0.0) + value * weight
    weights[key] = weights.get(key, 0.0) + weight


def clip_and_check(actor: nn.Module, max_norm: float, sums: dict) -> torch.Tensor:
    """Clip gradients to ``max_norm`` (0: no clipping) and stop on a non-finite loss or gradient.

    The check runs before ``optimizer.step()``, so a bad step never reaches the weights (and
    never reaches a checkpoint). Every rank takes the same decision: the norm is global and the
    loss flag is all-reduced.
    """
    params = [p for p in actor.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    grad_norm = grad_norm.detach().float().cpu()
    loss_bad = torch.tensor([0.0 if all(math.isfinite(v) for v in sums.values()) else 1.0])
    loss_bad = all_reduce_max(loss_bad)
    if loss_bad.item() > 0 or not torch.isfinite(grad_norm):
        what = "loss" if loss_bad.item() > 0 else "gradient norm"
        raise NonFiniteError(f"non-finite {what} (grad_norm={grad_norm.item()}, "
                             f"pg_loss sum={sums.get('actor/pg_loss')}); the update was not applied")
    return grad_norm


def sync_engine(engine: Any, actor: Actor) -> None:
    """Push the updated weights to the rollout engine (every rank holds a full copy), gathered
    one tensor at a time in the actor's compute dtype, straight into the engine."""
    items = full_state_items(actor, actor.compute_dtype)
    engine.update_weights((k.removeprefix("policy."), v) for k, v in items)


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names, dtypes and raw bytes)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_rank_consistency(model: Any, step: int) -> str:
    """Every rank's copy of the weights must be bit-identical after a step; returns the digest."""
    digest = model.apply_model(weights_digest)[0] if hasattr(model, "apply_model") else weights_digest(model)
    digests = all_gather_objects(digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks hold different weights after step {step}: {digests}")
    return digests[0]


# ============================================================================================
# 4. Evaluation: the same settings and code as python -m mrt_fast.eval
# ============================================================================================


def evaluate(state: RunState, *, desc: str, leave: bool = True) -> dict[str, float]:
    """Evaluate the engine's current policy on the evaluation problems (``mrt_fast.eval.settings``).

    Each rank evaluates a share of the problems with the sampling seed ``train.seed`` (a sample's
    random stream depends on the seed, its prompt and its index, not on the other prompts of the
    batch, so the split over ranks does not change the numbers; only a prompt repeated in one rank's
    share draws a fresh stream per repeat); scalars are reduced over ranks. Rank 0 shows its own progress bar.
    """
    from mrt_fast.eval.settings import eval_settings, evaluate_problems

    cfg, env = state.cfg, state.env
    mine = list(state.eval_examples)[env.rank::env.world_size]
    values: dict[str, float] = {}
    if mine:
        progress = _eval_bar(desc, leave) if env.is_main and cfg.log.progress_bar else None
        result = evaluate_problems(state.engine, state.tokenizer, [ex.prompt for ex in mine], [ex.answer for ex in mine],
                                   grader_kind=grader_kind(cfg.data.grader, cfg.data.source),
                                   settings=eval_settings(cfg.eval, seed=cfg.train.seed, splitter=episode_splitter(cfg)),
                                   progress=progress)
        values = {"eval/accuracy": result["pass@1"], "eval/response_length/mean": result["mean_tokens"],
                  "eval/J_at_empty_prefix": result["J_at_empty_prefix"],
                  "eval/J_at_end_of_thinking": result["J_at_end_of_thinking"],
                  **{f"eval/pass@{k}": v for k, v in result["pass@k"].items() if k != "1"},
                  **{f"eval/regret@{b}": v for b, v in result["regret"].items()}}
    return reduce_mean(values, {k: float(len(mine)) for k in values})


def _eval_bar(desc: str, leave: bool) -> Callable[[int], Any]:
    from tqdm.auto import tqdm

    return lambda total: tqdm(total=total, desc=desc, unit="problem", leave=leave, dynamic_ncols=True)


def _eval_label(cfg: RunConfig) -> str:
    from mrt_fast.eval.settings import accuracy_label

    return accuracy_label(cfg.eval)


# ============================================================================================
# 5. Setup and finish helpers
# ============================================================================================


class StopRequest:
    """Ctrl-C / SIGTERM handling: the first signal asks for a checkpoint at the next safe point
    (the end of the current step). A second Ctrl-C interrupts at once; SIGTERM never does,
    because torchrun follows a terminal's Ctrl-C (which every rank already got) with a SIGTERM
    to its workers, and that must not cut the checkpoint short."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: Optional[str] = None
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            self.signal_name = signal.Signals(signum).name
            print(f"\n[mrt_fast.train] {self.signal_name}: will checkpoint after this step and "
                  "stop (Ctrl-C again stops now)", file=sys.stderr, flush=True)
        self.requested = True

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled (ranks must stop at the same step)."""
        agreed = bool(all_reduce_max(torch.tensor([1.0 if self.requested else 0.0])).item() > 0)
        if agreed and self.signal_name is None:  # another rank got the signal
            self.signal_name = "SIGTERM"
        return agreed

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def build_engine(cfg: RunConfig, rollout_model: nn.Module, tokenizer: Any, env: DistEnv) -> Any:
    """The rollout engine: ``hf`` samples from ``rollout_model``; ``vllm`` loads ``model.path``
    itself, one engine per rank on the rank's GPU (weights are synced from the trainer after every
    update either way)."""
    from mrt_fast.rollout import make_engine

    if cfg.rollout.engine == "hf":
        return make_engine("hf", model=rollout_model, tokenizer=tokenizer, max_kv_tokens=cfg.rollout.max_kv_tokens)
    path = cfg.model.path
    if path == EMBEDDED:
        from mrt_fast.data.tokenizer import ASSETS_DIR

        path = str(ASSETS_DIR)
    v = cfg.vllm
    dtype = v.dtype if v.dtype != "auto" else str(compute_dtype(cfg.model.dtype, env.device)).removeprefix("torch.")
    return make_engine("vllm", model_path=path, tokenizer=tokenizer, seed=cfg.train.seed + env.rank,
                       gpu_memory_utilization=v.gpu_memory_utilization, enable_sleep_mode=v.enable_sleep_mode,
                       tensor_parallel_size=v.tensor_parallel_size, max_model_len=v.max_model_len,
                       enforce_eager=v.enforce_eager, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)


def resolve_run_dir(cfg: RunConfig, env: DistEnv) -> Path:
    """``--output-dir``, or ``runs/<algo>-<UTC time>`` chosen by rank 0 and shared."""
    if cfg.output_dir is None:
        name = f"runs/{cfg.algo.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        cfg.output_dir = broadcast_object(name)
    run_dir = Path(cfg.output_dir)
    if env.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"output_dir (--output-dir) {str(run_dir)!r} cannot be created: {exc}") from None
    barrier()
    return run_dir


def _short(path: str) -> str:
    return "the shipped tiny warm start" if path == EMBEDDED else path


def describe_run(cfg: RunConfig, run_dir: Path, env: DistEnv, *, export_only: bool = False) -> str:
    """The start-up lines: where the outputs go and what the run will do."""
    if export_only:
        return f"[mrt_fast.train] run directory: {run_dir}\n[mrt_fast.train] exporting checkpoint {cfg.resume}"
    data = (f"the embedded task ({cfg.data.num_problems} generated problems)" if cfg.data.source == EMBEDDED
            else f"{cfg.data.source}")
    r, t = cfg.rollout, cfg.train
    lines = [
        f"run directory : {run_dir}",
        f"model         : {_short(cfg.model.path)}",
        f"task          : {data}, grader {grader_kind(cfg.data.grader, cfg.data.source)}",
        f"algorithm     : {cfg.algo.name}" + (f" (alpha {cfg.algo.alpha:g})" if cfg.algo.name.startswith("mrt")
                                                and cfg.algo.name != "mrt-star" else ""),
        f"steps         : {t.steps} x {t.global_batch_size} prompts"
        + ("" if cfg.algo.name == "sft" else f" x {r.n} traces of <= {r.max_new_tokens} tokens")
        + f", lr {cfg.optim.lr:g}, on {env.world_size} process(es) ({env.device.type})",
    ]
    if cfg.eval.num_problems:
        when = ("before and after training" if cfg.eval.before_training else "after training")
        when += f", every {cfg.eval.every} steps" if cfg.eval.every else ""
        lines.append(f"evaluation    : {_eval_label(cfg)} {when}, on {describe_eval_source(cfg)}")
    else:
        lines.append("evaluation    : none (eval.num_problems is 0)")
    if cfg.resume is not None:
        lines.append(f"resume        : {cfg.resume}")
    return "\n".join(f"[mrt_fast.train] {line}" for line in lines)


def export(state: RunState, *, name: str) -> Path:
    """HF ``save_pretrained`` export of the current weights (collective; rank 0 writes)."""
    weights = full_state_dict(state.actor, cpu=True)
    out = state.run_dir / name
    if state.env.is_main:
        checkpoint.export_hf(out, weights, state.rollout_model, state.tokenizer, strip_prefix="policy.")
    barrier()
    return out


def resume_command(run_dir: Path, world_size: int) -> str:
    launcher = "python -m" if world_size == 1 else f"torchrun --nproc_per_node {world_size} -m"
    return f"{launcher} mrt_fast.train --config {run_dir / 'config.yaml'} --resume auto"


def summary_text(summary: dict[str, Any], cfg: RunConfig, *, world_size: int = 1) -> str:
    run_dir = Path(summary["run_dir"])
    lines = [f"[mrt_fast.train] {summary['status']} at step {summary['step']}"
             + (f" ({summary['signal']})" if "signal" in summary else ""),
             f"  run directory : {run_dir}",
             f"  metrics       : {summary['metrics']}",
             f"  checkpoint    : {summary['checkpoint']}"]
    if "hf_export" in summary:
        lines.append(f"  HF export     : {summary['hf_export']}")
    if "curves" in summary:
        lines.append(f"  curves        : {summary['curves']}")
    if (run_dir / "tensorboard").is_dir():
        lines.append(f"  TensorBoard   : tensorboard --logdir {run_dir / 'tensorboard'}")
    if "eval" in summary:
        def describe(ev: dict) -> str:
            budgets = sorted(int(k.split("@")[1]) for k in ev if k.startswith("eval/regret@"))
            regret = ", ".join(f"regret@{b} {ev[f'eval/regret@{b}']:.3f}" for b in budgets)
            return (f"{ev['eval/accuracy']:.3f}, mean response tokens "
                    f"{ev['eval/response_length/mean']:.1f}" + (f", {regret}" if regret else ""))

        lines.append(f"  evaluation    : {_eval_label(cfg)} on {describe_eval_source(cfg)}")
        if "eval_before" in summary:
            lines.append(f"    before      : {describe(summary['eval_before'])}")
        lines.append(f"    after       : {describe(summary['eval'])}")
        lines.append(f"    summary     : {run_dir / 'eval.json'}")
    if summary["status"] == "interrupted":
        lines.append(f"  resume with   : {resume_command(run_dir, world_size)}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    """Exit codes: 0 done, 1 non-finite loss, 2 bad config / data / checkpoint, 128 + N stopped by signal N."""
    try:
        args = parse_args(argv)
        if args.dry_run:
            preflight(args.config)
    except (ValueError, TypeError) as exc:
        print(f"mrt_fast.train: config error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(dump(args.config), end="")
        print("[mrt_fast.train] dry run: the config is valid, its paths exist and its packages are installed; "
              "nothing was run.")
        return 0
    try:
        summary = run(args.config, export_only=args.export_only, allow_config_change=args.allow_config_change)
    except (ValueError, TypeError, ImportError, checkpoint.CheckpointError) as exc:  # ImportError: vllm missing or unsupported
        print(f"mrt_fast.train: error: {exc}", file=sys.stderr)
        destroy_distributed()
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint of the current step
        print("mrt_fast.train: stopped at once by a second Ctrl-C; --resume auto continues from the last "
              "checkpoint written before it", file=sys.stderr)
        return 128 + signal.SIGINT.value
    if summary.get("status") == "interrupted":
        return 128 + signal.Signals[summary.get("signal", "SIGINT")].value
    return 0


if __name__ == "__main__":
    sys.exit(main())
