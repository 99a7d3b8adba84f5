"""Prefix sharing: a radix tree from token-id prefixes to the KV slots that hold them.

Ownership rule (DESIGN.md, Memory): every allocated KV slot is owned by exactly one
of a live request or this tree. A request shares the tree's slots for its matched
prefix (`prefix_indices`, kept alive by a lock on `last_node`) and owns the slots
past it. Caching a request hands its slots to the tree; slots whose tokens the tree
already had are duplicates and are freed, since the tree keeps its own copy.

With `page_size > 1` the tree holds whole pages only, so every node's key length
is a multiple of the page size and its slots are whole pages no one else owns.

This module knows token ids and slot indices only; a scheduler `Req` is read
through the duck-typed `CacheableReq` protocol.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from mem_cache.allocator import TokenToKVPoolAllocator
from mem_cache.memory_pool import ReqToTokenPool

ChildKey = int | tuple[int, ...]


@dataclass(eq=False)  # identity semantics: nodes are dict values and heap entries
class TreeNode:
    key: list[int]
    value: Tensor = field(repr=False)  # int64 KV slots, one per token of `key`
    # repr=False: a node's repr would otherwise print its whole subtree and parent chain.
    parent: TreeNode | None = field(repr=False)
    node_id: int  # heap tie-breaker, so nodes never get compared
    children: dict[ChildKey, TreeNode] = field(default_factory=dict, repr=False)
    lock_ref: int = 0
    last_access_time: int = 0


class CacheableReq(Protocol):
    req_pool_idx: int | None
    origin_input_ids: list[int]
    output_ids: list[int]
    fill_ids: list[int]
    prefix_indices: Tensor
    last_node: TreeNode | None


@dataclass
class MatchResult:
    indices: Tensor  # int64 [n] KV slots of the longest cached (page-aligned) prefix
    last_node: TreeNode  # node where the match ended (the root when nothing matched)


def _as_token_list(key: Sequence[int] | Tensor) -> list[int]:
    # Tokens become dict keys; a 0-d tensor hashes by identity, so convert.
    return key.tolist() if isinstance(key, Tensor) else list(key)


def _read_row(pool: ReqToTokenPool, row: int | None, n: int, page_size: int) -> Tensor:
    """The KV slots of a request's first n positions, as int64.

    A slot in the padding page means position < n was never given KV (the request's
    token lists run ahead of its computed KV); caching it would hand slot 0 to the
    tree, so refuse before anything is changed."""
    if row is None:
        raise ValueError("request has no req_to_token row")
    kv = pool.req_to_token[row, :n].to(torch.int64)
    if n and int(kv.min()) < page_size:
        raise ValueError(f"req_to_token row {row} has no KV slot for some of its first {n} positions")
    return kv


class _HitStats:
    """Prefix-hit totals. Updated only by `record_hit`, never by `match_prefix`: the
    lpm policy calls match_prefix for every waiting request on every iteration, so
    counting there would inflate the totals. The scheduler calls record_hit once per
    admitted request with its `cached_tokens`."""

    def __init__(self) -> None:
        self.hit_tokens = 0
        self.queried_tokens = 0

    def record_hit(self, matched: int, total: int) -> None:
        if not 0 <= matched <= total:
            raise ValueError(f"need 0 <= matched <= total, got {matched}, {total}")
        self.hit_tokens += matched
        self.queried_tokens += total

    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class RadixCache(_HitStats):
    def __init__(
        self, req_to_token_pool: ReqToTokenPool, allocator: TokenToKVPoolAllocator, page_size: int = 1
    ) -> None:
        super().__init__()
        if page_size != allocator.page_size:
            raise ValueError(f"page_size {page_size} != allocator page_size {allocator.page_size}")
        self.req_to_token_pool = req_to_token_pool
        self.allocator = allocator
        self.page_size = page_size
        self.device = req_to_token_pool.device
        self._clock = itertools.count(1)  # LRU time: a counter never ties across calls
        self._node_ids = itertools.count()
        self.evicted_tokens = 0  # total ever evicted (stats; reset() does not count)
        self._new_root()

    def _new_root(self) -> None:
        self.root_node = TreeNode([], self._empty(), None, next(self._node_ids))
        self._evictable_size = 0
        self._protected_size = 0

    def _empty(self) -> Tensor:
        return torch.empty(0, dtype=torch.int64, device=self.device)

    # ---- key helpers ---------------------------------------------------------

    def _child_key(self, key: list[int]) -> ChildKey:
        # Paged nodes start on a page boundary; two keys sharing a first token but
        # not a first page cannot share a node, so the whole first page is the key.
        return key[0] if self.page_size == 1 else tuple(key[: self.page_size])

    def _match_len(self, a: list[int], b: list[int]) -> int:
        n = min(len(a), len(b))
        i = 0
        while i < n and a[i] == b[i]:
            i += 1
        return i - i % self.page_size

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut `child` after n tokens; returns the new upper node. The lower part keeps
        the original object, so requests whose `last_node` is `child` stay correct."""
        parent = child.parent
        assert parent is not None
        upper = TreeNode(
            child.key[:n], child.value[:n], parent, next(self._node_ids),
            # Every lock through `child` also passes through its new parent.
            lock_ref=child.lock_ref, last_access_time=child.last_access_time,
        )
        child.key, child.value = child.key[n:], child.value[n:]
        child.parent = upper
        upper.children[self._child_key(child.key)] = child
        parent.children[self._child_key(upper.key)] = upper
        return upper

    # ---- lookup and insertion --------------------------------------------------

    def match_prefix(self, key: Sequence[int] | Tensor) -> MatchResult:
        """Longest cached prefix of `key` (whole pages only). Splits the node the match
        ends inside, so `last_node` covers exactly the matched tokens."""
        key = _as_token_list(key)
        key = key[: len(key) - len(key) % self.page_size]
        now = next(self._clock)
        node = self.root_node
        node.last_access_time = now
        values: list[Tensor] = []
        while key:
            child = node.children.get(self._child_key(key))
            if child is None:
                break
            child.last_access_time = now
            n = self._match_len(child.key, key)
            if n < len(child.key):
                node = self._split(child, n)
                values.append(node.value)
                break
            values.append(child.value)
            node, key = child, key[n:]
        indices = torch.cat(values) if values else self._empty()
        return MatchResult(indices, node)

    def insert(self, key: Sequence[int] | Tensor, value: Tensor) -> int:
        """Add `key` -> `value`; returns how many leading tokens the tree already had.
        Those slots of `value` are NOT taken: the caller frees them if they are its own."""
        key = _as_token_list(key)
        if len(key) != value.numel():
            raise ValueError(f"key has {len(key)} tokens but value has {value.numel()} slots")
        if len(key) % self.page_size:
            raise ValueError(f"key length {len(key)} is not a multiple of page_size {self.page_size}")
        now = next(self._clock)
        node = self.root_node
        node.last_access_time = now
        present = 0
        while key:
            child = node.children.get(self._child_key(key))
            if child is None:
                break
            child.last_access_time = now
            n = self._match_len(child.key, key)
            if n < len(child.key):
                child = self._split(child, n)
            present += n
            node, key, value = child, key[n:], value[n:]
        if key:
            # Clone: the caller's tensor is often a copy of a req_to_token row it reuses.
            leaf = TreeNode(key, value.to(torch.int64).clone(), node, next(self._node_ids),
                            last_access_time=now)
            node.children[self._child_key(key)] = leaf
            self._evictable_size += len(key)
        return present

    # ---- request hand-off ------------------------------------------------------

    def _tree_owned_len(self, req: CacheableReq) -> int:
        # prefix_indices may end with the request's own partial page (see
        # cache_unfinished_req); only its whole pages belong to the tree.
        n = len(req.prefix_indices)
        return n - n % self.page_size

    def cache_finished_req(self, req: CacheableReq) -> None:
        # The last sampled token was never fed back, so it has no KV.
        token_ids = (list(req.origin_input_ids) + list(req.output_ids))[:-1]
        kv = _read_row(self.req_to_token_pool, req.req_pool_idx, len(token_ids), self.page_size)
        aligned = len(token_ids) - len(token_ids) % self.page_size
        shared = self._tree_owned_len(req)
        present = self.insert(token_ids[:aligned], kv[:aligned])
        # Duplicates of what the tree already had, plus the partial last page the
        # tree cannot hold; one free call so a page in both is freed once.
        self.allocator.free(torch.cat([kv[shared:max(shared, present)], kv[aligned:]]))
        self.req_to_token_pool.free(req.req_pool_idx)
        self.dec_lock_ref(req.last_node)

    def cache_unfinished_req(self, req: CacheableReq) -> None:
        """Insert the computed tokens so far and re-point the request at the tree's
        slots; the request keeps its lock (moved to the new last node) and its
        partial last page."""
        row = req.req_pool_idx
        token_ids = list(req.fill_ids)
        kv = _read_row(self.req_to_token_pool, row, len(token_ids), self.page_size)
        aligned = len(token_ids) - len(token_ids) % self.page_size
        shared = self._tree_owned_len(req)
        present = self.insert(token_ids[:aligned], kv[:aligned])
        if present > shared:
            self.allocator.free(kv[shared:present])
        match = self.match_prefix(token_ids[:aligned])
        m = len(match.indices)
        if m > shared:
            # Starting at the page floor, not len(prefix_indices): a freed duplicate
            # page may also have held the request's earlier partial-page positions.
            table = self.req_to_token_pool.req_to_token
            table[row, shared:m] = match.indices[shared:].to(table.dtype)
        self.inc_lock_ref(match.last_node)
        self.dec_lock_ref(req.last_node)
        req.prefix_indices = torch.cat([match.indices, kv[m:]])
        req.last_node = match.last_node

    # ---- locking and eviction ----------------------------------------------------

    # None (a request that never matched) is accepted as "nothing locked".
    def inc_lock_ref(self, node: TreeNode | None) -> None:
        while node is not None and node is not self.root_node:
            if node.lock_ref == 0:
                self._evictable_size -= len(node.key)
                self._protected_size += len(node.key)
            node.lock_ref += 1
            assert node.parent is not None, "locking a node that is no longer in the tree"
            node = node.parent

    def dec_lock_ref(self, node: TreeNode | None) -> None:
        # Ancestors always hold at least their child's count, so checking the
        # first node is enough to keep the walk from going negative.
        if node is not None and node is not self.root_node and node.lock_ref <= 0:
            raise RuntimeError("dec_lock_ref on an unlocked node")
        while node is not None and node is not self.root_node:
            if node.lock_ref == 1:
                self._evictable_size += len(node.key)
                self._protected_size -= len(node.key)
            node.lock_ref -= 1
            assert node.parent is not None
            node = node.parent

    def _iter_nodes(self) -> Iterator[TreeNode]:
        stack = [self.root_node]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def evict(self, num_tokens: int) -> int:
        """Free at least `num_tokens` tokens (fewer if not enough are evictable) from
        unlocked leaves, least recently used first; returns the number freed."""
        if num_tokens <= 0:
            return 0
        heap = [
            (n.last_access_time, n.node_id, n)
            for n in self._iter_nodes()
            if not n.children and n.lock_ref == 0 and n is not self.root_node
        ]
        heapq.heapify(heap)
        freed: list[Tensor] = []
        num_freed = 0
        while num_freed < num_tokens and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            freed.append(leaf.value)
            num_freed += len(leaf.key)
            del parent.children[self._child_key(leaf.key)]
            leaf.parent = None
            self._evictable_size -= len(leaf.key)
            if not parent.children and parent.lock_ref == 0 and parent is not self.root_node:
                heapq.heappush(heap, (parent.last_access_time, parent.node_id, parent))
        if freed:
            self.allocator.free(torch.cat(freed))
        self.evicted_tokens += num_freed
        return num_freed

    def evictable_size(self) -> int:
        return self._evictable_size

    def protected_size(self) -> int:
        return self._protected_size

    def total_size(self) -> int:
        return self._evictable_size + self._protected_size

    def reset(self) -> None:
        """Drop the whole tree and free its KV. Refused while any node is locked: a
        live request still reads those slots (flush only when idle)."""
        if self._protected_size:
            raise RuntimeError(f"reset with {self._protected_size} locked tokens in the tree")
        values = [n.value for n in self._iter_nodes() if n is not self.root_node]
        if values:
            self.allocator.free(torch.cat(values))
        self._new_root()

    def pretty_print(self) -> str:
        lines: list[str] = []

        def walk(node: TreeNode, depth: int) -> None:
            for child in node.children.values():
                shown = child.key if len(child.key) <= 16 else [*child.key[:16], "..."]
                lines.append(f"{'  ' * depth}{shown} len={len(child.key)} "
                             f"lock={child.lock_ref} t={child.last_access_time}")
                walk(child, depth + 1)

        walk(self.root_node, 0)
        lines.append(f"#tokens: {self.total_size()} (evictable {self._evictable_size}, "
                     f"protected {self._protected_size})")
        return "\n".join(lines)


