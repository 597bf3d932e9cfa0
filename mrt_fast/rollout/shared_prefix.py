"""Shared-prefix ("cascade") decoding attention: the k branches of one context read its KV once.

During decoding every branch attends to (a) its context's cached KV, identical for the k branches
forked from that context, and (b) the tokens it generated itself. Copying (a) into every branch
row, as a plain batch needs, costs k copies of the prefix in memory and k reads of it per step.
Here (a) is stored once per context and attended with all of that context's branch queries in one
matmul; (b) is a small per-row cache. The two partial softmaxes are merged exactly through their
log-sum-exps:  out = (e^{l_a} o_a + e^{l_b} o_b) / (e^{l_a} + e^{l_b}).

The model's own attention function is swapped for `shared_prefix_attention` only inside the decode
loop (transformers' AttentionInterface), and restored afterwards.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
from transformers.cache_utils import Cache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from .kv_cache import BufferedLayer, KVRows

ATTN_NAME = "mrt_shared_prefix_decode"
_ACTIVE: contextvars.ContextVar["SharedPrefixRows | None"] = contextvars.ContextVar("mrt_shared_prefix", default=None)


class SharedPrefixRows:
    """Decode-time cache: contexts' KV once per context, plus each branch row's own tokens.

    Duck-types the parts of `KVRows` the decode loop uses (`valid`, `next_pos`, `cache`,
    `keep_rows_`): `valid` and `cache` cover only the rows' own tokens, so the masks transformers
    builds have the right length; the context part is found by `shared_prefix_attention`.
    """

    def __init__(self, contexts: KVRows, rows: torch.Tensor, reserve: int):
        device = contexts.valid.device
        self.context_keys = [layer.keys for layer in contexts.layers]  # [C, Hkv, L, D] each, shared
        self.context_values = [layer.values for layer in contexts.layers]
        self.context_valid = contexts.valid  # [C, L]
        # Additive mask over the context columns, built once for the whole decode: [C, 1, 1, L].
        self.context_bias = torch.zeros(contexts.valid.shape, device=device).masked_fill(
            ~contexts.valid, float("-inf"))[:, None, None, :]
        self.group = rows.to(device)  # context of each branch row
        self.next_pos = contexts.next_pos[self.group]
        self.valid = torch.zeros(len(rows), 0, dtype=torch.bool, device=device)
        self.layers = [BufferedLayer(capacity_hint=reserve) for _ in contexts.layers]
        self.cache = Cache(layers=self.layers)
        self._slots()

    def _slots(self) -> None:
        """Where each row's queries go in the per-context query block: (context, slot)."""
        contexts = self.context_valid.shape[0]
        counts = torch.bincount(self.group, minlength=contexts)
        first = torch.cumsum(counts, 0) - counts
        order = torch.argsort(self.group, stable=True)
        slot = torch.empty_like(self.group)
        slot[order] = torch.arange(len(self.group), device=self.group.device) - first[self.group[order]]
        self.slot = slot
        self.slots_per_context = int(counts.max()) if len(self.group) else 0

    def keep_rows_(self, keep: list[int]) -> None:
        for layer in self.layers:
            layer.keep_rows_(keep)
        index = torch.tensor(keep, dtype=torch.long, device=self.valid.device)
        self.valid, self.next_pos, self.group = self.valid[index], self.next_pos[index], self.group[index]
        self._slots()


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of one new token per row over [its context's KV (shared) ; its own KV].

    query [R, Hq, 1, D]; key/value [R, Hkv, S, D] are the rows' own tokens (all real). Returns
    ([R, 1, Hq, D], None) like transformers' attention functions.
    """
    state = _ACTIVE.get()
    if state is None or query.shape[2] != 1:
        raise RuntimeError("shared_prefix_attention runs only inside HFEngine's decode loop")
    rows, q_heads, _, dim = query.shape
    kv_heads = key.shape[1]
    rep = q_heads // kv_heads
    scale = scaling if scaling is not None else dim ** -0.5
    dtype = key.dtype
    # Products in the cache's dtype, softmax in fp32: the precision of transformers' eager attention.
    q = (query.reshape(rows, kv_heads, rep, dim) * scale).to(dtype)

    # (b) own tokens (all real): [R, Hkv, rep, D]
    own_out, own_lse = _partial_attention(q, key, value)

    # (a) shared context: gather each context's branch queries into one block [C, Hkv, slots*rep, D].
    layer = module.layer_idx
    ctx_k, ctx_v = state.context_keys[layer], state.context_values[layer]
    contexts, slots = ctx_k.shape[0], state.slots_per_context
    block = q.new_zeros(contexts, slots, kv_heads, rep, dim)
    block[state.group, state.slot] = q
    block = block.permute(0, 2, 1, 3, 4).reshape(contexts, kv_heads, slots * rep, dim)
    ctx_out, ctx_lse = _partial_attention(block, ctx_k, ctx_v, state.context_bias)
    ctx_out = ctx_out.reshape(contexts, kv_heads, slots, rep, dim).permute(0, 2, 1, 3, 4)[state.group, state.slot]
    ctx_lse = ctx_lse.reshape(contexts, kv_heads, slots, rep).permute(0, 2, 1, 3)[state.group, state.slot]

    # Merge the two partial softmaxes exactly.
    top = torch.maximum(ctx_lse, own_lse)
    w_ctx, w_own = torch.exp(ctx_lse - top), torch.exp(own_lse - top)
    out = (ctx_out * w_ctx[..., None] + own_out * w_own[..., None]) / (w_ctx + w_own)[..., None]
    return out.reshape(rows, q_heads, 1, dim).transpose(1, 2).to(query.dtype), None


def _partial_attention(q, k, v, bias=None):
    """softmax(q k^T + bias) v and its log-sum-exp, with one exp pass: ([..., D] fp32, [...] fp32)."""
    scores = (q @ k.transpose(-1, -2)).float()
    if bias is not None:
        scores += bias  # 0 for real context tokens, -inf for padding
    top = scores.amax(dim=-1, keepdim=True)
    scores.sub_(top).exp_()
    total = scores.sum(dim=-1, keepdim=True)
    out = (scores.to(v.dtype) @ v).float() / total
    return out, (top + total.log()).squeeze(-1)


AttentionInterface.register(ATTN_NAME, shared_prefix_attention)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)  # rows' own tokens: a plain mask, unused above


def supports_shared_prefix(model: torch.nn.Module) -> bool:
    """Whether switching `model.config` reaches every attention layer (modules with a
    `layer_idx`); models whose layers keep configs of their own decode the plain way."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = ATTN_NAME
    try:
        layers = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "config")]
        return bool(layers) and all(m.config._attn_implementation == ATTN_NAME for m in layers)
    finally:
        config._attn_implementation = before


@contextlib.contextmanager
def decoding_with_shared_prefix(model: torch.nn.Module, state: SharedPrefixRows):
    """Route the model's attention through `shared_prefix_attention` for `state`, then restore."""
    config = model.config
    before = config._attn_implementation
    token = _ACTIVE.set(state)
    config._attn_implementation = ATTN_NAME
    try:
        yield
    finally:
        config._attn_implementation = before
        _ACTIVE.reset(token)
