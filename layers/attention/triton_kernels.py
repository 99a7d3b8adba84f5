"""Triton kernels for attention over the paged KV pool.

Keys and values live in per-layer pools [num_slots, H_kv, D]; a step's
metadata lists, for each sequence, the pool slot of each of its tokens
(`kv_indices`, flattened, sequence b's at kv_indptr[b]:kv_indptr[b+1]). The
kernels read K/V through those slots, so any page size works: a page is just
a run of consecutive slots.

- `extend_attention`: the new tokens of each sequence attend causally to
  the whole sequence (cached prefix + themselves; the new K/V are written to
  the pool before the kernel runs). One program per (sequence, query head,
  block of BLOCK_M new tokens), online softmax over blocks of BLOCK_N keys.
- `decode_attention`: one query per sequence, flash-decoding style. Stage 1
  splits each sequence's keys into `num_splits` chunks, one program per
  (sequence, KV head, chunk), all query heads of the KV head's group at once
  (K/V read once per group); it writes each chunk's partial output and
  log-sum-exp. Stage 2 merges the chunks. The grid depends only on the
  batch size and `num_splits`, not on lengths, so it can be captured in a
  CUDA graph.

Loads are cast to fp32 right away: accumulation is in fp32 anyway, and
Triton's CPU interpreter (which CI runs these under, TRITON_INTERPRET=1)
gets bf16 arithmetic wrong. For bf16/fp16 pools the dots then run in tf32
(`dot_precision`): Q·K loses nothing to that, since bf16/fp16 values fit
tf32's 10-bit mantissa (the sums accumulate in fp32), but P·V rounds the
fp32 softmax weights P to tf32, about 1e-3 relative per weight. fp32 pools
(the parity reference) get full fp32 dots.

Token offsets are formed in int64 before they are multiplied by a stride:
in int32, a token index times the token stride (up to (H + 2 H_kv) * D: q may be
a view of the fused QKV output) passes 2^31 at a few hundred thousand tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _attend_block(
    q, row_max, row_sum, acc,
    K_pool, V_pool, kv_indices, kv_start, offs_n, n_valid, allowed, kv_head,
    stride_k_slot, stride_k_head, stride_v_slot, stride_v_head,
    offs_d, d_valid, scale,
    DOT_PRECISION: tl.constexpr,
):
    """One block of keys for a block of query rows, online softmax: read the
    keys' slots, K, V (as fp32), fold them into (row_max, row_sum, acc)."""
    slots = tl.load(kv_indices + kv_start + offs_n, mask=n_valid, other=0).to(tl.int64)
    k = tl.load(
        K_pool + slots[:, None] * stride_k_slot + kv_head * stride_k_head + offs_d[None, :],
        mask=n_valid[:, None] & d_valid[None, :],
        other=0.0,
    ).to(tl.float32)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
    scores = tl.where(allowed, scores, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scores, axis=1))
    # Rows with nothing allowed yet keep -inf; exp(-inf - -inf) is nan, so guard.
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    p = tl.exp(scores - safe_max[:, None])
    correction = tl.exp(row_max - safe_max)
    row_sum = row_sum * correction + tl.sum(p, axis=1)
    v = tl.load(
        V_pool + slots[:, None] * stride_v_slot + kv_head * stride_v_head + offs_d[None, :],
        mask=n_valid[:, None] & d_valid[None, :],
        other=0.0,
    ).to(tl.float32)
    acc = acc * correction[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
    return new_max, row_sum, acc


@triton.jit
def _extend_kernel(
    Q, K_pool, V_pool, Out,
    qo_indptr, kv_indptr, kv_indices, prefix_lens,
    scale,
    stride_q_tok, stride_q_head,
    stride_k_slot, stride_k_head,
    stride_v_slot, stride_v_head,
    stride_o_tok, stride_o_head,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    block_m = tl.program_id(2)
    kv_head = head // GROUP

    q_start = tl.load(qo_indptr + seq).to(tl.int64)  # see the module docstring: int64 offsets
    num_new = tl.load(qo_indptr + seq + 1) - q_start
    if block_m * BLOCK_M >= num_new:
        return
    kv_start = tl.load(kv_indptr + seq)
    seq_len = tl.load(kv_indptr + seq + 1) - kv_start
    prefix = tl.load(prefix_lens + seq)

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)  # index among the new tokens
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < num_new
    d_valid = offs_d < HEAD_DIM
    q = tl.load(
        Q + (q_start + offs_m)[:, None] * stride_q_tok + head * stride_q_head + offs_d[None, :],
        mask=m_valid[:, None] & d_valid[None, :],
        other=0.0,
    ).to(tl.float32)
    query_pos = prefix + offs_m  # position of each query in its sequence

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Keys past the block's last query are masked for every row: stop there.
    kv_end = tl.minimum(seq_len, prefix + (block_m + 1) * BLOCK_M)
    for n_start in range(0, kv_end, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_valid = offs_n < kv_end
        allowed = (offs_n[None, :] <= query_pos[:, None]) & n_valid[None, :]
        row_max, row_sum, acc = _attend_block(
            q, row_max, row_sum, acc,
            K_pool, V_pool, kv_indices, kv_start, offs_n, n_valid, allowed, kv_head,
            stride_k_slot, stride_k_head, stride_v_slot, stride_v_head,
            offs_d, d_valid, scale, DOT_PRECISION,
        )

    out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
    tl.store(
        Out + (q_start + offs_m)[:, None] * stride_o_tok + head * stride_o_head + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=m_valid[:, None] & d_valid[None, :],
    )


@triton.jit
def _decode_split_kernel(
    Q, K_pool, V_pool, PartialOut, PartialLse,
    kv_indptr, kv_indices,
    scale,
    stride_q_seq, stride_q_head,
    stride_k_slot, stride_k_head,
    stride_v_slot, stride_v_head,
    stride_po_seq, stride_po_head, stride_po_split,
    stride_pl_seq, stride_pl_head,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    kv_start = tl.load(kv_indptr + seq)
    seq_len = tl.load(kv_indptr + seq + 1) - kv_start
    split_len = tl.cdiv(seq_len, NUM_SPLITS)
    split_start = split * split_len
    split_end = tl.minimum(split_start + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_valid = offs_h < GROUP
    d_valid = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_h
    q = tl.load(
        Q + seq * stride_q_seq + heads[:, None] * stride_q_head + offs_d[None, :],
        mask=h_valid[:, None] & d_valid[None, :],
        other=0.0,
    ).to(tl.float32)

    row_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for n_start in range(split_start, split_end, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_valid = offs_n < split_end
        row_max, row_sum, acc = _attend_block(
            q, row_max, row_sum, acc,
            K_pool, V_pool, kv_indices, kv_start, offs_n, n_valid, n_valid[None, :], kv_head,
            stride_k_slot, stride_k_head, stride_v_slot, stride_v_head,
            offs_d, d_valid, scale, DOT_PRECISION,
        )

    if split_end > split_start:
        out = acc / row_sum[:, None]
        lse = row_max + tl.log(row_sum)
    else:  # an empty chunk (sequence shorter than NUM_SPLITS): weight 0 in the merge
        out = acc
        lse = tl.full([BLOCK_H], float("-inf"), tl.float32)
    tl.store(
        PartialOut + seq * stride_po_seq + heads[:, None] * stride_po_head + split * stride_po_split
        + offs_d[None, :],
        out,
        mask=h_valid[:, None] & d_valid[None, :],
    )
    tl.store(PartialLse + seq * stride_pl_seq + heads * stride_pl_head + split, lse, mask=h_valid)


@triton.jit
def _decode_merge_kernel(
    PartialOut, PartialLse, Out,
    stride_po_seq, stride_po_head, stride_po_split,
    stride_pl_seq, stride_pl_head,
    stride_o_seq, stride_o_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    lse = tl.load(PartialLse + seq * stride_pl_seq + head * stride_pl_head + offs_s)
    weights = tl.exp(lse - tl.max(lse, axis=0))  # empty chunks: exp(-inf) = 0
    partial = tl.load(
        PartialOut + seq * stride_po_seq + head * stride_po_head + offs_s[:, None] * stride_po_split
        + offs_d[None, :],
        mask=d_valid[None, :],
        other=0.0,
    )
    out = tl.sum(partial * weights[:, None], axis=0) / tl.sum(weights, axis=0)
    tl.store(Out + seq * stride_o_seq + head * stride_o_head + offs_d, out.to(Out.dtype.element_ty), mask=d_valid)


def dot_precision(kv_dtype: torch.dtype) -> str:
    """tf32 tensor cores for half-precision pools: Q·K loses nothing (bf16/
    fp16 inputs fit tf32), P·V rounds the fp32 weights P to tf32. fp32 pools
    (the parity reference) get full-precision dots."""
    return "ieee" if kv_dtype == torch.float32 else "tf32"


def extend_attention(
    q: torch.Tensor,  # [num_tokens, H, D]
    k_pool: torch.Tensor,  # [num_slots, H_kv, D]
    v_pool: torch.Tensor,
    out: torch.Tensor,  # [num_tokens, H, D]
    qo_indptr: torch.Tensor,  # [B + 1] int32
    kv_indptr: torch.Tensor,  # [B + 1] int32
    kv_indices: torch.Tensor,  # [kv_indptr[-1]] int64 pool slots
    prefix_lens: torch.Tensor,  # [B] int32
    max_new_tokens: int,
    scale: float,
) -> torch.Tensor:
    batch_size = qo_indptr.shape[0] - 1
    heads, head_dim = q.shape[1], q.shape[2]
    group = heads // k_pool.shape[1]
    block_m, block_n = 16, 32
    grid = (batch_size, heads, triton.cdiv(max_new_tokens, block_m))
    _extend_kernel[grid](
        q, k_pool, v_pool, out,
        qo_indptr, kv_indptr, kv_indices, prefix_lens,
        scale,
        q.stride(0), q.stride(1),
        k_pool.stride(0), k_pool.stride(1),
        v_pool.stride(0), v_pool.stride(1),
        out.stride(0), out.stride(1),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_PRECISION=dot_precision(k_pool.dtype),
    )
    return out


def decode_attention(
    q: torch.Tensor,  # [B, H, D]
    k_pool: torch.Tensor,  # [num_slots, H_kv, D]
    v_pool: torch.Tensor,
    out: torch.Tensor,  # [B, H, D]
    kv_indptr: torch.Tensor,  # [B + 1] int32
    kv_indices: torch.Tensor,  # pool slots
    partial_out: torch.Tensor,  # [>= B, H, num_splits, D] fp32 scratch
    partial_lse: torch.Tensor,  # [>= B, H, num_splits] fp32 scratch
    scale: float,
) -> torch.Tensor:
    batch_size, heads, head_dim = q.shape
    kv_heads = k_pool.shape[1]
    group = heads // kv_heads
    num_splits = partial_lse.shape[2]
    block_d = max(16, triton.next_power_of_2(head_dim))
    _decode_split_kernel[(batch_size, kv_heads, num_splits)](
        q, k_pool, v_pool, partial_out, partial_lse,
        kv_indptr, kv_indices,
        scale,
        q.stride(0), q.stride(1),
        k_pool.stride(0), k_pool.stride(1),
        v_pool.stride(0), v_pool.stride(1),
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
        partial_lse.stride(0), partial_lse.stride(1),
        GROUP=group,
        BLOCK_H=max(16, triton.next_power_of_2(group)),  # tl.dot wants >= 16 rows
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_N=32,
        NUM_SPLITS=num_splits,
        DOT_PRECISION=dot_precision(k_pool.dtype),
    )
    _decode_merge_kernel[(batch_size, heads)](
        partial_out, partial_lse, out,
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
        partial_lse.stride(0), partial_lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        NUM_SPLITS=num_splits,
    )
    return out
