"""ScheduleBatch's read of the slots a mid-page prefix continues from."""

from __future__ import annotations

import torch

from mem_cache.allocator import last_slots_mid_page
from mem_cache.allocator import TokenToKVPoolAllocator


def test_last_slots_are_read_only_where_a_prefix_ends_mid_page():
    table = torch.arange(100, dtype=torch.int32).view(5, 20) + 1000
    rows, prefix_lens = [3, 0, 4, 1, 2], [0, 8, 6, 9, 1]
    got = last_slots_mid_page(table, rows, prefix_lens, page_size=4)
    # The per-request read this replaces, kept where the allocator uses it.
    old = [int(table[r, p - 1]) if p else -1 for r, p in zip(rows, prefix_lens)]
    mid = [p % 4 != 0 for p in prefix_lens]
    assert got == [o if m else -1 for o, m in zip(old, mid)] == [-1, -1, 1085, 1028, 1040]


def test_page_size_one_never_reads_the_table():
    empty = torch.empty(0, 0, dtype=torch.int32)  # any read would raise IndexError
    assert last_slots_mid_page(empty, [7, 2], [5, 0], page_size=1) == [-1, -1]


def test_allocator_continues_the_page_from_the_slots_read():
    # An aligned prefix's -1 is never looked at; a mid-page one continues
    # its page right after the slot read.
    alloc = TokenToKVPoolAllocator(64, page_size=4)
    table = torch.zeros(2, 16, dtype=torch.int32)
    first = alloc.alloc_extend([0, 0], [6, 8], [-1, -1])
    table[0, :6], table[1, :8] = first[:6].int(), first[6:].int()
    prefix_lens = [6, 8]
    last = last_slots_mid_page(table, [0, 1], prefix_lens, page_size=4)
    assert last == [int(first[5]), -1]
    more = alloc.alloc_extend(prefix_lens, [9, 9], last).tolist()
    # Positions 6, 7 of request 0 fill its page; position 8 of each starts a fresh one.
    assert more[:2] == [int(first[5]) + 1, int(first[5]) + 2]
    assert more[2] % 4 == 0 and more[3] % 4 == 0


def test_tokens_between_reads_across_prompt_and_output():
    from managers.sampling_params import SamplingParams
    from managers.schedule_batch import Req

    req = Req("x", [1, 2, 3, 4], SamplingParams())
    req.output_ids = [5, 6, 7]
    full = [1, 2, 3, 4, 5, 6, 7]
    assert all(req.tokens_between(a, b) == full[a:b] for a in range(8) for b in range(a, 9))
