"""Triton grouped GEMMs for a mixture-of-experts MLP (the CUDA path).

For tokens x [T, H] routed to K of E experts (topk_ids [T, K], topk_weights
[T, K]), the layer computes

    y[t] = sum_k w[t, k] * W2[e] (silu(W13[e, :I] x[t]) * W13[e, I:] x[t]),  e = ids[t, k]

with W13 [E, 2I, H] (gate rows, then up rows) and W2 [E, H, I]. An id of -1
means "an expert on another rank" (expert parallelism): that (t, k) adds
nothing here.

Why the kernels are shaped this way
-----------------------------------
Looping over experts in Python would launch 2E small GEMMs per layer, most of
them on a handful of rows at decode. Instead the T * K (token, choice) pairs,
called slots (slot s = t * K + k), are sorted by expert once, in torch
(`align_to_blocks_padded`), and each expert's group is padded to a multiple of
BLOCK_M with a sentinel slot (T * K). Every BLOCK_M run of the sorted slots
then belongs to exactly ONE expert (`block_experts[b]`), so one launch covers
all experts: a program takes one block of slots and one N tile, reads its
expert's weight tile, and computes an ordinary BLOCK_M x BLOCK_N tile of a
GEMM whose rows are gathered, not contiguous. The padding costs at most
BLOCK_M - 1 wasted rows per active expert, which is why BLOCK_M follows the
number of slots per expert (below). Sentinel slots are masked on load (their
rows read as zeros) and on store; -1 slots are in no group at all.

The same kernel (`_grouped_gemm_kernel`) runs twice:
1. A = hidden, row of slot s = s // K (a token's row is read once per choice:
   no [T * K, H] copy of x is made), B = W13[e]: writes C1 [T * K, 2I] in
   hidden's dtype, fp32 accumulation;
2. SiLU-and-mul in torch, F.silu(gate) * up, the same formula and roundings
   as the dense layers' SiluAndMul. It is one elementwise pass over
   [T * K, 2I] (a few MB), small next to either GEMM: decode is bound by
   streaming expert weights, prefill by the dots. Fusing it into kernel 1's
   epilogue (two accumulators per tile, gate columns n and up columns I + n)
   would save that pass and a launch; it is the next step if a profile shows
   the pass, not worth a second kernel variant before.
3. A = the activations [T * K, I], row of slot s = s, B = W2[e]: each row is
   multiplied by its routing weight (fp32, before rounding) and written to
   C3 [T * K, H]; torch then sums the K rows of each token in fp32 and casts
   once. Fixed-order sums, so deterministic (no atomics), at the cost of the
   [T * K, H] buffer. Rows of -1 slots are never written: C3 starts zeroed
   when any exist.

Tiles (see `_config`), for H100/H200, chosen by the average number of slots
per expert, m = ceil(T * K / E) (what a block of rows actually holds):
- decode (m <= 16): BLOCK_M = 16 (tl.dot's minimum), BLOCK_N = 64,
  BLOCK_K = 128, 4 warps, 4 stages: each program is a weight-streaming GEMV
  over one expert's tile, and every active expert's weights are read once;
- m <= 32 / <= 64: BLOCK_M = 32 / 64, same N and K tiles, 3 stages;
- prefill (m > 64): 128 x 128 x 64, 8 warps, 3 stages, with grouped tile
  order (GROUP_M consecutive blocks, i.e. mostly one expert, walk the N tiles
  together) so programs running at once share weight tiles in L2. fp32
  inputs (the parity reference) use 64 x 64 x 32 with full fp32 ("ieee") dots.
N and K need not be multiples of the tiles: K is masked (zeros add nothing),
N rows of B are wrapped and the stores masked.

No host syncs (CUDA-graph capturable): the real number of padded slots P
is device data, so nothing is sized by it. `align_to_blocks_padded` (the
forward's sort) returns buffers for the worst case over all routings of T * K
slots to E experts, `launch_blocks(T, K, E, BLOCK_M)` blocks (derived there:
min(E, T * K) + (T * K - min(E, T * K)) // BLOCK_M, at most the usual
ceil((T * K + E (BLOCK_M - 1)) / BLOCK_M)), and both kernels are launched for
all of them; blocks past the real end have expert -1 and their programs
return at once. The tile config depends on T, K and E only. The sort uses no
op that sizes its output from device data (no bincount, nonzero, boolean
indexing, repeat_interleave without output_size, .item()/.tolist()): a stable
sort, index_add_ counts, cumsums, a scatter into one spare row for skipped
slots, and a searchsorted for the blocks' experts. Two costs of that: C3 is
always zeroed (whether any slot is skipped is device data; a memset of
[T * K, H], small next to either GEMM), and ids >= E cannot be refused
without reading them: for CUDA tensors they are treated like -1 (so never an
out-of-bounds weight read) unless RADIXSERVE_MOE_CHECK_IDS=1, a debug flag
that checks them with one sync (not while capturing); CPU tensors are always
checked. `align_to_blocks` is the exact form (P as a host int, one sync), for
tests and inspection.

Under Triton's CPU interpreter (TRITON_INTERPRET=1, how the tests run without
a GPU) bf16 dots are wrong, so for CPU tensors bf16 tiles are cast to fp32
right after their load and the dot runs in fp32: the products of bf16 values
are exact in fp32 either way, so the only difference from the GPU's bf16 dot
is summation order. fp16 dots work in the interpreter and run in fp16 there.

Offsets into every tensor are formed in int64 (index times stride).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
GROUP_M = 8  # grouped tile order for prefill (L2 reuse of expert weight tiles)
# Debug: refuse ids >= num_experts for CUDA tensors too (one host sync per call;
# skipped while capturing a CUDA graph). CPU tensors are always checked.
CHECK_IDS_ON_DEVICE = os.environ.get("RADIXSERVE_MOE_CHECK_IDS", "0") not in ("", "0")


@triton.jit
def _grouped_gemm_kernel(
    A, B, C, SortedSlots, BlockExperts, RouteWeights,
    N, K,
    num_slots, a_row_div,
    stride_am, stride_ak,
    stride_be, stride_bn, stride_bk,
    stride_cm, stride_cn,
    MUL_ROUTE_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """C[s, n] = (w[s] *) sum_k A[s // a_row_div, k] * B[e, n, k] for the slots s
    of one block (expert e); sentinel slots (>= num_slots) are skipped, and so
    are whole blocks with e = -1 (padding past the real end)."""
    pid = tl.program_id(0)
    num_pid_m = tl.num_programs(0) // tl.cdiv(N, BLOCK_N)  # = number of slot blocks
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_m = (pid // pids_per_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_group) % group_m
    pid_n = (pid % pids_per_group) // group_m

    expert = tl.load(BlockExperts + pid_m).to(tl.int64)
    if expert < 0:  # a block past the real end (the grid is sized for the worst case)
        return
    slots = tl.load(SortedSlots + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    slot_ok = slots < num_slots

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_n = (offs_n % N).to(tl.int64)  # wrapped: their columns are masked at the store
    a_rows = A + (slots // a_row_div).to(tl.int64)[:, None] * stride_am  # [BLOCK_M, 1]
    b_cols = B + expert * stride_be + rows_n[None, :] * stride_bn  # [1, BLOCK_N]: B[e] read as [K, N]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(a_rows + offs_k[None, :] * stride_ak, mask=slot_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_cols + offs_k[:, None] * stride_bk, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)

    if MUL_ROUTE_WEIGHT:
        w = tl.load(RouteWeights + slots, mask=slot_ok, other=0.0)
        acc = acc * w[:, None]
    c_ptrs = C + slots.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=slot_ok[:, None] & (offs_n < N)[None, :])


def launch_blocks(num_tokens: int, top_k: int, num_experts: int, block_m: int) -> int:
    """The most blocks of block_m slots that T * K slots over E experts can
    need: the launch size of `align_to_blocks_padded` and of the kernels. A
    pure function of its (host) arguments, so the same for every routing.

    n non-empty experts holding b_e blocks need at least sum (b_e - 1) * block_m + 1
    = (B - n) * block_m + n slots for B = sum b_e blocks, so B <= n + (S - n) // block_m
    for S = T * K slots, largest at n = min(E, S). This is floor((S + n (block_m - 1)) / block_m),
    i.e. never more than the usual ceil((S + E (block_m - 1)) / block_m), and tight:
    n experts with one slot each, the rest in full blocks of one expert, reach it."""
    if num_tokens < 0 or top_k < 0 or num_experts <= 0 or block_m <= 0:
        raise ValueError(f"bad sizes: T={num_tokens}, K={top_k}, E={num_experts}, block_m={block_m}")
    num_slots = num_tokens * top_k
    n = min(num_experts, num_slots)
    return n + (num_slots - n) // block_m


def _ids_out_of_range(flat: torch.Tensor, num_experts: int) -> int | None:
    """The largest id if one is >= num_experts, else None. Reads device data:
    for CPU tensors always (no device to sync with), for others (CUDA) only with
    RADIXSERVE_MOE_CHECK_IDS=1 and never while a CUDA graph is being captured."""
    if flat.numel() == 0:
        return None
    if flat.device.type != "cpu" and not (CHECK_IDS_ON_DEVICE and not torch.cuda.is_current_stream_capturing()):
        return None
    max_id = int(flat.max())
    return max_id if max_id >= num_experts else None


def align_to_blocks_padded(topk_ids: torch.Tensor, num_experts: int,
                           block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`align_to_blocks` without reading any device value on the host (CUDA-graph
    capturable): returns (sorted_slots int32 [NB * block_m], block_experts int32 [NB])
    for NB = launch_blocks(T, K, num_experts, block_m). The first P // block_m blocks
    are exactly `align_to_blocks`' output; every block after them has expert -1
    and only sentinel slots (T * K).

    Ids >= num_experts are NOT refused here (that needs the host to read them):
    they are treated like -1 (in no block, so never an out-of-bounds weight read).
    `triton_fused_experts` refuses them for CPU tensors, and for CUDA tensors only
    when RADIXSERVE_MOE_CHECK_IDS=1 (a debug flag: it syncs)."""
    _check_align_args(topk_ids, num_experts, block_m)
    t, k = topk_ids.shape
    num_slots = t * k
    num_blocks = launch_blocks(t, k, num_experts, block_m)
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    # Skipped slots (-1, and out-of-range ids) sort after every expert (key
    # num_experts); stable, so slots keep their t * K + k order inside a group.
    key = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    order = torch.sort(key, stable=True).indices
    # index_add_, not bincount: bincount on CUDA syncs to size its output.
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device).index_add_(0, key, torch.ones_like(key))
    padded = (counts + block_m - 1) // block_m * block_m
    padded[num_experts] = 0  # the skipped group gets no rows
    end_padded = torch.cumsum(padded, 0)
    start_padded = end_padded - padded  # exclusive prefix sums
    start_sorted = torch.cumsum(counts, 0) - counts

    # The i-th slot in sorted order (expert e) goes to start_padded[e] + (i - start_sorted[e]);
    # skipped ones to one spare row past the end, cut off below (no boolean
    # indexing: that would size its output from device data).
    experts = key[order]
    dest = start_padded[experts] + torch.arange(num_slots, device=device) - start_sorted[experts]
    dest = torch.where(experts < num_experts, dest, num_blocks * block_m)
    sorted_slots = torch.full((num_blocks * block_m + 1,), num_slots, dtype=torch.int32, device=device)
    sorted_slots = sorted_slots.scatter_(0, dest, order.to(torch.int32))[: num_blocks * block_m]
    # Block b starts at row b * block_m: its expert is the number of experts whose
    # padded group ends at or before that row (empty groups end where they start);
    # num_experts means past the real end, reported as -1.
    block_start = torch.arange(num_blocks, dtype=torch.int64, device=device) * block_m
    block_experts = torch.searchsorted(end_padded[:num_experts], block_start, right=True)
    block_experts = torch.where(block_experts < num_experts, block_experts, -1).to(torch.int32)
    return sorted_slots, block_experts


