"""Decode and verify steps replayed from captured CUDA graphs.

A decode step launches hundreds of small kernels; at small batch sizes the
CPU cannot launch them as fast as the GPU runs them. At start-up we capture
graphs of fixed shape, pad each step's batch to the next captured one, copy
its inputs into the graphs' static buffers and replay. Two families share
those buffers:

- decode: one new token per sequence, for batch sizes 1, 2, 4, 8, then steps
  of 8 up to `--cuda-graph-max-bs`;
- verify (speculative decoding; `verify_rows` = --speculative-num-draft-tokens):
  each sequence feeds its last token and up to `verify_rows - 1` guesses.
  Sequences guess different amounts (adapted per request, managers/drafts.py)
  while a graph's shape is fixed, so each sequence's rows are padded to
  `verify_rows`. Padding rows come after a sequence's real ones, so causal
  attention keeps them out of the real rows' view. The graph computes logits
  at every row and the replay picks the rows verification reads. Captured
  up to `VERIFY_GRAPH_MAX_BS` sequences: speculation pays at small batches,
  and the logits of every row of every graph stay allocated.

Padding rows write their KV into slot 0 (the allocator keeps page 0 for
exactly this); padding sequences have a one-token context; their outputs are
dropped. Every graph also hands back the final hidden states (an EAGLE head
drafts from the target's; the head returns its own), and the model's
`spec_hidden` input gets a static buffer when the model takes one (an EAGLE
head: `takes_spec_hidden`).

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
from model_executor.forward_batch import ForwardBatch, ForwardMode, ints_to_device

if TYPE_CHECKING:
    from model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)

PADDING_SLOT = 0  # page 0 is never handed out (mem_cache/allocator.py)
# Verify graphs hold logits for batch * verify_rows rows each (about 4 MiB per
# row at a 128k vocabulary): beyond this many sequences verification runs eagerly.
VERIFY_GRAPH_MAX_BS = 32


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


def is_verify_shaped(batch: ForwardBatch) -> bool:
    """Every sequence decodes its last token plus its guesses (what
    `ScheduleBatch.prepare_for_decode` builds with drafts)."""
    drafts = batch.draft_lens_cpu
    return (drafts is not None and min(batch.extend_prefix_lens_cpu) > 0
            and all(n == 1 + d for n, d in zip(batch.extend_seq_lens_cpu, drafts)))


class CudaGraphRunner:
    def __init__(self, model_runner: ModelRunner, max_bs: int, capture: bool = True, verify_rows: int = 0) -> None:
        """`capture=False` skips the graphs and "replays" by running the model
        eagerly on the static buffers: everything but the capture itself
        (padding, static inputs, the backend's replay metadata) then runs on
        CPU, which is how CI tests it. `verify_rows` > 1 adds verify graphs."""
        self.runner = model_runner
        self.capture = capture
        self.device = model_runner.device
        self.batch_sizes = capture_batch_sizes(min(max_bs, model_runner.config.max_running_requests))
        self.max_bs = self.batch_sizes[-1]
        self.verify_rows = verify_rows if verify_rows > 1 else 0
        self.verify_batch_sizes = capture_batch_sizes(min(self.max_bs, VERIFY_GRAPH_MAX_BS)) if self.verify_rows else []
        # By (rows per sequence, padded batch size): run the graph, return its static output.
        self.replays: dict[tuple[int, int], Callable[[], LogitsProcessorOutput]] = {}
        max_rows = max(self.max_bs, self.verify_rows * (self.verify_batch_sizes or [0])[-1])
        # Static inputs: each graph reads the first entries of each.
        long = dict(dtype=torch.int64, device=self.device)
        self.input_ids = torch.zeros(max_rows, **long)
        self.positions = torch.zeros(max_rows, **long)
        self.out_cache_loc = torch.full((max_rows,), PADDING_SLOT, **long)
        self.req_pool_indices = torch.zeros(self.max_bs, **long)
        self.seq_lens = torch.ones(self.max_bs, **long)
        self.prefix_lens = torch.zeros(self.max_bs, **long)
        self.extend_lens = {rows: torch.full((self.max_bs,), rows, **long) for rows in {1, self.verify_rows or 1}}
        self.spec_hidden = None
        if getattr(model_runner.model, "takes_spec_hidden", False):
            hidden_size = model_runner.model.config.hidden_size
            self.spec_hidden = torch.zeros(max_rows, hidden_size, dtype=model_runner.dtype, device=self.device)
        model_runner.attn_backend.init_cuda_graph_state(
            self.max_bs,
            # Not the pool size: sequences sharing a cached prefix list its
            # slots once each, so the batch's total context can exceed the pool.
            self.max_bs * model_runner.model_config.context_len,
            model_runner.model.config.num_attention_heads // model_runner.tp.size,
            model_runner.model_config.head_dim,
        )
        self._capture_all()

    def _static_batch(self, rows: int, bs: int, seq_lens_cpu: list[int], prefix_lens_cpu: list[int],
                      req_pool_indices_cpu: list[int]) -> ForwardBatch:
        n = rows * bs
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE if rows == 1 else ForwardMode.EXTEND,
            batch_size=bs,
            input_ids=self.input_ids[:n],
            positions=self.positions[:n],
            out_cache_loc=self.out_cache_loc[:n],
            req_pool_indices=self.req_pool_indices[:bs],
            seq_lens=self.seq_lens[:bs],
            extend_prefix_lens=self.prefix_lens[:bs],
            extend_seq_lens=self.extend_lens[rows][:bs],
            req_pool_indices_cpu=req_pool_indices_cpu,
            seq_lens_cpu=seq_lens_cpu,
            extend_prefix_lens_cpu=prefix_lens_cpu,
            extend_seq_lens_cpu=[rows] * bs,
            # Verify graphs compute every row's logits; the replay picks rows.
            return_all_logits=rows > 1,
            capture_hidden=True,
            spec_hidden=None if self.spec_hidden is None else self.spec_hidden[:n],
            req_to_token_pool=self.runner.req_to_token_pool,
            kv_pool=self.runner.kv_pool,
            attn_backend=self.runner.attn_backend,
        )

    def _capture_batch(self, rows: int, bs: int) -> ForwardBatch:
        """Sequences of `rows` new tokens on no prefix, all in request row 0."""
        self.seq_lens[:bs].fill_(rows)
        self.prefix_lens[:bs].zero_()
        self.req_pool_indices[:bs].zero_()
        return self._static_batch(rows, bs, [rows] * bs, [0] * bs, [0] * bs)

    def _shapes(self) -> list[tuple[int, int]]:
        """(rows per sequence, batch size), largest first: later, smaller graphs reuse its memory pool."""
        shapes = [(1, bs) for bs in self.batch_sizes] + [(self.verify_rows, bs) for bs in self.verify_batch_sizes]
        return sorted(shapes, key=lambda shape: shape[0] * shape[1], reverse=True)

    def _capture_all(self) -> None:
        if not self.capture:
            for rows, bs in self._shapes():
                batch = self._capture_batch(rows, bs)
                self.replays[rows, bs] = lambda batch=batch: self.runner.model(batch)
            return
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        pool = None
        for rows, bs in self._shapes():
            batch = self._capture_batch(rows, bs)
            self.runner.attn_backend.init_forward_metadata_capture_cuda_graph(batch)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(2):  # warm-up: lazy inits and autotuning stay out of the graph
                    self.runner.model(batch)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph, pool=pool, stream=stream):
                out = self.runner.model(batch)
            pool = graph.pool()

            def replay(graph: torch.cuda.CUDAGraph = graph, out: LogitsProcessorOutput = out) -> LogitsProcessorOutput:
                graph.replay()
                return out

            self.replays[rows, bs] = replay
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        logger.info(
            "captured CUDA graphs for decode batch sizes %s and verify batch sizes %s (%d rows each) "
            "in %.1f s, using %.0f MiB", self.batch_sizes, self.verify_batch_sizes, self.verify_rows,
            time.perf_counter() - start, used / 2**20,
        )

    def can_run(self, batch: ForwardBatch) -> bool:
        if batch.return_all_logits or (batch.spec_hidden is None) != (self.spec_hidden is None):
            return False
        if batch.forward_mode.is_decode():
            return batch.batch_size <= self.max_bs
        return (bool(self.verify_rows) and batch.batch_size <= self.verify_batch_sizes[-1]
                and is_verify_shaped(batch) and max(batch.extend_seq_lens_cpu) <= self.verify_rows)

    def replay(self, batch: ForwardBatch) -> LogitsProcessorOutput:
        rows = 1 if batch.forward_mode.is_decode() else self.verify_rows
        bs = batch.batch_size
        padded = padded_batch_size(bs, self.batch_sizes if rows == 1 else self.verify_batch_sizes)
        assert padded is not None
        # Where each new token goes among the graph's rows (None: in order, decode).
        dest = None
        if rows > 1:
            dest = ints_to_device([i * rows + j for i, n in enumerate(batch.extend_seq_lens_cpu) for j in range(n)],
                                  self.device)
        span = padded * rows
        _place(self.input_ids, batch.input_ids, dest, span, 0)
        _place(self.positions, batch.positions, dest, span, 0)
        _place(self.out_cache_loc, batch.out_cache_loc, dest, span, PADDING_SLOT)
        if self.spec_hidden is not None:
            assert batch.spec_hidden is not None
            _place(self.spec_hidden, batch.spec_hidden, dest, span, 0)
        self.req_pool_indices[:bs].copy_(batch.req_pool_indices, non_blocking=True)
        self.seq_lens[:bs].copy_(batch.seq_lens, non_blocking=True)
        self.prefix_lens[:bs].copy_(batch.extend_prefix_lens, non_blocking=True)
        pad = padded - bs
        if pad:
            self.req_pool_indices[bs:padded].copy_(batch.req_pool_indices[:1].expand(pad))
            self.seq_lens[bs:padded].fill_(1)
            self.prefix_lens[bs:padded].zero_()
        padded_batch = self._static_batch(
            rows, padded,
            batch.seq_lens_cpu + [1] * pad,
            batch.extend_prefix_lens_cpu + [0] * pad,
            batch.req_pool_indices_cpu + [batch.req_pool_indices_cpu[0]] * pad,
        )
        self.runner.attn_backend.init_forward_metadata_replay_cuda_graph(padded_batch)
        out = self.replays[rows, padded]()
        # Copies, not views: the next replay overwrites the static outputs,
        # and with overlap the hidden states are read after it launches.
        hidden = out.hidden_states
        if not batch.capture_hidden and self.spec_hidden is None:
            hidden = None  # nobody reads them (an EAGLE head always returns its own)
        if rows == 1:
            return LogitsProcessorOutput(out.next_token_logits[:bs],
                                         hidden_states=None if hidden is None else hidden[:bs].clone())
        assert batch.draft_lens_cpu is not None and out.all_logits is not None
        # What LogitsProcessor picks eagerly (draft_positions), at each sequence's rows here:
        # its last real row, then every guess's row but the last.
        last = [i * rows + n - 1 for i, n in enumerate(batch.extend_seq_lens_cpu)]
        earlier = [i * rows + j for i, n in enumerate(batch.extend_seq_lens_cpu) for j in range(n - 1)]
        logits = out.all_logits[ints_to_device(last + earlier, self.device)]
        return LogitsProcessorOutput(logits[:bs], verify_logits=logits[bs:],
                                     hidden_states=None if hidden is None else hidden[dest])


def _place(static: torch.Tensor, values: torch.Tensor, dest: torch.Tensor | None, span: int, fill: int) -> None:
    """Put a step's per-token `values` into the graph's first `span` rows of
    `static`: in order (dest None), or at rows `dest`; other rows get `fill`."""
    if dest is None:
        n = values.shape[0]
        static[:n].copy_(values, non_blocking=True)
        static[n:span].fill_(fill)
    else:
        static[:span].fill_(fill)
        static.index_copy_(0, dest, values.to(static.dtype))
