"""Native CPU kernels, compiled once per checkout with the system's C++ compiler.

`make install` builds them (`python -m layers.cpu_kernels`); a process that
finds no build compiles on first use. The build lands in a cache folder keyed
by the sources, the torch version and the architecture.

One build holds every instruction-set variant (isa_*.cpp: generic, AVX2,
AVX-512, AVX512-BF16, AMX), each unit compiled for its own instruction set
with a target pragma, the rest for the architecture's baseline; nothing is
built with -march=native. Which variant runs is chosen per call from the mask
`layers.cpu_features.cpu_isa()` computes (the CPU's probe, capped by
RADIXSERVE_CPU_ISA), so a build made on one machine (a shared home folder, an
image) never runs an instruction the CPU it runs on lacks.

`native_ops()` hands out the module with that mask bound into every kernel
(`NativeKernels`). If the compiler is missing or the build fails, it returns
None once, with a warning, and every caller keeps its pure-torch path.

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

from layers.cpu_features import CpuIsa, IsaLevel, cpu_isa

logger = logging.getLogger(__name__)

_SOURCES = ("bindings.cpp", "dispatch.cpp", "decoder_stack.cpp", "packing.cpp", "isa_generic.cpp", "isa_avx2.cpp", "isa_avx512.cpp",
            "isa_avx512bf16.cpp", "isa_amx.cpp")
# Included, not compiled on their own, but part of the build's identity.
_HEADERS = ("isa_unit.inc", "prelude.h", "dispatch.h", "isa.h", "kernel_table.h", "numerics.h", "int_gemm_layout.h", "simd.inc", "attention.inc",
            "gemm.inc", "int_gemm.inc", "int_gemm_store.inc", "int_gemm_amx.inc", "norm.inc", "rope.inc",
            "activation.inc")
# The kernels that take the ISA mask as their last argument (bindings.cpp).
_DISPATCHED = frozenset({"paged_attention", "bf16_linear", "rms_norm_bf16", "qk_norm_rope_store", "silu_and_mul_bf16",
                         "moe_experts_bf16", "int_linear", "bf16_gemm_supported", "int_gemm_supported",
                         "int_gemm_amx_supported", "kernel_units"})
_DISABLE_ENV = "RADIXSERVE_NO_NATIVE_KERNELS"


def _build_dir(sources: list[pathlib.Path]) -> pathlib.Path:
    digest = hashlib.sha256()
    for path in sources:
        # The path too: two checkouts must not share (and rebuild) one folder.
        digest.update(str(path.resolve()).encode())
        digest.update(path.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(sys.version.encode())
    # The architecture, not the CPU: every x86-64 CPU runs the same build.
    digest.update(platform.machine().encode())
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
            # No -march: the isa_* units name their instruction sets themselves.
            extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"],
            extra_ldflags=["-fopenmp"],
            verbose=verbose,
        )


@functools.cache
def built_module() -> ModuleType | None:
    """The compiled module, or None when it is disabled or cannot be built."""
    if os.environ.get(_DISABLE_ENV, "") not in ("", "0"):
        return None
    try:
        return build()
    except Exception as exc:  # a missing compiler, headers or ninja: fall back, loudly once
        logger.warning("native CPU kernels unavailable, using the torch paths: %s", str(exc).splitlines()[0] if str(exc) else exc)
        return None


class NativeKernels:
    """The module with one CPU level bound into every kernel call: callers
    write `ops.bf16_linear(x, packed, bias, n)` and the call runs the variant
    that level allows. `at(level)` gives the same kernels at a lower level."""

    def __init__(self, module: ModuleType, isa: CpuIsa) -> None:
        self.module, self.isa = module, isa
        mask = isa.kernel_mask
        for name in _DISPATCHED:
            setattr(self, name, _bind_mask(getattr(module, name), mask))

    def __getattr__(self, name: str):  # the mask-free functions: packing, the probe
        return getattr(self.module, name)

    def at(self, level: IsaLevel) -> NativeKernels:
        return NativeKernels(self.module, self.isa.at(level))


def _bind_mask(fn, mask: int):
    def call(*args):
        return fn(*args, mask)

    call.__name__ = call.__qualname__ = fn.__name__
    return call


@functools.cache
def native_ops() -> NativeKernels | None:
    """The kernels at this process's CPU level, or None when they are
    disabled or cannot be built."""
    module = built_module()
    return None if module is None else NativeKernels(module, cpu_isa())


def forget_cpu_choice() -> None:
    """Drop the cached probe and level, so the next call reads
    RADIXSERVE_CPU_ISA again (tests that run a model at several caps)."""
    cpu_isa.cache_clear()
    native_ops.cache_clear()
