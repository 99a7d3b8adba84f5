"""Start, watch and stop the scheduler and detokenizer processes."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

from managers.detokenizer_manager import run_detokenizer_process
from managers.io_struct import SchedulerReady
from managers.liveness import Heartbeat
from managers.scheduler_process import PortArgs, run_scheduler_process
from runtime.child_process import ChildProcess, start_child

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 600  # model load plus KV allocation
WATCH_INTERVAL_S = 0.2
# Any one of these makes a directory a tokenizer (fast, sentencepiece, BPE, WordPiece, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tiktoken.model")


@dataclass(eq=False)  # identity hash: kept in the weak set below
class ChildProcesses:
    processes: dict[str, ChildProcess]
    socket_dir: str
    port_args: PortArgs
    ready: SchedulerReady
    heartbeat: Heartbeat | None = None  # the scheduler's (node 0 only)
    stopping: bool = False

    def watch(
        self,
        on_failure: Callable[[str], None],
        has_pending_work: Callable[[], bool] = lambda: False,
        watchdog_timeout: float | None = None,
    ) -> threading.Thread:
        """Call `on_failure(reason)` (once) if a child exits while we are not
        stopping, or, with `watchdog_timeout`, if the scheduler has not gone
        round its loop for that long while work is pending (its own queue,
        or `has_pending_work()`: requests it may not have read yet)."""

        def failure() -> str | None:
            for name, proc in self.processes.items():
                if not proc.is_alive():
                    return f"the {name} process (pid {proc.pid}) died with exit code {proc.exitcode}"
            beat = self.heartbeat
            if watchdog_timeout and beat is not None and beat.age() > watchdog_timeout:
                if beat.busy() or has_pending_work():
                    return (f"watchdog: the scheduler made no progress for {beat.age():.0f} s with work "
                            f"pending (--watchdog-timeout {watchdog_timeout:g})")
            return None

        def loop() -> None:
            while not self.stopping:
                reason = failure()
                if reason is not None and not self.stopping:
                    logger.error("%s", reason)
                    on_failure(reason)
                    return
                time.sleep(WATCH_INTERVAL_S)

        thread = threading.Thread(target=loop, name="child-watchdog", daemon=True)
        thread.start()
        return thread

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the children in start order: TP rank 0 first, which tells the
        other ranks to stop (killing them first would make rank 0's last
        broadcast fail), then the rest; whatever outlives `timeout` is killed."""
        self.stopping = True
        deadline = time.monotonic() + timeout
        for proc in self.processes.values():
            if proc.is_alive():
                proc.terminate()
                proc.join(max(0.0, deadline - time.monotonic()))
        for name, proc in self.processes.items():
            if proc.is_alive():
                logger.warning("%s process did not stop within %.0f s; killing it", name, timeout)
                proc.kill()
                proc.join(1.0)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


# Children still running at interpreter exit are stopped there, as
# multiprocessing did for its daemon processes: an Engine nobody shut down (a
# script that just ends) must not leave them waiting to notice a dead parent.
_running: weakref.WeakSet[ChildProcesses] = weakref.WeakSet()


@atexit.register
def _stop_running_children() -> None:
    for children in list(_running):
        if not children.stopping:
            children.shutdown()


