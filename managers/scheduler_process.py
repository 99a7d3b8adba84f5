"""The scheduler as its own process: ZMQ in, `Scheduler.step`, ZMQ out.

Receives `TokenizedGenerateReq` / `AbortReq` / `FlushCacheReq` /
`GetInternalStateReq` from the tokenizer manager, sends each iteration's
`BatchTokenIDOut` to the detokenizer and control replies straight back to
the tokenizer manager. Blocks on its socket only while it has nothing to run.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import dataclass
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

logger = logging.getLogger(__name__)

# While idle, wake up this often to notice a parent that went away.
IDLE_POLL_MS = 1000


@dataclass
class PortArgs:
    """ipc:// addresses of the three sockets, under one per-server temp dir."""

    scheduler_input: str
    detokenizer_input: str
    tokenizer_input: str

    @classmethod
    def in_dir(cls, directory: str) -> PortArgs:
        return cls(
            scheduler_input=f"ipc://{directory}/scheduler",
            detokenizer_input=f"ipc://{directory}/detokenizer",
            tokenizer_input=f"ipc://{directory}/tokenizer",
        )


def run_scheduler_process(server_args, port_args: PortArgs, ready: Connection) -> None:
    """Process entry point. `server_args` is a runtime.server_args.ServerArgs
    (typed loosely: managers must not import runtime)."""
    _configure_child_logging(server_args.log_level, "scheduler")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    parent = os.getppid()
    try:
        from transformers import AutoTokenizer

        from managers.schedule_batch import eos_token_ids_of
        from managers.scheduler import Scheduler

        tokenizer = None
        if not server_args.skip_tokenizer_init:
            tokenizer = AutoTokenizer.from_pretrained(server_args.tokenizer_path)
        scheduler = Scheduler(
            server_args.model_runner_config(),
            server_args.scheduler_config(),
            tokenizer=tokenizer,
            eos_token_ids=eos_token_ids_of(server_args.model_path, tokenizer),
        )
        runner = scheduler.worker.model_runner
        context = zmq.Context(1)
        recv = context.socket(zmq.PULL)
        recv.bind(port_args.scheduler_input)
        to_detokenizer = context.socket(zmq.PUSH)
        to_detokenizer.connect(port_args.detokenizer_input)
        to_tokenizer = context.socket(zmq.PUSH)
        to_tokenizer.connect(port_args.tokenizer_input)
        ready.send(
            SchedulerReady(
                max_total_num_tokens=runner.max_total_num_tokens,
                max_running_requests=server_args.max_running_requests,
                context_len=runner.model_config.context_len,
                vocab_size=runner.model_config.vocab_size,
                dtype=str(runner.dtype).removeprefix("torch."),
                device=str(runner.device),
            )
        )
    except BaseException as err:
        logger.exception("scheduler failed to start")
        ready.send(err if isinstance(err, Exception) else RuntimeError(str(err)))
        sys.exit(1)

    poller = zmq.Poller()
    poller.register(recv, zmq.POLLIN)
    while True:
        timeout = 0 if not scheduler.is_idle() else IDLE_POLL_MS
        while poller.poll(timeout):
            timeout = 0
            msg = recv.recv_pyobj()
            if isinstance(msg, TokenizedGenerateReq):
                scheduler.add_request(msg)
            elif isinstance(msg, AbortReq):
                scheduler.abort_request(msg)
            elif isinstance(msg, FlushCacheReq):
                to_tokenizer.send_pyobj(FlushCacheReqOutput(scheduler.flush_cache()))
            elif isinstance(msg, GetInternalStateReq):
                to_tokenizer.send_pyobj(GetInternalStateReqOutput(scheduler.stats()))
        if os.getppid() != parent:
            logger.error("parent process is gone; scheduler exiting")
            return
        out = scheduler.step()
        if out.rids:
            to_detokenizer.send_pyobj(out)


def _configure_child_logging(level: str, name: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"[%(asctime)s {name}] %(levelname)s %(message)s",
    )
