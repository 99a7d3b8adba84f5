"""What this CPU can run, asked once per process, and the cap a developer sets.

Every CPU code path is chosen from `cpu_isa()`:

- the native kernels (layers/cpu_kernels) take its `kernel_mask` with every
  call and run the best variant the mask allows (generic, AVX2, AVX-512,
  AVX512-BF16, AMX);
- oneDNN's bf16 weight prepack (layers/cpu_gemm.py) only where oneDNN has a
  bf16 path (AVX-512 BW/VL/DQ here: below that it refuses at load time).

The features come from the CPU itself (cpuid through the native module, so
an emulator reports the CPU it emulates; /proc/cpuinfo would name the host's),
or, where the native module is not built, from torch's own cpuinfo probe (x86)
or the kernel's hwcaps (arm64).

`RADIXSERVE_CPU_ISA=generic|avx2|avx512|amx` caps the level: a developer's
AVX-512 or AMX machine runs every lower path with it. It never raises the
level above what the CPU has. An unknown value is an error at start-up; an
unknown CPU (another architecture, or a probe that fails) gets the portable
path with one warning.

One choice is tuning, not instruction sets: whether the linears
software-prefetch their weight streams (on Intel, off elsewhere: measured
both ways, see `CpuIsa.stream_prefetch`). `RADIXSERVE_CPU_PREFETCH=0|1`
overrides it, for A/B runs.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import platform
from dataclasses import dataclass
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

CAP_ENV = "RADIXSERVE_CPU_ISA"
PREFETCH_ENV = "RADIXSERVE_CPU_PREFETCH"


class IsaLevel(enum.IntEnum):
    """The CPU classes the kernels are written for, lowest first."""

    GENERIC = 0  # any CPU: portable C++ and torch's kernels
    AVX2 = 1  # AVX2 + FMA + F16C
    AVX512 = 2  # AVX-512 F / BW / VL / DQ
    AMX = 3  # AMX tile + bf16 (with AVX512-BF16)

    @classmethod
    def parse(cls, name: str) -> IsaLevel:
        try:
            return cls[name.strip().upper()]
        except KeyError:
            choices = "|".join(level.name.lower() for level in cls)
            raise ValueError(f"{CAP_ENV}={name!r}: expected one of {choices}") from None


# The kernels' ISA mask bits (layers/cpu_kernels/isa.h), and one tuning bit:
# software-prefetch the linears' weight streams.
ISA_AVX2, ISA_AVX512, ISA_AVX512_BF16, ISA_AMX = 1, 2, 4, 8
TUNE_STREAM_PREFETCH = 16

# What each level needs, named as Linux's /proc/cpuinfo flags.
_LEVEL_NEEDS = {
    IsaLevel.AVX2: ("avx2", "fma", "f16c"),
    IsaLevel.AVX512: ("avx512f", "avx512bw", "avx512vl", "avx512dq"),
    IsaLevel.AMX: ("amx_tile", "amx_bf16", "avx512_bf16", "amx_permitted"),
}


@dataclass(frozen=True)
class CpuFeatures:
    arch: str  # platform.machine(): x86_64, aarch64, ...
    flags: frozenset[str]
    source: str  # "cpuid", "torch", "hwcap" or "none"

    @property
    def level(self) -> IsaLevel:
        """The highest level whose features (and every lower level's) are all here."""
        if self.arch not in ("x86_64", "AMD64"):
            return IsaLevel.GENERIC
        best = IsaLevel.GENERIC
        for level in (IsaLevel.AVX2, IsaLevel.AVX512, IsaLevel.AMX):
            if not all(flag in self.flags for flag in _LEVEL_NEEDS[level]):
                break
            best = level
        return best


@dataclass(frozen=True)
class CpuIsa:
    """The features, the cap, and the level this process runs at."""

    features: CpuFeatures
    cap: IsaLevel | None
    prefetch_override: bool | None = None  # RADIXSERVE_CPU_PREFETCH=0|1, else the vendor decides

    @property
    def level(self) -> IsaLevel:
        detected = self.features.level
        return detected if self.cap is None else min(detected, self.cap)

    def at(self, level: IsaLevel) -> CpuIsa:
        """The same CPU capped at `level` (tests run every lower path with it)."""
        return CpuIsa(self.features, level if self.cap is None else min(level, self.cap), self.prefetch_override)

    @property
    def stream_prefetch(self) -> bool:
        """Whether the linears software-prefetch their weight streams. Measured
        both ways: on an Intel Xeon the prefetches made a decode step's
        linears 1.3x faster; on an AMD Zen 4 they made them 1.15-1.45x slower
        (its hardware prefetchers keep up alone). Other CPUs: off, the
        hardware's own choice."""
        if self.prefetch_override is not None:
            return self.prefetch_override
        return "vendor_intel" in self.features.flags

    @property
    def kernel_mask(self) -> int:
        level, flags = self.level, self.features.flags
        mask = 0
        if level >= IsaLevel.AVX2:
            mask |= ISA_AVX2
        if level >= IsaLevel.AVX512:
            mask |= ISA_AVX512
            if "avx512_bf16" in flags:
                mask |= ISA_AVX512_BF16
        if level >= IsaLevel.AMX:
            mask |= ISA_AMX
        if level >= IsaLevel.AVX2 and self.stream_prefetch:
            mask |= TUNE_STREAM_PREFETCH
        return mask

    @property
    def onednn_bf16(self) -> bool:
        """Whether oneDNN's bf16 linear (and its weight prepack) runs here:
        it needs AVX-512 BW/VL/DQ (or AVX-NE-CONVERT, which this project has
        not measured: those CPUs take the AVX2 kernels)."""
        return self.level >= IsaLevel.AVX512

    def describe(self) -> dict:
        return {
            "arch": self.features.arch,
            "level": self.level.name.lower(),
            "detected_level": self.features.level.name.lower(),
            "cap": None if self.cap is None else self.cap.name.lower(),
            "features": sorted(self.features.flags),
            "features_source": self.features.source,
            "stream_prefetch": self.stream_prefetch,
            "torch_capability": torch.backends.cpu.get_cpu_capability(),
        }


def _torch_flags() -> frozenset[str]:
    """x86 features from torch's cpuinfo probe (no native module to ask)."""
    cpu = torch.cpu
    flags = set()
    if getattr(cpu, "_is_avx2_supported", lambda: False)():
        flags |= {"avx2", "fma", "f16c"}  # every AVX2 CPU has FMA and F16C
    if getattr(cpu, "_is_avx512_supported", lambda: False)():
        flags |= {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        flags.add("avx512_bf16")
    if getattr(cpu, "_is_vnni_supported", lambda: False)():
        flags.add("avx512_vnni")
    # AMX needs the native module's permission request, so it is left out here.
    return frozenset(flags)


def _hwcap_flags() -> frozenset[str]:
    """arm64 features from the kernel's hwcaps (getauxval through libc)."""
    import ctypes

    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError):
        return frozenset()
    getauxval.restype = ctypes.c_ulong
    hwcap, hwcap2 = getauxval(16), getauxval(26)  # AT_HWCAP, AT_HWCAP2
    bits = {"asimd": (hwcap, 1), "asimddp": (hwcap, 20), "sve": (hwcap, 22), "sve2": (hwcap2, 1),
            "i8mm": (hwcap2, 13), "bf16": (hwcap2, 14)}
    return frozenset(name for name, (word, bit) in bits.items() if word >> bit & 1)


def probe_features(module: ModuleType | None) -> CpuFeatures:
    arch = platform.machine()
    if module is not None and hasattr(module, "cpu_features"):
        return CpuFeatures(arch, frozenset(k for k, v in module.cpu_features().items() if v), "cpuid")
    if arch in ("x86_64", "AMD64"):
        return CpuFeatures(arch, _torch_flags(), "torch")
    if arch in ("aarch64", "arm64"):
        return CpuFeatures(arch, _hwcap_flags(), "hwcap")
    return CpuFeatures(arch, frozenset(), "none")


def read_cap() -> IsaLevel | None:
    value = os.environ.get(CAP_ENV, "").strip()
    return IsaLevel.parse(value) if value else None


def read_prefetch_override() -> bool | None:
    value = os.environ.get(PREFETCH_ENV, "").strip()
    if not value:
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{PREFETCH_ENV}={value!r}: expected 0 or 1")
    return value == "1"


@functools.cache
def cpu_isa() -> CpuIsa:
    """This process's CPU and level, asked once (the native module, if it
    builds, answers the probe)."""
    from layers.cpu_kernels import built_module

    features = probe_features(built_module())
    isa = CpuIsa(features, read_cap(), read_prefetch_override())
    if features.arch not in ("x86_64", "AMD64", "aarch64", "arm64"):
        logger.warning("CPU architecture %s is not one the native kernels know: the portable paths run", features.arch)
    if isa.cap is not None and isa.cap > features.level:
        logger.warning("%s=%s is above this CPU's level (%s): running at %s", CAP_ENV, isa.cap.name.lower(),
                       features.level.name.lower(), isa.level.name.lower())
    return isa


def log_cpu_isa() -> None:
    """One line at start-up: what the CPU has and which level runs."""
    isa = cpu_isa()
    info = isa.describe()
    logger.info("CPU: %s, level %s (detected %s%s), features from %s: %s", info["arch"], info["level"],
                info["detected_level"], f", capped by {CAP_ENV}" if isa.cap is not None else "",
                info["features_source"], " ".join(info["features"]) or "none")


def cpu_report() -> dict:
    """`describe()` plus the variant each native kernel runs (none: torch's
    path), for /server_info."""
    from layers.cpu_kernels import native_ops

    ops = native_ops()
    return {**cpu_isa().describe(), "kernels": dict(ops.kernel_units()) if ops is not None else "torch (not built)"}
