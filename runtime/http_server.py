"""The HTTP server: FastAPI on uvicorn (uvloop), orjson bodies.

Native routes (SGLang's contract): /generate (single, batch, SSE stream with
cumulative text), /health, /health_generate, /get_model_info,
/get_server_info, /flush_cache, /abort_request, /metrics. OpenAI routes
come from runtime/openai_api.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from managers.io_struct import GenerateReqInput
from managers.tokenizer_manager import ServerDeadError, TokenizerManager
from runtime.launch import ChildProcesses, launch_children
from runtime.metrics import ServerMetrics
from runtime.openai_api import register_openai_routes
from runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)

class ORJSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


GENERATE_FIELDS = {f.name for f in dataclasses.fields(GenerateReqInput)}
OPEN_PATHS = ("/health",)  # reachable without the API key


def error(message: str, status: int = 400) -> ORJSONResponse:
    return ORJSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": status}}, status)


def create_app(server_args: ServerArgs, children: ChildProcesses) -> FastAPI:
    ready = children.ready
    state: dict[str, Any] = {"tm": None, "accepting": False}
    metrics = ServerMetrics(server_args.served_model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tm = TokenizerManager(server_args, children.port_args, ready.context_len, ready.max_total_num_tokens)
        tm.start()
        tm.finish_listeners.append(lambda result, ttft: metrics.observe_finished(result["meta_info"], ttft))
        state["tm"] = tm
        state["accepting"] = True
        logger.info(
            "serving %s (%s on %s, KV cache %d tokens) at http://%s:%d",
            server_args.served_model_name, ready.dtype, ready.device,
            ready.max_total_num_tokens, server_args.host, server_args.port,
        )
        yield
        state["accepting"] = False
        await tm.close()

    app = FastAPI(lifespan=lifespan, default_response_class=ORJSONResponse)
    app.state.server_state = state

    def tm() -> TokenizerManager:
        return state["tm"]

    if server_args.api_key:
        expected = f"Bearer {server_args.api_key}"

        @app.middleware("http")
        async def check_api_key(request: Request, call_next):
            if request.url.path not in OPEN_PATHS and request.headers.get("authorization") != expected:
                return error("invalid or missing API key", 401)
            return await call_next(request)

    @app.exception_handler(ServerDeadError)
    async def server_dead(_: Request, err: ServerDeadError):
        return ORJSONResponse({"error": {"message": str(err), "type": "server_error", "code": 500}}, 500)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if state["accepting"] else 503)

    @app.get("/health_generate")
    async def health_generate(request: Request) -> Response:
        if not state["accepting"] or tm().dead_reason:
            return Response(status_code=503)
        obj = GenerateReqInput(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 1, "temperature": 0})
        async for _ in tm().generate_request(obj, request):
            pass
        return Response(status_code=200)

    @app.get("/get_model_info")
    async def model_info() -> dict:
        return {
            "model_path": server_args.model_path,
            "tokenizer_path": server_args.tokenizer_path,
            "served_model_name": server_args.served_model_name,
            "context_length": ready.context_len,
            "vocab_size": ready.vocab_size,
            "is_generation": True,
        }

    @app.get("/get_server_info")
    async def server_info() -> dict:
        states = await tm().get_internal_states()
        return {
            **dataclasses.asdict(server_args),
            "max_total_num_tokens": ready.max_total_num_tokens,
            "internal_states": states,
            "processes": {name: proc.pid for name, proc in children.processes.items()},
        }

    @app.post("/flush_cache")
    async def flush_cache() -> Response:
        ok = await tm().flush_cache()
        return Response(
            "cache flushed" if ok else "not flushed: requests are running",
            status_code=200 if ok else 400,
        )

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        if not isinstance(body, dict) or not isinstance(body.get("rid"), str):
            return error("body must be {\"rid\": \"...\"}")
        tm().abort_request(body["rid"])
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics_route() -> Response:
        for s in await tm().get_internal_states():
            metrics.update_state(s)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        if not isinstance(body, dict):
            return error("the body must be a JSON object")
        unknown = set(body) - GENERATE_FIELDS
        if unknown:
            return error(f"unknown field(s): {', '.join(sorted(unknown))}")
        try:
            obj = GenerateReqInput(**body)
            stream = tm().generate_request(obj, request)
            first = await stream.__anext__()
        except ValueError as err:
            return error(str(err))
        except StopAsyncIteration:
            return error("nothing to generate")
        if obj.stream:
            return StreamingResponse(_sse(first, stream), media_type="text/event-stream")
        results = [first] + [r async for r in stream]
        results.sort(key=lambda r: r["index"])
        for r in results:
            r.pop("index")
        single = len(results) == 1 and not isinstance(obj.text, list) and not (
            obj.input_ids and isinstance(obj.input_ids[0], list)
        )
        return ORJSONResponse(results[0] if single else results)

    register_openai_routes(app, tm)
    return app


async def _json_body(request: Request) -> Any:
    try:
        return orjson.loads(await request.body())
    except orjson.JSONDecodeError as err:
        return error(f"malformed JSON: {err}")


async def _sse(first: dict, rest: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    try:
        yield b"data: " + orjson.dumps(first) + b"\n\n"
        async for chunk in rest:
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
    except ServerDeadError as err:
        yield b"data: " + orjson.dumps({"error": {"message": str(err)}}) + b"\n\n"
    yield b"data: [DONE]\n\n"


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def launch_server(server_args: ServerArgs) -> int:
    """Run until SIGINT / SIGTERM (exit 0) or a child process dies (exit 1)."""
    import uvicorn

    try:
        children = launch_children(server_args)
    except (ValueError, RuntimeError) as err:  # a bad flag for this model, a rank that failed to start
        logger.error("could not start: %s", err)
        return 1
    exit_code = 0
    try:
        app = create_app(server_args, children)
        config = uvicorn.Config(
            app,
            host=server_args.host,
            port=server_args.port,
            loop="uvloop",
            log_level=server_args.log_level if server_args.log_level != "debug" else "debug",
            timeout_graceful_shutdown=5,
        )
        server = uvicorn.Server(config)

        def on_death(name: str, code: int | None) -> None:
            nonlocal exit_code
            exit_code = 1
            tm = app.state.server_state["tm"]
            loop = server_loop.get("loop")
            if tm is not None and loop is not None:
                loop.call_soon_threadsafe(tm.fail_all, f"the {name} process died (exit code {code})")
            server.should_exit = True

        server_loop: dict[str, asyncio.AbstractEventLoop] = {}

        async def serve() -> None:
            server_loop["loop"] = asyncio.get_running_loop()
            await server.serve()

        children.watch(on_death)
        # uvicorn handles SIGINT/SIGTERM itself, then re-raises the signal to
        # the handler that was there before it: make that one a clean exit so
        # the `finally` below still stops the children.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _exit_cleanly)
        import uvloop

        uvloop.run(serve())
    finally:
        children.shutdown()
    if exit_code:
        logger.error("exiting with code %d after a child process died", exit_code)
    return exit_code
