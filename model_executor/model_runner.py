"""ModelRunner: load the model, size and create the KV memory, run a step.

One per TP rank. It owns the model, the request-to-token table, the token
slot allocator, the KV pool and the attention backend; the scheduler (or a
test) owns which slots belong to which sequence.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from layers.activation import SiluAndMul
from layers.attention.registry import backend_spec, create_attention_backend
from layers.cpu_features import cpu_report, log_cpu_isa
from layers.cpu_gemm import cpu_pack_supported
from layers.linear import TPContext
from layers.logits_processor import LogitsProcessorOutput
from layers.quantization import CpuPackOptions, QuantizationConfig
from layers.quantization.online import quantize_lm_head
from layers.quantization.registry import resolve_quantization
from layers.sampler import Sampler
from mem_cache.allocator import TokenToKVPoolAllocator
from mem_cache.memory_pool import KVPool, ReqToTokenPool
from model_executor.cpu_decoder_stack import build_cpu_decoder_stack
from model_executor.distributed import TPGroup
from model_executor.forward_batch import ForwardBatch
from model_executor.model_config import ModelConfig, ModelRunnerConfig
from model_executor.model_loader import load_model, weight_memory
from sampling.row_state import SamplingRows

logger = logging.getLogger(__name__)


def available_memory_bytes(device: torch.device) -> int:
    """Memory the KV cache may grow into, before applying mem_fraction_static."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo; pass --max-total-tokens")


