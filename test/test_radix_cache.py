"""Tests for mem_cache.radix_cache, against the real ReqToTokenPool and allocator."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mem_cache.allocator import TokenToKVPoolAllocator
from mem_cache.memory_pool import ReqToTokenPool
from mem_cache.radix_cache import MatchResult, NoSharingCache, RadixCache, TreeNode


@dataclass
class FakeReq:
    """Plain holder of the CacheableReq fields (what managers.Req carries)."""

    req_pool_idx: int | None
    origin_input_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    fill_ids: list[int] = field(default_factory=list)
    prefix_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    last_node: TreeNode | None = None


def make(page_size: int = 1, capacity: int = 64, rows: int = 8, ctx: int = 64):
    pool = ReqToTokenPool(rows, ctx, "cpu")
    alloc = TokenToKVPoolAllocator(capacity, page_size=page_size)
    return pool, alloc, RadixCache(pool, alloc, page_size)


def alloc_slots(alloc: TokenToKVPoolAllocator, n: int) -> torch.Tensor:
    out = alloc.alloc_extend([0], [n], [0])
    assert out is not None
    return out


def row_of(pool: ReqToTokenPool, req: FakeReq, n: int) -> torch.Tensor:
    assert req.req_pool_idx is not None
    return pool.req_to_token[req.req_pool_idx, :n].long()


def admit(cache: RadixCache | NoSharingCache, toks: list[int]) -> FakeReq | None:
    """What the scheduler does for a new request: match, lock, allocate the rest."""
    pool, alloc = cache.req_to_token_pool, cache.allocator
    rows = pool.alloc(1)
    if rows is None:
        return None
    m = cache.match_prefix(toks)
    cache.inc_lock_ref(m.last_node)
    plen = len(m.indices)
    last = [int(m.indices[-1])] if plen else [0]
    slots = alloc.alloc_extend([plen], [len(toks)], last)
    if slots is None:
        cache.evict(len(toks))
        slots = alloc.alloc_extend([plen], [len(toks)], last)
    if slots is None:
        cache.dec_lock_ref(m.last_node)
        pool.free(rows[0])
        return None
    pool.req_to_token[rows[0], :plen] = m.indices.to(torch.int32)
    pool.req_to_token[rows[0], plen : len(toks)] = slots.to(torch.int32)
    return FakeReq(rows[0], list(toks), [], list(toks), m.indices, m.last_node)


def extend(cache: RadixCache | NoSharingCache, req: FakeReq, more: list[int]) -> bool:
    """Compute `more` tokens for a live request (next prefill chunk or decode steps)."""
    n = len(req.fill_ids)
    last = int(row_of(cache.req_to_token_pool, req, n)[-1])
    slots = cache.allocator.alloc_extend([n], [n + len(more)], [last])
    if slots is None:
        return False
    cache.req_to_token_pool.req_to_token[req.req_pool_idx, n : n + len(more)] = slots.to(torch.int32)
    req.fill_ids = req.fill_ids + list(more)
    return True


def finish(cache: RadixCache | NoSharingCache, req: FakeReq, split: int | None = None, last: int = 99) -> None:
    """fill_ids = prompt + all outputs but the last sampled one (it has no KV)."""
    p = len(req.fill_ids) if split is None else split
    req.origin_input_ids, req.output_ids = req.fill_ids[:p], req.fill_ids[p:] + [last]
    cache.cache_finished_req(req)


def tree_nodes(cache: RadixCache) -> list[TreeNode]:
    out, stack = [], list(cache.root_node.children.values())
    while stack:
        n = stack.pop()
        out.append(n)
        stack.extend(n.children.values())
    return out


def path(node: TreeNode) -> tuple[list[int], torch.Tensor]:
    keys, vals = [], []
    while node.parent is not None:
        keys, vals = node.key + keys, [node.value] + vals
        node = node.parent
    return keys, (torch.cat(vals) if vals else torch.empty(0, dtype=torch.int64))


def check_ownership(cache: RadixCache, reqs: list[FakeReq]) -> None:
    """Every page is free, the tree's, or one live request's; nothing else (no leak)."""
    ps, alloc, pool = cache.page_size, cache.allocator, cache.req_to_token_pool
    nodes = tree_nodes(cache)
    vals = torch.cat([n.value for n in nodes]) if nodes else torch.empty(0, dtype=torch.int64)
    tree_pages = set((vals // ps).tolist())
    assert len(tree_pages) * ps == vals.numel() == cache.total_size()
    owned: set[int] = set()
    for r in reqs:
        row = row_of(pool, r, len(r.fill_ids))
        assert torch.equal(row[: len(r.prefix_indices)], r.prefix_indices)
        shared = len(r.prefix_indices) // ps * ps
        assert set((row[:shared] // ps).tolist()) <= tree_pages, "request points at KV the tree lost"
        mine = set((row[shared:] // ps).tolist())
        assert not mine & tree_pages and not mine & owned
        owned |= mine
    free = set(torch.nonzero(alloc.page_is_free).flatten().tolist())
    assert not (tree_pages | owned) & free
    assert alloc.available_size() + (len(tree_pages) + len(owned)) * ps == alloc.size


def all_free(cache: RadixCache | NoSharingCache) -> bool:
    pool = cache.req_to_token_pool
    return cache.allocator.available_size() == cache.allocator.size and pool.available_size() == pool.size


# ---- RadixCache: deterministic -------------------------------------------------


def test_match_on_empty_tree() -> None:
    _, _, cache = make()
    m = cache.match_prefix([1, 2, 3])
    assert isinstance(m, MatchResult)
    assert m.indices.dtype == torch.int64 and m.indices.numel() == 0
    assert m.last_node is cache.root_node
    assert cache.match_prefix([]).last_node is cache.root_node
    for node in (None, cache.root_node):  # nothing to lock: both are no-ops
        cache.inc_lock_ref(node)
        cache.dec_lock_ref(node)
    assert cache.total_size() == cache.protected_size() == 0


def test_insert_match_split() -> None:
    _, alloc, cache = make()
    slots = alloc_slots(alloc, 4)
    assert cache.insert([1, 2, 3, 4], slots) == 0
    m = cache.match_prefix([1, 2])
    assert m.indices.tolist() == slots[:2].tolist()
    (upper,) = cache.root_node.children.values()
    assert upper.key == [1, 2] and m.last_node is upper
    (lower,) = upper.children.values()
    assert lower.key == [3, 4] and lower.value.tolist() == slots[2:].tolist()
    assert list(cache.root_node.children) == [1] and list(upper.children) == [3]
    full = cache.match_prefix([1, 2, 3, 4, 5])
    assert full.indices.tolist() == slots.tolist() and full.last_node is lower
    m1 = cache.match_prefix([1, 9])
    assert m1.indices.tolist() == slots[:1].tolist() and m1.last_node.key == [1]
    assert [n.key for n in tree_nodes(cache)] == [[1], [2], [3, 4]]
    assert cache.match_prefix([7]).indices.numel() == 0
    assert cache.total_size() == cache.evictable_size() == 4
    printed = cache.pretty_print()
    assert "[1]" in printed and "[3, 4]" in printed and "#tokens: 4" in printed


def test_insert_returns_present_prefix() -> None:
    _, alloc, cache = make()

    def ins(key: list[int]) -> int:
        v = alloc_slots(alloc, len(key))
        present = cache.insert(key, v)
        alloc.free(v[:present])  # the tree keeps its own copy of those
        return present

    assert ins([1, 2, 3]) == 0
    assert ins([1, 2, 3, 4, 5]) == 3
    assert ins([1, 2, 7]) == 2
    assert ins([1, 2, 3, 4, 5]) == 5
    assert ins([4]) == 0
    assert cache.total_size() == 7
    assert alloc.available_size() == alloc.size - 7
    with pytest.raises(ValueError):
        cache.insert([1, 2], torch.tensor([5], dtype=torch.int64))


def test_lock_protects_from_evict_and_sizes() -> None:
    _, alloc, cache = make()
    cache.insert([1, 2, 3], alloc_slots(alloc, 3))
    cache.insert([1, 2, 4, 5], torch.cat([cache.match_prefix([1, 2]).indices, alloc_slots(alloc, 2)]))
    # Tree: [1,2] -> {[3], [4,5]}; lock [1,2,3] twice (two requests share it).
    node = cache.match_prefix([1, 2, 3]).last_node
    cache.inc_lock_ref(node)
    cache.inc_lock_ref(node)
    assert (cache.protected_size(), cache.evictable_size()) == (3, 2)
    cache.dec_lock_ref(node)
    assert (cache.protected_size(), cache.evictable_size()) == (3, 2)
    before = alloc.available_size()
    assert cache.evict(100) == 2
    assert alloc.available_size() == before + 2
    assert cache.match_prefix([1, 2, 4]).indices.numel() == 2
    assert cache.match_prefix([1, 2, 3]).indices.numel() == 3
    cache.dec_lock_ref(node)
    assert (cache.protected_size(), cache.evictable_size()) == (0, 3)
    with pytest.raises(RuntimeError):
        cache.dec_lock_ref(node)
    assert cache.evict(1) == 1  # stops after the first leaf
    assert cache.evict(2) == 2  # its parent [1,2] became an evictable leaf
    assert cache.total_size() == 0 and alloc.available_size() == alloc.size


def test_evict_is_lru_over_leaves() -> None:
    _, alloc, cache = make()
    a, b = alloc_slots(alloc, 3), alloc_slots(alloc, 3)
    cache.insert([1, 2, 3], a)
    cache.insert([4, 5, 6], b)
    cache.match_prefix([1, 2, 3])  # the older branch is now the most recent
    before = alloc.available_size()
    assert cache.evict(1) == 3  # whole leaf [4,5,6]
    assert alloc.available_size() == before + 3
    assert not alloc.page_is_free[a].any() and alloc.page_is_free[b].all()
    assert cache.match_prefix([4, 5, 6]).indices.numel() == 0
    assert cache.match_prefix([1, 2, 3]).indices.tolist() == a.tolist()


def test_evict_parent_becomes_leaf() -> None:
    _, alloc, cache = make()
    cache.insert([1, 2, 3, 4], alloc_slots(alloc, 4))
    prefix = cache.match_prefix([1, 2]).indices
    cache.insert([1, 2, 5, 6], torch.cat([prefix, alloc_slots(alloc, 2)]))
    assert cache.evict(5) == 6 and cache.total_size() == 0
    assert alloc.available_size() == alloc.size
    assert cache.evict(5) == 0


def test_cache_finished_req_frees_duplicates_and_row() -> None:
    pool, alloc, cache = make()
    # Both admitted before either finished: neither matched anything.
    a, b = admit(cache, [1, 2, 3, 4]), admit(cache, [1, 2, 3, 4])
    assert a is not None and b is not None
    assert extend(cache, a, [5]) and extend(cache, b, [9])
    a_kv = row_of(pool, a, 5)
    finish(cache, a, split=4)  # prompt [1,2,3,4], outputs [5, 99]
    assert pool.available_size() == pool.size - 1
    assert cache.total_size() == 5 and alloc.available_size() == alloc.size - 10
    b_kv = row_of(pool, b, 5)
    finish(cache, b, split=4)
    assert cache.total_size() == 6 and alloc.available_size() == alloc.size - 6
    assert alloc.page_is_free[b_kv[:4]].all()  # duplicates freed, tree kept a's copy
    assert cache.match_prefix([1, 2, 3, 4, 5]).indices.tolist() == a_kv.tolist()
    assert cache.evictable_size() == 6 and pool.available_size() == pool.size
    cache.reset()
    assert all_free(cache) and cache.total_size() == 0


def test_chunked_prefill_then_finish_no_leak() -> None:
    pool, alloc, cache = make()
    prompt = list(range(10, 20))
    req = admit(cache, prompt[:4])  # first chunk
    assert req is not None
    cache.cache_unfinished_req(req)
    assert cache.protected_size() == 4 and len(req.prefix_indices) == 4
    check_ownership(cache, [req])
    other = admit(cache, prompt[:4] + [1, 2])  # shares the first chunk
    assert other is not None and len(other.prefix_indices) == 4
    assert extend(cache, req, prompt[4:])  # second chunk
    cache.cache_unfinished_req(req)
    assert cache.protected_size() == 10 and req.last_node is not None
    check_ownership(cache, [req, other])
    assert extend(cache, req, [7, 8])  # two decode steps
    finish(cache, req, split=10)
    finish(cache, other)
    check_ownership(cache, [])
    assert cache.protected_size() == 0 and cache.total_size() == 14
    cache.reset()
    assert all_free(cache)


def test_reset_refuses_locked_tree() -> None:
    _, _, cache = make()
    req = admit(cache, [1, 2, 3])
    assert req is not None
    cache.cache_unfinished_req(req)
    with pytest.raises(RuntimeError):
        cache.reset()
    finish(cache, req)
    cache.reset()
    assert all_free(cache)


def test_caching_positions_without_kv_is_refused() -> None:
    """Token lists longer than the computed KV (e.g. a chunked request aborted mid-prompt)
    would put the padding slot into the tree; refused before anything changes."""
    pool, alloc, cache = make()
    req = admit(cache, [1, 2, 3])
    assert req is not None
    req.origin_input_ids, req.output_ids = [1, 2, 3, 4, 5, 6], [7]
    with pytest.raises(ValueError):
        cache.cache_finished_req(req)
    req.fill_ids = [1, 2, 3, 4, 5]
    with pytest.raises(ValueError):
        cache.cache_unfinished_req(req)
    assert cache.total_size() == 0 and pool.available_size() == pool.size - 1
    req.fill_ids = [1, 2, 3]
    finish(cache, req)
    cache.reset()
    assert all_free(cache)


def test_hit_statistics() -> None:
    _, _, cache = make()
    assert cache.hit_rate() == 0.0
    cache.match_prefix([1, 2, 3])  # lookups alone do not count
    cache.record_hit(3, 10)
    cache.record_hit(0, 5)
    assert (cache.hit_tokens, cache.queried_tokens) == (3, 15)
    assert cache.hit_rate() == pytest.approx(0.2)
    with pytest.raises(ValueError):
        cache.record_hit(6, 5)


# ---- page_size > 1 ---------------------------------------------------------------


def test_paged_match_and_insert_whole_pages() -> None:
    _, alloc, cache = make(page_size=4)
    toks = list(range(1, 9))
    slots = alloc_slots(alloc, 8)
    assert cache.insert(toks, slots) == 0
    assert cache.match_prefix(toks[:7]).indices.tolist() == slots[:4].tolist()
    assert cache.match_prefix(toks[:3]).indices.numel() == 0
    assert cache.match_prefix(toks[:4] + [5, 6, 0, 8]).indices.numel() == 4  # mismatch in page 2
    assert cache.match_prefix(toks[:2] + [0, 0]).indices.numel() == 0
    assert [n.key for n in tree_nodes(cache)] == [toks[:4], toks[4:]]  # split on the page boundary
    m = cache.match_prefix(toks)
    assert all(s % 4 == p % 4 for p, s in enumerate(m.indices.tolist()))
    with pytest.raises(ValueError):
        cache.insert(toks[:6], slots[:6])
    # Same first token, different first page: separate children.
    v = alloc_slots(alloc, 4)
    assert cache.insert([1, 2, 3, 0], v) == 0
    assert len(cache.root_node.children) == 2
    # A mismatch inside a later page of one node splits it on a page boundary.
    long_key = [0] * 4 + [1] * 4 + [2] * 4
    cache.insert(long_key, alloc_slots(alloc, 12))
    m = cache.match_prefix(long_key[:10] + [9, 9])
    assert len(m.indices) == 8 and m.last_node.key == [0] * 4 + [1] * 4


def test_paged_finished_frees_tail() -> None:
    pool, alloc, cache = make(page_size=4)
    req = admit(cache, list(range(1, 11)))  # 10 tokens: pages of 4, 4, 2
    assert req is not None and alloc.available_size() == alloc.size - 12
    finish(cache, req, split=9)
    assert cache.total_size() == 8 and alloc.available_size() == alloc.size - 8
    assert pool.available_size() == pool.size
    again = admit(cache, list(range(1, 11)))
    assert again is not None and len(again.prefix_indices) == 8
    check_ownership(cache, [again])
    finish(cache, again)
    cache.reset()
    assert all_free(cache)


def test_paged_chunked_with_concurrent_duplicate() -> None:
    """A chunk's partial page is duplicated by another request before the next chunk:
    the whole page is freed, so every position on it must be re-pointed at the tree."""
    pool, alloc, cache = make(page_size=4)
    prompt = list(range(1, 13))
    r1 = admit(cache, prompt[:6])
    assert r1 is not None
    cache.cache_unfinished_req(r1)
    assert len(r1.prefix_indices) == 6 and cache.total_size() == 4
    check_ownership(cache, [r1])
    r2 = admit(cache, prompt[:8] + [0])
    assert r2 is not None and len(r2.prefix_indices) == 4
    finish(cache, r2)  # the tree now holds prompt[:8], its second page from r2
    tree_page2 = cache.match_prefix(prompt[:8]).indices[4:]
    assert extend(cache, r1, prompt[6:])
    cache.cache_unfinished_req(r1)
    assert row_of(pool, r1, 8)[4:].tolist() == tree_page2.tolist()
    assert len(r1.prefix_indices) == 12
    check_ownership(cache, [r1])
    finish(cache, r1)
    check_ownership(cache, [])
    cache.reset()
    assert all_free(cache)


# ---- NoSharingCache --------------------------------------------------------------


@pytest.mark.parametrize("ps", [1, 4])
def test_no_sharing_cache_frees_everything(ps: int) -> None:
    pool = ReqToTokenPool(4, 32, "cpu")
    alloc = TokenToKVPoolAllocator(64, page_size=ps)
    cache = NoSharingCache(pool, alloc, ps)
    a = admit(cache, [1, 2, 3, 4, 5])
    assert a is not None and a.prefix_indices.numel() == 0
    cache.cache_unfinished_req(a)
    assert a.prefix_indices.tolist() == row_of(pool, a, 5).tolist()
    assert a.last_node is cache.root_node
    b = admit(cache, [1, 2, 3, 4, 5])
    assert b is not None and b.prefix_indices.numel() == 0
    assert cache.insert([1, 2, 3, 4], torch.arange(4)) == 0
    assert cache.evict(100) == 0
    assert (cache.evictable_size(), cache.protected_size(), cache.total_size()) == (0, 0, 0)
    assert extend(cache, a, [6, 7])
    finish(cache, a)
    finish(cache, b, split=3)
    cache.reset()
    assert all_free(cache)
    assert isinstance(cache.pretty_print(), str)


# ---- property: random operation sequences against a reference model ---------------


def aligned_prefixes(toks: list[int], ps: int) -> set[tuple[int, ...]]:
    return {tuple(toks[:n]) for n in range(ps, len(toks) + 1, ps)}


def model_match_len(ref: set[tuple[int, ...]], toks: list[int], ps: int) -> int:
    n = 0
    while n + ps <= len(toks) and tuple(toks[: n + ps]) in ref:
        n += ps
    return n


def tree_prefix_set(cache: RadixCache) -> set[tuple[int, ...]]:
    out: set[tuple[int, ...]] = set()
    for node in tree_nodes(cache):
        key, _ = path(node)
        out |= {p for p in aligned_prefixes(key, cache.page_size) if len(p) > len(key) - len(node.key)}
    return out


class RadixMachine(RuleBasedStateMachine):
    page_size = 1
    alphabet = 3
    max_len = 12

    def __init__(self) -> None:
        super().__init__()
        ps = self.page_size
        self.pool = ReqToTokenPool(4, 40, "cpu")
        self.alloc = TokenToKVPoolAllocator(48 * ps if ps > 1 else 64, page_size=ps)
        self.cache = RadixCache(self.pool, self.alloc, ps)
        self.reqs: list[FakeReq] = []
        self.locks: list[TreeNode] = []
        self.ref: set[tuple[int, ...]] = set()  # aligned prefixes inserted and not evicted

    def _tokens(self, data: st.DataObject, min_size: int = 1) -> list[int]:
        return data.draw(st.lists(st.integers(0, self.alphabet - 1), min_size=min_size, max_size=self.max_len))

    @rule(data=st.data())
    def match(self, data: st.DataObject) -> None:
        toks = self._tokens(data, 0)
        m = self.cache.match_prefix(toks)
        n = model_match_len(self.ref, toks, self.page_size)
        assert len(m.indices) == n
        key, value = path(m.last_node)
        assert key == toks[:n] and torch.equal(value, m.indices)

    @rule(data=st.data())
    def insert(self, data: st.DataObject) -> None:
        toks = self._tokens(data)
        toks = toks[: len(toks) - len(toks) % self.page_size]
        slots = self.alloc.alloc_extend([0], [len(toks)], [0])
        if slots is None:
            return
        present = self.cache.insert(toks, slots)
        assert present == model_match_len(self.ref, toks, self.page_size)
        self.alloc.free(slots[:present])
        self.ref |= aligned_prefixes(toks, self.page_size)

    @rule(data=st.data())
    def admit(self, data: st.DataObject) -> None:
        req = admit(self.cache, self._tokens(data))
        if req is not None:
            self.ref = tree_prefix_set(self.cache)  # admission may have evicted
            self.reqs.append(req)

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def extend(self, data: st.DataObject) -> None:
        req = data.draw(st.sampled_from(self.reqs))
        more = data.draw(st.lists(st.integers(0, self.alphabet - 1), min_size=1, max_size=6))
        if len(req.fill_ids) + len(more) <= self.pool.max_context_len:
            extend(self.cache, req, more)

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def cache_unfinished(self, data: st.DataObject) -> None:
        req = data.draw(st.sampled_from(self.reqs))
        self.cache.cache_unfinished_req(req)
        self.ref |= aligned_prefixes(req.fill_ids, self.page_size)
        assert len(req.prefix_indices) == len(req.fill_ids)

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        req = data.draw(st.sampled_from(self.reqs))
        split = data.draw(st.integers(1, len(req.fill_ids)))
        self.reqs.remove(req)
        finish(self.cache, req, split)
        self.ref |= aligned_prefixes(req.fill_ids, self.page_size)

    @rule(data=st.data())
    def lock(self, data: st.DataObject) -> None:
        node = self.cache.match_prefix(self._tokens(data)).last_node
        self.cache.inc_lock_ref(node)
        self.locks.append(node)

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.locks) - 1))
        self.cache.dec_lock_ref(self.locks.pop(i))

    @rule(n=st.integers(0, 40))
    def evict(self, n: int) -> None:
        avail, evictable = self.alloc.available_size(), self.cache.evictable_size()
        freed = self.cache.evict(n)
        after = tree_prefix_set(self.cache)
        assert after <= self.ref
        assert (len(self.ref) - len(after)) * self.page_size == freed
        assert self.alloc.available_size() == avail + freed
        assert freed >= min(n, evictable)
        if freed < n:
            assert self.cache.evictable_size() == 0
        self.ref = after

    @invariant()
    def consistent(self) -> None:
        assert tree_prefix_set(self.cache) == self.ref
        # Lock counts = number of holders whose path runs through the node.
        expected: dict[int, int] = {}
        for node in self.locks + [r.last_node for r in self.reqs if r.last_node is not None]:
            while node.parent is not None:
                expected[id(node)] = expected.get(id(node), 0) + 1
                node = node.parent
            assert node is self.cache.root_node, "a held node fell out of the tree"
        nodes = tree_nodes(self.cache)
        assert all(n.lock_ref == expected.get(id(n), 0) for n in nodes)
        assert self.cache.protected_size() == sum(len(n.key) for n in nodes if n.lock_ref)
        assert self.cache.evictable_size() == sum(len(n.key) for n in nodes if not n.lock_ref)
        check_ownership(self.cache, self.reqs)

    def teardown(self) -> None:
        for req in self.reqs:
            finish(self.cache, req)
        for node in self.locks:
            self.cache.dec_lock_ref(node)
        check_ownership(self.cache, [])
        self.cache.reset()
        assert all_free(self.cache)


class PagedRadixMachine(RadixMachine):
    page_size = 4
    alphabet = 2
    max_len = 16


_machine_settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
RadixMachine.TestCase.settings = _machine_settings
PagedRadixMachine.TestCase.settings = _machine_settings
TestRadixCacheStateful = RadixMachine.TestCase
TestPagedRadixCacheStateful = PagedRadixMachine.TestCase


@pytest.mark.parametrize("cache_cls", [RadixCache, NoSharingCache])
def test_both_caches_implement_the_declared_interface(cache_cls):
    from managers.cache_manager import PrefixCache

    pool = ReqToTokenPool(2, 16, "cpu")
    cache = cache_cls(pool, TokenToKVPoolAllocator(32, 1, "cpu"), 1)
    assert isinstance(cache, PrefixCache)
    missing = [name for name in dir(PrefixCache) if not name.startswith("_") and not callable(getattr(cache, name, None))]
    assert missing == []
