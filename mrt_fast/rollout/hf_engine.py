"""The embedded rollout engine: sampling with a shared, reusable KV cache on any HF causal LM.

Why not `model.generate`: MRT needs (1) one prefill per prefix shared by all its branches,
(2) one prefill per *trace* shared by all its episode boundaries (the cache cut at each
boundary), (3) stop strings matched across token boundaries per row, and (4) per-token
log-probs under the sampling temperature. The loop below does all four with plain forwards
over `KVRows` (mrt_fast.rollout.kv_cache); branches of one context decode with shared-prefix
attention (mrt_fast.rollout.shared_prefix).

Batching: rows of different lengths share a batch by left padding. Every forward passes a 2-D
attention mask (which columns hold real tokens) and explicit position ids, so a row's tokens
get the same positions and attend to the same keys as they would alone.

The engine holds the trainer's module itself (no copy): a training step changes what it samples
from immediately. Sampling runs under `torch.inference_mode()` with the module in eval mode
(restored afterwards).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .branching import check_branch_inputs
from .kv_cache import KVRows
from .params import Completion, SamplingParams
from .protocol import check_n, check_params, check_token_lists
from .sampling import context_keys, sample_next, uniform_streams
from .shared_prefix import SharedPrefixRows, decoding_with_shared_prefix, supports_shared_prefix
from .stopping import StopStrings


@dataclass
class PrefixCache:
    """Prefilled prefixes, reusable by several `HFEngine.fork` calls (e.g. the terminate-now and
    continue-thinking halves of an MRT-RL group). Invalidated by `update_weights`."""

    token_ids: list[list[int]]
    kv: KVRows
    last_logits: torch.Tensor  # [prefixes, vocab] fp32
    weights_version: int


class _BoundaryJob(NamedTuple):
    """One (trace, boundary) context: the part served from the trace's cache, the rest fed."""

    trace: int
    index: int  # which boundary of the trace
    cached: int  # leading context tokens taken from the trace's prefill
    suffix: list[int]  # tokens fed after cutting the cache (the termination ids)

    @classmethod
    def of(cls, trace: int, index: int, prefix: list[int], termination: list[int]) -> "_BoundaryJob":
        # Without termination text the prefix's last token is re-fed: its logits start the answer.
        context = prefix + termination
        cached = min(len(prefix), len(context) - 1)
        return cls(trace, index, cached, context[cached:])

    @property
    def context_len(self) -> int:
        return self.cached + len(self.suffix)


@dataclass
class _Branch:
    """One row to decode: which cached row it continues, and its bookkeeping."""

    kv_row: int
    stream: tuple[int, ...]  # names its random stream
    prompt_len: int
    budget: int  # most tokens it may generate (max_new_tokens, capped by the context)