class NoSharingCache(_HitStats):
    """RadixCache's interface with no sharing (--disable-radix-cache): nothing is
    ever matched or kept, and a finished request frees all of its KV."""

    def __init__(
        self, req_to_token_pool: ReqToTokenPool, allocator: TokenToKVPoolAllocator, page_size: int = 1
    ) -> None:
        super().__init__()
        self.req_to_token_pool = req_to_token_pool
        self.allocator = allocator
        self.page_size = page_size
        self.device = req_to_token_pool.device
        self.root_node = TreeNode([], self._empty(), None, 0)
        self.evicted_tokens = 0  # nothing is ever kept, so nothing is evicted

    def _empty(self) -> Tensor:
        return torch.empty(0, dtype=torch.int64, device=self.device)

    def match_prefix(self, key: Sequence[int] | Tensor) -> MatchResult:
        return MatchResult(self._empty(), self.root_node)

    def insert(self, key: Sequence[int] | Tensor, value: Tensor) -> int:
        return 0

    def cache_finished_req(self, req: CacheableReq) -> None:
        n = len(req.origin_input_ids) + len(req.output_ids) - 1
        self.allocator.free(_read_row(self.req_to_token_pool, req.req_pool_idx, n, self.page_size))
        self.req_to_token_pool.free(req.req_pool_idx)

    def cache_unfinished_req(self, req: CacheableReq) -> None:
        # The request keeps all of its KV; the next chunk extends past it.
        pool, n = self.req_to_token_pool, len(req.fill_ids)
        req.prefix_indices = _read_row(pool, req.req_pool_idx, n, self.page_size)
        req.last_node = self.root_node

    def inc_lock_ref(self, node: TreeNode | None) -> None:
        pass

    def dec_lock_ref(self, node: TreeNode | None) -> None:
        pass

    def evict(self, num_tokens: int) -> int:
        return 0

    def evictable_size(self) -> int:
        return 0

    def protected_size(self) -> int:
        return 0

    def total_size(self) -> int:
        return 0

    def reset(self) -> None:
        pass

    def pretty_print(self) -> str:
        return "#tokens: 0 (radix cache disabled)"
