"""Liveness between the server process and its children, both ways.

- `Heartbeat`: the scheduler stamps it every loop iteration (at least once a
  second while idle); the server reads its age for `/health` and for the
  watchdog. A scheduler that is stopped, deadlocked or stuck in one step stops
  stamping, whatever its process state says.
- `exit_with_parent`: a child process must not outlive the server. The main
  loops already check `getppid()`, but a child can be blocked elsewhere (a long
  step, a collective, a ZMQ close with messages queued), so a daemon thread
  checks too and ends the process, removing the socket directory the dead
  parent can no longer remove.

Not `PR_SET_PDEATHSIG`: it fires when the *thread* that started the child
exits, which would kill an Engine's children when the thread that built the
Engine returns.
"""

from __future__ import annotations

import logging
import mmap
import os
import shutil
import threading
import time

logger = logging.getLogger(__name__)

PARENT_POLL_S = 0.25


class Heartbeat:
    """Two doubles in a shared file mapping: [last stamp (monotonic), has work].

    A small file in the server's socket directory, mapped by both sides: the
    children are started as fresh interpreters (runtime/child_process.py), so
    the heartbeat travels by path, not as an inherited multiprocessing array.
    CLOCK_MONOTONIC is system-wide on Linux, so stamps from the child compare
    with `time.monotonic()` in the parent. Lock-free: one writer, and an
    aligned 8-byte store is not torn on the platforms we run on.
    """

    _SIZE = 16

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "wb") as f:
            f.write(bytes(self._SIZE))
        self._map()
        self.beat(busy=False)

    def _map(self) -> None:
        with open(self.path, "r+b") as f:  # the mapping outlives the file object
            self._mmap = mmap.mmap(f.fileno(), self._SIZE)
        self._values = memoryview(self._mmap).cast("d")

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self._map()

    def beat(self, busy: bool) -> None:
        self._values[1] = 1.0 if busy else 0.0
        self._values[0] = time.monotonic()

    def age(self) -> float:
        """Seconds since the scheduler last went round its loop."""
        return time.monotonic() - self._values[0]

    def busy(self) -> bool:
        """The scheduler had queued or running requests at its last beat."""
        return self._values[1] != 0.0


def exit_with_parent(socket_dir: str | None, name: str) -> threading.Thread:
    """Start a daemon thread that ends this process (exit code 1) soon after
    its parent dies; `socket_dir` is removed first."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        logger.error("%s: the server process is gone; exiting", name)
        if socket_dir:
            shutil.rmtree(socket_dir, ignore_errors=True)
        logging.shutdown()
        os._exit(1)

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread
