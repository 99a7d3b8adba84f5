"""Request-to-token map and the KV cache storage.

`ReqToTokenPool` maps (request slot, position) -> KV slot index; `KVPool` holds
the K and V tensors those slot indices point into. Which KV slots are free is
the allocator's business (`mem_cache/allocator.py`), not this module's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class ReqToTokenPool:
    """Rows of `req_to_token`, one per running request.

    The free rows live in a plain Python list: the pool has at most a few
    hundred rows (max running requests), so list operations are cheaper than
    tensor round trips, and the scheduler needs the row ids as ints anyway.
    """

    def __init__(self, size: int, max_context_len: int, device: str | torch.device) -> None:
        if size <= 0 or max_context_len <= 0:
            raise ValueError(f"size and max_context_len must be positive, got {size}, {max_context_len}")
        self.size: int = size
        self.max_context_len: int = max_context_len
        self.device: torch.device = torch.device(device)
        # int32 halves the footprint and is what attention kernels index with.
        self.req_to_token: Tensor = torch.zeros(
            (size, max_context_len), dtype=torch.int32, device=self.device
        )
        self.free_slots: list[int] = list(range(size))
        # Mirror of membership in free_slots so double frees are O(1) to detect.
        self._is_free: list[bool] = [True] * size

    def available_size(self) -> int:
        return len(self.free_slots)

    def alloc(self, n: int = 1) -> list[int] | None:
        if n < 0:
            raise ValueError(f"cannot allocate {n} rows")
        if n > len(self.free_slots):
            return None
        rows = self.free_slots[:n]
        del self.free_slots[:n]
        for r in rows:
            self._is_free[r] = False
        return rows

    def free(self, indices: int | Sequence[int]) -> None:
        rows = [indices] if isinstance(indices, int) else [int(i) for i in indices]
        # Validate everything before mutating so a bad call leaves the pool intact.
        seen: set[int] = set()
        for r in rows:
            if not 0 <= r < self.size:
                raise ValueError(f"req_to_token row {r} out of range [0, {self.size})")
            if self._is_free[r] or r in seen:
                raise ValueError(f"req_to_token row {r} freed twice")
            seen.add(r)
        for r in rows:
            self._is_free[r] = True
        self.free_slots.extend(rows)

    def write_slots(self, rows: list[int], prefix_lens: list[int], extend_lens: list[int], slots: Tensor) -> None:
        """Record `slots` (concatenated per request) as positions
        [prefix_len, prefix_len + extend_len) of each row, in one indexed write."""
        if all(e == 1 for e in extend_lens):  # a decode step: no per-request aranges
            row_index, columns = torch.tensor(rows, dtype=torch.int64), torch.tensor(prefix_lens, dtype=torch.int64)
        else:
            row_index = torch.repeat_interleave(torch.tensor(rows, dtype=torch.int64), torch.tensor(extend_lens))
            columns = torch.cat([torch.arange(p, p + e, dtype=torch.int64)
                                 for p, e in zip(prefix_lens, extend_lens)])
        if self.device.type == "cuda":  # from pinned memory the copies do not wait for the GPU
            row_index, columns = (x.pin_memory().to(self.device, non_blocking=True) for x in (row_index, columns))
        self.req_to_token[row_index, columns] = slots.to(self.device, torch.int32)

    def clear(self) -> None:
        self.free_slots = list(range(self.size))
        self._is_free = [True] * self.size


class KVPool:
    """Per-layer K and V buffers for multi-head (or grouped-query) attention.

    Slot indices come from `TokenToKVPoolAllocator`; slot 0 (and the rest of the
    first page) is the padding slot that padded batches point at.
    """

    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: str | torch.device,
    ) -> None:
        if min(num_slots, num_layers, num_kv_heads, head_dim) <= 0:
            raise ValueError("KVPool dimensions must be positive")
        self.num_slots: int = num_slots
        self.num_layers: int = num_layers
        self.num_kv_heads: int = num_kv_heads
        self.head_dim: int = head_dim
        self.dtype: torch.dtype = dtype
        self.device: torch.device = torch.device(device)
        shape = (num_slots, num_kv_heads, head_dim)
        # torch.empty: a large CPU pool must not be written (and so committed
        # page by page by the OS) before tokens actually land in it.
        self.k_buffers: list[Tensor] = [
            torch.empty(shape, dtype=dtype, device=self.device) for _ in range(num_layers)
        ]
        self.v_buffers: list[Tensor] = [
            torch.empty(shape, dtype=dtype, device=self.device) for _ in range(num_layers)
        ]
        # Padded attention reads slot 0 and multiplies it by a zero weight;
        # garbage there could be NaN/inf, and NaN * 0 is still NaN.
        self.zero_padding(1)

    def zero_padding(self, page_size: int) -> None:
        """Zero the reserved first page (slots [0, page_size))."""
        n = min(max(page_size, 1), self.num_slots)
        for k, v in zip(self.k_buffers, self.v_buffers):
            k[:n].zero_()
            v[:n].zero_()

    def get_kv_buffer(self, layer_id: int) -> tuple[Tensor, Tensor]:
        return self.k_buffers[layer_id], self.v_buffers[layer_id]

    def get_key_buffer(self, layer_id: int) -> Tensor:
        return self.k_buffers[layer_id]

    def get_value_buffer(self, layer_id: int) -> Tensor:
        return self.v_buffers[layer_id]

    def set_kv_buffer(self, layer_id: int, loc: Tensor, k: Tensor, v: Tensor) -> None:
        """Write k, v `[n, num_kv_heads, head_dim]` into slots `loc` of one layer."""
        k_buf, v_buf = self.k_buffers[layer_id], self.v_buffers[layer_id]
        # The model computes in its own dtype; the cache may be narrower (e.g. bf16 or fp8).
        if k.dtype != self.dtype:
            k = k.to(self.dtype)
        if v.dtype != self.dtype:
            v = v.to(self.dtype)
        # index_copy_ is a plain row scatter; `buf[loc] = x` goes through the
        # general index_put path and is ~2x slower on CPU.
        k_buf.index_copy_(0, loc, k)
        v_buf.index_copy_(0, loc, v)

    @staticmethod
    def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one token's K and V take across all layers (used to size capacity)."""
        element_size = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_kv_heads * head_dim * element_size

    def bytes_per_token(self) -> int:
        return self.kv_bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)

    def mem_bytes(self) -> int:
        return self.num_slots * self.bytes_per_token()
