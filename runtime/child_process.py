"""Start the scheduler / detokenizer as `python -m runtime.child_process`.

Why not multiprocessing: its "spawn" start method re-imports the parent's
`__main__` in every child, so `Engine(...)` in a script without an
`if __name__ == "__main__":` guard started another Engine in each child (and
failed), and a script read from stdin (`python -`) could not be re-imported
at all. Here the child runs only this module: the parent pickles
`(target, kwargs)` down the child's stdin, and hands it the write end of the
start-up pipe as an inherited file descriptor. (fork is no alternative: the
parent may hold CUDA, ZMQ and threads.)

`ChildProcess` offers the few `multiprocessing.Process` members runtime/launch.py
uses, so its start-up checks, watchdog and shutdown are unchanged; children
still notice a dead parent through managers/liveness.py.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, Pipe
from typing import Any

# The directory holding our packages (runtime/, managers/, ...), so the child
# imports the same code as the parent, whatever its working directory.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ChildProcess:
    """A `subprocess.Popen` behind the `multiprocessing.Process` interface."""

    def __init__(self, name: str, popen: subprocess.Popen) -> None:
        self.name = name
        self.popen = popen
        self.pid = popen.pid

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def exitcode(self) -> int | None:
        """None while running; negative: killed by that signal (as multiprocessing)."""
        return self.popen.poll()

    def terminate(self) -> None:
        if self.is_alive():
            self.popen.terminate()

    def kill(self) -> None:
        if self.is_alive():
            self.popen.kill()

    def join(self, timeout: float | None = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass


def start_child(name: str, target: Callable[..., Any], kwargs: dict[str, Any]) -> tuple[ChildProcess, Connection]:
    """Run `target(ready=<pipe>, **kwargs)` in a new interpreter; returns the
    process and the read end of its start-up pipe. `target` must be a
    module-level function of an importable module (it is pickled by name)."""
    if target.__module__ == "__main__":
        raise ValueError(f"{target.__qualname__} lives in __main__, which a child process cannot import")
    if not sys.executable:
        raise RuntimeError("cannot start child processes: sys.executable is unknown")
    reader, writer = Pipe(duplex=False)
    # Two layers: the child extends sys.path before it unpickles the call.
    payload = pickle.dumps({
        "sys_path": [p for p in sys.path if p],
        "ready_fd": writer.fileno(),
        "call": pickle.dumps((target, kwargs)),
    })
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    try:
        popen = subprocess.Popen(
            [sys.executable, "-m", "runtime.child_process", name],
            stdin=subprocess.PIPE, pass_fds=(writer.fileno(),), env=env, close_fds=True,
        )
    finally:
        # Only the child may hold the write end: its exit then reads as EOF here.
        writer.close()
    try:
        assert popen.stdin is not None
        popen.stdin.write(payload)
        popen.stdin.close()
    except BrokenPipeError:
        pass  # it died at once; waiting for its report gives the exit code
    return ChildProcess(name, popen), reader


def _main() -> None:
    # The parent decides when we stop; a Ctrl-C in the terminal reaches the
    # whole process group, us included, and must not kill us mid-start.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    payload = pickle.load(sys.stdin.buffer)
    sys.stdin.close()
    sys.stdin = open(os.devnull)  # noqa: SIM115 - lives as long as the process
    for path in payload["sys_path"]:  # as multiprocessing's spawn did, minus __main__
        if path not in sys.path:
            sys.path.append(path)
    ready = Connection(payload["ready_fd"], readable=False)
    target, kwargs = pickle.loads(payload["call"])
    code = 1
    try:
        target(ready=ready, **kwargs)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        # Leave as multiprocessing's children did: flush, then os._exit,
        # skipping interpreter teardown. Tearing down a process that holds a
        # torch.distributed (gloo) group runs C++ destructors of still-live
        # threads: "terminate called without an active exception", SIGABRT,
        # seen on a TP rank that had stopped cleanly.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    _main()
