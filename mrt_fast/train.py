"""The mrt-fast training recipe: ``python -m mrt_fast.train`` / ``torchrun -m mrt_fast.train``.

Read top to bottom, like a torchtune recipe:

1. config      parse ``--config run.yaml`` + dotted overrides, make the run directory
2. setup       process group, model + tokenizer, data, FSDP2 actor, optimizer, LR schedule,
               rollout engine (an unsharded copy of the policy), optional reference model, resume
3. step loop   prompts -> rollouts + the algorithm's plan (PrefixGroups + advantages)
               -> pack with shared prefixes, balance over ranks -> fused loss inside the sharded
               forward -> gradient accumulation, clipping, AdamW, LR schedule (PPO epochs and
               mini-batches) -> weight sync to the engine -> metrics, checkpoints
4. finish      final checkpoint, HF export, short evaluation, where the outputs are

With no arguments it runs the embedded default job: the tiny warm-started model of
``mrt_fast.data.synthetic`` on its synthetic task, MRT-RL for a few steps, then an evaluation.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from mrt_fast import checkpoint
from mrt_fast.config import EMBEDDED, RunConfig, dump, parse_args, save as save_config, world_batch_check
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
    init_distributed,
    max_memory_allocated_gb,
    shard,
    transformer_blocks,
)
from mrt_fast.metrics import MetricsWriter, ProgressBar, Timer, mfu, reduce_mean, transformer_flops_per_token

# ============================================================================================
# 1. Data: problems with a prompt, a reference answer and (for SFT) a response to imitate
# ============================================================================================


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    response: Optional[str] = None


EVAL_SEED_OFFSET = 1_000_003  # held-out embedded problems come from a different seed stream


def load_examples(cfg: RunConfig, *, held_out: bool = False) -> list[Example]:
    """Training (or held-out evaluation) examples; a missing column fails here, before any compute."""
    data = cfg.data
    if data.source == EMBEDDED:
        from mrt_fast.data import synthetic

        seed = cfg.train.seed + (EVAL_SEED_OFFSET if held_out else 0)
        n = cfg.eval.num_problems if held_out else data.num_problems
        kwargs = {} if data.difficulty is None else {"difficulty": data.difficulty}
        problems = synthetic.generate_problems(n, seed=seed, task=data.task, **kwargs)
        rng = random.Random(seed)
        need_response = cfg.algo.name == "sft" and not held_out
        return [Example(p.prompt, p.answer, synthetic.sft_trace(p, rng) if need_response else None)
                for p in problems]

    rows = _read_table(data.source, data.split)
    columns = list(rows[0].keys()) if rows else []
    needed = [data.prompt_column, data.answer_column]
    if cfg.algo.name == "sft":
        needed.append(data.response_column)
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ValueError(f"data.source={data.source!r} has no column(s) {missing} "
                         f"(columns: {columns}); set data.prompt_column / data.answer_column / "
                         "data.response_column")
    examples = [Example(str(r[data.prompt_column]), str(r[data.answer_column]),
                        str(r[data.response_column]) if data.response_column in r else None) for r in rows]
    if held_out:
        return examples[: cfg.eval.num_problems]
    return examples


def _read_table(source: str, split: str) -> list[dict]:
    path = Path(source)
    if not path.exists():
        raise ValueError(f"data.source={source!r} does not exist (expected 'embedded', a json/jsonl/"
                         "parquet/csv file or a directory saved with datasets.save_to_disk)")
    import datasets

    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"data.split={split!r} not in {list(ds)}")
            ds = ds[split]
    else:
        kind = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
        if kind is None:
            raise ValueError(f"data.source={source!r}: unsupported file type {path.suffix!r}")
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    if len(ds) == 0:
        raise ValueError(f"data.source={source!r} is empty")
    return list(ds)


def grader_for(cfg: RunConfig):
    """``grade(response, answer) -> bool`` for the configured data."""
    from mrt_fast.data import grade

    kind = cfg.data.grader
    if kind == "auto" and cfg.data.source == EMBEDDED:
        from mrt_fast.data.synthetic import GRADER_KIND

        kind = GRADER_KIND
    elif kind == "auto":
        kind = "math"
    return lambda response, answer: bool(grade(response, answer, kind=kind))


def prompt_token_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt tokens through the chat template, with the assistant turn opened."""
    enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True)
    ids = enc["input_ids"] if hasattr(enc, "keys") else enc
    return [int(t) for t in ids]


