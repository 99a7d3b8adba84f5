"""Running a benchmark as a lower CPU class would, on this machine.

RADIXSERVE_CPU_ISA caps our kernels; torch's libraries have caps of their own
(oneDNN's ONEDNN_MAX_CPU_ISA, ATen's ATEN_CPU_CAPABILITY, MKL's
MKL_ENABLE_INSTRUCTIONS), all read at start-up, so the capped process must be
a child started with them. The caches and memory stay this machine's: a
stand-in for the class, not a measurement of another machine.
"""

from __future__ import annotations

import os

LEVEL_ENV = {
    "generic": {"ONEDNN_MAX_CPU_ISA": "SSE41", "ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "ATEN_CPU_CAPABILITY": "avx512",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "amx": {},
}


def emulation_env(level: str | None) -> dict[str, str]:
    """The environment for a child running at `level` (None: as this CPU is)."""
    if level is None:
        return dict(os.environ)
    return {**os.environ, "RADIXSERVE_CPU_ISA": level, **LEVEL_ENV[level]}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
