"""Decode steps replayed from captured CUDA graphs.

A decode step launches hundreds of small kernels; at small batch sizes the
CPU cannot launch them as fast as the GPU runs them. At start-up we capture
one graph per batch size in `capture_batch_sizes` (1, 2, 4, 8, then steps
of 8 up to `--cuda-graph-max-bs`); each step's batch is padded to the next
captured size, its inputs copied into the graph's static buffers, and the
graph replayed.

Padding rows decode a dummy token into slot 0 (the allocator keeps page 0
for exactly this) with a one-token context; their logits are dropped.

The attention backend takes part through three hooks (see
`AttentionBackend`): static metadata buffers sized once, metadata pointing
at them during capture, and refilling them before each replay.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from layers.logits_processor import LogitsProcessorOutput
from model_executor.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)

PADDING_SLOT = 0  # page 0 is never handed out (mem_cache/allocator.py)


def capture_batch_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, ... up to and including `max_bs`."""
    sizes = [bs for bs in (1, 2, 4, 8) if bs <= max_bs]
    sizes += list(range(16, max_bs + 1, 8))
    if sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


def padded_batch_size(batch_size: int, sizes: list[int]) -> int | None:
    """The smallest captured size that fits `batch_size` (None: too big)."""
    i = bisect.bisect_left(sizes, batch_size)
    return sizes[i] if i < len(sizes) else None


class CudaGraphRunner:
    def __init__(self, model_runner: ModelRunner, max_bs: int, capture: bool = True) -> None:
        """`capture=False` skips the graphs and "replays" by running the model
        eagerly on the static buffers: everything but the capture itself
        (padding, static inputs, the backend's replay metadata) then runs on
        CPU, which is how CI tests it."""
        self.runner = model_runner
        self.capture = capture
        self.device = model_runner.device
        self.batch_sizes = capture_batch_sizes(min(max_bs, model_runner.config.max_running_requests))
        self.max_bs = self.batch_sizes[-1]
        self.replays: dict[int, Callable[[], torch.Tensor]] = {}  # by padded batch size
        # Static inputs: each graph reads its first `bs` entries.
        long = dict(dtype=torch.int64, device=self.device)
        self.input_ids = torch.zeros(self.max_bs, **long)
        self.positions = torch.zeros(self.max_bs, **long)
        self.out_cache_loc = torch.full((self.max_bs,), PADDING_SLOT, **long)
        self.req_pool_indices = torch.zeros(self.max_bs, **long)
        self.seq_lens = torch.ones(self.max_bs, **long)
        self.extend_lens = torch.ones(self.max_bs, **long)
        self.prefix_lens = torch.zeros(self.max_bs, **long)
        model_runner.attn_backend.init_cuda_graph_state(
            self.max_bs,
            # Not the pool size: sequences sharing a cached prefix list its
            # slots once each, so the batch's total context can exceed the pool.
            self.max_bs * model_runner.model_config.context_len,
            model_runner.model.config.num_attention_heads // model_runner.tp.size,
            model_runner.model_config.head_dim,
        )
        self._capture_all()

    def _static_batch(self, bs: int, seq_lens_cpu: list[int], req_pool_indices_cpu: list[int]) -> ForwardBatch:
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE,
            batch_size=bs,
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            out_cache_loc=self.out_cache_loc[:bs],
            req_pool_indices=self.req_pool_indices[:bs],
            seq_lens=self.seq_lens[:bs],
            extend_prefix_lens=self.prefix_lens[:bs],
            extend_seq_lens=self.extend_lens[:bs],
            req_pool_indices_cpu=req_pool_indices_cpu,
            seq_lens_cpu=seq_lens_cpu,
            extend_prefix_lens_cpu=[s - 1 for s in seq_lens_cpu],
            extend_seq_lens_cpu=[1] * bs,
            req_to_token_pool=self.runner.req_to_token_pool,
            kv_pool=self.runner.kv_pool,
            attn_backend=self.runner.attn_backend,
        )

    def _capture_all(self) -> None:
        if not self.capture:
            for bs in self.batch_sizes:
                batch = self._static_batch(bs, [1] * bs, [0] * bs)
                self.replays[bs] = lambda batch=batch: self.runner.model(batch).next_token_logits
            return
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        pool = None
        # Largest first: later, smaller graphs reuse its memory pool.
        for bs in reversed(self.batch_sizes):
            batch = self._static_batch(bs, [1] * bs, [0] * bs)
            self.runner.attn_backend.init_forward_metadata_capture_cuda_graph(batch)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(2):  # warm-up: lazy inits and autotuning stay out of the graph
                    self.runner.model(batch)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph, pool=pool, stream=stream):
                logits = self.runner.model(batch).next_token_logits
            pool = graph.pool()

            def replay(graph: torch.cuda.CUDAGraph = graph, logits: torch.Tensor = logits) -> torch.Tensor:
                graph.replay()
                return logits

            self.replays[bs] = replay
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        logger.info(
            "captured CUDA graphs for decode batch sizes %s in %.1f s, using %.0f MiB",
            self.batch_sizes, time.perf_counter() - start, used / 2**20,
        )

    def can_run(self, batch: ForwardBatch) -> bool:
        return batch.forward_mode.is_decode() and batch.batch_size <= self.max_bs and not batch.return_all_logits

    def replay(self, batch: ForwardBatch) -> LogitsProcessorOutput:
        bs = batch.batch_size
        padded = padded_batch_size(bs, self.batch_sizes)
        assert padded is not None
        self.input_ids[:bs].copy_(batch.input_ids, non_blocking=True)
        self.positions[:bs].copy_(batch.positions, non_blocking=True)
        self.out_cache_loc[:bs].copy_(batch.out_cache_loc, non_blocking=True)
        self.req_pool_indices[:bs].copy_(batch.req_pool_indices, non_blocking=True)
        self.seq_lens[:bs].copy_(batch.seq_lens, non_blocking=True)
        if padded > bs:
            self.input_ids[bs:padded].zero_()
            self.positions[bs:padded].zero_()
            self.out_cache_loc[bs:padded].fill_(PADDING_SLOT)
            self.req_pool_indices[bs:padded].copy_(batch.req_pool_indices[:1].expand(padded - bs))
            self.seq_lens[bs:padded].fill_(1)
        padded_batch = self._static_batch(
            padded,
            batch.seq_lens_cpu + [1] * (padded - bs),
            batch.req_pool_indices_cpu + [batch.req_pool_indices_cpu[0]] * (padded - bs),
        )
        self.runner.attn_backend.init_forward_metadata_replay_cuda_graph(padded_batch)
        return LogitsProcessorOutput(self.replays[padded]()[:bs])
