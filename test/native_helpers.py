"""Shared by the native-kernel tests: skip where no kernels can exist, and
fail (not skip) where they should have built but did not."""

from __future__ import annotations

import os
import shutil

import pytest

from layers.cpu_features import CAP_ENV, IsaLevel, cpu_isa
from layers.cpu_kernels import forget_cpu_choice, native_ops

requires_native_kernels = pytest.mark.skipif(
    shutil.which("c++") is None or os.environ.get("RADIXSERVE_NO_NATIVE_KERNELS", "") not in ("", "0"),
    reason="no C++ compiler, or native kernels disabled",
)


def built_native_ops():
    ops = native_ops()
    assert ops is not None, "the native CPU kernels failed to build (see the warning above)"
    return ops


# The CPU levels, for tests that run every variant this machine can: one
# param per level up to this CPU's (or a RADIXSERVE_CPU_ISA cap the whole run
# has), so an AMX machine tests AVX-512, AVX2 and the portable paths too.
def machine_level() -> IsaLevel:
    return cpu_isa().level


def level_params(lowest: IsaLevel = IsaLevel.GENERIC) -> list:
    top = machine_level()
    return [pytest.param(level, id=level.name.lower()) for level in IsaLevel if lowest <= level <= top]


@pytest.fixture
def cpu_level(request, monkeypatch):
    """Runs the test with this process capped at the param's level, as
    RADIXSERVE_CPU_ISA would (parametrize with `level_params`, indirect)."""
    level = request.param
    monkeypatch.setenv(CAP_ENV, level.name.lower())
    forget_cpu_choice()
    yield level
    # monkeypatch restores the variable after this; the next call reads it again.
    forget_cpu_choice()
