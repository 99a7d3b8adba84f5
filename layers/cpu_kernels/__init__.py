"""Native CPU kernels, compiled once per machine with the system's C++ compiler.

`make install` builds them (`python -m layers.cpu_kernels`); a process that
finds no build compiles on first use. The build lands in a cache folder keyed
by the sources, the torch version and the CPU's instruction sets (it is built
with -march=native), so a copied home folder never runs code built for
another CPU. If the compiler is missing or the build fails, `native_ops()`
returns None once, with a warning, and every caller keeps its pure-torch path.

Set RADIXSERVE_NO_NATIVE_KERNELS=1 to force the torch paths (A/B runs, and
the tests that check the two agree).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import pathlib
import platform
import sys
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

_SOURCES = ("bindings.cpp", "attention.cpp", "gemm.cpp", "int_gemm.cpp", "int_gemm_amx.cpp", "norm.cpp", "rope.cpp", "activation.cpp", "moe.cpp")
_HEADERS = ("numerics.h", "int_gemm_layout.h")  # not compiled on their own, but part of the build's identity
_DISABLE_ENV = "RADIXSERVE_NO_NATIVE_KERNELS"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor()


def _build_dir(sources: list[pathlib.Path]) -> pathlib.Path:
    digest = hashlib.sha256()
    for path in sources:
        # The path too: two checkouts must not share (and rebuild) one folder.
        digest.update(str(path.resolve()).encode())
        digest.update(path.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(sys.version.encode())
    digest.update(_cpu_flags().encode())
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
    return cache / "radixserve" / "cpu_kernels" / digest.hexdigest()[:16]


def build_dir() -> pathlib.Path:
    """Where this checkout's kernels are built for this machine."""
    here = pathlib.Path(__file__).parent
    return _build_dir([here / name for name in _SOURCES + _HEADERS])


def build(verbose: bool = False) -> ModuleType:
    """Compile (or load the cached build of) the extension; raises on failure."""
    from torch.utils.cpp_extension import load

    sources = [pathlib.Path(__file__).parent / name for name in _SOURCES]
    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    # torch guards a build with a plain `lock` file, which a process killed
    # mid-build leaves behind; every later process would then wait on it
    # forever. An flock is dropped by the kernel when its holder dies: take
    # it, and any `lock` file found while holding it is such a leftover.
    with open(folder / "radixserve.flock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        (folder / "lock").unlink(missing_ok=True)
        return load(
            name="radixserve_cpu_kernels",
            sources=[str(p) for p in sources],
            build_directory=str(folder),
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"],
            extra_ldflags=["-fopenmp"],
            verbose=verbose,
        )


@functools.cache
def native_ops() -> ModuleType | None:
    """The compiled kernels, or None when they are disabled or cannot be built."""
    if os.environ.get(_DISABLE_ENV, "") not in ("", "0"):
        return None
    try:
        return build()
    except Exception as exc:  # a missing compiler, headers or ninja: fall back, loudly once
        logger.warning("native CPU kernels unavailable, using the torch paths: %s", str(exc).splitlines()[0] if str(exc) else exc)
        return None
