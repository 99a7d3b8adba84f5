"""radixserve runtime: server arguments, the offline Engine, the HTTP server."""

from __future__ import annotations


def __getattr__(name: str):
    # Lazy: `import runtime.server_args` must not start importing the engine.
    if name == "Engine":
        from runtime.engine import Engine

        return Engine
    raise AttributeError(name)
