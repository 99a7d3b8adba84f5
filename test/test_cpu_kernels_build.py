"""Building the native kernels: a build killed half-way does not block the next."""

from __future__ import annotations

import subprocess
import sys

from layers.cpu_kernels import build_dir
from native_helpers import built_native_ops, requires_native_kernels

pytestmark = requires_native_kernels


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next():
    built_native_ops()  # the cached build exists: the child only loads it
    stale = build_dir() / "lock"  # what torch's build guard leaves when its process is killed
    stale.touch()
    child = subprocess.run(
        [sys.executable, "-c", "from layers.cpu_kernels import build; build()"],
        capture_output=True, text=True, timeout=240,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    assert not stale.exists()
