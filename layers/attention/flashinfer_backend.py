"""Attention backend on FlashInfer's batch wrappers (CUDA only).

Three wrappers share one workspace buffer:
- ragged prefill, for extend batches where no sequence has a cached prefix:
  the new tokens attend to their own K/V straight from the projection, no
  pool read;
- paged prefill, for extends over a cached prefix (and MIXED batches): after
  the new K/V are written to the pool, each sequence's queries attend
  causally over its whole run of slots (FlashInfer aligns causal masking to
  the end of the KV, which is exactly "prefix + own position");
- paged decode.

The pool is viewed as pages of one slot ([num_slots, 1, H_kv, D], "NHD"),
so the page table is the flat slot list of `kv_indices.py` and any
allocator page size works. Each step plans once (on its first layer, when
head counts and dtypes are known) and every layer reuses the plan.

`plan()` schedules on the host: it reads the indptr arrays there, so they
are built on the host from the batch's host lengths. Given device tensors
it would copy them back, a blocking device-to-host copy every step that
stalls the overlap scheduler. Only `kv_indices` stays on the device.

`flashinfer` is imported only when this backend is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from layers.attention.base import AttentionBackend
from layers.attention.kv_indices import build_kv_indices, host_indptr

if TYPE_CHECKING:
    from layers.radix_attention import RadixAttention
    from model_executor.forward_batch import ForwardBatch

# Size of the float workspace, which holds the split-KV partial outputs of
# FA2 plans (flashinfer's scheduler.cuh, "batch_prefill_tmp_v" / "_tmp_s";
# fa3 plans on Hopper use none). Outside CUDA graphs that is at most
# group * 2 * num_SMs * 128 * (head_dim + 1) * 4 bytes (cta_tile_q <= 128),
# whatever the batch, and the same under TP (query and KV heads shrink
# together). At head_dim 128 and 132 SMs (H100/H200) that is 16.6 MiB per
# query head of a KV group: 133 MiB for the group-8 models we serve
# (Llama-3-70B, Qwen2-72B, Qwen3-32B), more than the 128 MiB of flashinfer's
# examples, and 149 MiB at 148 SMs (B200). 256 MiB covers groups up to 15 at
# 132 SMs. SGLang's 512 MiB for Qwen2/Qwen3 (its PR #2879) was an empirical
# fix for Qwen2-7B (group 7) crashes; past the bound, flashinfer's error says
# "Increase the workspace buffer size": --flashinfer-workspace-mb does.
DEFAULT_WORKSPACE_MB = 256


def import_flashinfer(device: torch.device) -> Any:
    """The flashinfer module, or a ValueError saying what is missing."""
    if device.type != "cuda":
        raise ValueError(
            f"the flashinfer attention backend needs a CUDA device (got {device.type}); "
            "use --attention-backend torch_native on CPU"
        )
    try:
        import flashinfer
    except ImportError as err:
        raise ValueError(
            "the flashinfer attention backend needs the flashinfer package: "
            "pip install 'radixserve[gpu]' (flashinfer-python), or use --attention-backend triton"
        ) from err
    return flashinfer


@dataclass
class FlashInferMetadata:
    kv_indptr: torch.Tensor  # [B + 1] int32, host
    kv_indices: torch.Tensor  # [sum(seq_lens)] int32 slots (pages of one slot), device
    last_page_len: torch.Tensor  # [B] int32, all ones, host
    qo_indptr: torch.Tensor | None  # [B + 1] int32, host; extend only
    ragged: bool  # extend with no cached prefix anywhere
    planned: bool = False


class FlashInferAttnBackend(AttentionBackend):
    def __init__(
        self, device: torch.device, dtype: torch.dtype, workspace_mb: int = DEFAULT_WORKSPACE_MB
    ) -> None:
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"the flashinfer attention backend runs fp16/bf16 models only (got {dtype}); "
                "use --attention-backend triton or torch_native, or --dtype bfloat16"
            )
        self.flashinfer = import_flashinfer(device)
        self.device = device
        if workspace_mb < 1:
            raise ValueError(f"the flashinfer workspace must be >= 1 MiB, got {workspace_mb}")
        # Zeroed: the wrappers' docstrings require it "for its first use"
        # since flashinfer #1463 (trtllm-gen kernels expect zeroed state
        # there); fa2/fa3 do not care, and one memset at start-up is free.
        self.workspace = torch.zeros(workspace_mb << 20, dtype=torch.uint8, device=device)
        self.prefill_ragged = self.flashinfer.BatchPrefillWithRaggedKVCacheWrapper(self.workspace, "NHD")
        self.prefill_paged = self.flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.decode_wrappers: dict[bool, Any] = {}  # by use_tensor_cores
        self.metadata: FlashInferMetadata | None = None

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        assert batch.req_to_token_pool is not None
        _, kv_indices = build_kv_indices(
            batch.req_to_token_pool.req_to_token, batch.req_pool_indices, batch.seq_lens, sum(batch.seq_lens_cpu)
        )
        # Pinned, so plan()'s own host-to-device copies of these are asynchronous.
        pin = self.device.type == "cuda"
        qo_indptr = None
        if not batch.forward_mode.is_decode():
            qo_indptr = host_indptr(batch.extend_seq_lens_cpu, pin)
        self.metadata = FlashInferMetadata(
            kv_indptr=host_indptr(batch.seq_lens_cpu, pin),
            kv_indices=kv_indices.to(torch.int32),
            last_page_len=torch.ones(batch.batch_size, dtype=torch.int32, pin_memory=pin),
            qo_indptr=qo_indptr,
            ragged=qo_indptr is not None and not any(batch.extend_prefix_lens_cpu),
        )

    def _decode_wrapper(self, group: int) -> Any:
        # Tensor-core decode pays off once several query heads share a KV head.
        use_tensor_cores = group >= 4
        if use_tensor_cores not in self.decode_wrappers:
            self.decode_wrappers[use_tensor_cores] = self.flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_tensor_cores=use_tensor_cores
            )
        return self.decode_wrappers[use_tensor_cores]

    def _plan(self, layer: RadixAttention, q_dtype: torch.dtype, kv_dtype: torch.dtype, decode: bool) -> None:
        meta = self.metadata
        assert meta is not None
        if meta.planned:
            return
        heads = dict(num_qo_heads=layer.num_heads, num_kv_heads=layer.num_kv_heads)
        dtypes = dict(q_data_type=q_dtype, kv_data_type=kv_dtype, sm_scale=layer.scaling)
        if decode:
            self._decode_wrapper(layer.num_heads // layer.num_kv_heads).plan(
                meta.kv_indptr, meta.kv_indices, meta.last_page_len, **heads,
                head_dim=layer.head_dim, page_size=1, **dtypes,
            )
        elif meta.ragged:
            # Without a prefix, each sequence's KV is exactly its new tokens.
            self.prefill_ragged.plan(meta.qo_indptr, meta.qo_indptr, **heads, head_dim_qk=layer.head_dim,
                                     causal=True, **dtypes)
        else:
            self.prefill_paged.plan(meta.qo_indptr, meta.kv_indptr, meta.kv_indices, meta.last_page_len,
                                    **heads, head_dim_qk=layer.head_dim, page_size=1, causal=True, **dtypes)
        meta.planned = True

    def _pool_pages(self, layer: RadixAttention, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        assert batch.kv_pool is not None
        k_pool, v_pool = batch.kv_pool.get_kv_buffer(layer.layer_id)
        shape = (-1, 1, layer.num_kv_heads, layer.head_dim)
        return k_pool.view(shape), v_pool.view(shape)

    def _write_kv(self, k, v, layer, batch, save: bool) -> tuple[torch.Tensor, torch.Tensor]:
        assert batch.kv_pool is not None
        k = k.view(-1, layer.num_kv_heads, layer.head_dim)
        v = v.view(-1, layer.num_kv_heads, layer.head_dim)
        if save:
            batch.kv_pool.set_kv_buffer(layer.layer_id, batch.out_cache_loc, k, v)
        return k, v

    def forward_extend(self, q, k, v, layer, batch, save_kv_cache=True):
        meta = self.metadata
        assert meta is not None
        k3, v3 = self._write_kv(k, v, layer, batch, save_kv_cache)
        k_pages, _ = self._pool_pages(layer, batch)
        self._plan(layer, q.dtype, k_pages.dtype, decode=False)
        q3 = q.view(-1, layer.num_heads, layer.head_dim)
        if meta.ragged:
            out = self.prefill_ragged.run(q3, k3.to(k_pages.dtype), v3.to(k_pages.dtype))
        else:
            out = self.prefill_paged.run(q3, self._pool_pages(layer, batch))
        return out.reshape(-1, layer.num_heads * layer.head_dim)

    def forward_decode(self, q, k, v, layer, batch, save_kv_cache=True):
        self._write_kv(k, v, layer, batch, save_kv_cache)
        pages = self._pool_pages(layer, batch)
        self._plan(layer, q.dtype, pages[0].dtype, decode=True)
        wrapper = self._decode_wrapper(layer.num_heads // layer.num_kv_heads)
        out = wrapper.run(q.view(-1, layer.num_heads, layer.head_dim), pages)
        return out.reshape(-1, layer.num_heads * layer.head_dim)