class DataStream:
    """A deterministic, resumable order over the examples: reshuffled every epoch from the seed.

    ``position`` counts prompts handed out over all ranks; it is all a checkpoint needs to resume.
    """

    def __init__(self, n: int, *, seed: int, shuffle: bool, position: int = 0) -> None:
        if n <= 0:
            raise ValueError(f"the dataset is empty (n={n})")
        self.n, self.seed, self.shuffle, self.position = n, seed, shuffle, position
        self._epoch, self._cached = -1, []

    def _order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self._epoch, self._cached = epoch, list(range(self.n))
            if self.shuffle:
                random.Random(self.seed * 7919 + epoch).shuffle(self._cached)
        return self._cached

    def take(self, count: int) -> list[int]:
        out = []
        for _ in range(count):
            epoch, i = divmod(self.position, self.n)
            out.append(self._order(epoch)[i])
            self.position += 1
        return out


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

        looks_local = path.startswith((".", "/", "~")) or os.sep in path and path.count("/") != 1
        if looks_local and not Path(path).expanduser().exists():
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
            logp = token_logprobs(hidden, head.weight, batch.targets, bias=bias)
            mask = batch.target_loss_mask.to(logp.dtype)
            nll = -(logp * mask).sum() / mask.sum().clamp_min(1.0)
            return nll, {"logprobs": logp.detach()}
        if mode == "policy":
            return fused_policy_loss(hidden, head.weight, batch.targets, bias=bias,
                                     loss_mask=batch.target_loss_mask, **loss_kwargs)
        raise ValueError(f"mode must be 'logprobs', 'sft' or 'policy', got {mode!r}")


def build_actor(model: nn.Module, cfg: RunConfig, env: DistEnv) -> Actor:
    """Shard the policy with FSDP2 (per block + root) and move it to this rank's device."""
    blocks = transformer_blocks(model)
    actor = Actor(model, cfg.model.attn_backend).to(env.device)
    shard(actor, blocks, param_dtype=compute_dtype(cfg.model.dtype, env.device))
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


RL_ALGORITHMS = ("grpo", "mrt-rl", "mrt-online")