class HFEngine:
    """Rollout engine over a transformers causal LM (CPU or GPU).

    Args:
        model: any `transformers` causal LM whose layers use full attention with a standard KV
            cache (Llama, Qwen2, Mistral without sliding window, ...).
        tokenizer: needed for `Completion.text` and stop strings; without it text is "".
        max_batch_size: most rows decoded together; larger requests are split.
        max_kv_tokens: if set, bounds the KV cache held at once, in token slots (rows x reserved
            columns, prefilled contexts and decode rows together): prompts are prefilled and
            decoded in waves that fit. At least one prompt and one decode row run at a time, so a
            single prompt longer than the bound still runs (alone). Size it to the GPU memory left
            by training: a 1.5B Qwen2 needs 28 KiB of KV per token in bf16. `peak_kv_tokens`
            records the most slots the engine has held.
        prefill_chunk_tokens: budget of (rows x columns) per prefill forward; long prompts are
            prefilled in column chunks of this many tokens in total.
        eos_token_id: overrides the EOS id(s) taken from the generation config / config /
            tokenizer.
        shared_prefix_decoding: when several branches continue one context, decode them with
            shared-prefix attention (mrt_fast.rollout.shared_prefix): the context's KV is kept
            once and read once per step for all its branches, instead of copied into each.
            Ignored (plain decoding) for models whose attention layers do not follow
            `model.config`'s attention implementation.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any = None,
        *,
        max_batch_size: int = 256,
        max_kv_tokens: int | None = None,
        prefill_chunk_tokens: int = 8192,
        eos_token_id: int | list[int] | None = None,
        shared_prefix_decoding: bool = True,
    ):
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"model must be a transformers causal LM, got {type(model).__name__}")
        check_n(max_batch_size, "max_batch_size")
        check_n(prefill_chunk_tokens, "prefill_chunk_tokens")
        if max_kv_tokens is not None:
            check_n(max_kv_tokens, "max_kv_tokens")
        self.max_kv_tokens = max_kv_tokens
        self.peak_kv_tokens = 0
        self.shared_prefix_decoding = shared_prefix_decoding and supports_shared_prefix(model)
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.prefill_chunk_tokens = prefill_chunk_tokens
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        layer_types = getattr(config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(
                f"model: HFEngine needs full-attention layers (a cut cache must stay exact), got layer_types={set(layer_types)}"
            )
        self.num_layers = config.num_hidden_layers
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.max_context_len: int | None = getattr(config, "max_position_embeddings", None)
        self.eos_token_ids = self._eos_ids(eos_token_id)
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._keep_kwarg = "logits_to_keep" in params
        self._weights_version = 0

    # ----------------------------------------------------------------------------------- API

    def generate(self, prompts: list[list[int]], params: SamplingParams, n: int = 1) -> list[list[Completion]]:
        """`n` samples per prompt, [prompt][sample]. Each prompt is prefilled once for its n samples."""
        prompts = check_token_lists(prompts, "prompts", vocab_size=self.vocab_size, max_len=self.max_context_len)
        return self._fork_tokens(prompts, params, check_n(n))

    def fork(self, prefixes: list[list[int]] | PrefixCache, params: SamplingParams, n: int, *,
             max_new_tokens: list[int] | None = None) -> list[list[Completion]]:
        """`n` branches per prefix, [prefix][branch]; each prefix's KV is computed once and
        shared by its branches (shared-prefix attention, or one copy per branch when that is
        off). `prefixes` may be a `PrefixCache` from `prefill` to reuse a prefill across calls.

        `max_new_tokens[i]`, when given, caps prefix i's branches below `params.max_new_tokens`
        (e.g. what is left of a response budget after a prefix that is itself part of the response).
        """
        n = check_n(n)
        if isinstance(prefixes, PrefixCache):
            caps = self._check_caps(max_new_tokens, len(prefixes.token_ids))
            return self._fork_cached(prefixes, params, n, caps)
        prefixes = check_token_lists(prefixes, "prefixes", vocab_size=self.vocab_size, max_len=self.max_context_len)
        return self._fork_tokens(prefixes, params, n, self._check_caps(max_new_tokens, len(prefixes)))

    def prefill(self, prefixes: list[list[int]]) -> PrefixCache:
        """Compute the KV cache of `prefixes` once, for several later `fork` calls."""
        prefixes = check_token_lists(prefixes, "prefixes", vocab_size=self.vocab_size, max_len=self.max_context_len)
        with self._sampling_mode():
            kv, logits = self._prefill(prefixes)
        return PrefixCache(prefixes, kv, logits, self._weights_version)

    def branch_at_boundaries(
        self,
        traces: list[list[int]],
        boundaries: list[list[int]],
        termination_ids: list[int],
        params: SamplingParams,
        k: int,
    ) -> list[list[list[Completion]]]:
        """k answers per (trace, boundary): see `mrt_fast.rollout.branch_at_boundaries`.

        One prefill per trace (up to its last boundary); each boundary's context is that cache
        cut at the boundary, followed by `termination_ids` (fed once per boundary, then shared
        by its k answers). Boundaries of several traces are decoded in shared batches.
        """
        traces, boundaries, termination_ids = check_branch_inputs(
            traces, boundaries, termination_ids, k, vocab_size=self.vocab_size, max_len=self.max_context_len
        )
        check_params(params, vocab_size=self.vocab_size, has_tokenizer=self.tokenizer is not None)
        out: list[list[list[Completion]]] = [[[] for _ in b] for b in boundaries]
        base = self._base_seed(params)
        jobs = [
            _BoundaryJob.of(t, i, trace[:b], termination_ids)
            for t, (trace, bounds) in enumerate(zip(traces, boundaries))
            for i, b in enumerate(bounds)
        ]
        contexts = [traces[job.trace][: job.cached] + job.suffix for job in jobs]
        keys = dict(zip([(job.trace, job.index) for job in jobs], context_keys(contexts)))
        rows_per_batch = max(1, self.max_batch_size // k)
        # KV per boundary, at most: its trace's prefill, its context (+ suffix) and k decode rows.
        context_cap = max((len(t) for t in traces), default=0) + len(termination_ids) + 1
        per_job = self._rows_within_kv(0, 2 * context_cap + k * params.max_new_tokens, rows_per_batch)
        with self._sampling_mode():
            for group in _groups_by_trace(jobs, per_job):
                # One prefill per trace of the group, as far as its furthest boundary needs.
                group_traces = sorted({job.trace for job in group})
                local = {t: row for row, t in enumerate(group_traces)}
                longest = {t: max(job.cached for job in group if job.trace == t) for t in group_traces}
                trace_kv, _ = self._prefill([traces[t][: longest[t]] for t in group_traces], allow_empty=True)
                held = _reserved_kv_tokens(trace_kv)
                context = max(job.context_len for job in group)
                step = self._rows_within_kv(held, context + k * params.max_new_tokens, rows_per_batch)
                for start in range(0, len(group), step):
                    chunk = group[start : start + step]
                    kv = trace_kv.truncated(torch.tensor([local[job.trace] for job in chunk]),
                                            torch.tensor([job.cached for job in chunk]),
                                            reserve=max(len(job.suffix) for job in chunk))
                    logits = self._extend(kv, [job.suffix for job in chunk])
                    branches = [
                        _Branch(row, self._stream(base, keys[(job.trace, job.index)], s),
                                job.context_len, self._budget(params, job.context_len))
                        for row, job in enumerate(chunk)
                        for s in range(k)
                    ]
                    results = self._decode_branches(kv, logits, branches, params, held=(trace_kv,))
                    for row, job in enumerate(chunk):
                        out[job.trace][job.index] = results[row * k : (row + 1) * k]
        return out

    def update_weights(self, weights: Any = None) -> None:
        """Sync the weights the engine samples from.

        The engine shares the trainer's module, so after an in-place optimizer step there is
        nothing to copy: call `update_weights()` anyway, which invalidates `PrefixCache`
        handles computed with the old weights. Given another module or a state dict (a
        mapping or an iterable of (name, tensor) pairs, possibly a partial bucket), the named
        parameters/buffers are copied into the engine's module; unknown names are an error.
        """
        self._weights_version += 1
        if weights is None or weights is self.model:
            return
        if isinstance(weights, torch.nn.Module):
            weights = weights.state_dict()
        items = weights.items() if isinstance(weights, Mapping) else weights
        if not isinstance(items, Iterable):
            raise TypeError(f"weights must be a module, a state dict or (name, tensor) pairs, got {type(weights).__name__}")
        own = dict(self.model.state_dict(keep_vars=True))
        unknown = []
        with torch.no_grad():
            for name, tensor in items:
                target = own.get(name)
                if target is None:
                    unknown.append(name)
                    continue
                if target.shape != tensor.shape:
                    raise ValueError(f"weights[{name!r}] has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
                target.copy_(tensor)
        if unknown:
            raise ValueError(f"weights has names the model does not have: {unknown[:5]}{'...' if len(unknown) > 5 else ''}")

    # ------------------------------------------------------------------------------ internals

    def _eos_ids(self, override: int | list[int] | None) -> set[int]:
        candidates: list[Any] = [override]
        if override is None:
            gen = getattr(self.model, "generation_config", None)
            candidates = [getattr(gen, "eos_token_id", None), getattr(self.model.config, "eos_token_id", None)]
            if self.tokenizer is not None:
                candidates.append(getattr(self.tokenizer, "eos_token_id", None))
        for value in candidates:
            if value is not None:
                ids = {value} if isinstance(value, int) else set(value)
                bad = [t for t in ids if not 0 <= t < self.vocab_size]
                if bad:
                    raise ValueError(f"eos_token_id {bad} is outside the vocabulary (size {self.vocab_size})")
                return ids
        return set()

    @contextlib.contextmanager
    def _sampling_mode(self):
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.model.train(was_training)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _base_seed(self, params: SamplingParams) -> int:
        if params.seed is not None:
            return params.seed
        return int(torch.randint(0, 2**62, (1,)).item())  # torch.manual_seed makes this reproducible

    @staticmethod
    def _stream(base: int, context: tuple[int, int], sample: int) -> tuple[int, ...]:
        """Names a branch's random stream: (seed, context hash, occurrence of that context in the
        call, sample). Different contexts never share a stream, so sample j of two prompts, or a
        branch and the trace it was cut from, draw independent uniforms; the same seed and context
        give the same samples whatever else is in the batch."""
        return (base, *context, sample)

    @staticmethod
    def _check_caps(caps: list[int] | None, count: int) -> list[int | None]:
        if caps is None:
            return [None] * count
        if isinstance(caps, (str, bytes)) or not hasattr(caps, "__len__") or len(caps) != count:
            raise ValueError(f"max_new_tokens must be a list with one cap per prefix ({count}), got {caps!r}")
        for c in caps:
            check_n(c, "max_new_tokens[i]")
        return list(caps)

    def _budget(self, params: SamplingParams, context_len: int, cap: int | None = None) -> int:
        budget = params.max_new_tokens if cap is None else min(params.max_new_tokens, cap)
        if self.max_context_len is None:
            return budget
        return max(0, min(budget, self.max_context_len - context_len))

    def _forward(self, kv: KVRows, tokens: torch.Tensor, token_valid: torch.Tensor) -> torch.Tensor:
        """Append a block of tokens [rows, S] (left-padded: the last column is real for every
        row that has any) to the cache; returns the logits at the last column, fp32 [rows, V]."""
        positions = kv.next_pos[:, None] + (token_valid.long().cumsum(dim=1) - 1).clamp(min=0)
        mask = torch.cat([kv.valid, token_valid], dim=1)
        kwargs = {self._cache_kwarg: kv.cache, "use_cache": True}
        if self._keep_kwarg:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=tokens, attention_mask=mask.long(), position_ids=positions, **kwargs)
        kv.valid = mask
        kv.next_pos = kv.next_pos + token_valid.sum(dim=1)
        return out.logits[:, -1].float()

    def _extend(self, kv: KVRows, suffixes: list[list[int]]) -> torch.Tensor:
        """Feed each row its suffix (left-padded into one block, in column chunks); returns the
        logits after each row's last suffix token."""
        device = self.device
        width = max(len(s) for s in suffixes)
        tokens = torch.zeros(len(suffixes), width, dtype=torch.long)
        valid = torch.zeros(len(suffixes), width, dtype=torch.bool)
        for r, s in enumerate(suffixes):
            if s:
                tokens[r, width - len(s):] = torch.tensor(s)
                valid[r, width - len(s):] = True
        tokens, valid = tokens.to(device), valid.to(device)
        step = max(1, self.prefill_chunk_tokens // len(suffixes))
        logits = None
        for start in range(0, width, step):
            logits = self._forward(kv, tokens[:, start : start + step], valid[:, start : start + step])
        return logits

    def _prefill(self, prefixes: list[list[int]], allow_empty: bool = False) -> tuple[KVRows, torch.Tensor]:
        kv = KVRows.empty(self.num_layers, len(prefixes), self.device, max(len(p) for p in prefixes))
        if all(len(p) == 0 for p in prefixes):
            if not allow_empty:
                raise ValueError("prefixes are empty")
            return kv, torch.empty(len(prefixes), self.vocab_size, device=self.device)
        return kv, self._extend(kv, prefixes)

    def _fork_tokens(self, prefixes: list[list[int]], params: SamplingParams, n: int,
                     caps: list[int | None] | None = None) -> list[list[Completion]]:
        check_params(params, vocab_size=self.vocab_size, has_tokenizer=self.tokenizer is not None)
        out: list[list[Completion]] = []
        base = self._base_seed(params)
        keys = context_keys(prefixes)
        caps = caps or [None] * len(prefixes)
        with self._sampling_mode():
            for start, end in self._prefill_waves(prefixes, n, params.max_new_tokens):
                group = prefixes[start:end]
                kv, logits = self._prefill(group)
                out.extend(self._fork_rows(kv, logits, group, params, n, base, keys[start:end], caps[start:end]))
        return out

    def _prefill_waves(self, prefixes: list[list[int]], n: int, new_tokens: int) -> list[tuple[int, int]]:
        """Consecutive `[start, end)` ranges of prefixes prefilled together: at most
        max_batch_size // n prefixes, and under `max_kv_tokens` their prefill plus all n decode rows
        each (a decode row holds its own tokens, and a copy of the context without shared-prefix
        decoding)."""
        per_group = max(1, self.max_batch_size // n)
        waves, start = [], 0
        while start < len(prefixes):
            end, width = start + 1, len(prefixes[start])
            while end < len(prefixes) and end - start < per_group:
                wider = max(width, len(prefixes[end]))
                row = new_tokens + (0 if self.shared_prefix_decoding and n > 1 else wider)
                if self.max_kv_tokens is not None and (end + 1 - start) * (wider + n * row) > self.max_kv_tokens:
                    break
                end, width = end + 1, wider
            waves.append((start, end))
            start = end
        return waves

    def _rows_within_kv(self, held_tokens: int, row_tokens: int, limit: int) -> int:
        """Most rows of `row_tokens` KV slots each that fit beside `held_tokens` under
        max_kv_tokens: between 1 and `limit`."""
        if self.max_kv_tokens is None:
            return limit
        return max(1, min(limit, (self.max_kv_tokens - held_tokens) // max(1, row_tokens)))

    def _fork_cached(self, cache: PrefixCache, params: SamplingParams, n: int,
                     caps: list[int | None]) -> list[list[Completion]]:
        if cache.weights_version != self._weights_version:
            raise ValueError("prefixes: this PrefixCache was computed before update_weights(); call prefill() again")
        check_params(params, vocab_size=self.vocab_size, has_tokenizer=self.tokenizer is not None)
        with self._sampling_mode():
            return self._fork_rows(cache.kv, cache.last_logits, cache.token_ids, params, n, self._base_seed(params),
                                   context_keys(cache.token_ids), caps)

    def _fork_rows(self, kv, logits, prefixes, params, n, base, keys, caps) -> list[list[Completion]]:
        branches = [
            _Branch(r, self._stream(base, keys[r], s), len(p), self._budget(params, len(p), caps[r]))
            for r, p in enumerate(prefixes)
            for s in range(n)
        ]
        results = self._decode_branches(kv, logits, branches, params)
        return [results[r * n : (r + 1) * n] for r in range(len(prefixes))]

    def _decode_branches(self, kv: KVRows, logits: torch.Tensor, branches: list[_Branch],
                         params: SamplingParams, held: tuple = ()) -> list[Completion]:
        """Decode every branch (in batches of at most max_batch_size rows, and within
        max_kv_tokens beside `kv` and the caches `held`); in branch order."""
        results: list[Completion] = []
        shared = self.shared_prefix_decoding and kv.length > 0 and len({b.kv_row for b in branches}) < len(branches)
        row_tokens = max(b.budget for b in branches) + (0 if shared else kv.length)
        held = (kv, *held)
        per_batch = self._rows_within_kv(_reserved_kv_tokens(*held), row_tokens, self.max_batch_size)
        if shared:
            per_batch = min(self.max_batch_size, max(2, per_batch))  # one row alone would copy its context
        for start in range(0, len(branches), per_batch):
            batch = branches[start : start + per_batch]
            rows = torch.tensor([b.kv_row for b in batch])
            reserve = max(b.budget for b in batch)
            batch_logits = logits[rows.to(logits.device)]
            if self.shared_prefix_decoding and len(set(rows.tolist())) < len(batch) and kv.length > 0:
                state = SharedPrefixRows(kv, rows, reserve)
                with decoding_with_shared_prefix(self.model, state):
                    results.extend(self._decode(state, batch_logits, batch, params, held))
            else:
                results.extend(self._decode(kv.select(rows, reserve), batch_logits, batch, params, held))
        return results

    def _decode(self, kv: KVRows, logits: torch.Tensor, branches: list[_Branch], params: SamplingParams,
                held: tuple = ()) -> list[Completion]:
        """The sampling loop: one token per live row per step; finished rows leave the batch.
        `held`: the other caches alive meanwhile (counted in `peak_kv_tokens`)."""
        steps = max(b.budget for b in branches)
        uniforms = uniform_streams([b.stream for b in branches], max(steps, 1), logits.device)
        stops = (StopStrings(self.tokenizer, params.stop, skip_special_tokens=params.skip_special_tokens)
                 if params.stop else None)
        stop_ids = set(params.stop_token_ids)
        eos_ids = set() if params.ignore_eos else self.eos_token_ids
        tokens_out: list[list[int]] = [[] for _ in branches]
        logprobs_out: list[list[float]] = [[] for _ in branches]
        finish: list[Any] = [None] * len(branches)
        stop_reason: list[Any] = [None] * len(branches)
        for i, b in enumerate(branches):
            if b.budget == 0:  # the context already fills the model's context window
                finish[i] = "length"
        live = [i for i in range(len(branches)) if finish[i] is None]
        if len(live) < len(branches):
            kv.keep_rows_(live)
            logits = logits[torch.tensor(live, device=logits.device)]
        step = 0
        while live:
            tokens, logprobs = sample_next(logits, params, uniforms[live, step])
            still = []
            for i, tok, lp in zip(live, tokens.tolist(), logprobs.tolist()):
                tokens_out[i].append(tok)
                logprobs_out[i].append(lp)
                if tok in stop_ids:
                    finish[i], stop_reason[i] = "stop", tok
                elif tok in eos_ids:
                    finish[i] = "eos"
                elif stops is not None and stops.hit(tokens_out[i]):
                    finish[i] = "stop"
                elif len(tokens_out[i]) >= branches[i].budget:
                    finish[i] = "length"
                else:
                    still.append(i)
            step += 1
            if not still:
                break
            if len(still) < len(live):  # finished rows leave the batch
                keep = [live.index(i) for i in still]
                kv.keep_rows_(keep)
                tokens = tokens[torch.tensor(keep, device=tokens.device)]
            live = still
            ones = torch.ones(len(live), 1, dtype=torch.bool, device=tokens.device)
            logits = self._forward(kv, tokens[:, None], ones)
            self.peak_kv_tokens = max(self.peak_kv_tokens, _reserved_kv_tokens(kv, *held))
        return [self._completion(tokens_out[i], logprobs_out[i], finish[i], stop_reason[i], b.prompt_len, params, stops)
                for i, b in enumerate(branches)]

    def _completion(self, token_ids, logprobs, finish, stop_reason, prompt_len, params, stops) -> Completion:
        text = ""
        if self.tokenizer is not None:
            text = self.tokenizer.decode(token_ids, skip_special_tokens=params.skip_special_tokens,
                                         clean_up_tokenization_spaces=False)
            if stops is not None and finish == "stop" and stop_reason is None:
                text, stop_reason = stops.cut(text)
        return Completion(token_ids, text, logprobs, finish, prompt_len, stop_reason)


def _reserved_kv_tokens(*caches: Any) -> int:
    """Token slots the caches' KV buffers reserve (rows x capacity of layer 0's key buffer, from
    its storage, so a cache cut down to fewer rows still counts what it holds). Storage shared
    between caches (a decode batch reading its contexts' KV) is counted once."""
    slots: dict[int, int] = {}
    for cache in caches:
        buf = cache.layers[0]._kbuf if cache.layers else None
        if buf is not None:
            storage = buf.untyped_storage()
            slots[storage.data_ptr()] = storage.nbytes() // (buf.shape[1] * buf.shape[3] * buf.element_size())
    return sum(slots.values())


def _groups_by_trace(jobs: list[_BoundaryJob], rows_per_group: int) -> list[list[_BoundaryJob]]:
    """Split boundary jobs into groups of whole traces with at most `rows_per_group` boundaries
    each (a trace with more boundaries forms its own group, decoded in several batches)."""
    groups: list[list[_BoundaryJob]] = []
    current: list[_BoundaryJob] = []
    by_trace: dict[int, list[_BoundaryJob]] = {}
    for job in jobs:
        by_trace.setdefault(job.trace, []).append(job)
    for trace_jobs in by_trace.values():
        if current and len(current) + len(trace_jobs) > rows_per_group:
            groups.append(current)
            current = []
        current = current + trace_jobs
    if current:
        groups.append(current)
    return groups
