"""Read-only routes about the model, the server and its load, under SGLang's names.

SGLang renamed /get_model_info and /get_server_info to /model_info and
/server_info (keeping the old names as deprecated aliases); both spellings
answer here, identically. sglang-router (the Rust gateway, ``smg``) reads
these when it registers a worker: /server_info and /model_info for its labels,
falling back to the ``get_`` forms on a 404, and /server_info again to tell
an SGLang worker from a vLLM one when /v1/models does not say. It also probes
vLLM's /version for that, so this server must not answer /version. Its
load-aware policies and its own /get_loads read each worker's /get_load.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from importlib import metadata
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

if TYPE_CHECKING:
    from managers.tokenizer_manager import TokenizerManager
    from runtime.launch import ChildProcesses
    from runtime.server_args import ServerArgs


def _version() -> str:
    try:
        return metadata.version("radixserve")
    except metadata.PackageNotFoundError:
        return "unknown"


def checkpoint_identity(model_path: str) -> dict[str, Any]:
    """``model_type`` and ``architectures`` from the checkpoint's config.json
    (SGLang reports them; the router turns them into worker labels)."""
    try:
        with open(os.path.join(model_path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return {key: config[key] for key in ("model_type", "architectures") if key in config}


def load_entry(dp_rank: int, state: dict[str, Any]) -> dict[str, Any]:
    """SGLang's /get_load row for one data-parallel rank. ``num_tokens`` counts
    KV slots held by requests: cached prefixes nobody uses can be evicted."""
    return {
        "dp_rank": dp_rank,
        "num_reqs": state["running_requests"] + state["waiting_requests"],
        "num_waiting_reqs": state["waiting_requests"],
        "num_tokens": state["kv_used_tokens"] - state["cache_evictable_tokens"],
    }


def register_info_routes(app: FastAPI, server_args: ServerArgs, children: ChildProcesses,
                         get_tm: Callable[[], TokenizerManager]) -> None:
    ready = children.ready
    identity = checkpoint_identity(server_args.model_path)
    version = _version()

    async def model_info() -> dict:
        return {
            "model_path": server_args.model_path,
            "tokenizer_path": server_args.tokenizer_path,
            "served_model_name": server_args.served_model_name,
            "context_length": ready.context_len,
            "vocab_size": ready.vocab_size,
            "is_generation": True,
            **ready.quantization,
            **identity,
        }

    async def server_info() -> dict:
        states = await get_tm().get_internal_states()
        return {
            **dataclasses.asdict(server_args),
            # Settings are for dashboards and routers; the key is not theirs to copy.
            "api_key": "<set>" if server_args.api_key else None,
            "max_total_num_tokens": ready.max_total_num_tokens,
            "cpu": ready.cpu,
            "internal_states": states,
            "processes": {name: proc.pid for name, proc in children.processes.items()},
            "version": version,
        }

    async def get_load() -> list[dict]:
        states = await get_tm().get_internal_states()
        return [load_entry(rank, state) for rank, state in enumerate(states)]

    for path in ("/model_info", "/get_model_info"):
        app.add_api_route(path, model_info, methods=["GET"])
    for path in ("/server_info", "/get_server_info"):
        app.add_api_route(path, server_info, methods=["GET"])
    app.add_api_route("/get_load", get_load, methods=["GET"])