def _check_align_args(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [T, K], got shape {list(topk_ids.shape)}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise TypeError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    if num_experts <= 0 or block_m <= 0:
        raise ValueError(f"num_experts ({num_experts}) and block_m ({block_m}) must be positive")


def align_to_blocks(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """topk_ids [T, K] int (values in [0, num_experts) or -1 = routed to an expert not on this rank: contributes nothing).
    Returns (sorted_slots int32 [P], block_experts int32 [P // block_m], P): the flat slot indices t*K+k grouped by expert,
    each expert's group padded to a multiple of block_m with the sentinel T*K; block_experts[b] is the expert of block b.
    Experts with no tokens get no block. Pure torch, vectorized: no Python loop over tokens or experts.

    The exact form, for tests and inspection: it reads P (and checks that no id is >= num_experts)
    on the host, one sync. The forward pass uses `align_to_blocks_padded`, which does neither."""
    sorted_slots, block_experts = align_to_blocks_padded(topk_ids, num_experts, block_m)
    flat = topk_ids.reshape(-1).to(torch.int64)
    max_id = flat.max() if flat.numel() else flat.new_tensor(-1)
    stats = torch.stack([max_id, (block_experts >= 0).sum()])
    max_id, real_blocks = stats.tolist()
    if max_id >= num_experts:
        raise ValueError(f"topk_ids holds expert {max_id}, but num_experts is {num_experts}")
    return sorted_slots[: real_blocks * block_m], block_experts[:real_blocks], real_blocks * block_m


def _config(m: int, dot_fp32: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by the slots per expert m: see the module docstring."""
    if dot_fp32 and m > 64:
        return 64, 64, 32, 4, 3
    if m <= 16:
        return 16, 64, 128, 4, 4
    if m <= 32:
        return 32, 64, 128, 4, 3
    if m <= 64:
        return 64, 64, 128, 4, 3
    return 128, 128, 64, 8, 3


def _launch(a, b, c, sorted_slots, block_experts, route_weights, num_slots, a_row_div, mul_route_weight, cfg, dot_dtype):
    block_m, block_n, block_k, num_warps, num_stages = cfg
    n, k = b.shape[1], b.shape[2]
    dot_fp32 = dot_dtype == torch.float32
    grid = (block_experts.numel() * triton.cdiv(n, block_n),)
    _grouped_gemm_kernel[grid](
        a, b, c, sorted_slots, block_experts, route_weights,
        n, k,
        num_slots, a_row_div,
        a.stride(0), a.stride(1),
        b.stride(0), b.stride(1), b.stride(2),
        c.stride(0), c.stride(1),
        MUL_ROUTE_WEIGHT=mul_route_weight,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=GROUP_M,
        DOT_DTYPE=_TL_DTYPES[dot_dtype],
        DOT_PRECISION="ieee" if dot_fp32 else "tf32",  # "tf32" is ignored for half operands
        num_warps=num_warps,
        num_stages=num_stages,
    )


def triton_fused_experts(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                         topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """hidden [T, H]; w13 [E, 2I, H] (per expert: gate rows [0, I) then up rows [I, 2I));
    w2 [E, H, I]; topk_weights [T, K] float32; topk_ids [T, K] int (-1 = skip).
    Returns [T, H] in hidden.dtype: sum_k topk_weights[t,k] * (w2[e] @ (silu(w13[e,:I] @ x) * (w13[e,I:] @ x))), e = topk_ids[t,k]."""
    if hidden.dtype not in _TL_DTYPES:
        raise TypeError(f"hidden must be bf16, fp16 or fp32, got {hidden.dtype}")
    if hidden.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(
            f"want hidden [T, H], w13 [E, 2I, H], w2 [E, H, I]; got {list(hidden.shape)}, "
            f"{list(w13.shape)}, {list(w2.shape)}"
        )
    t, h = hidden.shape
    e, two_i, h13 = w13.shape
    i = two_i // 2
    if two_i % 2 or h13 != h or tuple(w2.shape) != (e, h, i):
        raise ValueError(
            f"for hidden [T, {h}], w13 must be [E, 2I, {h}] and w2 [E, {h}, I]; got "
            f"{list(w13.shape)} and {list(w2.shape)}"
        )
    if w13.dtype != hidden.dtype or w2.dtype != hidden.dtype:
        raise TypeError(f"w13 ({w13.dtype}) and w2 ({w2.dtype}) must have hidden's dtype {hidden.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(
            f"topk_ids and topk_weights must both be [{t}, K]; got {list(topk_ids.shape)} and "
            f"{list(topk_weights.shape)}"
        )
    if topk_weights.dtype != torch.float32:
        raise TypeError(f"topk_weights must be fp32, got {topk_weights.dtype}")
    for name, x in (("w13", w13), ("w2", w2), ("topk_weights", topk_weights), ("topk_ids", topk_ids)):
        if x.device != hidden.device:
            raise ValueError(f"all tensors must be on {hidden.device}, {name} is on {x.device}")

    top_k = topk_ids.shape[1]
    num_slots = t * top_k
    if num_slots == 0:
        return hidden.new_zeros(t, h)

    # bf16 dots are wrong in Triton's CPU interpreter: there, dot in fp32 (same exact products).
    dot_dtype = torch.float32 if (hidden.dtype == torch.bfloat16 and not hidden.is_cuda) else hidden.dtype
    bad = _ids_out_of_range(topk_ids.reshape(-1), e)
    if bad is not None:
        raise ValueError(f"topk_ids holds expert {bad}, but num_experts is {e}")
    # Everything below is sized from shapes only: no device value reaches the host.
    cfg = _config(triton.cdiv(num_slots, e), dot_dtype == torch.float32)
    sorted_slots, block_experts = align_to_blocks_padded(topk_ids, e, cfg[0])
    route_weights = topk_weights.reshape(-1).contiguous()

    # Rows of skipped (-1) slots are written by neither kernel; C1 and the
    # activations keep garbage there, which kernel 2 never reads, but C3 is
    # summed, so it starts zeroed (whether any slot is skipped is device data).
    c1 = torch.empty(num_slots, two_i, dtype=hidden.dtype, device=hidden.device)
    c3 = torch.zeros(num_slots, h, dtype=hidden.dtype, device=hidden.device)
    if block_experts.numel():
        _launch(hidden, w13, c1, sorted_slots, block_experts, route_weights, num_slots, top_k, False, cfg, dot_dtype)
        act = F.silu(c1[:, :i]) * c1[:, i:]
        _launch(act, w2, c3, sorted_slots, block_experts, route_weights, num_slots, 1, True, cfg, dot_dtype)
    return c3.view(t, top_k, h).sum(dim=1, dtype=torch.float32).to(hidden.dtype)
