"""Start, watch and stop the scheduler and detokenizer processes."""

from __future__ import annotations

import logging
import multiprocessing as mp
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from managers.detokenizer_manager import run_detokenizer_process
from managers.io_struct import SchedulerReady
from managers.scheduler_process import PortArgs, run_scheduler_process

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 600  # model load plus KV allocation
WATCH_INTERVAL_S = 0.2


@dataclass
class ChildProcesses:
    processes: dict[str, mp.Process]
    socket_dir: str
    port_args: PortArgs
    ready: SchedulerReady
    stopping: bool = False

    def watch(self, on_death: Callable[[str, int | None], None]) -> threading.Thread:
        """Call `on_death(name, exit_code)` (once) if a child exits while we are not stopping."""

        def loop() -> None:
            while not self.stopping:
                for name, proc in self.processes.items():
                    if not proc.is_alive() and not self.stopping:
                        logger.error("%s process (pid %s) died with exit code %s", name, proc.pid, proc.exitcode)
                        on_death(name, proc.exitcode)
                        return
                time.sleep(WATCH_INTERVAL_S)

        thread = threading.Thread(target=loop, name="child-watchdog", daemon=True)
        thread.start()
        return thread

    def shutdown(self, timeout: float = 5.0) -> None:
        self.stopping = True
        for proc in self.processes.values():
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in self.processes.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def launch_children(server_args) -> ChildProcesses:
    """Start both children and wait until each reports ready."""
    # Short path: ipc:// socket paths must stay under ~100 characters.
    socket_dir = tempfile.mkdtemp(prefix="rxs-", dir="/tmp")
    port_args = PortArgs.in_dir(socket_dir)
    ctx = mp.get_context("spawn")
    processes: dict[str, mp.Process] = {}
    pipes = {}
    for name, target in (("scheduler", run_scheduler_process), ("detokenizer", run_detokenizer_process)):
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=target, args=(server_args, port_args, writer), name=name, daemon=True)
        proc.start()
        processes[name], pipes[name] = proc, reader
    children = ChildProcesses(processes, socket_dir, port_args, ready=None)  # type: ignore[arg-type]
    try:
        reports = {name: _wait_ready(name, processes[name], pipe) for name, pipe in pipes.items()}
    except BaseException:
        children.shutdown()
        raise
    children.ready = reports["scheduler"]
    return children


def _wait_ready(name: str, proc: mp.Process, pipe) -> object:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if pipe.poll(0.2):
            report = pipe.recv()
            if isinstance(report, BaseException):
                raise RuntimeError(f"{name} process failed to start: {report}") from report
            return report
        if not proc.is_alive():
            raise RuntimeError(f"{name} process exited during start-up with code {proc.exitcode}")
    raise RuntimeError(f"{name} process not ready after {STARTUP_TIMEOUT_S} s")