class ModelRunner:
    def __init__(self, config: ModelRunnerConfig, tp_group: TPGroup | None = None) -> None:
        """`tp_group`: this rank's TP group when tp_size > 1 (see distributed.py)."""
        if config.tp_size > 1 and tp_group is None:
            raise ValueError(f"tp_size {config.tp_size} needs a TP group (model_executor.distributed)")
        # An unknown backend name fails here, before minutes of loading, not after.
        backend_spec(config.attention_backend)
        self.config = config
        self.tp_group = tp_group
        self.device = torch.device(config.device)
        torch.manual_seed(config.random_seed)
        self.model_config = ModelConfig.from_pretrained(
            config.model_path, config.dtype, config.context_length, config.device,
            trust_remote_code=config.trust_remote_code,
        )
        self.dtype = self.model_config.dtype
        # What the CPU runs (its level and each kernel's variant): logged
        # once, reported in /server_info.
        self.cpu_info = cpu_report() if self.device.type == "cpu" else None
        if self.cpu_info is not None and config.tp_rank == 0:
            log_cpu_isa()
        self.tp = tp_group.tp_context(config.ep_size) if tp_group is not None else TPContext(ep_size=config.ep_size)
        quant_config = self._quant_config(config)
        self.model = load_model(self.model_config, self.device, self.tp, config.load_format, config.random_seed,
                                quant_config, config.fallback_weight_paths)
        if config.quantize_lm_head is not None:
            head = getattr(self.model, "lm_head", None)
            if head is None:
                raise ValueError(f"--quantize-lm-head: {type(self.model).__name__} has no LM head")
            quantize_lm_head(head, config.quantize_lm_head, quant_config.cpu_pack)
        weight_bytes, dense_bytes = weight_memory(self.model)
        self.quantization_info = {**quant_config.describe(), "weight_bytes": weight_bytes}
        if config.quantize_lm_head is not None:
            self.quantization_info["lm_head"] = config.quantize_lm_head
        if config.tp_rank == 0:
            logger.info("weights: %.1f MiB per rank (%.1f MiB dense in %s; quantization: %s)",
                        weight_bytes / 2**20, dense_bytes / 2**20, self.dtype, quant_config.name)
        self.sampler = Sampler()

        self.num_kv_heads = max(1, self.model_config.num_kv_heads // self.tp.size)
        self.max_total_num_tokens = self._kv_capacity()
        self.req_to_token_pool = ReqToTokenPool(
            config.max_running_requests, self.model_config.context_len, self.device
        )
        # The running requests' sampling state, addressed by their req_to_token row.
        self.sampling_rows = SamplingRows(self.req_to_token_pool.size, self.model_config.vocab_size, self.device)
        self.token_to_kv_pool_allocator = TokenToKVPoolAllocator(
            self.max_total_num_tokens, config.page_size, self.device
        )
        self.kv_pool = KVPool(
            self.token_to_kv_pool_allocator.num_slots,
            self.model_config.num_layers,
            self.num_kv_heads,
            self.model_config.head_dim,
            self.dtype,
            self.device,
        )
        self.kv_pool.zero_padding(config.page_size)
        self.attn_backend = create_attention_backend(
            config.attention_backend, self.device, self.dtype,
            flashinfer_workspace_mb=config.flashinfer_workspace_mb,
        )
        if not config.cpu_fused_ops:
            self._use_unfused_ops()
        elif config.cpu_native_stack and self.device.type == "cpu" and hasattr(self.model, "model"):
            self.model.model.native_stack = build_cpu_decoder_stack(self.model, self.kv_pool, self.attn_backend)
        self.cuda_graph_runner = None
        if self.device.type == "cuda" and not config.disable_cuda_graph:
            if config.tp_size > 1:
                # ServerArgs turns graphs off for TP (runtime.device_defaults.cuda_graph_off_reason:
                # NCCL collectives in a captured graph are untested); configs built
                # without it (benchmarks) get the same rule here.
                if config.tp_rank == 0:
                    logger.warning("CUDA graphs disabled with tp_size %d: decode runs eagerly", config.tp_size)
            elif self.attn_backend.supports_cuda_graph:
                from model_executor.cuda_graph_runner import CudaGraphRunner

                self.cuda_graph_runner = CudaGraphRunner(self, config.cuda_graph_max_bs,
                                                         verify_rows=config.verify_graph_rows)
            else:
                logger.info("the %s backend has no CUDA-graph support: decode runs eagerly", config.attention_backend)
        logger.info(
            "KV cache: %d tokens (%.1f MiB), page size %d, dtype %s",
            self.max_total_num_tokens,
            self.kv_pool.mem_bytes() / 2**20,
            config.page_size,
            self.dtype,
        )

    def _quant_config(self, config: ModelRunnerConfig) -> QuantizationConfig:
        """The checkpoint's quantization or --quantization (layers/quantization/
        registry.py); on CPU bf16 every dense linear packs its weight for the
        CPU kernels (layers/cpu_gemm.py)."""
        pack = None
        if config.cpu_weight_prepack and cpu_pack_supported(self.device, self.dtype):
            pack = CpuPackOptions(min(config.max_running_requests, 16), config.cpu_small_batch_gemv,
                                  config.cpu_streaming_rows)
        return resolve_quantization(self.model_config.quantization_config, config.quantization, pack)

    def _use_unfused_ops(self) -> None:
        """The torch ops instead of the fused native CPU kernels (an A/B switch)."""
        self.attn_backend.accepts_stored_kv = False  # no fused rope + KV store
        for module in self.model.modules():
            if isinstance(module, SiluAndMul):
                module.use_native = False

    def _kv_capacity(self) -> int:
        """Token capacity: --max-total-tokens, else what free memory allows."""
        page = self.config.page_size
        if self.config.max_total_tokens is not None:
            tokens = self.config.max_total_tokens
        else:
            per_token = KVPool.kv_bytes_per_token(
                self.model_config.num_layers,
                self.num_kv_heads,
                self.model_config.head_dim,
                self.dtype,
            )
            budget = available_memory_bytes(self.device)
            if self.device.type == "cuda":
                total = torch.cuda.get_device_properties(self.device).total_memory
                budget -= int(total * (1 - self.config.mem_fraction_static))
            else:
                budget = int(budget * self.config.mem_fraction_static)
                # Host memory is shared with everything else; no point in
                # holding more than every request slot at full context.
                budget = min(
                    budget,
                    per_token * self.config.max_running_requests * self.model_config.context_len,
                )
            tokens = budget // per_token
        if self.tp_group is not None:
            # Every rank runs the same schedule, so all must fit the same
            # number of tokens: the smallest rank decides.
            tokens = self.tp_group.min_int(tokens)
        tokens = tokens // page * page
        if tokens < page:
            raise RuntimeError(
                f"not enough memory for the KV cache (capacity {tokens} tokens); "
                "raise the memory fraction, lower the context length or the number of "
                "running requests, or set the KV capacity explicitly (max_total_tokens)"
            )
        return tokens

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> LogitsProcessorOutput:
        batch.req_to_token_pool = self.req_to_token_pool
        batch.kv_pool = self.kv_pool
        batch.attn_backend = self.attn_backend
        if self.cuda_graph_runner is not None and self.cuda_graph_runner.can_run(batch):
            out = self.cuda_graph_runner.replay(batch)
        else:
            self.attn_backend.init_forward_metadata(batch)
            out = self.model(batch)
        if self.expert_load is not None:
            self.expert_load.end_step()
        return out

    @property
    def expert_load(self):
        """The MoE model's per-expert routing counts (layers/moe/load_stats.py), else None."""
        return getattr(self.model, "expert_load", None)

    @torch.inference_mode()
    def sample(self, logits: LogitsProcessorOutput, batch: ForwardBatch) -> torch.Tensor:
        """Next token id per sequence ([B] int64), honouring each one's sampling params."""
        if batch.sampling_plan is not None:
            info = self.sampling_rows.sample_inputs(batch.sampling_plan)
        elif batch.sampling_info is not None:
            info = batch.sampling_info
        else:
            return torch.argmax(logits.next_token_logits, dim=-1)
        return self.sampler(logits.next_token_logits, info)

    @torch.inference_mode()
    def sample_guess_positions(self, verify_logits: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """The token each drafted row's request samples at each guess position
        ([sum(draft_lens)] int64, batch order), as a plain decode step at that
        output position would: greedy rows take the argmax, sampled rows draw
        with their parameters and, if seeded, the seed of that position."""
        plan = batch.sampling_plan
        if plan is None or plan.draft_lens is None or plan.flags.is_all_greedy:
            return verify_logits.argmax(dim=-1)
        draft_lens = plan.draft_lens
        rows = torch.repeat_interleave(plan.rows, torch.tensor(draft_lens, dtype=torch.int64))
        output_lens = [n - d + j for n, d in zip(plan.output_lens, draft_lens) for j in range(d)]
        seeds = [seed for seed, d in zip(plan.seeds, draft_lens) for _ in range(d)]
        # Rows with penalties or logits processors never draft (managers/drafts.py).
        flags = dataclasses.replace(plan.flags, frequency=False, presence=False, repetition=False)
        info = self.sampling_rows.batch_info(rows.to(self.device), flags, seeds, output_lens)
        return self.sampler(verify_logits, info)

    @torch.inference_mode()
    def record_sampled(self, batch: ForwardBatch, token_ids: torch.Tensor) -> None:
        """Count the step's kept tokens into the rows' penalty state (the ids
        every TP rank agreed on), on the device, before the next batch samples."""
        if batch.sampling_plan is not None:
            self.sampling_rows.record_plan(batch.sampling_plan, token_ids)