def launch_children(server_args) -> ChildProcesses:
    """Start this node's scheduler ranks (and, on node 0, the detokenizer)
    and wait until each reports ready. `ready` is rank 0's report on node 0,
    this node's first rank's elsewhere."""
    from model_executor.tp_layout import check_tp_layout

    check_model_files(server_args)
    # Refuse a --tp-size the model cannot split before any rank starts.
    check_tp_layout(server_args.model_path, server_args.tp_size, server_args.ep_size)
    if server_args.speculative_draft_model_path is not None:
        from managers.model_drafts import check_draft_compatible

        # A draft with another vocabulary is refused before any rank loads.
        check_draft_compatible(server_args.model_path, server_args.speculative_draft_model_path)
    dist_init_addr = server_args.dist_init_addr
    if server_args.tp_size > 1 and dist_init_addr is None:
        dist_init_addr = f"127.0.0.1:{free_port()}"
    # Short path: ipc:// socket paths must stay under ~100 characters.
    socket_dir = tempfile.mkdtemp(prefix="rxs-", dir="/tmp")
    port_args = PortArgs.in_dir(socket_dir)
    heartbeat = Heartbeat(os.path.join(socket_dir, "heartbeat")) if server_args.node_rank == 0 else None
    targets: list[tuple[str, Callable, dict]] = []
    for rank in server_args.local_tp_ranks():
        name = "scheduler" if server_args.tp_size == 1 else f"scheduler_tp{rank}"
        targets.append((name, run_scheduler_process, {
            "config": server_args.scheduler_process_config(rank), "port_args": port_args,
            "tp_rank": rank, "dist_init_addr": dist_init_addr, "heartbeat": heartbeat if rank == 0 else None,
        }))
    if server_args.node_rank == 0:
        targets.append(("detokenizer", run_detokenizer_process,
                        {"config": server_args.detokenizer_process_config(), "port_args": port_args}))
    processes: dict[str, ChildProcess] = {}
    pipes: dict[str, Connection] = {}
    children = ChildProcesses(processes, socket_dir, port_args, ready=None, heartbeat=heartbeat)  # type: ignore[arg-type]
    _running.add(children)
    try:
        # Fresh interpreters running only our entry module (runtime/child_process.py):
        # the caller's __main__ is never re-imported, so an unguarded script,
        # `python -` and a notebook can all build an Engine.
        for name, target, kwargs in targets:
            processes[name], pipes[name] = start_child(name, target, kwargs)
        reports = _wait_all_ready(processes, pipes)
    except BaseException:
        children.shutdown()
        raise
    children.ready = reports[targets[0][0]]
    return children


def check_model_files(server_args) -> None:
    """One clear line for a wrong path, before any process starts (else: a
    hub-style "Repo id must be..." error from deep inside transformers, or,
    for a missing tokenizer, an empty one that turns every prompt into [])."""
    path = server_args.model_path
    if not os.path.isdir(path):
        raise ValueError(f"--model-path {path}: no such directory (checkpoints are loaded from local paths)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"--model-path {path} has no config.json: not a Hugging Face checkpoint directory")
    if server_args.skip_tokenizer_init:
        return
    tok = server_args.tokenizer_path
    if not os.path.isdir(tok) or not any(os.path.isfile(os.path.join(tok, f)) for f in TOKENIZER_FILES):
        raise ValueError(
            f"no tokenizer in {tok} (looked for {', '.join(TOKENIZER_FILES)}); pass --tokenizer-path, "
            "or --skip-tokenizer-init to serve token ids only"
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_all_ready(processes: dict[str, ChildProcess], pipes: dict[str, Connection]) -> dict[str, object]:
    """Every child's ready report; the first failure (an exception sent on
    its pipe, or an early exit) is raised at once, naming the child."""
    reports: dict[str, object] = {}
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while len(reports) < len(pipes):
        if time.monotonic() > deadline:
            late = ", ".join(sorted(set(pipes) - set(reports)))
            raise RuntimeError(f"not ready after {STARTUP_TIMEOUT_S} s: {late}")
        for name, pipe in pipes.items():
            if name in reports:
                continue
            if pipe.poll(0.05):
                try:
                    report = pipe.recv()
                except EOFError:  # it died before reporting
                    processes[name].join(5)
                    raise RuntimeError(
                        f"{name} process exited during start-up with code {processes[name].exitcode}"
                    ) from None
                if isinstance(report, BaseException):
                    raise RuntimeError(f"{name} process failed to start: {report}") from report
                reports[name] = report
            elif not processes[name].is_alive():
                raise RuntimeError(f"{name} process exited during start-up with code {processes[name].exitcode}")
    return reports


def run_worker_node(server_args) -> int:
    """Node rank > 0 of a multi-node deployment: run this node's TP ranks
    until they stop (node 0's rank 0 tells them) or one dies; no HTTP."""
    try:
        children = launch_children(server_args)
    except (ValueError, RuntimeError) as err:
        logger.error("could not start: %s", err)
        return 1
    ranks = list(server_args.local_tp_ranks())
    logger.info("node %d: TP ranks %s ready; requests are served by node 0", server_args.node_rank, ranks)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stopped.set())
    children.watch(lambda reason: stopped.set())
    while not stopped.wait(0.5):
        pass
    # Node 0 stopping our ranks is the normal end: they exit 0.
    failed = [name for name, proc in children.processes.items() if proc.exitcode not in (None, 0)]
    children.shutdown()
    if failed:
        logger.error("node %d: %s exited with an error; stopping this node", server_args.node_rank, ", ".join(failed))
        return 1
    return 0