def sampling_params(cfg: RunConfig, tokenizer: Any, seed: int, *, meta: bool = False) -> Any:
    from mrt_fast.rollout import SamplingParams

    r = cfg.rollout
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if meta:  # the meta-prover's forced-termination answers (DESIGN.md section 2)
        return SamplingParams(temperature=r.meta_temperature, top_p=r.meta_top_p,
                              max_new_tokens=r.meta_max_new_tokens, stop_token_ids=stop, seed=seed + 1)
    return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                          max_new_tokens=r.max_new_tokens, stop_token_ids=stop, seed=seed)


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
    common = dict(grader=grader, params=sampling_params(cfg, tokenizer, seed))
    if name == "grpo":
        rl = plans.grpo_plan(engine, tokenizer, prompts, answers, n=cfg.rollout.n, **common)
    elif name == "mrt-rl":
        rl = plans.mrt_rl_plan(engine, tokenizer, prompts, answers, n=cfg.rollout.n, alpha=cfg.algo.alpha,
                               termination_ids=termination_token_ids(tokenizer),
                               answer_params=sampling_params(cfg, tokenizer, seed, meta=True),
                               train_terminate=cfg.algo.train_both_branches, rng=random.Random(seed), **common)
    elif name in ("mrt-online", "mrt-star"):
        meta = dict(meta_params=sampling_params(cfg, tokenizer, seed, meta=True), n=cfg.rollout.n,
                    k=cfg.rollout.meta_k, termination_ids=termination_token_ids(tokenizer))
        if name == "mrt-star":
            kept, metrics = plans.mrt_star_plan(engine, tokenizer, prompts, answers, **meta, **common)
            return Plan([ex.to_prefix_group() for ex in kept], [[1.0] for _ in kept], "sequence", metrics)
        rl = plans.mrt_online_plan(engine, tokenizer, prompts, answers, alpha=cfg.algo.alpha, **meta, **common)
    else:
        raise ValueError(f"algo.name={name!r} has no plan")
    adv = rl.advantages.tolist()
    if rl.level == "episode":
        return Plan(rl.groups, [adv], "episode", rl.metrics)
    per_group, i = [], 0
    for g in rl.groups:  # [S] in plan order -> per group, per continuation
        per_group.append(adv[i:i + len(g.continuations)])
        i += len(g.continuations)
    return Plan(rl.groups, per_group, "sequence", rl.metrics)


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
    from mrt_fast.packing import packed_attention

    # Gradient checkpointing re-runs each block's forward during backward, after packed_hidden has
    # left its attention context: keep the packed attention in place for the whole update so the
    # recomputation sees the same attention (and mask) as the forward.
    with packed_attention(actor.policy):
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

    def share(b: Any) -> float:
        """This micro-batch's part of the mini-batch normaliser: its loss tokens for token-mean, its
        sequences with loss tokens for the seq-mean modes. (seq-mean-token-sum-norm's kernel loss is
        a plain sum / max_len, so its micro-batches add up and only the sequence total divides.)"""
        if seq_mode:
            return float(len(set(b.target_seq_ids[b.target_loss_mask > 0].tolist())))
        return float(b.target_loss_mask.sum())

    summed = cfg.algo.loss_agg == "seq-mean-token-sum-norm" and not sft

    # Pack every mini-batch once; old/reference log-probs are taken before any update.
    minis, all_batches = [], []
    for start in range(0, len(plan.groups), per_mini):
        groups = plan.groups[start:start + per_mini]
        advs = plan.advantages if plan.level == "episode" else plan.advantages[start:start + per_mini]
        batches = pack(groups, max_tokens=cfg.train.max_tokens_per_micro_batch)
        all_batches += batches
        total = sum(share(b) for b in batches)
        mine = [b.to(env.device) for b in balance_micro_batches(batches, env.world_size)[env.rank]]
        extras = []
        for b in mine:
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
                                    eps_low=cfg.algo.eps_low, eps_high=cfg.algo.eps_high,
                                    dual_clip=cfg.algo.dual_clip, beta=cfg.algo.beta,
                                    kl_estimator=cfg.algo.kl_estimator, entropy_coef=cfg.algo.entropy_coef,
                                    temperature=temperature, loss_agg=cfg.algo.loss_agg,
                                    max_len=cfg.rollout.max_new_tokens
                                    if cfg.algo.loss_agg == "seq-mean-token-sum-norm" else None, **kw)
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
    out = reduce_mean({k: sums[k] / weights[k] for k in names}, {k: weights[k] for k in names})
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
    """Push the updated weights to the rollout engine (every rank holds a full copy)."""
    state = full_state_dict(actor)
    engine.update_weights({k.removeprefix("policy."): v for k, v in state.items()})


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names, dtypes and raw bytes)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_rank_consistency(model: nn.Module, step: int) -> str:
    """Every rank's copy of the weights must be bit-identical after a step; returns the digest."""
    digests = all_gather_objects(weights_digest(model))
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks hold different weights after step {step}: {digests}")
    return digests[0]


# ============================================================================================
# 4. Evaluation: greedy (or sampled) answers to held-out problems
# ============================================================================================


def evaluate(cfg: RunConfig, engine: Any, tokenizer: Any, examples: Sequence[Example], grader: Any,
             env: DistEnv) -> dict[str, float]:
    """Short evaluation through ``mrt_fast.eval``: accuracy, mean response tokens, the meta-prover's
    ``J`` along each trace and normalised regret at ``eval.budgets`` (each rank evaluates a share of
    ``examples``; scalars are reduced over ranks)."""
    from mrt_fast.data import extract_boxed
    from mrt_fast.eval.runner import EvalSettings, evaluate as run_eval
    from mrt_fast.mrt.progress import termination_token_ids

    mine = list(examples)[env.rank::env.world_size]
    values: dict[str, float] = {}
    if mine:
        e = cfg.eval
        params = sampling_params(cfg, tokenizer, cfg.train.seed + env.rank)
        params.temperature, params.max_new_tokens = e.temperature, e.max_new_tokens
        settings = EvalSettings(params=params, meta_params=sampling_params(cfg, tokenizer, cfg.train.seed, meta=True),
                                n=e.samples, ks=(1,), meta_k=e.meta_k, regret_samples=1,
                                budgets=tuple(e.budgets) if e.budgets else (e.max_new_tokens,))
        result = run_eval(engine, tokenizer, [prompt_token_ids(tokenizer, ex.prompt) for ex in mine],
                          [ex.answer for ex in mine], grader=grader, termination_ids=termination_token_ids(tokenizer),
                          settings=settings, extract=_extract_answer)
        values = {"eval/accuracy": result["pass@1"], "eval/response_length/mean": result["mean_tokens"],
                  "eval/J_at_empty_prefix": result["J_at_empty_prefix"],
                  "eval/J_at_end_of_thinking": result["J_at_end_of_thinking"],
                  **{f"eval/regret@{b}": v for b, v in result["regret"].items()}}
    return reduce_mean(values, {k: float(len(mine)) for k in values})


