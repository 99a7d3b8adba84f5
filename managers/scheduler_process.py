"""The scheduler as its own process: ZMQ in, `Scheduler.step`, ZMQ out.

Receives `TokenizedGenerateReq` / `AbortReq` / `FlushCacheReq` /
`GetInternalStateReq` from the tokenizer manager, sends each iteration's
`BatchTokenIDOut` to the detokenizer and control replies straight back to
the tokenizer manager. Blocks on its socket only while it has nothing to run.

With tensor parallelism there is one such process per rank. Only rank 0 has
sockets: each iteration it broadcasts the messages it received (or None:
stop) over the TP group's control channel, every rank applies them and runs
the same `step`, and only rank 0 sends the outputs on.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING
from multiprocessing.connection import Connection

import zmq

from managers.io_struct import (
    AbortReq,
    FlushCacheReq,
    FlushCacheReqOutput,
    GetInternalStateReq,
    GetInternalStateReqOutput,
    SchedulerReady,
    TokenizedGenerateReq,
)
from managers.liveness import Heartbeat, exit_with_parent

if TYPE_CHECKING:
    from managers.process_config import SchedulerProcessConfig

logger = logging.getLogger(__name__)

# While idle, wake up this often to notice a parent that went away.
IDLE_POLL_MS = 1000
# oneDNN (CPU bf16 linears) caches a primitive per input shape, in two LRU
# caches of 1,024 entries each; a server sees a new prefill length nearly
# every batch, so at the default the scheduler's memory grew for as long as
# we soaked it (+165 MiB over 1,600 requests on the tiny demo model). At 32
# entries it is flat and throughput unchanged (benchmark/RESULTS.md, "Soak").
ONEDNN_CACHE_CAPACITY = "32"


@dataclass
class PortArgs:
    """ipc:// addresses of the three sockets, under one per-server temp dir."""

    scheduler_input: str
    detokenizer_input: str
    tokenizer_input: str

    @property
    def socket_dir(self) -> str:
        return os.path.dirname(self.scheduler_input.removeprefix("ipc://"))

    @classmethod
    def in_dir(cls, directory: str) -> PortArgs:
        return cls(
            scheduler_input=f"ipc://{directory}/scheduler",
            detokenizer_input=f"ipc://{directory}/detokenizer",
            tokenizer_input=f"ipc://{directory}/tokenizer",
        )


