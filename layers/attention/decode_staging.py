"""Contiguous copies of a running decode batch's KV, for the torch-native backend.

SDPA wants each sequence's keys contiguous, but the pool is paged, so every
layer of every step would gather the whole KV of the batch ([B, len, H, D],
twice) just to read it once: on CPU that gather was ~5% of a decode step of
the 125M demo model. While the same sequences keep decoding (same request
rows, in the same order, each one token longer than last step) their staged
copies stay valid, and a step only appends the one new token per sequence.
Any other step (a different batch, an extend) starts over from the pool.

The pool stays the source of truth: tokens are always written there first.
Staging is bounded by `max_bytes`; layers beyond it gather as before.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Room for this many more decode steps before a re-stage.
_GROWTH = 128


class DecodeKVStaging:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.rows: list[int] | None = None
        self.seq_lens: list[int] = []
        self.capacity = 0
        self.fresh = True
        self.write_index: torch.Tensor | None = None  # flat [B] position of the new token
        self.keys: dict[int, torch.Tensor] = {}  # layer id -> [B, capacity, H_kv, D]
        self.values: dict[int, torch.Tensor] = {}

    def reset(self) -> None:
        self.rows = None
        self.keys.clear()
        self.values.clear()

    def begin_decode_step(
        self, rows: list[int], seq_lens: list[int], seq_lens_dev: torch.Tensor
    ) -> None:
        continuing = (
            self.rows == rows
            and max(seq_lens) <= self.capacity
            and all(new == old + 1 for new, old in zip(seq_lens, self.seq_lens))
        )
        self.fresh = not continuing
        if self.fresh:
            self.keys.clear()
            self.values.clear()
            self.capacity = -(-(max(seq_lens) + _GROWTH) // _GROWTH) * _GROWTH
        self.rows, self.seq_lens = list(rows), list(seq_lens)
        batch_offsets = torch.arange(len(rows), device=seq_lens_dev.device) * self.capacity
        self.write_index = batch_offsets + seq_lens_dev - 1

    def layer_kv(
        self,
        layer_id: int,
        gather: Callable[[], tuple[torch.Tensor, torch.Tensor]],
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        max_len: int,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys and values [B, H_kv, max_len, D] for this layer, or None if
        the layer is not staged (over budget): the caller gathers then.

        `gather()` returns the pool's [B, H_kv, max_len, D] keys and values;
        it is called only when this layer (re)starts staging.
        """
        if self.fresh or layer_id not in self.keys:
            staged = self._allocate(layer_id, k_new)
            if staged is None:
                return None
            keys, values = gather()
            staged[0][:, :max_len].copy_(keys.transpose(1, 2))
            staged[1][:, :max_len].copy_(values.transpose(1, 2))
        else:
            staged = (self.keys[layer_id], self.values[layer_id])
            batch, capacity, heads, dim = staged[0].shape
            staged[0].view(batch * capacity, heads, dim).index_copy_(0, self.write_index, k_new)
            staged[1].view(batch * capacity, heads, dim).index_copy_(0, self.write_index, v_new)
        return staged[0][:, :max_len].transpose(1, 2), staged[1][:, :max_len].transpose(1, 2)

    def _allocate(self, layer_id: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        _, heads, dim = like.shape
        shape = (len(self.seq_lens), self.capacity, heads, dim)
        layer_bytes = 2 * like.element_size() * heads * dim * shape[0] * shape[1]
        in_use = sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))
        if in_use - self._bytes_of(layer_id) + layer_bytes > self.max_bytes:
            return None
        # Zeros, not empty: masked positions must hold finite values (NaN * 0 = NaN).
        staged = (
            torch.zeros(shape, dtype=like.dtype, device=like.device),
            torch.zeros(shape, dtype=like.dtype, device=like.device),
        )
        self.keys[layer_id], self.values[layer_id] = staged
        return staged

    def _bytes_of(self, layer_id: int) -> int:
        if layer_id not in self.keys:
            return 0
        return 2 * self.keys[layer_id].numel() * self.keys[layer_id].element_size()
