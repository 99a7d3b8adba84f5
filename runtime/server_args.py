"""All server settings in one dataclass, turned into CLI flags generically
(runtime/dataclass_cli.py): a new setting is one field here and nothing
else; the rules between fields are runtime/server_args_checks.py. Lower
packages never read flags: `ServerArgs` builds their small configs (e.g. `model_runner_config`).

This module must stay light: the HTTP process imports it, so torch and
`model_executor` are imported only inside the functions that need them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

# Torch-free: the attention backend flag's choices come from the backend registry.
from layers.attention.registry import attention_backend_names
from runtime.dataclass_cli import add_flags, arg, check_choices, from_namespace
from runtime.device_defaults import cuda_graph_off_reason, default_attention_backend, detect_device
from runtime.server_args_checks import check_server_args

if TYPE_CHECKING:
    from managers.process_config import DetokenizerProcessConfig, SchedulerProcessConfig, TokenizerConfig
    from managers.scheduler_config import SchedulerConfig
    from model_executor.model_config import ModelRunnerConfig

logger = logging.getLogger(__name__)


@dataclass
class ServerArgs:
    # Model and tokenizer.
    model_path: str = field(metadata={"help": "Checkpoint directory (HF layout) to serve."})
    tokenizer_path: str | None = arg(None, "Tokenizer directory; default: --model-path.")
    dtype: str = arg(
        "auto", "Weight and activation dtype; auto uses the checkpoint's.",
        ("auto", "float32", "bfloat16", "float16"),
    )
    device: str | None = arg(
        None, "Device to run on; default: cuda if available, else cpu.", ("cpu", "cuda")
    )
    context_length: int | None = arg(
        None, "Max tokens per request (prompt + output); default: the model's limit."
    )
    trust_remote_code: bool = arg(False, "Allow custom code from the checkpoint.")
    load_format: str = arg(
        "auto",
        "auto: the checkpoint's safetensors; dummy: random weights from config.json alone "
        "(benchmarks of a model shape without its weights).",
        ("auto", "dummy"),
    )
    quantization: str | None = arg(
        None,
        "Quantized weights: default, the checkpoint's own quantization_config (fp8, gptq, awq, "
        "compressed-tensors; naming it again is allowed, naming another is an error); on a dense "
        "checkpoint, int8 or fp8 quantizes the weights while loading (one scale per output row).",
        ("awq", "compressed-tensors", "fp8", "gptq", "int8"),
    )
    quantize_lm_head: str | None = arg(
        None,
        "Round the LM head, which every format keeps dense, to int8 per row at load (any checkpoint; "
        "the embedding stays as it is): fewer bytes per decode step for slightly coarser logits.",
        ("int8",),
    )
    skip_tokenizer_init: bool = arg(False, "Do not load a tokenizer; requests pass token ids.")
    served_model_name: str | None = arg(
        None, "Model name reported by the API; default: --model-path."
    )

    # Memory and batching.
    page_size: int = arg(1, "Tokens per KV-cache page.")
    max_total_tokens: int | None = arg(
        None, "KV-cache capacity in tokens; default: sized from free memory."
    )
    mem_fraction_static: float = arg(
        0.88, "Fraction of GPU memory for weights plus KV cache, in (0, 1]."
    )
    max_running_requests: int = arg(256, "Max requests in the running batch.")
    max_prefill_tokens: int = arg(16384, "Token budget of one prefill batch.")
    chunked_prefill_size: int = arg(
        8192, "Split prompts longer than this across iterations; -1 or 0 disables."
    )
    schedule_policy: str = arg(
        "lpm", "Order of the waiting queue.", ("fcfs", "lpm", "dfs-weight")
    )
    disable_radix_cache: bool = arg(False, "Do not share prefixes between requests.")
    tool_call_parser: str | None = arg(
        None, "Parse tool calls out of chat output in this model's format.",
        choices=("qwen25", "llama3", "mistral", "pythonic", "deepseekv3"))
    reasoning_parser: str | None = arg(
        None, "Split the model's <think> reasoning into reasoning_content.", choices=("qwen3", "deepseek-r1"))
    grammar_backend: str = arg("xgrammar", "Backend of constrained decoding (json_schema, regex, ebnf, "
                                "structural_tag); none turns it off.", choices=("xgrammar", "none"))
    constrained_json_disable_any_whitespace: bool = arg(
        False, "JSON-schema outputs have no free whitespace (compact JSON).")
    enable_mixed_chunk: bool = arg(
        False,
        "Run the running decodes inside prefill batches (MIXED) instead of pausing them "
        "while a prefill runs: steadier TPOT, slower TTFT.",
    )
    disable_overlap: bool = arg(False, "Use the plain (non-overlapped) scheduler loop.")

    # Speculative decoding (managers/drafts.py).
    speculative_algorithm: str | None = arg(
        None,
        "Draft tokens and verify them in one forward: NGRAM copies what followed earlier "
        "occurrences of the newest tokens (prompt lookup; no model); STANDALONE asks a small "
        "draft model (--speculative-draft-model-path, same vocabulary); EAGLE an EAGLE head "
        "(--speculative-draft-model-path) fed the target's hidden states. Outputs are unchanged: "
        "the same tokens for greedy and seeded requests, the same distribution for sampled ones "
        "(requests with penalties or logits processors are not drafted).",
        choices=("NGRAM", "STANDALONE", "EAGLE"),
    )
    speculative_draft_model_path: str | None = arg(
        None, "STANDALONE: the draft model's checkpoint; EAGLE: the head's.")
    speculative_eagle_topk: int | None = arg(
        None, "EAGLE: guesses per drafting step; 1 (a chain) is what is supported.")
    speculative_num_steps: int | None = arg(
        None, "Guesses per request and step (a chain); sets --speculative-num-draft-tokens to this + 1.")
    speculative_num_draft_tokens: int | None = arg(
        None, "Tokens a verify step feeds per request: its last token plus up to this many - 1 guesses "
        "(default 8 for NGRAM, 4 for STANDALONE and EAGLE).")
    speculative_ngram_min_match_window_size: int = arg(
        1, "NGRAM: the fewest newest tokens that must match an earlier occurrence.")
    speculative_ngram_max_match_window_size: int = arg(
        12, "NGRAM: the most newest tokens compared when choosing between earlier occurrences.")
    enable_cpu_overlap: bool = arg(
        False,
        "Overlap scheduling on CPU too. Off by default there: the forward thread and the "
        "scheduler compete for the same cores (measured ~25%% slower on 2 cores).",
    )

    # Kernels.
    disable_cuda_graph: bool = arg(
        False, "Run decode without CUDA graphs (always so on CUDA with --tp-size > 1, for now)."
    )
    cuda_graph_max_bs: int = arg(64, "Largest decode batch size captured in a CUDA graph.")
    flashinfer_workspace_mb: int = arg(
        256,
        "flashinfer backend: its float workspace, in MiB. Raise it if flashinfer reports "
        "'Increase the workspace buffer size' (models with many query heads per KV head).",
    )
    attention_backend: str | None = arg(
        None,
        "Attention kernels; default: cpu (native kernels, torch_native if they "
        "cannot be built) on cpu, flashinfer on cuda if installed, else triton.",
        attention_backend_names(),
    )

    # Parallelism.
    tp_size: int = arg(1, "Tensor-parallel degree (one scheduler process per rank).")
    ep_size: int = arg(
        1,
        "Expert parallelism for mixture-of-experts models: the TP group's ranks form ep-size groups "
        "that each hold 1/ep-size of the experts (each expert split over tp-size/ep-size ranks). "
        "Must divide --tp-size; equal to it puts whole experts on each rank.",
    )
    nnodes: int = arg(1, "Number of nodes.")
    node_rank: int = arg(0, "Rank of this node, in 0..nnodes-1.")
    dist_init_addr: str | None = arg(
        None,
        "host:port of rank 0's torch.distributed rendezvous (on node 0); needed with "
        "--nnodes > 1, else a free local port is picked.",
    )
    dist_timeout: int = arg(
        300, "Seconds to wait for all TP ranks to join, and for any one collective."
    )

    # Serving.
    host: str = arg("127.0.0.1", "HTTP bind address.")
    port: int = arg(30000, "HTTP port.")
    api_key: str | None = arg(None, "If set, requests must send this bearer token.")
    stream_interval: int = arg(
        1,
        "Send a streaming chunk every N decoded tokens; the first token and the final chunk "
        "go out at once. Larger values cut per-chunk overhead for many concurrent streams.",
    )
    max_queued_requests: int | None = arg(
        None, "Requests allowed to wait for admission; more get 503 with Retry-After. Default: unbounded."
    )
    max_request_body_mb: float = arg(
        32, "Largest HTTP request body, in MiB; larger ones get 413."
    )
    watchdog_timeout: float = arg(
        300,
        "Exit with an error when the scheduler makes no progress for this many seconds "
        "while requests are pending (a hung step or process).",
    )
    health_check_timeout: float = arg(
        20,
        "Seconds: /health turns 503 when the scheduler has not gone round its loop for this "
        "long, and /health_generate waits this long for its test request.",
    )
    shutdown_grace: float = arg(
        30,
        "On SIGTERM, seconds in-flight requests get to finish (new ones get 503) before open "
        "streams end with an error event and waiting calls with a 503.",
    )
    random_seed: int = arg(0, "Seed for sampling and weight init.")
    log_level: str = arg("info", "Logging level.", ("debug", "info", "warning", "error"))

    def __post_init__(self) -> None:
        if self.tokenizer_path is None:
            self.tokenizer_path = self.model_path
        if self.served_model_name is None:
            self.served_model_name = self.model_path
        if self.device is None:
            self.device = detect_device()
        check_choices(self)
        if self.attention_backend is None:
            self.attention_backend = default_attention_backend(self.device, self.dtype)
        check_server_args(self)
        reason = cuda_graph_off_reason(self.device, self.tp_size)
        if reason is not None and not self.disable_cuda_graph:
            # A warning: logging is configured only after the flags are parsed,
            # and until then Python's last-resort handler prints warnings (not
            # info) to stderr.
            logger.warning("CUDA graphs disabled: %s", reason)
            self.disable_cuda_graph = True

    @property
    def ranks_per_node(self) -> int:
        return self.tp_size // self.nnodes

    def local_tp_ranks(self) -> range:
        """The TP ranks whose scheduler processes this node runs."""
        first = self.node_rank * self.ranks_per_node
        return range(first, first + self.ranks_per_node)

    @property
    def chunked_prefill_enabled(self) -> bool:
        return self.chunked_prefill_size > 0

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        add_flags(parser, cls)

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> ServerArgs:
        return from_namespace(cls, ns)

    def model_runner_config(self, tp_rank: int = 0) -> ModelRunnerConfig:
        # Imported here: model_executor pulls in torch, which the HTTP side avoids.
        from model_executor.model_config import ModelRunnerConfig

        if not 0 <= tp_rank < self.tp_size:
            raise ValueError(f"tp_rank must be in 0..{self.tp_size - 1}, got {tp_rank}")
        assert self.device is not None and self.attention_backend is not None
        device = self.device
        if device == "cuda" and self.tp_size > 1:
            device = f"cuda:{tp_rank % self.ranks_per_node}"  # one GPU per local rank
        return ModelRunnerConfig(
            model_path=self.model_path,
            dtype=self.dtype,
            device=device,
            context_length=self.context_length,
            page_size=self.page_size,
            max_total_tokens=self.max_total_tokens,
            mem_fraction_static=self.mem_fraction_static,
            max_running_requests=self.max_running_requests,
            attention_backend=self.attention_backend,
            disable_cuda_graph=self.disable_cuda_graph,
            cuda_graph_max_bs=self.cuda_graph_max_bs,
            verify_graph_rows=self.speculative_num_draft_tokens if self.speculative_algorithm else 0,
            flashinfer_workspace_mb=self.flashinfer_workspace_mb,
            tp_size=self.tp_size,
            tp_rank=tp_rank,
            ep_size=self.ep_size,
            random_seed=self.random_seed,
            load_format=self.load_format,
            trust_remote_code=self.trust_remote_code,
            quantization=self.quantization,
            quantize_lm_head=self.quantize_lm_head,
        )

    def scheduler_config(self) -> SchedulerConfig:
        from managers.scheduler_config import SchedulerConfig, SpeculativeConfig

        speculative = None
        if self.speculative_algorithm is not None:
            speculative = SpeculativeConfig(self.speculative_algorithm, self.speculative_num_draft_tokens,
                                            self.speculative_draft_model_path,
                                            self.speculative_ngram_min_match_window_size,
                                            self.speculative_ngram_max_match_window_size)
        return SchedulerConfig(
            max_prefill_tokens=self.max_prefill_tokens,
            chunked_prefill_size=self.chunked_prefill_size if self.chunked_prefill_enabled else None,
            schedule_policy=self.schedule_policy,
            disable_radix_cache=self.disable_radix_cache,
            enable_mixed_chunk=self.enable_mixed_chunk,
            enable_overlap=not self.disable_overlap
            and (self.device != "cpu" or self.enable_cpu_overlap),
            max_queued_requests=self.max_queued_requests,
            grammar_backend=self.grammar_backend,
            constrained_json_disable_any_whitespace=self.constrained_json_disable_any_whitespace,
            speculative=speculative,
        )

    def tokenizer_config(self) -> TokenizerConfig:
        from managers.process_config import TokenizerConfig

        return TokenizerConfig(self.tokenizer_path, self.trust_remote_code)

    def scheduler_process_config(self, tp_rank: int) -> SchedulerProcessConfig:
        from managers.process_config import SchedulerProcessConfig

        return SchedulerProcessConfig(
            runner=self.model_runner_config(tp_rank),
            scheduler=self.scheduler_config(),
            tokenizer=None if self.skip_tokenizer_init else self.tokenizer_config(),
            model_path=self.model_path,
            tp_size=self.tp_size,
            ranks_per_node=self.ranks_per_node,
            dist_timeout_s=self.dist_timeout,
            log_level=self.log_level,
        )

    def detokenizer_process_config(self) -> DetokenizerProcessConfig:
        from managers.process_config import DetokenizerProcessConfig

        return DetokenizerProcessConfig(self.tokenizer_config(), self.log_level)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runtime.launch_server",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ServerArgs.add_cli_args(parser)
    return parser


def prepare_server_args(argv: list[str]) -> ServerArgs:
    """Parse flags; invalid values raise ValueError (argparse syntax errors still exit)."""
    return ServerArgs.from_cli_args(make_parser().parse_args(argv))


def parse_server_args_or_exit(argv: list[str] | None = None) -> ServerArgs:
    """CLI entry: a bad value prints usage plus the message and exits with code 2."""
    parser = make_parser()
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return ServerArgs.from_cli_args(ns)
    except ValueError as e:
        parser.error(str(e))
