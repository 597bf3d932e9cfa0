"""A per-row KV cache that the embedded engine can copy, truncate and reshape between forwards.

Layout: every layer keeps keys/values as [rows, kv_heads, capacity, head_dim] buffers; the
first `length` columns are in use. A row's tokens sit in column order but not necessarily
contiguously: rows are left-padded and a block of new tokens is itself left-padded, so a row
may have gaps. `valid` [rows, length] marks the columns that hold a real token, and becomes the
2-D attention mask; `next_pos` [rows] is the position id of each row's next token. Attention
only sees keys through the mask, and RoPE was applied before caching, so a cached key can be
moved to any column without changing what it means.

Appending writes into the buffer in place (no per-step concatenation as in transformers'
DynamicCache); the buffer doubles when full.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class BufferedLayer(DynamicLayer):
    """A full-attention cache layer over a preallocated buffer."""

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None, length: int = 0,
                 capacity_hint: int = 0):
        super().__init__()
        self._capacity_hint = capacity_hint
        self._length = length
        self._kbuf, self._vbuf = keys, values
        if keys is not None:
            self.is_initialized = True
            self.device = keys.device
            self._expose()

    def _expose(self) -> None:
        self.keys = self._kbuf[:, :, : self._length]
        self.values = self._vbuf[:, :, : self._length]

    def _reserve(self, template: torch.Tensor, needed: int) -> None:
        capacity = 0 if self._kbuf is None else self._kbuf.shape[2]
        if needed <= capacity:
            return
        rows, heads, _, dim = template.shape
        new_cap = max(needed, 2 * capacity, self._capacity_hint)
        kbuf = template.new_empty(rows, heads, new_cap, dim)
        vbuf = template.new_empty(rows, heads, new_cap, self._vbuf.shape[-1] if self._vbuf is not None else dim)
        if self._length:
            kbuf[:, :, : self._length] = self._kbuf[:, :, : self._length]
            vbuf[:, :, : self._length] = self._vbuf[:, :, : self._length]
        self._kbuf, self._vbuf = kbuf, vbuf

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self._kbuf is None:
            self.is_initialized = True
            self.device = key_states.device
            rows, heads, _, _ = key_states.shape
            cap = max(self._capacity_hint, key_states.shape[2])
            self._kbuf = key_states.new_empty(rows, heads, cap, key_states.shape[-1])
            self._vbuf = value_states.new_empty(rows, value_states.shape[1], cap, value_states.shape[-1])
        new = key_states.shape[2]
        self._reserve(key_states, self._length + new)
        self._kbuf[:, :, self._length : self._length + new] = key_states
        self._vbuf[:, :, self._length : self._length + new] = value_states
        self._length += new
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length

    def crop(self, tokens_to_remove: int) -> None:  # transformers' convention: a negative count
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        self._length = max(0, self._length + tokens_to_remove)
        if self._kbuf is not None:
            self._expose()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._kbuf is not None:
            self._kbuf, self._vbuf = self._kbuf[indices], self._vbuf[indices]
            self._expose()

    def keep_rows_(self, keep: list[int]) -> None:
        """Keep only rows `keep` (ascending), moving them down in place: no second buffer, so
        dropping finished rows never doubles the cache's memory."""
        if self._kbuf is None:
            return
        for dst, src in enumerate(keep):
            if dst != src:  # src >= dst, so a row is read before anything overwrites it
                self._kbuf[dst] = self._kbuf[src]
                self._vbuf[dst] = self._vbuf[src]
        self._kbuf, self._vbuf = self._kbuf[: len(keep)], self._vbuf[: len(keep)]
        self._expose()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._kbuf is not None:
            self._kbuf = self._kbuf.repeat_interleave(repeats, dim=0)
            self._vbuf = self._vbuf.repeat_interleave(repeats, dim=0)
            self._expose()


