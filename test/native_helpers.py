"""Shared by the native-kernel tests: skip where no kernels can exist, and
fail (not skip) where they should have built but did not."""

from __future__ import annotations

import os
import shutil

import pytest

from layers.cpu_kernels import native_ops

requires_native_kernels = pytest.mark.skipif(
    shutil.which("c++") is None or os.environ.get("RADIXSERVE_NO_NATIVE_KERNELS", "") not in ("", "0"),
    reason="no C++ compiler, or native kernels disabled",
)


def built_native_ops():
    ops = native_ops()
    assert ops is not None, "the native CPU kernels failed to build (see the warning above)"
    return ops
