"""Tests for mem_cache.memory_pool and mem_cache.allocator."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from mem_cache.allocator import TokenToKVPoolAllocator
from mem_cache.memory_pool import KVPool, ReqToTokenPool

PAGE_SIZES = [1, 4, 16]


def assert_paged(slots: list[int], page_size: int, start_pos: int = 0) -> None:
    """slot % ps == pos % ps, and one page-aligned block of positions shares one page."""
    for i, s in enumerate(slots):
        pos = start_pos + i
        assert s >= page_size, f"slot {s} is in the padding page"
        assert s % page_size == pos % page_size, (pos, s)
        if pos % page_size and i > 0:
            assert s == slots[i - 1] + 1, (pos, s, slots[i - 1])


def snapshot(a: TokenToKVPoolAllocator) -> tuple[int, list[int], list[bool]]:
    return a.available_size(), a.free_pages_list().tolist(), a.page_is_free.tolist()


# ---- TokenToKVPoolAllocator: deterministic ------------------------------------


@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_sizes_and_capacity_accounting(ps: int) -> None:
    a = TokenToKVPoolAllocator(10 * ps + ps - 1, page_size=ps)  # remainder is dropped
    assert a.num_pages == 10 and a.size == 10 * ps and a.num_slots == 11 * ps
    assert a.available_size() == a.size
    chunks = [a.alloc(2 * ps) for _ in range(5)]
    assert all(c is not None for c in chunks)
    assert a.available_size() == 0
    a.free_group_begin()
    for c in chunks[::2]:
        a.free(c)
    a.free_group_end()
    for c in chunks[1::2]:
        a.free(c)
    assert a.available_size() == a.size
    assert sorted(a.free_pages_list().tolist()) == list(range(1, 11))


@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_alloc_free_round_trip_and_page_zero_reserved(ps: int) -> None:
    a = TokenToKVPoolAllocator(8 * ps, page_size=ps)
    slots = a.alloc(8 * ps)
    assert slots is not None and slots.dtype == torch.int64
    assert sorted(slots.tolist()) == list(range(ps, 9 * ps))  # everything but page 0
    assert a.alloc(ps) is None
    a.free(slots)
    again = a.alloc(8 * ps)
    assert again is not None and sorted(again.tolist()) == sorted(slots.tolist())
    a.clear()
    assert a.available_size() == a.size


@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_short_alloc_returns_none_and_changes_nothing(ps: int) -> None:
    a = TokenToKVPoolAllocator(4 * ps, page_size=ps)
    held = a.alloc(3 * ps)
    assert held is not None
    before = snapshot(a)
    assert a.alloc(2 * ps) is None
    # Two requests that each fit, but not together: all or nothing.
    assert a.alloc_extend([0, 0], [ps, ps], [-1, -1]) is None
    assert a.alloc_decode([1, 1 + ps], [-1, -1]) is None
    assert snapshot(a) == before
    assert a.alloc(ps) is not None and a.alloc_decode([1], [-1]) is None


def test_alloc_rejects_partial_pages_and_negative() -> None:
    a = TokenToKVPoolAllocator(64, page_size=4)
    with pytest.raises(ValueError):
        a.alloc(3)
    with pytest.raises(ValueError):
        a.alloc(-1)
    assert a.alloc(0) is not None and a.available_size() == 64
    assert TokenToKVPoolAllocator(8, page_size=1).alloc(3) is not None


@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_double_free_and_bad_free_raise(ps: int) -> None:
    a = TokenToKVPoolAllocator(4 * ps, page_size=ps)
    s = a.alloc(2 * ps)
    assert s is not None
    a.free(s[:ps])
    before = snapshot(a)
    with pytest.raises(ValueError):
        a.free(s[:ps])
    with pytest.raises(ValueError):
        a.free(s)  # half of it is still valid: nothing may be freed
    with pytest.raises(ValueError):
        a.free(torch.tensor([0]))
    with pytest.raises(ValueError):
        a.free(torch.tensor([a.num_slots]))
    assert snapshot(a) == before
    a.free_group_begin()
    a.free(s[ps:])
    a.free(s[ps:])
    with pytest.raises(ValueError):
        a.free_group_end()
    assert snapshot(a) == before


def test_alloc_extend_continues_mid_page() -> None:
    ps = 4
    a = TokenToKVPoolAllocator(16 * ps, page_size=ps)
    first = a.alloc_extend([0, 0], [6, 3], [-1, -1])
    assert first is not None and first.numel() == 9
    r0, r1 = first[:6].tolist(), first[6:].tolist()
    assert_paged(r0, ps)
    assert_paged(r1, ps)
    assert {s // ps for s in r0}.isdisjoint({s // ps for s in r1})
    # Chunked continuation: r0 resumes at position 6 (mid page), r1 at 3.
    more = a.alloc_extend([6, 3], [11, 4], [r0[-1], r1[-1]])
    assert more is not None and more.numel() == 6
    m0, m1 = more[:5].tolist(), more[5:].tolist()
    assert m0[:2] == [r0[-1] + 1, r0[-1] + 2] and m1 == [r1[-1] + 1]
    assert_paged(r0 + m0, ps)
    assert_paged(r1 + m1, ps)
    assert a.available_size() == a.size - ps * (3 + 1)
    # Extending by nothing allocates nothing.
    empty = a.alloc_extend([11], [11], [m0[-1]])
    assert empty is not None and empty.numel() == 0


def test_alloc_extend_rejects_bad_last_loc() -> None:
    ps = 4
    a = TokenToKVPoolAllocator(8 * ps, page_size=ps)
    s = a.alloc_extend([0], [5], [-1])
    assert s is not None
    before = snapshot(a)
    with pytest.raises(ValueError):
        a.alloc_extend([5], [7], [int(s[3])])  # wrong offset in page
    with pytest.raises(ValueError):
        a.alloc_extend([5], [7], [-1])
    with pytest.raises(ValueError):
        a.alloc_extend([3], [2], [int(s[2])])  # seq_len < prefix_len
    assert snapshot(a) == before


@pytest.mark.parametrize("entry", ["alloc_decode", "alloc_extend"])
@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_alloc_decode_crosses_pages(ps: int, entry: str) -> None:
    """One token per request per step, by alloc_decode or by alloc_extend
    (which hands such a step to alloc_decode): pages continue, then turn."""
    a = TokenToKVPoolAllocator(32 * ps, page_size=ps)
    lens = [1, ps - 1 if ps > 1 else 1, ps + 1]
    pre = a.alloc_extend([0] * 3, lens, [-1] * 3)
    assert pre is not None
    seqs, off = [], 0
    for n in lens:
        seqs.append(pre[off : off + n].tolist())
        off += n
    for _ in range(2 * ps + 1):
        lens_now, last = [len(s) for s in seqs], [s[-1] for s in seqs]
        if entry == "alloc_decode":
            out = a.alloc_decode([n + 1 for n in lens_now], last)
        else:
            out = a.alloc_extend(lens_now, [n + 1 for n in lens_now], last)
        assert out is not None and out.numel() == 3
        for s, new in zip(seqs, out.tolist()):
            s.append(new)
    for s in seqs:
        assert_paged(s, ps)
    owned = [s for seq in seqs for s in seq]
    assert len(set(owned)) == len(owned)
    pages = {s // ps for s in owned}
    assert a.available_size() == a.size - ps * len(pages)
    a.free(torch.tensor(owned))
    assert a.available_size() == a.size


@pytest.mark.parametrize("entry", ["alloc_decode", "alloc_extend"])
def test_one_slot_decode_wraps_the_free_ring(entry: str) -> None:
    """Page size 1 decodes take a slice of the free ring (no tensor index):
    across the ring's end they still hand out free, distinct slots, mark
    them used, refuse bad lengths, and leave nothing behind when short."""
    a = TokenToKVPoolAllocator(5, page_size=1)
    held: list[int] = []
    for step in range(12):  # frees and re-allocates, so the ring head wraps several times
        lens = [3 + step, 7 + step]
        out = (a.alloc_decode(lens, [-1, -1]) if entry == "alloc_decode"
               else a.alloc_extend([n - 1 for n in lens], lens, [-1, -1]))
        assert out is not None
        new = out.tolist()
        assert len(set(new)) == 2 and not set(new) & set(held)
        assert not a.page_is_free[out].any()
        held += new
        if len(held) > 2:  # keep the last step's two, free the older ones
            a.free(torch.tensor(held[:-2]))
            held = held[-2:]
    before = snapshot(a)
    with pytest.raises(ValueError):
        a.alloc_decode([0], [-1])
    too_many = [1] * (a.available_size() + 1)
    assert a.alloc_decode(too_many, [-1] * len(too_many)) is None
    assert snapshot(a) == before


# ---- TokenToKVPoolAllocator: randomized against a model ---------------------


@dataclass
class ReqModel:
    slots: list[int]  # position -> slot, for the whole sequence
    shared_len: int  # positions [0, shared_len) are borrowed from the cache node
    node: int | None  # cache entry it holds a lock on


@dataclass
class CacheEntry:
    slots: list[int]  # the full path from the root, page aligned
    own_start: int  # positions [own_start, len(slots)) are owned by this entry
    parent: int | None
    lock: int = 0
    children: int = 0


@dataclass
class Owners:
    reqs: dict[int, ReqModel] = field(default_factory=dict)
    cache: dict[int, CacheEntry] = field(default_factory=dict)
    scratch: dict[int, list[int]] = field(default_factory=dict)


MAX_LEN = 48


class AllocatorMachine(RuleBasedStateMachine):
    """Requests borrow page-aligned prefixes from a radix-like cache, extend in
    chunks, decode, and finish into the cache or free; the cache evicts leaves."""

    def __init__(self) -> None:
        super().__init__()
        self.ps = 1
        self.a = TokenToKVPoolAllocator(1)
        self.o = Owners()
        self.next_id = 0

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    @initialize(ps=st.sampled_from(PAGE_SIZES), num_pages=st.integers(2, 24))
    def setup(self, ps: int, num_pages: int) -> None:
        self.ps = ps
        self.a = TokenToKVPoolAllocator(num_pages * ps, page_size=ps)

    @rule(data=st.data(), reuse=st.booleans(), extend=st.integers(0, MAX_LEN))
    def add_request(self, data: st.DataObject, reuse: bool, extend: int) -> None:
        node, prefix = None, []
        if reuse and self.o.cache:
            node = data.draw(st.sampled_from(sorted(self.o.cache)))
            full = self.o.cache[node].slots
            k = data.draw(st.integers(0, len(full) // self.ps))
            prefix = full[: k * self.ps]
        before = snapshot(self.a)
        n = len(prefix)
        out = self.a.alloc_extend([n], [n + extend], [prefix[-1] if prefix else -1])
        if out is None:
            assert snapshot(self.a) == before
            return
        if node is not None:
            self.o.cache[node].lock += 1
        self.o.reqs[self._new_id()] = ReqModel(prefix + out.tolist(), n, node)

    @precondition(lambda self: bool(self.o.reqs))
    @rule(data=st.data())
    def extend_batch(self, data: st.DataObject) -> None:
        rids = data.draw(st.lists(st.sampled_from(sorted(self.o.reqs)), min_size=1, unique=True))
        adds = [data.draw(st.integers(0, 2 * self.ps + 1)) for _ in rids]
        reqs = [self.o.reqs[r] for r in rids]
        prefix = [len(r.slots) for r in reqs]
        before = snapshot(self.a)
        out = self.a.alloc_extend(
            prefix, [p + d for p, d in zip(prefix, adds)], [r.slots[-1] if r.slots else -1 for r in reqs]
        )
        if out is None:
            assert snapshot(self.a) == before
            return
        assert out.numel() == sum(adds)
        flat, off = out.tolist(), 0
        for r, d in zip(reqs, adds):
            r.slots.extend(flat[off : off + d])
            off += d

    @precondition(lambda self: bool(self.o.reqs))
    @rule(data=st.data())
    def decode(self, data: st.DataObject) -> None:
        rids = data.draw(st.lists(st.sampled_from(sorted(self.o.reqs)), min_size=1, unique=True))
        reqs = [self.o.reqs[r] for r in rids]
        before = snapshot(self.a)
        out = self.a.alloc_decode([len(r.slots) + 1 for r in reqs], [r.slots[-1] if r.slots else -1 for r in reqs])
        if out is None:
            assert snapshot(self.a) == before
            return
        for r, s in zip(reqs, out.tolist()):
            r.slots.append(s)

    @precondition(lambda self: bool(self.o.reqs))
    @rule(data=st.data(), to_cache=st.booleans())
    def finish(self, data: st.DataObject, to_cache: bool) -> None:
        rid = data.draw(st.sampled_from(sorted(self.o.reqs)))
        r = self.o.reqs.pop(rid)
        full_len = len(r.slots) // self.ps * self.ps
        keep = full_len if to_cache and full_len > r.shared_len else r.shared_len
        if keep > r.shared_len:
            self.o.cache[self._new_id()] = CacheEntry(r.slots[:keep], r.shared_len, r.node)
            if r.node is not None:
                self.o.cache[r.node].children += 1
        self.a.free(torch.tensor(r.slots[keep:], dtype=torch.int64))
        if r.node is not None:
            self.o.cache[r.node].lock -= 1

    @precondition(lambda self: bool(self.o.cache))
    @rule(data=st.data())
    def evict_leaf(self, data: st.DataObject) -> None:
        leaves = sorted(k for k, e in self.o.cache.items() if e.lock == 0 and e.children == 0)
        if leaves:
            self._evict(data.draw(st.sampled_from(leaves)))

    def _evict(self, key: int) -> None:
        e = self.o.cache.pop(key)
        self.a.free(torch.tensor(e.slots[e.own_start :], dtype=torch.int64))
        if e.parent is not None:
            self.o.cache[e.parent].children -= 1

    @rule(pages=st.integers(0, 4))
    def scratch_alloc(self, pages: int) -> None:
        out = self.a.alloc(pages * self.ps)
        if out is not None:
            self.o.scratch[self._new_id()] = out.tolist()

    @precondition(lambda self: bool(self.o.scratch))
    @rule(data=st.data())
    def scratch_free(self, data: st.DataObject) -> None:
        self.a.free(torch.tensor(self.o.scratch.pop(data.draw(st.sampled_from(sorted(self.o.scratch))))))

    @rule(data=st.data())
    def double_free_is_rejected(self, data: st.DataObject) -> None:
        free = self.a.free_pages_list().tolist()
        page = data.draw(st.sampled_from(free)) if free else 0
        before = snapshot(self.a)
        with pytest.raises(ValueError):
            self.a.free(torch.tensor([page * self.ps]))
        assert snapshot(self.a) == before

    def owned_slot_lists(self) -> list[list[int]]:
        lists = [r.slots[r.shared_len :] for r in self.o.reqs.values()]
        lists += [e.slots[e.own_start :] for e in self.o.cache.values()]
        lists += list(self.o.scratch.values())
        return lists

    @invariant()
    def no_leak_no_sharing_paged(self) -> None:
        seen_pages: set[int] = set()
        for slots in self.owned_slot_lists():
            pages = {s // self.ps for s in slots}
            assert seen_pages.isdisjoint(pages), "a page has two owners"
            seen_pages |= pages
        assert 0 not in seen_pages
        is_free = self.a.page_is_free
        assert not any(bool(is_free[p]) for p in seen_pages)
        assert self.a.available_size() + self.ps * len(seen_pages) == self.a.size
        for r in self.o.reqs.values():
            assert_paged(r.slots, self.ps)
        for e in self.o.cache.values():
            assert_paged(e.slots, self.ps)

    def teardown(self) -> None:
        for r in list(self.o.reqs.values()):
            self.a.free(torch.tensor(r.slots[r.shared_len :], dtype=torch.int64))
        self.o.reqs.clear()
        for e in self.o.cache.values():
            e.lock = 0
        while self.o.cache:
            leaf = next(k for k, e in self.o.cache.items() if e.children == 0)
            self._evict(leaf)
        for s in self.o.scratch.values():
            self.a.free(torch.tensor(s, dtype=torch.int64))
        assert self.a.available_size() == self.a.size
        assert sorted(self.a.free_pages_list().tolist()) == list(range(1, self.a.num_pages + 1))


AllocatorMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestAllocatorMachine = AllocatorMachine.TestCase


# ---- ReqToTokenPool ----------------------------------------------------------


def test_req_to_token_pool() -> None:
    pool = ReqToTokenPool(4, 16, "cpu")
    assert pool.req_to_token.shape == (4, 16) and pool.req_to_token.dtype == torch.int32
    assert int(pool.req_to_token.abs().sum()) == 0
    rows = pool.alloc(3)
    assert rows is not None and len(set(rows)) == 3 and pool.available_size() == 1
    assert pool.alloc(2) is None and pool.available_size() == 1
    last = pool.alloc()
    assert last is not None and pool.alloc() is None
    pool.free(rows[0])
    with pytest.raises(ValueError):
        pool.free(rows[0])
    with pytest.raises(ValueError):
        pool.free([rows[1], rows[1]])
    with pytest.raises(ValueError):
        pool.free(4)
    assert pool.available_size() == 1
    pool.free(rows[1:] + last)
    assert pool.available_size() == 4
    pool.alloc(2)
    pool.clear()
    assert pool.available_size() == 4 and sorted(pool.alloc(4) or []) == [0, 1, 2, 3]


# ---- KVPool --------------------------------------------------------------------


def test_kv_pool_round_trip_and_cast() -> None:
    pool = KVPool(num_slots=20, num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16, device="cpu")
    assert len(pool.k_buffers) == len(pool.v_buffers) == 3
    assert pool.k_buffers[0].shape == (20, 2, 8) and pool.k_buffers[0].dtype == torch.bfloat16
    for layer in range(3):
        k, v = pool.get_kv_buffer(layer)
        assert torch.all(k[0] == 0) and torch.all(v[0] == 0)
    loc = torch.tensor([3, 7, 11])
    k = torch.randn(3, 2, 8)
    v = torch.randn(3, 2, 8)
    pool.set_kv_buffer(1, loc, k, v)
    k_buf, v_buf = pool.get_kv_buffer(1)
    assert torch.equal(k_buf[loc], k.to(torch.bfloat16)) and torch.equal(v_buf[loc], v.to(torch.bfloat16))
    assert pool.get_key_buffer(1) is k_buf and pool.get_value_buffer(1) is v_buf
    pool.k_buffers[2].fill_(float("nan"))
    pool.zero_padding(4)
    assert torch.all(pool.k_buffers[2][:4] == 0) and torch.isnan(pool.k_buffers[2][4:]).all()


def test_kv_pool_sizes() -> None:
    per_token = KVPool.kv_bytes_per_token(num_layers=4, num_kv_heads=2, head_dim=64, dtype=torch.float16)
    assert per_token == 2 * 4 * 2 * 64 * 2
    pool = KVPool(10, 4, 2, 64, torch.float16, "cpu")
    assert pool.bytes_per_token() == per_token and pool.mem_bytes() == 10 * per_token
    assert pool.mem_bytes() == sum(b.numel() * b.element_size() for b in pool.k_buffers + pool.v_buffers)
    assert KVPool.kv_bytes_per_token(1, 1, 8, torch.float32) == 64