class KVRows:
    """The KV cache, attention mask and next position ids of a batch of rows."""

    def __init__(self, layers: list[BufferedLayer], valid: torch.Tensor, next_pos: torch.Tensor):
        self.layers = layers
        self.valid = valid  # [rows, length] bool
        self.next_pos = next_pos  # [rows] int64
        self.cache = Cache(layers=layers)

    @classmethod
    def empty(cls, num_layers: int, rows: int, device: torch.device, capacity_hint: int = 0) -> "KVRows":
        layers = [BufferedLayer(capacity_hint=capacity_hint) for _ in range(num_layers)]
        valid = torch.zeros(rows, 0, dtype=torch.bool, device=device)
        return cls(layers, valid, torch.zeros(rows, dtype=torch.long, device=device))

    @property
    def rows(self) -> int:
        return self.valid.shape[0]

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def _tensors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.length == 0:
            return []
        return [(layer.keys, layer.values) for layer in self.layers]

    def select(self, rows: torch.Tensor, reserve: int = 0) -> "KVRows":
        """A new cache holding copies of `rows` (indices may repeat: that is how branches share a
        prefix), with room for `reserve` more columns before the buffers have to grow."""
        rows = rows.to(self.valid.device)
        if self.length == 0:
            return KVRows.empty(len(self.layers), len(rows), self.valid.device, reserve)
        layers = []
        for keys, values in self._tensors():
            kbuf = keys.new_empty(len(rows), keys.shape[1], self.length + reserve, keys.shape[3])
            vbuf = values.new_empty(len(rows), values.shape[1], self.length + reserve, values.shape[3])
            kbuf[:, :, : self.length] = keys[rows]
            vbuf[:, :, : self.length] = values[rows]
            layers.append(BufferedLayer(kbuf, vbuf, self.length, capacity_hint=self.length + reserve))
        return KVRows(layers, self.valid[rows], self.next_pos[rows])

    def keep_rows_(self, keep: list[int]) -> None:
        """Drop every row not in `keep` (ascending indices), in place."""
        if sorted(keep) != list(keep) or len(set(keep)) != len(keep):
            raise ValueError("keep must be ascending row indices without repeats")
        for layer in self.layers:
            layer.keep_rows_(keep)
        index = torch.tensor(keep, dtype=torch.long, device=self.valid.device)
        self.valid, self.next_pos = self.valid[index], self.next_pos[index]

    def truncated(self, rows: torch.Tensor, keep: torch.Tensor, reserve: int = 0) -> "KVRows":
        """A new cache whose row r holds the first `keep[r]` tokens of source row `rows[r]`.

        This is how several boundaries of one trace reuse that trace's single prefill: each
        boundary is the trace's cache cut at the boundary. Rows are left-padded to max(keep).
        """
        device = self.valid.device
        rows, keep = rows.to(device), keep.to(device)
        width = int(keep.max()) if len(keep) else 0
        out_valid = torch.arange(width, device=device)[None, :] >= (width - keep)[:, None]
        if width == 0 or self.length == 0:
            if width > 0:
                raise ValueError("cannot keep tokens of an empty cache")
            return KVRows.empty(len(self.layers), len(rows), device, reserve)
        # Source column of the m-th real token (1-based) of each source row: the first column
        # where the running count of real tokens reaches m.
        counts = self.valid[rows].long().cumsum(dim=1)  # [R', L]
        rank = torch.arange(1, width + 1, device=device)[None, :] - (width - keep)[:, None]
        rank = rank.clamp(min=1)  # padding slots copy the first real token; masked anyway
        if bool((keep > self.valid[rows].sum(dim=1)).any()):
            raise ValueError("keep exceeds the number of cached tokens of a row")
        # Rows keeping nothing (an empty prefix) find no such column: any column will do there,
        # since every slot of theirs is masked.
        cols = torch.searchsorted(counts, rank.contiguous()).clamp(max=self.length - 1)  # [R', width]
        layers = []
        for keys, values in self._tensors():
            k = keys[rows[:, None], :, cols].permute(0, 2, 1, 3)  # [R', H, width, D]
            v = values[rows[:, None], :, cols].permute(0, 2, 1, 3)
            kbuf = k.new_empty(k.shape[0], k.shape[1], width + reserve, k.shape[3])
            vbuf = v.new_empty(v.shape[0], v.shape[1], width + reserve, v.shape[3])
            kbuf[:, :, :width] = k
            vbuf[:, :, :width] = v
            layers.append(BufferedLayer(kbuf, vbuf, width, capacity_hint=width + reserve))
        return KVRows(layers, out_valid, keep.clone())