def _extract_answer(text: str) -> Optional[str]:
    from mrt_fast.data import extract_boxed

    return extract_boxed(text)


# ============================================================================================
# 5. The recipe
# ============================================================================================


class StopRequest:
    """Ctrl-C / SIGTERM handling: the first signal asks for a checkpoint at the next safe point
    (the end of the current step). A second Ctrl-C interrupts at once; SIGTERM never does,
    because torchrun follows a terminal's Ctrl-C (which every rank already got) with a SIGTERM
    to its workers, and that must not cut the checkpoint short."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            print(f"\n[mrt_fast.train] {signal.Signals(signum).name}: will checkpoint after this step and "
                  "stop (Ctrl-C again stops now)", file=sys.stderr, flush=True)
        self.requested = True

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled (ranks must stop at the same step)."""
        return bool(all_reduce_max(torch.tensor([1.0 if self.requested else 0.0])).item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def build_engine(cfg: RunConfig, rollout_model: nn.Module, tokenizer: Any) -> Any:
    """The rollout engine: ``hf`` samples from ``rollout_model``; ``vllm`` loads ``model.path``
    itself (weights are synced from the trainer after every update either way)."""
    from mrt_fast.rollout import make_engine

    if cfg.rollout.engine == "hf":
        return make_engine("hf", model=rollout_model, tokenizer=tokenizer)
    path = cfg.model.path
    if path == EMBEDDED:
        from mrt_fast.data.tokenizer import ASSETS_DIR

        path = str(ASSETS_DIR)
    return make_engine("vllm", model_path=path)


def resolve_run_dir(cfg: RunConfig, env: DistEnv) -> Path:
    """``--output-dir``, or ``runs/<algo>-<UTC time>`` chosen by rank 0 and shared."""
    if cfg.output_dir is None:
        name = f"runs/{cfg.algo.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        cfg.output_dir = broadcast_object(name)
    run_dir = Path(cfg.output_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    return run_dir


def run(cfg: RunConfig, *, export_only: bool = False) -> dict[str, Any]:
    """Train (or, with ``export_only``, only export a checkpoint); returns a summary dict."""
    # --- setup -----------------------------------------------------------------------------
    env = init_distributed()
    world_batch_check(cfg, env.world_size)
    run_dir = resolve_run_dir(cfg, env)
    say = print if env.is_main else (lambda *a, **k: None)
    if env.is_main and not export_only:
        save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.train.seed + env.rank)
    random.seed(cfg.train.seed + env.rank)

    model, tokenizer = load_model_and_tokenizer(cfg)
    examples = load_examples(cfg)
    eval_examples = load_examples(cfg, held_out=True) if cfg.eval.num_problems > 0 else []
    grader = grader_for(cfg)
    resume_from = checkpoint.resolve_resume(run_dir, cfg.resume)
    if resume_from is not None:  # incompatible checkpoints fail here, before any compute
        checkpoint.check_compatible(resume_from, Actor(model))  # names as the sharded actor has them

    # The engine samples from an unsharded copy (vLLM holds its own; the copy then stays on the CPU
    # and only serves as the HF export template).
    engine_device = env.device if cfg.rollout.engine == "hf" else torch.device("cpu")
    rollout_model = copy.deepcopy(model).to(engine_device, compute_dtype(cfg.model.dtype, env.device)).eval()
    reference = None
    if cfg.model.reference_model:
        reference = build_actor(copy.deepcopy(model), cfg, env).eval()
        reference.requires_grad_(False)
    actor = build_actor(model, cfg, env)
    optimizer, scheduler = build_optimizer(actor, cfg)

    step, data_position = 0, 0
    if resume_from is not None:
        state = checkpoint.load(resume_from, actor, optimizer, scheduler=scheduler)
        step, data_position = state["step"], state["trainer"].get("data_position", 0)
        say(f"[mrt_fast.train] resumed from {resume_from} at step {step}"
            + ("" if state["rng_restored"] else " (different world size: RNG streams restart)"))
    engine = build_engine(cfg, rollout_model, tokenizer)
    sync_engine(engine, actor)

    if export_only:
        path = export(run_dir, actor, rollout_model, tokenizer, env, name=f"hf-step_{step}")
        say(f"[mrt_fast.train] HF export of step {step}: {path}")
        destroy_distributed()
        return {"run_dir": str(run_dir), "hf_export": str(path), "step": step}

    # --- step loop -------------------------------------------------------------------------
    data = DataStream(len(examples), seed=cfg.train.seed, shuffle=cfg.data.shuffle, position=data_position)
    per_rank = cfg.train.global_batch_size // env.world_size
    writer = MetricsWriter(run_dir, enabled=env.is_main, tensorboard=cfg.log.tensorboard)
    bar = ProgressBar(cfg.train.steps, step, enabled=env.is_main and cfg.log.progress_bar)
    timer = Timer()
    stop = StopRequest()
    n_params = sum(p.numel() for p in actor.parameters())
    last_metrics: dict[str, Any] = {}
    status = "completed"
    initial_eval = None
    try:
        if cfg.eval.before_training and eval_examples and step == 0:
            initial_eval = evaluate(cfg, engine, tokenizer, eval_examples, grader, env)
            writer.log(0, initial_eval)
        while step < cfg.train.steps:
            t0 = time.perf_counter()
            indices = data.take(cfg.train.global_batch_size)[env.rank * per_rank:(env.rank + 1) * per_rank]
            with timer("gen"):
                plan = make_plan(cfg, [examples[i] for i in indices], engine, tokenizer, grader,
                                 seed=cfg.train.seed * 1_000_003 + step * 1_009 + env.rank)
            plan, rollout_metrics = gather_plan(plan)
            with timer("update_actor"):
                actor.train()
                if plan.groups:
                    update_metrics = update(actor, optimizer, plan, cfg, env, reference)
                else:  # e.g. MRT-STaR kept no trace this step: nothing to train on
                    update_metrics = {"actor/grad_norm": 0.0, "perf/total_num_tokens": 0.0,
                                      "perf/packed_num_tokens": 0.0, "train/empty_step": 1.0}
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
            with timer("sync_weights"):
                sync_engine(engine, actor)
            step += 1
            digest = check_rank_consistency(rollout_model, step) if cfg.log.check_weights else None
            elapsed = time.perf_counter() - t0
            metrics = {**rollout_metrics, **update_metrics, "actor/lr": lr, **timer.pop()}
            tokens = metrics["perf/total_num_tokens"]
            metrics["perf/throughput"] = tokens / elapsed / env.world_size
            metrics["perf/time_per_step"] = elapsed
            packed = metrics["perf/packed_num_tokens"] * cfg.algo.ppo_epochs  # what the GPU computed
            util = mfu(packed / max(metrics["timing_s/update_actor"], 1e-9) / env.world_size,
                       _flops_per_token(rollout_model, n_params, packed / max(1, len(plan.groups))))
            if util is not None:
                metrics["perf/mfu"] = util
            if digest is not None:
                metrics["debug/weights_sha256"] = digest
            mem = max_memory_allocated_gb(env.device)
            if mem is not None:
                metrics["perf/max_memory_allocated_gb"] = mem
            if cfg.eval.every and step % cfg.eval.every == 0 and eval_examples:
                metrics.update(evaluate(cfg, engine, tokenizer, eval_examples, grader, env))
            writer.log(step, metrics)
            bar.update(step, metrics)
            last_metrics = metrics
            trainer_state = {"data_position": data.position}
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.train.steps:
                checkpoint.save(run_dir, step, actor, optimizer, scheduler=scheduler,
                                trainer_state=trainer_state, keep_last=cfg.checkpoint.keep_last)
            if cfg.checkpoint.export_every and step % cfg.checkpoint.export_every == 0:
                export(run_dir, actor, rollout_model, tokenizer, env, name=f"hf-step_{step}")
            if stop.agreed():
                status = "interrupted"
                break
    except NonFiniteError as exc:
        last = checkpoint.latest(run_dir)
        bar.close()
        say(f"[mrt_fast.train] stopped at step {step + 1}: {exc}. Last good checkpoint: "
            f"{last if last is not None else 'none (no checkpoint was written yet)'}")
        writer.close()
        stop.restore()
        destroy_distributed()
        raise SystemExit(1) from exc
    finally:
        stop.restore()
    bar.close()

    # --- finish ----------------------------------------------------------------------------
    ckpt = checkpoint.save(run_dir, step, actor, optimizer, scheduler=scheduler,
                           trainer_state={"data_position": data.position}, keep_last=cfg.checkpoint.keep_last)
    summary: dict[str, Any] = {"run_dir": str(run_dir), "status": status, "step": step, "checkpoint": str(ckpt),
                               "metrics": str(run_dir / "metrics.jsonl")}
    if status == "completed":
        if cfg.checkpoint.export_hf:
            summary["hf_export"] = str(export(run_dir, actor, rollout_model, tokenizer, env, name="hf"))
        if eval_examples:
            result = evaluate(cfg, engine, tokenizer, eval_examples, grader, env)
            writer.log(step, result)
            summary["eval"] = result
            if initial_eval is not None:
                summary["eval_before"] = initial_eval
            if env.is_main:
                (run_dir / "eval.json").write_text(json.dumps(
                    {"before": initial_eval, "after": result, "step": step}, indent=2) + "\n")
    writer.close()
    summary["last_metrics"] = {k: v for k, v in last_metrics.items() if isinstance(v, float)}
    if env.is_main:
        _print_summary(summary)
    destroy_distributed()
    return summary


def _flops_per_token(model: nn.Module, n_params: int, seq_len: float) -> float:
    c = model.config
    return transformer_flops_per_token(n_params, c.num_hidden_layers, c.hidden_size, int(seq_len))


def export(run_dir: Path, actor: Actor, hf_model: nn.Module, tokenizer: Any, env: DistEnv, *, name: str) -> Path:
    """HF ``save_pretrained`` export of the current weights (collective; rank 0 writes)."""
    state = full_state_dict(actor, cpu=True)
    out = run_dir / name
    if env.is_main:
        checkpoint.export_hf(out, state, hf_model, tokenizer, strip_prefix="policy.")
    barrier()
    return out


def _print_summary(summary: dict[str, Any]) -> None:
    lines = [f"[mrt_fast.train] {summary['status']} at step {summary['step']}",
             f"  run directory : {summary['run_dir']}",
             f"  metrics       : {summary['metrics']}",
             f"  checkpoint    : {summary['checkpoint']}"]
    if "hf_export" in summary:
        lines.append(f"  HF export     : {summary['hf_export']}")
    if "eval" in summary:
        def describe(ev: dict) -> str:
            regret = ", ".join(f"regret@{k.split('@')[1]} {v:.3f}" for k, v in ev.items() if k.startswith("eval/regret@"))
            return (f"accuracy {ev['eval/accuracy']:.3f}, mean response tokens "
                    f"{ev['eval/response_length/mean']:.1f}" + (f", {regret}" if regret else ""))

        if "eval_before" in summary:
            lines.append(f"  eval (start)  : {describe(summary['eval_before'])}")
        lines.append(f"  eval (end)    : {describe(summary['eval'])}")
        lines.append(f"  eval summary  : {Path(summary['run_dir']) / 'eval.json'}")
    print("\n".join(lines), flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    try:
        args = parse_args(argv)
    except (ValueError, TypeError) as exc:
        print(f"mrt_fast.train: config error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(dump(args.config), end="")
        print("[mrt_fast.train] dry run: the config is valid; nothing was run.")
        return 0
    try:
        run(args.config, export_only=args.export_only)
    except (ValueError, TypeError, checkpoint.CheckpointError) as exc:
        print(f"mrt_fast.train: error: {exc}", file=sys.stderr)
        destroy_distributed()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
