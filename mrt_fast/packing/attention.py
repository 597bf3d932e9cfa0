"""Prefix-tree attention for stock HF models, registered with transformers' `AttentionInterface`.

We do not fork model code. Every module call that carries a `PackedAttentionContext` as a forward
kwarg (transformers threads unknown kwargs down to the attention function) runs with the model's
`config._attn_implementation` switched to our registered name, and switched back when that call
returns: `route_packed_attention` installs this as a pre-hook/hook pair on the modules that read
the config (the decoder model and every attention module). Because the switch follows the call,
not a context around it, gradient checkpointing's recomputation during backward, which re-runs
each layer with the same kwargs, takes the packed path again. The stock Llama/Qwen2/Qwen3/Mistral
attention modules then call `packed_attention_forward` with the rotated q/k/v of the whole packed
stream, and the context tells it the layout. Because our name is not a known mask type,
transformers builds no mask of its own (it returns None); the context builds each mask once per
forward and every layer reuses it.

Backends (one mask function, `masks.prefix_tree_mask`, behind all of them):
  flex          FlexAttention with a BlockMask (compiled). GPU default. FlexAttention has no CPU
                backward, so on the CPU it only runs without gradients (tests use it so).
  sdpa          the mask materialised as dense boolean masks through SDPA, one per group (no
                attention crosses groups): the CPU path and the reference. Memory
                O(sum of group_len^2).
  flash_varlen  flash-attn varlen kernels over cu_seqlens; only when no prefix is shared (each
                group is then one causal sequence) and flash-attn is installed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from mrt_fast.packing.batch import PackedBatch
from mrt_fast.packing.masks import dense_mask, prefix_tree_mask

ATTENTION_NAME = "mrt_fast_packed"
CONTEXT_KWARG = "mrt_packed_context"
BACKENDS = ("flex", "sdpa", "flash_varlen")
FLEX_BLOCK_SIZE = 128
# flex pads the packed stream to a multiple of this many tokens (see `pad_stream`): a handful of
# lengths instead of one per micro-batch, so the compiled kernels see few shapes.
FLEX_PAD_MULTIPLE = 1024


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def default_backend(device: torch.device) -> str:
    """flex on GPU (block-sparse, compiled), sdpa on CPU (flex has no CPU backward)."""
    return "flex" if device.type == "cuda" else "sdpa"


_compiled: dict = {}


def _compiled_flex(name: str):
    """`flex_attention` / `create_block_mask`, compiled once on first use. Uncompiled, the first
    materialises all scores and the second all L^2 mask entries: slow and memory-hungry on a GPU.
    Default dynamic-shape handling: micro-batches differ in length, so after the first recompile
    the compiled code is shape-generic instead of recompiling per length."""
    if name not in _compiled:
        from torch.nn.attention import flex_attention as flex

        _compiled[name] = torch.compile(getattr(flex, name))
    return _compiled[name]


@dataclass
class PackedAttentionContext:
    """Layout of one packed stream on the model's device, and the masks built from it (cached per window)."""

    backend: str
    group_ids: torch.Tensor
    segment_ids: torch.Tensor
    position_ids: torch.Tensor
    shares_prefix: bool
    max_sequence_length: int
    calls: int = 0
    _masks: dict = field(default_factory=dict)

    @classmethod
    def from_batch(cls, batch: PackedBatch, backend: str, *, length: int | None = None) -> "PackedAttentionContext":
        """The context of `batch`; with `length` > the batch's tokens, of the stream padded to
        `length` (see `pad_stream`)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {backend!r}")
        if backend == "flash_varlen":
            if batch.shares_prefix:
                raise ValueError(
                    "backend='flash_varlen' cannot share a prefix (flash-attn varlen runs independent causal "
                    "sequences); pack with share_prefix=False or use backend='flex'/'sdpa'"
                )
            if not flash_attn_available():
                raise ValueError("backend='flash_varlen' needs the flash-attn package, which is not installed")
        _, position_ids, group_ids, segment_ids = pad_stream(batch, length or batch.num_tokens)
        return cls(
            backend=backend,
            group_ids=group_ids,
            segment_ids=segment_ids,
            position_ids=position_ids,
            shares_prefix=batch.shares_prefix,
            max_sequence_length=batch.max_sequence_length,
        )

    def effective_window(self, sliding_window: int | None) -> int | None:
        """The window, or None where it cannot cut anything (no sequence is longer than it)."""
        if sliding_window is None or sliding_window >= self.max_sequence_length:
            return None
        return int(sliding_window)

    def mask_mod(self, window: int | None):
        return prefix_tree_mask(self.group_ids, self.segment_ids, self.position_ids, window)

    def dense_mask(self, window: int | None) -> torch.Tensor:
        key = ("dense", window)
        if key not in self._masks:
            mask = dense_mask(self.mask_mod(window), self.group_ids.numel(), self.group_ids.device)
            self._masks[key] = mask[None, None]  # [1, 1, L, L], broadcast over batch and heads
        return self._masks[key]

    def group_masks(self, window: int | None) -> list[tuple[int, int, torch.Tensor]]:
        """Per group: its stream range and its own dense mask `[1, 1, n, n]`.

        Attention never crosses groups, so the SDPA path attends group by group: memory and work
        O(sum of group_len^2) instead of O(L^2) for the whole stream.
        """
        key = ("groups", window)
        if key not in self._masks:
            g = self.group_ids
            change = torch.nonzero(g[1:] != g[:-1]).flatten() + 1
            bounds = [0, *change.tolist(), g.numel()]
            mod = self.mask_mod(window)
            self._masks[key] = [
                (start, end, dense_mask(mod, end - start, g.device, start=start)[None, None])
                for start, end in zip(bounds[:-1], bounds[1:])
            ]
        return self._masks[key]

    def block_mask(self, window: int | None):
        from torch.nn.attention.flex_attention import create_block_mask

        key = ("block", window)
        if key not in self._masks:
            length = self.group_ids.numel()
            on_gpu = self.group_ids.device.type == "cuda"
            make = _compiled_flex("create_block_mask") if on_gpu else create_block_mask
            # Under no_grad whatever the caller's mode: the mask needs no autograd, and one grad
            # mode means one compiled graph for training and no-grad (log-prob) forwards alike.
            with torch.no_grad():
                self._masks[key] = make(
                    self.mask_mod(window), B=None, H=None, Q_LEN=length, KV_LEN=length,
                    device=self.group_ids.device, BLOCK_SIZE=FLEX_BLOCK_SIZE,
                )
        return self._masks[key]

    def cu_seqlens(self) -> tuple[torch.Tensor, int]:
        """Sequence boundaries for flash-attn varlen: a new sequence starts where the group or,
        with an empty prefix, the segment changes (each group is one sequence when nothing is shared)."""
        if "cu" not in self._masks:
            g, s = self.group_ids, self.segment_ids
            starts = torch.ones_like(g, dtype=torch.bool)
            # Same group and (same segment or previous token in the prefix): same sequence.
            starts[1:] = (g[1:] != g[:-1]) | ((s[1:] != s[:-1]) & (s[:-1] != 0))
            idx = torch.nonzero(starts).flatten()
            cu = torch.cat([idx, idx.new_tensor([g.numel()])]).to(torch.int32)
            self._masks["cu"] = (cu, int((cu[1:] - cu[:-1]).max()))
        return self._masks["cu"]


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The `AttentionInterface` function: q [1, Hq, L, D], k/v [1, Hkv, L, D] -> out [1, L, Hq, D]."""
    ctx: PackedAttentionContext | None = kwargs.get(CONTEXT_KWARG)
    if ctx is None:
        raise RuntimeError(
            f"attention implementation {ATTENTION_NAME!r} needs a PackedAttentionContext; "
            "run the model through mrt_fast.packing.packed_hidden"
        )
    # Anything that changes scores beyond scaled q.k would be silently dropped: refuse it.
    if softcap is not None:
        raise ValueError(f"packed attention does not support attention logit soft-capping (softcap={softcap})")
    for name in ("s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            raise ValueError(f"packed attention does not support {name} (non-standard attention)")
    if attention_mask is not None:
        raise ValueError("packed attention builds its own mask; the model must not pass an attention_mask")
    if query.shape[0] != 1 or query.shape[2] != ctx.group_ids.numel():
        raise ValueError(
            f"packed attention expects one packed stream of {ctx.group_ids.numel()} tokens, "
            f"got query of shape {tuple(query.shape)}"
        )
    ctx.calls += 1
    window = ctx.effective_window(sliding_window)

    if ctx.backend == "sdpa":
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
        outs = [
            F.scaled_dot_product_attention(
                query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                attn_mask=mask, dropout_p=dropout, scale=scaling,
            )
            for start, end, mask in ctx.group_masks(window)
        ]
        return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None

    if ctx.backend == "flex":
        if dropout > 0:
            raise ValueError("backend='flex' does not support attention dropout; set the config's attention_dropout to 0")
        if query.device.type == "cpu":
            if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
                raise ValueError("backend='flex' has no backward on the CPU; use backend='sdpa' for CPU training")
            from torch.nn.attention.flex_attention import flex_attention as flex  # eager: CPU checks only
        else:
            flex = _compiled_flex("flex_attention")
        out = flex(query, key, value, block_mask=ctx.block_mask(window), scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    # flash_varlen
    from flash_attn import flash_attn_varlen_func

    cu, max_len = ctx.cu_seqlens()
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [L, H, D]
    out = flash_attn_varlen_func(
        q, k, v, cu, cu, max_len, max_len, dropout_p=dropout, softmax_scale=scaling, causal=True,
        window_size=(window - 1, window - 1) if window is not None else (-1, -1),
    )
    return out[None], None


AttentionInterface.register(ATTENTION_NAME, packed_attention_forward)


def pad_stream(batch: PackedBatch, length: int) -> tuple[torch.Tensor, ...]:
    """`(input_ids, position_ids, group_ids, segment_ids)` of `batch` padded to `length` tokens.

    The padding is one extra group of token 0 at position 0, a causal "prefix" of its own: no real
    token sees it and it sees no real token, so real outputs (and gradients) are unchanged, and
    every padding query has a key (no all-masked row). Nothing reads its outputs.
    """
    pad = length - batch.num_tokens
    if pad < 0:
        raise ValueError(f"length={length} is shorter than the batch ({batch.num_tokens} tokens)")
    streams = (batch.input_ids, batch.position_ids, batch.group_ids, batch.segment_ids)
    if pad == 0:
        return streams
    fill = (0, 0, int(batch.group_ids[-1]) + 1, 0)
    return tuple(torch.cat([t, t.new_full((pad,), value)]) for t, value in zip(streams, fill))


def padded_length(num_tokens: int, multiple: int | None) -> int:
    """`num_tokens` rounded up to a multiple of `multiple` (None or 1: unchanged)."""
    if multiple is None or multiple <= 1:
        return num_tokens
    return -(-num_tokens // multiple) * multiple


_STACK_ATTR = "_mrt_packed_attention_saved"


def _enter_packed(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    if kwargs.get(CONTEXT_KWARG) is not None:
        getattr(module, _STACK_ATTR).append(module.config._attn_implementation)
        module.config._attn_implementation = ATTENTION_NAME


def _leave_packed(module: torch.nn.Module, args: tuple, kwargs: dict, output) -> None:
    saved = getattr(module, _STACK_ATTR)
    if kwargs.get(CONTEXT_KWARG) is not None and saved:
        module.config._attn_implementation = saved.pop()


def route_packed_attention(model: torch.nn.Module) -> None:
    """Make every call that carries a `PackedAttentionContext` kwarg use packed attention (idempotent).

    Hooks the modules that read `config._attn_implementation`: the switch happens on entry to each
    such call and is undone on its exit (exceptions included), so a layer recomputed by gradient
    checkpointing during backward attends exactly as in the forward. Calls without the kwarg
    (plain inference, generation) are untouched.
    """
    for module in model.modules():
        if hasattr(module, _STACK_ATTR) or not hasattr(getattr(module, "config", None), "_attn_implementation"):
            continue
        object.__setattr__(module, _STACK_ATTR, [])
        module.register_forward_pre_hook(_enter_packed, with_kwargs=True)
        module.register_forward_hook(_leave_packed, with_kwargs=True, always_call=True)


@contextlib.contextmanager
def packed_attention(model: torch.nn.Module) -> Iterator[None]:
    """Route the model's attention through `packed_attention_forward` for the duration of the block.

    For calling the model directly with a `PackedAttentionContext` kwarg. `packed_hidden` does not
    need it (see `route_packed_attention`), and a recomputation by gradient checkpointing after
    the block has exited would not see it.
    """
    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")}
    saved = {key: cfg._attn_implementation for key, cfg in configs.items()}
    try:
        for cfg in configs.values():
            cfg._attn_implementation = ATTENTION_NAME
        yield
    finally:
        for key, cfg in configs.items():
            cfg._attn_implementation = saved[key]
