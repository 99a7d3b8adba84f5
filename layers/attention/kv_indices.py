"""Each sequence's KV pool slots, flattened: the page table the GPU
backends hand to their kernels.

With one slot per "page" (page size 1 as the kernels see it) any allocator
page size works: a real page is a run of consecutive slots.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch


def build_kv_indices(
    req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, total_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_indptr [B + 1] int32, kv_indices [total_tokens] int64): sequence
    b's slots are req_to_token[req_pool_indices[b], :seq_lens[b]], laid end
    to end. `total_tokens` = sum(seq_lens), passed in to avoid a device sync."""
    kv_indptr = torch.zeros(seq_lens.shape[0] + 1, dtype=torch.int32, device=seq_lens.device)
    torch.cumsum(seq_lens, 0, out=kv_indptr[1:])
    seq_of_token = torch.repeat_interleave(
        torch.arange(seq_lens.shape[0], device=seq_lens.device), seq_lens, output_size=total_tokens
    )
    position = torch.arange(total_tokens, device=seq_lens.device) - kv_indptr[seq_of_token].long()
    kv_indices = req_to_token[req_pool_indices[seq_of_token], position].long()
    return kv_indptr, kv_indices


def host_indptr(lengths: Sequence[int], pin_memory: bool = False) -> torch.Tensor:
    """[0, l0, l0 + l1, ...] as an int32 CPU tensor, from host-side lengths:
    for kernels that schedule on the host (flashinfer's plan), which would
    otherwise copy a device indptr back and wait for the GPU to get it."""
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, pin_memory=pin_memory)
