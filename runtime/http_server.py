"""The HTTP server: FastAPI on uvicorn (uvloop), orjson bodies.

Native routes (SGLang's contract): /generate (single, batch, SSE stream with
cumulative text), /health, /health_generate, /flush_cache, /abort_request,
/metrics; the info routes (/model_info, /server_info, /get_load, and the
``get_`` aliases) come from runtime/info_routes.py, the OpenAI routes from
runtime/openai_api.py. Bodies are read by hand (see runtime/request_schema.py
for why, and for how /openapi.json still describes them); which top-level
/generate fields are taken is runtime/sglang_fields.py's business.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from managers.io_struct import GenerateReqInput
from managers.request_state import ClientDisconnected, ServerDeadError, ServiceUnavailableError
from managers.tokenizer_manager import TokenizerManager
from runtime.asgi_guards import ApiKeyMiddleware, BodySizeLimitMiddleware, DrainMiddleware
from runtime.graceful_shutdown import DrainingServer, DrainState
from runtime.info_routes import register_info_routes
from runtime.launch import ChildProcesses, launch_children
from runtime.metrics import ServerMetrics
from runtime.openai_api import register_openai_routes
from runtime.openai_responses import openai_error_body
from runtime.request_schema import AbortRequestBody, GenerateRequest, add_request_schemas
from runtime.server_args import ServerArgs
from runtime.sglang_fields import WarnOncePerName, split_generate_body

logger = logging.getLogger(__name__)

class ORJSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


OPEN_PATHS = ("/health",)  # reachable without the API key
# Routes that start generation: refused (503) once a shutdown has begun.
WORK_PATHS = ("/generate", "/v1/completions", "/v1/chat/completions")
CLIENT_CLOSED_REQUEST = 499  # nginx's code; nobody reads it, the access log does


def error(message: str, status: int = 400, err_type: str = "invalid_request_error",
          headers: dict[str, str] | None = None) -> ORJSONResponse:
    """OpenAI's error shape, used by every route."""
    return ORJSONResponse(openai_error_body(message, err_type, code=status), status, headers=headers)


def unavailable(message: str, retry_after_s: int = 1) -> ORJSONResponse:
    return error(message, 503, "service_unavailable", {"Retry-After": str(retry_after_s)})


