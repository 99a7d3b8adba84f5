"""The Triton mixture-of-experts path (layers/moe/triton_moe.py): the slot
sort (`align_to_blocks`) against hand-worked and brute-force expectations, its
sync-free worst-case form (`align_to_blocks_padded`, sized by `launch_blocks`
from shapes alone), and `triton_fused_experts` against a torch reference that
loops over experts in fp32; with CUDA, also captured in a CUDA graph.

Without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1,
set before the kernel module is imported); with CUDA, on the GPU.

Tolerances, as |y - ref| <= RTOL * |ref| + ATOL * max|ref| (ref in fp32):
- fp32: RTOL 0, ATOL 1e-5: everything stays fp32, only summation orders
  differ (seen: under 1e-6);
- bf16: RTOL 2^-6, ATOL 2^-6. Unlike a single GEMM, the layer rounds to
  bf16 between its steps, as the GPU path does: the gate/up outputs,
  silu(gate) and its product with up (torch), each weighted expert output,
  and the result. On the GPU each rounding is to nearest (2^-9 relative on
  average, unbiased; a torch emulation of those roundings is within 2^-7.3
  of max|ref| here). The interpreter's fp32 -> bf16 store truncates toward
  zero instead (up to 2^-7, 2^-8.5 on average, always shrinking), and the
  three truncating stores on a path compound into a relative error of each
  output element: hence the RTOL term at 2^-6 rather than one ulp. Seen
  under the interpreter: 2^-6.1 of max|ref| at worst, 0.54 of the bound;
- fp16: RTOL 2^-10, ATOL 2^-9, the same argument at fp16's precision (seen:
  0.43 of the bound).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import layers.moe.triton_moe as triton_moe  # noqa: E402
from layers.moe.triton_moe import (  # noqa: E402
    align_to_blocks,
    align_to_blocks_padded,
    launch_blocks,
    triton_fused_experts,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = {torch.float32: 0.0, torch.bfloat16: 2.0**-6, torch.float16: 2.0**-10}
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9}  # times max|ref|


# --------------------------------------------------------------------------- align_to_blocks


def _check_alignment(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Checks align_to_blocks' output against what it must be, slot by slot."""
    sorted_slots, block_experts, p = align_to_blocks(topk_ids.to(DEVICE), num_experts, block_m)
    sorted_slots, block_experts = sorted_slots.cpu(), block_experts.cpu()
    t, k = topk_ids.shape
    sentinel = t * k
    flat = topk_ids.reshape(-1).tolist()
    assert sorted_slots.dtype == torch.int32 and block_experts.dtype == torch.int32
    assert isinstance(p, int) and p % block_m == 0
    assert sorted_slots.shape == (p,) and block_experts.shape == (p // block_m,)
    # Walk the blocks: each expert's blocks are consecutive and appear once.
    seen_experts = []
    for b, e in enumerate(block_experts.tolist()):
        if not seen_experts or seen_experts[-1] != e:
            assert e not in seen_experts, f"expert {e}'s blocks are not contiguous"
            seen_experts.append(e)
        for s in sorted_slots[b * block_m : (b + 1) * block_m].tolist():
            assert s == sentinel or flat[s] == e, f"slot {s} (expert {flat[s]}) in a block of expert {e}"
    # Each expert's group: exactly its slots, then sentinels up to a block multiple.
    want_experts = sorted({e for e in flat if e >= 0})
    assert sorted(seen_experts) == want_experts  # no block for an expert without tokens
    for e in want_experts:
        rows = [b for b, be in enumerate(block_experts.tolist()) if be == e]
        group = sorted_slots[rows[0] * block_m : (rows[-1] + 1) * block_m].tolist()
        slots = [s for s, fe in enumerate(flat) if fe == e]
        assert sorted(s for s in group if s != sentinel) == slots
        assert len(rows) == -(-len(slots) // block_m)  # padded to the next multiple, no more
    # -1 slots appear nowhere.
    skipped = {s for s, fe in enumerate(flat) if fe < 0}
    assert not skipped & set(sorted_slots.tolist())


def test_align_hand_cases():
    # T = 3, K = 2: slots 0..5, sentinel 6; expert 1 and 3 get nothing, slot 3 is skipped.
    ids = torch.tensor([[2, 0], [0, -1], [2, 0]])
    sorted_slots, block_experts, p = align_to_blocks(ids.to(DEVICE), 4, 2)
    assert p == 6
    assert block_experts.tolist() == [0, 0, 2]
    assert sorted_slots.tolist() == [1, 2, 5, 6, 0, 4]
    sorted_slots, block_experts, p = align_to_blocks(ids.to(DEVICE), 4, 4)
    assert (p, block_experts.tolist(), sorted_slots.tolist()) == (8, [0, 2], [1, 2, 5, 6, 0, 4, 6, 6])
    # block_m = 1: no padding at all.
    sorted_slots, block_experts, p = align_to_blocks(ids.to(DEVICE), 4, 1)
    assert (p, block_experts.tolist(), sorted_slots.tolist()) == (5, [0, 0, 0, 2, 2], [1, 2, 5, 0, 4])
    # Every slot skipped, and no tokens: nothing to do.
    for none in (torch.full((2, 2), -1), torch.zeros(0, 2, dtype=torch.int64)):
        sorted_slots, block_experts, p = align_to_blocks(none.to(DEVICE), 4, 16)
        assert p == 0 and sorted_slots.numel() == 0 and block_experts.numel() == 0
    with pytest.raises(ValueError, match="expert 4"):
        align_to_blocks(torch.tensor([[4]], device=DEVICE), 4, 16)


@pytest.mark.parametrize("seed", range(4))
def test_align_random(seed):
    gen = torch.Generator().manual_seed(seed)
    t = int(torch.randint(1, 40, (1,), generator=gen))
    k = int(torch.randint(1, 4, (1,), generator=gen))
    e = int(torch.randint(2, 12, (1,), generator=gen))
    ids = torch.randint(-1, e, (t, k), generator=gen, dtype=torch.int32)
    ids[ids == e // 2] = -1  # at least one expert certainly empty
    for block_m in (1, 4, 16):
        _check_alignment(ids, e, block_m)


def test_launch_blocks_is_a_function_of_shapes_only():
    """The launch size comes from (T, K, E, block_m) alone: the same buffers
    for every routing, never fewer blocks than a routing needs, never more than
    the textbook bound, and reached by some routing (so it is tight)."""
    assert launch_blocks(1, 2, 8, 16) == 2  # decode: one block per choice, no padding blocks
    assert launch_blocks(0, 2, 8, 16) == 0
    assert launch_blocks(64, 8, 64, 16) == 64 + (512 - 64) // 16
    for t, k, e, block_m in [(1, 1, 4, 16), (3, 2, 8, 4), (17, 2, 4, 16), (40, 3, 5, 4), (9, 2, 3, 1)]:
        s = t * k
        nb = launch_blocks(t, k, e, block_m)
        assert nb <= -(-(s + e * (block_m - 1)) // block_m)
        # A worst case: min(E, S) experts with one slot each, the rest on expert 0.
        n = min(e, s)
        worst = torch.cat([torch.arange(n), torch.zeros(s - n, dtype=torch.int64)]).view(t, k)
        routings = [worst, torch.full((t, k), -1), torch.zeros(t, k, dtype=torch.int64),
                    torch.randint(-1, e, (t, k), generator=torch.Generator().manual_seed(s))]
        for ids in routings:
            sorted_slots, block_experts = align_to_blocks_padded(ids.to(DEVICE), e, block_m)
            assert sorted_slots.shape == (nb * block_m,) and block_experts.shape == (nb,)
            _, exact, _ = align_to_blocks(ids.to(DEVICE), e, block_m)
            assert exact.numel() <= nb
        assert align_to_blocks(worst.to(DEVICE), e, block_m)[1].numel() == nb
    # Meta tensors hold no data: the sort runs on them only if it never reads a value on the host.
    sorted_slots, block_experts = align_to_blocks_padded(torch.zeros(5, 2, dtype=torch.int64, device="meta"), 8, 4)
    nb = launch_blocks(5, 2, 8, 4)
    assert sorted_slots.shape == (nb * 4,) and block_experts.shape == (nb,)


@pytest.mark.parametrize("seed", range(3))
def test_align_padded_extends_the_exact_sort(seed):
    """align_to_blocks_padded = align_to_blocks, then blocks of expert -1 holding only sentinels."""
    gen = torch.Generator().manual_seed(100 + seed)
    t = int(torch.randint(1, 30, (1,), generator=gen))
    k = int(torch.randint(1, 4, (1,), generator=gen))
    e = int(torch.randint(2, 12, (1,), generator=gen))
    ids = torch.randint(-1, e, (t, k), generator=gen).to(DEVICE)
    for block_m in (1, 4, 16):
        sorted_slots, block_experts = align_to_blocks_padded(ids, e, block_m)
        exact_slots, exact_experts, p = align_to_blocks(ids, e, block_m)
        nb = p // block_m
        assert torch.equal(sorted_slots[:p], exact_slots) and torch.equal(block_experts[:nb], exact_experts)
        assert (block_experts[nb:] == -1).all() and (sorted_slots[p:] == t * k).all()


def test_align_padded_ids_out_of_range_are_skipped():
    """Without a host read they cannot be refused: they land in no block (no
    out-of-bounds weight read); align_to_blocks, which syncs anyway, refuses them."""
    ids = torch.tensor([[0, 4], [7, 1]], device=DEVICE)
    sorted_slots, block_experts = align_to_blocks_padded(ids, 4, 2)
    assert block_experts.tolist() == [0, 1, -1, -1] and sorted_slots.tolist() == [0, 4, 3, 4, 4, 4, 4, 4]
    with pytest.raises(ValueError, match="expert 7"):
        align_to_blocks(ids, 4, 2)


# --------------------------------------------------------------------------- fused experts


def _reference(hidden, w13, w2, topk_weights, topk_ids):
    """Loop over experts, all in fp32; -1 ids add nothing."""
    x, w13, w2 = hidden.float(), w13.float(), w2.float()
    i = w13.shape[1] // 2
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        tok, choice = (topk_ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x[tok]
        act = F.silu(xe @ w13[e, :i].T) * (xe @ w13[e, i:].T)
        out.index_add_(0, tok, (act @ w2[e].T) * topk_weights[tok, choice, None])
    return out


def _routing(t, e, k, gen, skip_frac=0.2, empty=(1,)):
    """Distinct experts per token, never the `empty` ones; about skip_frac of
    the choices replaced by -1."""
    scores = torch.rand(t, e, generator=gen)
    scores[:, list(empty)] = -1.0
    weights, ids = scores.topk(k, dim=1)
    weights = torch.softmax(weights * 4, dim=1)
    ids = torch.where(torch.rand(t, k, generator=gen) < skip_frac, -1, ids)
    return weights.float(), ids


def _case(t, e, k, h, i, dtype, seed=0, **routing):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=gen).to(dtype)
    w13 = (torch.randn(e, 2 * i, h, generator=gen) * h**-0.5).to(dtype)
    w2 = (torch.randn(e, h, i, generator=gen) * i**-0.5).to(dtype)
    weights, ids = _routing(t, e, k, gen, **routing)
    ref = _reference(hidden, w13, w2, weights, ids)
    y = triton_fused_experts(*(a.to(DEVICE) for a in (hidden, w13, w2, weights, ids)))
    return y.cpu(), ref


def _check(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    bound = RTOL[dtype] * ref.abs() + ATOL[dtype] * ref.abs().max()
    excess = ((y.float() - ref).abs() - bound).max().item()
    assert excess <= 0, f"max error exceeds the bound by {excess}"


# (T, E, K, H, I): decode and small prefill, E 4 / 8, K 1 / 2, H and I powers
# of two or not (48, 40: partial K and N tiles in both GEMMs).
SHAPES = [
    (1, 4, 1, 64, 32),
    (1, 8, 2, 48, 40),
    (3, 8, 2, 64, 32),
    (17, 4, 2, 48, 40),
    (17, 8, 1, 64, 32),
    (64, 4, 2, 64, 32),
    (64, 8, 2, 48, 40),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-E{}-K{}-H{}-I{}".format(*s))
def test_fused_experts_matches_reference(shape, dtype):
    y, ref = _case(*shape, dtype)
    _check(y, ref, dtype)


def test_fused_experts_fp16_and_prefill_tiles():
    """fp16 (native fp16 dots, also in the interpreter), and enough slots per
    expert (m = 80 > 64) for the prefill tile: 128 x 128 for half, 64 x 64
    for fp32; no skipped slots, so the output buffer is not pre-zeroed."""
    for dtype in (torch.float16, torch.float32):
        y, ref = _case(80, 4, 2, 48, 40, dtype, seed=1, skip_frac=0.0, empty=())
        _check(y, ref, dtype)
    y, ref = _case(5, 4, 2, 64, 32, torch.float16, seed=2)
    _check(y, ref, torch.float16)


def test_fused_experts_all_skipped_and_empty():
    y, ref = _case(3, 4, 2, 64, 32, torch.float32, skip_frac=1.0)
    assert torch.equal(y, torch.zeros(3, 64)) and torch.equal(ref, torch.zeros(3, 64))
    y, _ = _case(0, 4, 2, 48, 40, torch.bfloat16)
    assert y.shape == (0, 48) and y.dtype == torch.bfloat16


def test_fused_experts_bad_arguments_are_refused():
    h, w13, w2 = torch.zeros(2, 64), torch.zeros(4, 64, 64), torch.zeros(4, 64, 32)
    w, ids = torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="w2"):
        triton_fused_experts(h, w13, w2[:, :, :16], w, ids)
    with pytest.raises(TypeError, match="hidden's dtype"):
        triton_fused_experts(h, w13.half(), w2, w, ids)
    with pytest.raises(TypeError, match="fp32"):
        triton_fused_experts(h, w13, w2, w.half(), ids)
    with pytest.raises(ValueError, match="expert 4"):
        triton_fused_experts(h, w13, w2, w, ids + 4)


def test_fused_experts_many_padding_blocks():
    """Routings that fill few of the launched blocks: the blocks past the real
    end (expert -1) must do nothing, and the result match the reference."""
    gen = torch.Generator().manual_seed(7)
    t, e, k, h, i = 4, 8, 2, 48, 40
    hidden = torch.randn(t, h, generator=gen)
    w13 = torch.randn(e, 2 * i, h, generator=gen) * h**-0.5
    w2 = torch.randn(e, h, i, generator=gen) * i**-0.5
    weights = torch.rand(t, k, generator=gen)
    block_m = 16  # the decode tile at m = ceil(8 / 8) = 1
    assert launch_blocks(t, k, e, block_m) == 8
    for ids in (torch.tensor([[3, 5]] * t),                  # 2 real blocks of 8
                torch.tensor([[6, -1], [-1, -1], [-1, 2], [-1, -1]]),
                torch.tensor([[1, -1]] + [[-1, -1]] * (t - 1))):
        _, block_experts = align_to_blocks_padded(ids, e, block_m)
        assert (block_experts < 0).sum() >= 6
        ref = _reference(hidden, w13, w2, weights, ids)
        y = triton_fused_experts(*(a.to(DEVICE) for a in (hidden, w13, w2, weights, ids))).cpu()
        _check(y, ref, torch.float32)
    # T = 1, K = 2 (decode): 2 blocks launched; one skipped choice leaves one of them padding.
    y, ref = _case(1, 8, 2, 48, 40, torch.bfloat16, seed=3, skip_frac=0.5)
    _check(y, ref, torch.bfloat16)


def test_padding_blocks_exit_before_touching_memory():
    """A block of expert -1 must return early even with real slots in it: here
    every slot is real, so without the early exit the kernel would read expert
    -1's weights and overwrite C."""
    block_m, n, kk = 16, 64, 32
    a = torch.randn(block_m, kk, device=DEVICE)
    b = torch.randn(2, n, kk, device=DEVICE)
    c = torch.full((block_m, n), 123.0, device=DEVICE)
    slots = torch.arange(block_m, dtype=torch.int32, device=DEVICE)
    cfg = (block_m, 64, 32, 4, 1)
    triton_moe._launch(a, b, c, slots, torch.tensor([-1], dtype=torch.int32, device=DEVICE),
                       torch.ones(block_m, device=DEVICE), block_m, 1, False, cfg, torch.float32)
    assert (c == 123.0).all()
    triton_moe._launch(a, b, c, slots, torch.tensor([1], dtype=torch.int32, device=DEVICE),
                       torch.ones(block_m, device=DEVICE), block_m, 1, False, cfg, torch.float32)
    torch.testing.assert_close(c, a @ b[1].T, rtol=1e-5, atol=1e-5)


def test_fused_experts_reads_no_device_value(monkeypatch):
    """The whole host side of the forward on meta tensors (which hold no data,
    so any .item(), nonzero, boolean mask or data-sized op would fail), with the
    kernel launches stubbed out: the launch grids come from shapes alone."""
    grids = []
    monkeypatch.setattr(triton_moe, "_launch", lambda a, b, c, slots, block_experts, *rest: grids.append(
        (slots.numel(), block_experts.numel())))
    t, e, k, h, i = 3, 8, 2, 64, 32
    meta = dict(device="meta")
    y = triton_fused_experts(torch.empty(t, h, **meta), torch.empty(e, 2 * i, h, **meta), torch.empty(e, h, i, **meta),
                             torch.empty(t, k, **meta), torch.empty(t, k, dtype=torch.int64, **meta))
    assert y.shape == (t, h) and y.device.type == "meta"
    nb = launch_blocks(t, k, e, 16)
    assert grids == [(nb * 16, nb)] * 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_fused_experts_cuda_graph_capture_and_replay():
    """Captured once in a CUDA graph (which refuses host syncs), replayed with
    other tokens, weights and routings (including skipped slots and all on
    one expert) copied into the static inputs."""
    t, e, k, h, i = 8, 8, 2, 128, 64
    gen = torch.Generator().manual_seed(11)
    w13 = (torch.randn(e, 2 * i, h, generator=gen) * h**-0.5).to(torch.bfloat16).cuda()
    w2 = (torch.randn(e, h, i, generator=gen) * i**-0.5).to(torch.bfloat16).cuda()

    def inputs(seed, **routing):
        g = torch.Generator().manual_seed(seed)
        weights, ids = _routing(t, e, k, g, **routing)
        return torch.randn(t, h, generator=g).to(torch.bfloat16), weights, ids

    static = [x.cuda() for x in inputs(0)]
    torch.cuda.set_sync_debug_mode("error")  # any sync in the eager call raises
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: compiles the kernels outside the graph
            triton_fused_experts(static[0], w13, w2, static[1], static[2])
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = triton_fused_experts(static[0], w13, w2, static[1], static[2])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    all_on_one = inputs(3)
    all_on_one = (all_on_one[0], all_on_one[1], torch.full((t, k), 5))
    for new in (inputs(1), inputs(2, skip_frac=0.6, empty=(0, 1, 2)), all_on_one, inputs(4, skip_frac=1.0)):
        for dst, src in zip(static, new):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        ref = _reference(new[0], w13.cpu(), w2.cpu(), new[1], new[2])
        _check(out.cpu(), ref, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_path_equals_the_torch_path_of_the_moe_layer(dtype):
    """The layer's CPU grouped path (layers/moe/method.py) and the Triton
    kernel on the same FusedMoE weights and routing, including -1 slots
    (experts on another rank) and idle experts."""
    from layers.linear import TPContext
    from layers.moe.layer import FusedMoE
    from layers.moe.method import GroupedExperts
    from layers.moe.router import select_experts

    gen = torch.Generator().manual_seed(3)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        layer = FusedMoE(num_experts=8, top_k=2, hidden=64, intermediate=48, renormalize=True, tp=TPContext())
    finally:
        torch.set_default_dtype(previous)
    layer.w13_weight.data.copy_(torch.randn(layer.w13_weight.shape, generator=gen) / 8)
    layer.w2_weight.data.copy_(torch.randn(layer.w2_weight.shape, generator=gen) / 7)
    hidden = torch.randn(13, 64, generator=gen).to(dtype)
    weights, ids = select_experts(torch.randn(13, 8, generator=gen), 2, True)
    ids = torch.where(ids >= 6, -1, ids)  # experts 6 and 7 "on another rank"
    torch_path = GroupedExperts().apply(layer, hidden, weights, ids)
    triton_path = triton_fused_experts(hidden.to(DEVICE), layer.w13_weight.to(DEVICE), layer.w2_weight.to(DEVICE),
                                       weights.to(DEVICE), ids.to(DEVICE)).cpu()
    _check(triton_path, torch_path.float(), dtype)
