"""The rules between server settings, one concern per function; each
failure is a ValueError naming the flags as the user typed them. Run by
`ServerArgs.__post_init__`, so the CLI, `Engine(...)` and tests get the same
messages. Torch-free."""

from __future__ import annotations

from typing import TYPE_CHECKING

from layers.attention.registry import device_error
from runtime.dataclass_cli import flag

if TYPE_CHECKING:
    from runtime.server_args import ServerArgs


def check_server_args(args: ServerArgs) -> None:
    check_limits(args)
    check_memory_and_batching(args)
    check_network(args)
    settle_speculative(args)
    check_parallelism(args)
    check_backend(args)


def check_limits(args: ServerArgs) -> None:
    for name in ("page_size", "max_running_requests", "max_prefill_tokens", "cuda_graph_max_bs", "tp_size",
                 "ep_size", "nnodes", "stream_interval", "dist_timeout", "flashinfer_workspace_mb"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"{flag(name)} must be >= 1, got {value}")
    if args.max_queued_requests is not None and args.max_queued_requests < 1:
        raise ValueError(f"--max-queued-requests must be >= 1, got {args.max_queued_requests}")
    for name in ("max_request_body_mb", "watchdog_timeout", "health_check_timeout"):
        if not getattr(args, name) > 0:
            raise ValueError(f"{flag(name)} must be > 0, got {getattr(args, name)}")
    if not args.shutdown_grace >= 0:
        raise ValueError(f"--shutdown-grace must be >= 0, got {args.shutdown_grace}")
    if args.context_length is not None and args.context_length < 1:
        raise ValueError(f"--context-length must be >= 1, got {args.context_length}")


def check_memory_and_batching(args: ServerArgs) -> None:
    if args.max_total_tokens is not None and args.max_total_tokens < args.page_size:
        raise ValueError(f"--max-total-tokens must be >= --page-size ({args.page_size}), got {args.max_total_tokens}")
    if not 0.0 < args.mem_fraction_static <= 1.0:
        raise ValueError(f"--mem-fraction-static must be in (0, 1], got {args.mem_fraction_static}")
    if args.chunked_prefill_size < -1:
        raise ValueError(f"--chunked-prefill-size must be > 0, or -1 or 0 to disable; got {args.chunked_prefill_size}")
    # A chunk boundary inside a page would leave a half-filled page owned
    # by an unfinished request, which the paged allocator cannot share.
    if args.chunked_prefill_enabled and args.chunked_prefill_size % args.page_size:
        raise ValueError(f"--chunked-prefill-size must be a multiple of --page-size ({args.page_size}), "
                         f"got {args.chunked_prefill_size}")


def check_network(args: ServerArgs) -> None:
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if not 0 <= args.node_rank < args.nnodes:
        raise ValueError(f"--node-rank must be < --nnodes ({args.nnodes}) and >= 0, got {args.node_rank}")
    if args.nnodes > 1 and not args.dist_init_addr:
        raise ValueError("--nnodes > 1 needs --dist-init-addr host:port")
    if args.dist_init_addr is not None:
        host, _, port = args.dist_init_addr.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"--dist-init-addr must be host:port, got {args.dist_init_addr!r}")


def settle_speculative(args: ServerArgs) -> None:
    """Fill in --speculative-num-draft-tokens (SGLang's defaults: 8 for
    NGRAM, else 4, or --speculative-num-steps + 1) and check the rest."""
    if args.speculative_num_draft_tokens is None:
        if args.speculative_num_steps is not None:
            args.speculative_num_draft_tokens = args.speculative_num_steps + 1
        else:
            args.speculative_num_draft_tokens = 8 if args.speculative_algorithm == "NGRAM" else 4
    elif args.speculative_num_steps is not None and args.speculative_num_draft_tokens != args.speculative_num_steps + 1:
        raise ValueError(f"--speculative-num-draft-tokens ({args.speculative_num_draft_tokens}) must be "
                         f"--speculative-num-steps + 1 ({args.speculative_num_steps + 1}) for a chain of guesses")
    if (args.speculative_algorithm in ("STANDALONE", "EAGLE")) != (args.speculative_draft_model_path is not None):
        raise ValueError("--speculative-draft-model-path goes with --speculative-algorithm STANDALONE or "
                         "EAGLE (and they need it)")
    if args.speculative_eagle_topk not in (None, 1):
        raise ValueError(f"--speculative-eagle-topk {args.speculative_eagle_topk}: only 1 (a chain of guesses) "
                         "is supported, not a tree")
    if args.speculative_num_draft_tokens < 2:
        raise ValueError(f"--speculative-num-draft-tokens must be >= 2 (the last token and a guess), "
                         f"got {args.speculative_num_draft_tokens}")
    if not 1 <= args.speculative_ngram_min_match_window_size <= args.speculative_ngram_max_match_window_size:
        raise ValueError(
            "--speculative-ngram-min-match-window-size must be >= 1 and <= "
            f"--speculative-ngram-max-match-window-size, got {args.speculative_ngram_min_match_window_size} "
            f"and {args.speculative_ngram_max_match_window_size}")


def check_parallelism(args: ServerArgs) -> None:
    if args.tp_size % args.ep_size:
        raise ValueError(f"--ep-size ({args.ep_size}) must divide --tp-size ({args.tp_size})")
    if args.tp_size % args.nnodes:
        raise ValueError(f"--tp-size ({args.tp_size}) must be a multiple of --nnodes ({args.nnodes}): "
                         "each node runs the same number of ranks")


def check_backend(args: ServerArgs) -> None:
    # Which backend runs on which device is the registry's rule (triton is
    # allowed on cpu there: the tests run its kernels under TRITON_INTERPRET=1).
    assert args.device is not None and args.attention_backend is not None
    reason = device_error(args.attention_backend, args.device)
    if reason is not None:
        raise ValueError(reason)