def create_app(server_args: ServerArgs, children: ChildProcesses, drain: DrainState | None = None) -> FastAPI:
    ready = children.ready
    drain = drain or DrainState()
    state: dict[str, Any] = {"tm": None, "accepting": False}
    metrics = ServerMetrics(server_args.served_model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tm = TokenizerManager(server_args, children.port_args, ready)
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
    # Added last runs first: the key is checked before a body is read.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=int(server_args.max_request_body_mb * (1 << 20)))
    app.add_middleware(DrainMiddleware, is_draining=lambda: drain.draining, work_paths=WORK_PATHS)
    if server_args.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=server_args.api_key, open_paths=OPEN_PATHS)

    def tm() -> TokenizerManager:
        return state["tm"]

    def scheduler_alive() -> bool:
        beat = children.heartbeat
        return beat is None or beat.age() < server_args.health_check_timeout


    @app.exception_handler(ServiceUnavailableError)
    async def service_unavailable(_: Request, err: ServiceUnavailableError):
        return unavailable(str(err), err.retry_after_s)

    @app.exception_handler(ServerDeadError)
    async def server_dead(_: Request, err: ServerDeadError):
        return error(str(err), 500, "server_error")

    def healthy() -> bool:
        return state["accepting"] and not drain.draining and not tm().dead_reason and scheduler_alive()

    @app.get("/health")
    async def health() -> Response:
        """Up, taking work, and the scheduler's heartbeat is fresh."""
        return Response(status_code=200 if healthy() else 503)

    @app.get("/health_generate")
    async def health_generate(request: Request) -> Response:
        """200 at once if a request completed recently (so a busy server is
        not judged by a probe stuck in its queue), else runs a 1-token request
        and answers 503 if it does not finish in --health-check-timeout."""
        if not healthy():
            return Response(status_code=503)
        timeout = server_args.health_check_timeout
        last = tm().last_finished_at
        if last is not None and time.monotonic() - last < timeout:
            return Response(status_code=200)
        obj = GenerateReqInput(input_ids=[min(1, ready.vocab_size - 1)],
                               sampling_params={"max_new_tokens": 1, "temperature": 0})

        async def probe() -> None:
            async for _ in tm().generate_request(obj, request):
                pass

        try:
            await asyncio.wait_for(probe(), timeout)  # cancelling aborts the probe request
        except asyncio.TimeoutError:
            logger.warning("/health_generate: no result within %g s", timeout)
            return Response(status_code=503)
        return Response(status_code=200)

    register_info_routes(app, server_args, children, tm)

    # POST only (SGLang also answers GET): a side effect should not hide behind a GET.
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

    warn_unknown = WarnOncePerName(logger, "/generate")

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        if not isinstance(body, dict):
            return error("the body must be a JSON object")
        try:
            fields, unknown = split_generate_body(body)
            if unknown:
                warn_unknown(unknown)
            obj = GenerateReqInput(**fields)
            stream = tm().generate_request(obj, request)
            first = await stream.__anext__()
            if obj.stream:
                return StreamingResponse(_sse(first, stream), media_type="text/event-stream")
            results = [first] + [r async for r in stream]
        except ValueError as err:
            return error(str(err))
        except StopAsyncIteration:
            return error("nothing to generate")
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        results.sort(key=lambda r: r["index"])
        for r in results:
            r.pop("index")
        single = len(results) == 1 and not isinstance(obj.text, list) and not (
            obj.input_ids and isinstance(obj.input_ids[0], list)
        )
        return ORJSONResponse(results[0] if single else results)

    register_openai_routes(app, tm)
    add_request_schemas(app, {"/generate": GenerateRequest, "/abort_request": AbortRequestBody})
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
    except ClientDisconnected:
        return
    except (ServerDeadError, ServiceUnavailableError, ValueError) as err:
        # The status line is gone already: the error travels as an event.
        code = 400 if isinstance(err, ValueError) else 503 if isinstance(err, ServiceUnavailableError) else 500
        yield b"data: " + orjson.dumps({"error": {"message": str(err), "code": code}}) + b"\n\n"
    yield b"data: [DONE]\n\n"


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _listen_socket(host: str, port: int) -> socket.socket:
    """Bound before the model loads, so a port in use is found in a second,
    not after minutes of loading; uvicorn then serves on this very socket."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


def launch_server(server_args: ServerArgs) -> int:
    """Run until SIGINT / SIGTERM (exit 0) or a child process dies or hangs (exit 1)."""
    import uvicorn

    try:
        sock = _listen_socket(server_args.host, server_args.port)
    except OSError as err:
        logger.error("could not start: cannot listen on %s:%d: %s", server_args.host, server_args.port,
                     err.strerror or err)
        return 1
    try:
        children = launch_children(server_args)
    except (ValueError, RuntimeError) as err:  # a bad path or flag for this model, a rank that failed to start
        sock.close()
        logger.error("could not start: %s", err)
        return 1
    exit_code = 0
    try:
        drain = DrainState()
        app = create_app(server_args, children, drain)
        config = uvicorn.Config(
            app,
            host=server_args.host,
            port=server_args.port,
            loop="uvloop",
            log_level=server_args.log_level if server_args.log_level != "debug" else "debug",
            # Responses are complete before uvicorn is told to exit (see DrainingServer).
            timeout_graceful_shutdown=2,
        )
        get_tm = lambda: app.state.server_state["tm"]  # noqa: E731
        server = DrainingServer(config, drain, get_tm, server_args.shutdown_grace)

        def on_failure(reason: str) -> None:
            nonlocal exit_code
            exit_code = 1
            tm, loop = get_tm(), server.loop
            if tm is not None and loop is not None:
                loop.call_soon_threadsafe(tm.fail_all, reason)
            server.should_exit = True

        children.watch(
            on_failure,
            has_pending_work=lambda: get_tm() is not None and get_tm().is_busy(),
            watchdog_timeout=server_args.watchdog_timeout,
        )
        # uvicorn handles SIGINT/SIGTERM itself (DrainingServer.handle_exit),
        # then re-raises the signal to the handler that was there before it:
        # make that one a clean exit so the `finally` below still stops the children.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _exit_cleanly)
        import uvloop

        uvloop.run(server.serve(sockets=[sock]))
    finally:
        children.shutdown()
        sock.close()
    if exit_code:
        logger.error("exiting with code %d: a child process died or hung", exit_code)
    return exit_code
