"""Every attention backend, by the name `--attention-backend` takes.

The one list the CLI choices (runtime/server_args.py), the model runner
(model_executor/model_runner.py) and the benchmarks read, so a new backend
is one entry here. Torch-free on purpose: the HTTP process imports it for
the flag's choices, and each backend's class is imported only when that
backend is created (flashinfer and triton must never load on a CPU box).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BackendSpec:
    module: str  # where the class lives, imported on first use
    class_name: str
    # Devices the server accepts it on. Triton lists cpu because the tests run
    # its kernels there under TRITON_INTERPRET=1 (the backend itself refuses
    # a CPU without it, with a message saying so).
    devices: tuple[str, ...]
    # How the backend's constructor takes the common arguments (device, dtype,
    # flashinfer workspace): the classes differ, and their tests build them directly.
    make_args: str = "none"  # none | device | device_dtype_workspace


ATTENTION_BACKENDS: dict[str, BackendSpec] = {
    # CPU default: native paged kernels, torch_native inside when they cannot be built.
    "cpu": BackendSpec("layers.attention.cpu_backend", "CpuAttnBackend", ("cpu",), "device"),
    # The reference every other backend is tested against; runs anywhere.
    "torch_native": BackendSpec("layers.attention.torch_native", "TorchNativeAttnBackend", ("cpu", "cuda")),
    "triton": BackendSpec("layers.attention.triton_backend", "TritonAttnBackend", ("cpu", "cuda"), "device"),
    "flashinfer": BackendSpec(
        "layers.attention.flashinfer_backend", "FlashInferAttnBackend", ("cuda",), "device_dtype_workspace"
    ),
}


def attention_backend_names() -> tuple[str, ...]:
    return tuple(ATTENTION_BACKENDS)


def backends_for_device(device: str) -> tuple[str, ...]:
    """The names accepted on `device` ("cpu" or "cuda")."""
    return tuple(name for name, spec in ATTENTION_BACKENDS.items() if device in spec.devices)


def backend_spec(name: str) -> BackendSpec:
    """The entry for `name`; an unknown name is a ValueError listing the known ones."""
    spec = ATTENTION_BACKENDS.get(name)
    if spec is None:
        raise ValueError(
            f"unknown attention backend {name!r}; available: {', '.join(ATTENTION_BACKENDS)}"
        )
    return spec


def device_error(name: str, device: str) -> str | None:
    """Why backend `name` cannot run on `device` (a flag-level message), or None."""
    spec = backend_spec(name)
    if device in spec.devices:
        return None
    return f"--attention-backend {name} requires --device {' or '.join(spec.devices)}, got {device}"


def create_attention_backend(name: str, device: Any, dtype: Any, *, flashinfer_workspace_mb: int) -> Any:
    """Import and build backend `name` (a layers.attention.base.AttentionBackend)."""
    spec = backend_spec(name)
    cls = getattr(importlib.import_module(spec.module), spec.class_name)
    if spec.make_args == "device":
        return cls(device)
    if spec.make_args == "device_dtype_workspace":
        return cls(device, dtype, flashinfer_workspace_mb)
    return cls()