def run_scheduler_process(
    config: SchedulerProcessConfig,
    port_args: PortArgs,
    ready: Connection,
    tp_rank: int = 0,
    dist_init_addr: str | None = None,
    heartbeat: Heartbeat | None = None,
) -> None:
    """Process entry point for TP rank `tp_rank` (`config` is built for that
    rank). Rank 0 owns the sockets; with tp_size > 1 it broadcasts what it
    receives to the other ranks, and every rank runs the same schedule.
    `heartbeat` (rank 0 on node 0) is stamped every loop iteration."""
    tp_size = config.tp_size
    name = "scheduler" if tp_size == 1 else f"scheduler TP{tp_rank}"
    _configure_child_logging(config.log_level, name)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    exit_with_parent(port_args.socket_dir, name)
    stop = _StopFlag()
    if tp_rank == 0:  # other ranks die on SIGTERM as usual; rank 0 notices at its next collective
        signal.signal(signal.SIGTERM, stop.set)
    parent = os.getppid()
    try:
        # Read by oneDNN / ideep when torch first uses them: set before the import.
        os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE_CAPACITY)
        os.environ.setdefault("LRU_CACHE_CAPACITY", ONEDNN_CACHE_CAPACITY)
        import torch

        from managers.schedule_batch import eos_token_ids_of
        from managers.scheduler import Scheduler
        from managers.tokenizer_loading import load_tokenizer
        from model_executor.distributed import DistInitConfig, init_tp_group

        runner_config = config.runner
        if tp_size > 1 and runner_config.device == "cpu":
            # The node's ranks share its cores; oversubscribed OpenMP teams
            # spin against each other.
            cores = len(os.sched_getaffinity(0))
            torch.set_num_threads(max(1, cores // config.ranks_per_node))
        tp_group = None
        if tp_size > 1:
            tp_group = init_tp_group(
                DistInitConfig(tp_size, tp_rank, dist_init_addr, runner_config.device, config.dist_timeout_s)
            )
        tokenizer = None if config.tokenizer is None else load_tokenizer(config.tokenizer)
        scheduler = Scheduler(
            runner_config,
            config.scheduler,
            tokenizer=tokenizer,
            eos_token_ids=eos_token_ids_of(config.model_path, tokenizer),
            tp_group=tp_group,
        )
        runner = scheduler.worker.model_runner
        io = _RankZeroSockets(port_args) if tp_rank == 0 else None
        ready.send(
            SchedulerReady(
                max_total_num_tokens=runner.max_total_num_tokens,
                max_running_requests=runner_config.max_running_requests,
                context_len=runner.model_config.context_len,
                vocab_size=runner.model_config.vocab_size,
                dtype=str(runner.dtype).removeprefix("torch."),
                device=str(runner.device),
                quantization=runner.quantization_info,
                cpu=runner.cpu_info,
            )
        )
    except BaseException as err:
        if type(err).__name__ == "RankJoinTimeout":  # a deployment mistake, not a bug: no traceback
            logger.error("scheduler failed to start: %s", err)
        else:
            logger.exception("scheduler failed to start")
        ready.send(err if isinstance(err, Exception) else RuntimeError(str(err)))
        sys.exit(1)

    while True:
        if heartbeat is not None:
            heartbeat.beat(busy=not scheduler.is_idle())
        if io is not None:
            messages: list | None = None if stop.requested else io.receive(block=scheduler.is_idle())
        if tp_group is not None:
            try:
                messages = tp_group.broadcast_object(messages if io is not None else None)
            except RuntimeError as err:
                logger.error("lost contact with the other TP ranks (%s); exiting", err)
                sys.exit(1)
        if messages is None:  # rank 0 was asked to stop; everyone stops
            logger.info("scheduler stopping")
            return
        for msg in messages:
            reply = _handle(scheduler, msg)
            if reply is not None and io is not None:
                io.to_tokenizer.send_pyobj(reply)
        if os.getppid() != parent:
            logger.error("parent process is gone; scheduler exiting")
            return
        try:
            out = scheduler.step()
        except RuntimeError:
            if tp_group is None:
                raise
            # Usually a collective that lost its peer (another rank died);
            # the traceback says if it was anything else.
            logger.exception("scheduler step failed under TP; exiting so that every rank stops")
            sys.exit(1)
        if io is not None and out.rids:
            io.to_detokenizer.send_pyobj(out)


def _handle(scheduler, msg: object) -> object | None:
    """Apply one message; the reply for the tokenizer manager, if any."""
    if isinstance(msg, TokenizedGenerateReq):
        scheduler.add_request(msg)
    elif isinstance(msg, AbortReq):
        scheduler.abort_request(msg)
    elif isinstance(msg, FlushCacheReq):
        return FlushCacheReqOutput(scheduler.flush_cache())
    elif isinstance(msg, GetInternalStateReq):
        return GetInternalStateReqOutput(scheduler.stats())
    return None


class _StopFlag:
    """SIGTERM sets it; the loop finishes its iteration, then stops (on
    rank 0 by telling the other ranks first)."""

    def __init__(self) -> None:
        self.requested = False

    def set(self, signum: int, frame: object) -> None:
        self.requested = True


class _RankZeroSockets:
    def __init__(self, port_args: PortArgs) -> None:
        context = zmq.Context(1)
        # Undelivered messages must not hold the process at exit (a dead
        # detokenizer made the scheduler hang in Context.term()).
        context.setsockopt(zmq.LINGER, 0)
        self.recv = context.socket(zmq.PULL)
        self.recv.bind(port_args.scheduler_input)
        self.to_detokenizer = context.socket(zmq.PUSH)
        self.to_detokenizer.connect(port_args.detokenizer_input)
        self.to_tokenizer = context.socket(zmq.PUSH)
        self.to_tokenizer.connect(port_args.tokenizer_input)
        self.poller = zmq.Poller()
        self.poller.register(self.recv, zmq.POLLIN)

    def receive(self, block: bool) -> list:
        """Everything queued now; if `block`, first wait up to IDLE_POLL_MS
        for something (so an idle server does not spin)."""
        messages = []
        timeout = IDLE_POLL_MS if block else 0
        while self.poller.poll(timeout):
            timeout = 0
            messages.append(self.recv.recv_pyobj())
        return messages


def _configure_child_logging(level: str, name: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"[%(asctime)s {name}] %(levelname)s %(message)s",
    )
