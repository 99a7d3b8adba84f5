"""Engine from a plain script: no `if __name__ == "__main__":` guard, run as a
file and fed to `python -` on stdin. The child processes must not re-import
the script (they did under multiprocessing's spawn: "scheduler process
exited during start-up with code 1"), and an Engine left open must not keep
the script from exiting or leave children behind."""

from __future__ import annotations

import subprocess
import sys
import time

from server_helpers import alive

# Deliberately unguarded, and never shut down: the end of the script must do it.
SCRIPT = """
from runtime import Engine

engine = Engine(model_path={model!r}, dtype="float32", max_total_tokens=2048, device="cpu")
out = engine.generate("The cat sat", {{"max_new_tokens": 4, "temperature": 0}})
print("GENERATED", out["meta_info"]["completion_tokens"], flush=True)
print("CHILDREN", *[p.pid for p in engine.children.processes.values()], flush=True)
"""


def _check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr
    assert "GENERATED 4" in result.stdout, result.stdout + result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("CHILDREN")]
    pids = [int(p) for p in line.split()[1:]]
    assert len(pids) == 2  # scheduler and detokenizer
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids), "a child outlived the script"
    assert "Traceback" not in result.stderr, result.stderr


def test_unguarded_script_file(tiny_qwen3, tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(SCRIPT.format(model=str(tiny_qwen3)))
    # cwd is the script's folder, not the repository: the package must come
    # from the installation, as for a user's own script.
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240,
                            cwd=tmp_path)
    _check(result)


def test_script_on_stdin(tiny_qwen3, tmp_path):
    result = subprocess.run([sys.executable, "-"], input=SCRIPT.format(model=str(tiny_qwen3)),
                            capture_output=True, text=True, timeout=240, cwd=tmp_path)
    _check(result)
