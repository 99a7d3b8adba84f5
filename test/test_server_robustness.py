"""What a hostile client or an unlucky operator does to a real server
subprocess: bad token ids, huge bodies, overload, hung or killed processes,
SIGTERM under load, broken start-up. The server must answer with a clear
status, keep serving others, and never leave a process or socket behind."""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from server_helpers import alive, free_port, start_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def post(server, path, body, timeout=60, **kw):
    return requests.post(server.url + path, json=body, timeout=timeout, **kw)


def greedy(n, **kw):
    return {"max_new_tokens": n, "temperature": 0, **kw}


def long_params(n=1900):
    return {"max_new_tokens": n, "ignore_eos": True, "temperature": 0}


def wait_until(predicate, timeout, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def health(server) -> int:
    try:
        return requests.get(server.url + "/health", timeout=2).status_code
    except requests.RequestException:
        return -1


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith(b"data: "):
            payload = line[len(b"data: "):]
            events.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return events


@pytest.fixture
def spawn(tiny_qwen3, tmp_path):
    """Start a server of the tiny model; whatever a failing test leaves running is killed."""
    started = []

    def start(*extra: str):
        srv = start_server(tiny_qwen3, tmp_path, *extra)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        if srv.proc.poll() is None:
            srv.proc.kill()  # its children follow within a second
            srv.proc.wait(10)


@pytest.fixture(scope="module")
def server(tiny_qwen3, tmp_path_factory):
    srv = start_server(tiny_qwen3, tmp_path_factory.mktemp("logs"), "--dtype", "float32", "--context-length", "512")
    yield srv
    assert srv.stop() == 0


# -- bad input -------------------------------------------------------------------


def test_out_of_vocabulary_ids_are_400_on_every_route(server):
    r = post(server, "/v1/completions", {"model": "default", "prompt": [5, -1], "max_tokens": 2})
    assert r.status_code == 400
    assert "token id -1 at position 1 is outside the vocabulary [0, 4096)" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = post(server, "/v1/completions", {"model": "default", "prompt": [[5, 6], [4096]], "max_tokens": 2})
    assert r.status_code == 400 and "4096" in r.json()["error"]["message"]
    ok = post(server, "/v1/completions", {"model": "default", "prompt": [5, 4095], "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_body_over_the_limit_is_413_and_never_read_whole(server):
    port = int(server.url.rsplit(":", 1)[1])
    # A declared length far over the 32 MiB limit (past the 128 MiB the server
    # would read and drop) is refused before its body is sent.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 400000000000\r\n\r\n{\"text\": \"")
        reply = b""
        while chunk := sock.recv(4096):  # the server closes after its answer
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413"), reply
    assert "--max-request-body-mb" in reply
    # 3x the limit is read to its end and dropped, so a client that writes its
    # whole body before it reads (urllib, requests, httpx) gets the 413, not a reset.
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as refused:  # a reset would be a URLError
        urllib.request.urlopen(server.url + "/generate", data=b"x" * (96 << 20), timeout=60)
    assert refused.value.code == 413
    assert "--max-request-body-mb" in json.loads(refused.value.read())["error"]["message"]
    # A chunked body (no Content-Length) is counted as it arrives.
    chunks = (b"x" * (1 << 20) for _ in range(40))
    r = requests.post(server.url + "/generate", data=chunks, timeout=60)
    assert r.status_code == 413
    assert post(server, "/generate", {"text": "fine", "sampling_params": greedy(2)}).status_code == 200


# The 413 itself, on a bare uvicorn run as the server runs it (uvloop; h11, and
# httptools too where installed, which uvicorn then prefers) with a 4 MiB limit:
# big enough that a body 3x over it does not fit in loopback's socket buffers,
# so a server that answered and closed while the client still wrote would
# reach the client as a reset.
GUARD_LIMIT = 4 << 20


async def _echo_size(scope, receive, send):
    """The route behind the guard: how big a body it was handed, and on which client port."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = json.dumps({"size": size, "port": scope["client"][1]}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _http_impls():
    impls = ["h11"]
    try:
        import httptools  # noqa: F401  (uvicorn's "auto" takes it when installed)
        impls.append("httptools")
    except ImportError:
        pass
    return impls


@pytest.fixture(scope="module", params=_http_impls())
def guarded(request):
    """A real uvicorn on a free port, its app `BodySizeLimitMiddleware` in front of `_echo_size`."""
    import uvicorn

    from runtime.asgi_guards import BodySizeLimitMiddleware

    port = free_port()
    app = BodySizeLimitMiddleware(_echo_size, GUARD_LIMIT, drain_bytes=4 * GUARD_LIMIT)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, loop="uvloop", http=request.param,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    assert wait_until(lambda: srv.started, 10)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


def _assert_413(status, body: bytes):
    assert status == 413
    error = json.loads(body)["error"]
    assert error["code"] == 413 and error["type"] == "invalid_request_error"
    assert "limit of 4 MiB (--max-request-body-mb)" in error["message"]


def _chunks(size, step=64 << 10):
    for start in range(0, size, step):
        yield b"x" * min(step, size - start)


def _urllib_post(url, data, headers=None):
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers or {}), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _httpx():
    try:
        import httpx
    except ImportError:  # the name the openai client's HTTP library goes by in newer releases
        httpx = pytest.importorskip("httpx2")
    return httpx


@pytest.mark.parametrize("client, chunked", [
    pytest.param(client, chunked, id=f"{client}-{'chunked' if chunked else 'content-length'}")
    for client in ("requests", "urllib", "httpx", "openai") for chunked in (False, True)
    if not (client == "openai" and chunked)  # the openai client always sends a Content-Length
])
def test_a_body_over_the_limit_is_a_413_the_client_reads(guarded, client, chunked):
    """Clients write their whole body before they read: the 413 waits for it
    (read and dropped), so they get the answer instead of a reset, and the
    connection stays open for the next request."""
    url = guarded + "/v1/completions"
    big = 3 * GUARD_LIMIT
    fits = GUARD_LIMIT  # exactly the limit is fine

    def data(size):
        return _chunks(size) if chunked else b"x" * size

    if client == "requests":
        with requests.Session() as session:
            ok = session.post(url, data=data(fits), timeout=30)
            assert ok.status_code == 200 and ok.json()["size"] == fits
            r = session.post(url, data=data(big), timeout=30)
            _assert_413(r.status_code, r.content)
            after = session.post(url, data=data(fits), timeout=30)
            assert after.status_code == 200 and after.json()["size"] == fits
            assert after.json()["port"] == ok.json()["port"], "the connection was not kept for the next request"
    elif client == "urllib":
        _assert_413(*_urllib_post(url, data(big)))
        status, body = _urllib_post(url, data(fits))
        assert status == 200 and json.loads(body)["size"] == fits
    elif client == "httpx":
        with _httpx().Client(timeout=30) as http:
            ok = http.post(url, content=data(fits))
            assert ok.status_code == 200 and ok.json()["size"] == fits
            r = http.post(url, content=data(big))
            _assert_413(r.status_code, r.content)
            after = http.post(url, content=data(fits))
            assert after.status_code == 200 and after.json()["size"] == fits
            assert after.json()["port"] == ok.json()["port"], "the connection was not kept for the next request"
    else:
        openai = pytest.importorskip("openai")
        oa = openai.OpenAI(base_url=guarded + "/v1", api_key="x", max_retries=0, timeout=30)
        with pytest.raises(openai.APIStatusError) as refused:  # not APIConnectionError
            oa.completions.create(model="default", prompt="x" * big, max_tokens=1)
        assert refused.value.status_code == 413
        assert "--max-request-body-mb" in refused.value.message
        ok = requests.post(url, data=b"x" * fits, timeout=30)
        assert ok.status_code == 200 and ok.json()["size"] == fits


def _connect(url):
    return socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10)


def _read_response(sock, buf=b""):
    """One response (status, lowercased headers, body; an interim 1xx has no body) and what came after it."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {buf!r}"
        buf += chunk
    head, buf = buf.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode().split("\r\n")
    status = int(status_line.split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    length = 0 if status < 200 else int(headers.get("content-length", 0))
    while len(buf) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        buf += chunk
    return status, headers, buf[:length], buf[length:]


def _post_head(extra: bytes) -> bytes:
    return b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra + b"\r\n"


def _send_chunked(sock, size):
    for chunk in _chunks(size):
        sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    sock.sendall(b"0\r\n\r\n")


def test_expect_100_continue_over_the_limit_is_refused_before_the_body_is_sent(guarded):
    big = 3 * GUARD_LIMIT
    # A declared length over the limit: 413 at once, no 100 Continue, and the
    # connection closed, so the body the client now will not send cannot be
    # waited for or taken for its next request.
    with _connect(guarded) as sock:
        sock.sendall(_post_head(b"Expect: 100-continue\r\nContent-Length: %d\r\n" % big))
        status, headers, body, rest = _read_response(sock)
        _assert_413(status, body)
        assert headers.get("connection") == "close"
        assert rest == b"" and sock.recv(1) == b"", "the connection was left open"
    # Under the limit: 100 Continue, the body, a 200, and the connection serves another request.
    with _connect(guarded) as sock:
        sock.sendall(_post_head(b"Expect: 100-continue\r\nContent-Length: %d\r\n" % GUARD_LIMIT))
        status, _, _, rest = _read_response(sock)
        assert status == 100
        sock.sendall(b"x" * GUARD_LIMIT)
        status, _, body, rest = _read_response(sock, rest)
        assert status == 200 and json.loads(body)["size"] == GUARD_LIMIT
        # Chunked, so no length to refuse up front: 100 Continue, the body is read and dropped, 413.
        sock.sendall(_post_head(b"Expect: 100-continue\r\nTransfer-Encoding: chunked\r\n"))
        status, _, _, rest = _read_response(sock, rest)
        assert status == 100
        _send_chunked(sock, big)
        status, headers, body, rest = _read_response(sock, rest)
        _assert_413(status, body)
        assert headers.get("connection") != "close"
        sock.sendall(_post_head(b"Content-Length: 2\r\n") + b"{}")
        status, _, body, _ = _read_response(sock, rest)
        assert status == 200 and json.loads(body)["size"] == 2


def test_a_body_far_over_the_limit_is_not_read_to_its_end(guarded):
    """Past `drain_bytes` (16 MiB here) the server stops reading, answers and closes."""
    # A declared length past it: answered before the body is sent.
    with _connect(guarded) as sock:
        sock.sendall(_post_head(b"Content-Length: %d\r\n" % (1 << 40)) + b"x" * 1000)
        status, headers, body, _ = _read_response(sock)
        _assert_413(status, body)
        assert headers.get("connection") == "close"
    # A chunked body that never ends: cut off once past it, not read forever.
    sent = 0
    with _connect(guarded) as sock:
        sock.sendall(_post_head(b"Transfer-Encoding: chunked\r\n"))
        chunk = b"%x\r\n%s\r\n" % (1 << 20, b"x" * (1 << 20))
        try:  # a timeout here would mean the server stopped reading without closing
            while sent < (1 << 30):
                sock.sendall(chunk)
                sent += 1 << 20
        except (BrokenPipeError, ConnectionResetError):
            pass
        else:
            pytest.fail("the server read 1 GiB of a refused body")
    # Loopback's socket buffers can take a few dozen MiB more than the server read.
    assert sent < 4 * GUARD_LIMIT + (64 << 20)
    assert requests.post(guarded + "/v1/completions", data=b"{}", timeout=30).status_code == 200


def test_a_huge_prompt_does_not_stall_other_routes(server):
    # ~8 MiB of text takes seconds to tokenize; /health must answer meanwhile.
    text = "lorem ipsum dolor sit amet, " * 300_000
    big = {}

    def send_big():
        big["r"] = post(server, "/generate", {"text": text, "sampling_params": greedy(1)}, timeout=120)

    thread = threading.Thread(target=send_big)
    thread.start()
    worst = 0.0
    while thread.is_alive():
        start = time.monotonic()
        assert requests.get(server.url + "/health", timeout=30).status_code == 200
        worst = max(worst, time.monotonic() - start)
        time.sleep(0.05)
    thread.join()
    assert big["r"].status_code == 400 and "context length" in big["r"].json()["error"]["message"]
    # Tokenized on the event loop, this prompt held every route for ~7 s.
    assert worst < 3.0, f"/health took {worst:.2f} s while a prompt was tokenized"


def test_tiny_temperature_and_top_p_are_greedy(server):
    prompt = {"text": "the same start"}
    reference = post(server, "/generate", {**prompt, "sampling_params": greedy(8)}).json()["output_ids"]
    for params in ({"temperature": 1e-38}, {"top_p": 1e-46}):
        out = post(server, "/generate", {**prompt, "sampling_params": {"max_new_tokens": 8, **params}}).json()
        assert out["output_ids"] == reference, params


def test_chat_without_max_tokens_gets_the_room_left(server, tiny_qwen3):
    # 512-token context: a prompt with fewer than 128 tokens of room once got a 400.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3)
    content = " ".join(f"w{i}" for i in range(600))
    while True:
        messages = [{"role": "user", "content": content}]
        n = len(tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)))
        if n <= 440:
            break
        content = content[: int(len(content) * 0.95)]
    body = {"model": "default", "messages": messages, "temperature": 0, "ignore_eos": True}
    r = post(server, "/v1/chat/completions", body, timeout=120)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert 512 - usage["prompt_tokens"] < 128
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 512
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_a_non_streamed_client_that_leaves_is_aborted(spawn):
    # Its request gets an update every step, which once hid the disconnect.
    srv = spawn("--log-level", "info")
    # Leave early: the tiny model's 1900 tokens take only a few seconds, and a
    # client that left late could see its request finish before the abort.
    with pytest.raises(requests.Timeout):
        post(srv, "/generate", {"text": "leaving", "sampling_params": long_params()}, timeout=0.3)

    def idle():
        state = requests.get(srv.url + "/get_server_info", timeout=10).json()["internal_states"][0]
        return state["running_requests"] == 0 and state["waiting_requests"] == 0

    assert wait_until(idle, 5)
    assert wait_until(lambda: "client disconnected; aborting" in srv.log(), 2)
    assert "Traceback" not in srv.log()
    assert srv.stop() == 0


# -- overload --------------------------------------------------------------------


def test_queue_bound_gives_503_with_retry_after(spawn):
    srv = spawn("--max-running-requests", "1", "--max-queued-requests", "2",
                       "--health-check-timeout", "1")
    try:
        statuses = []
        lock = threading.Lock()

        def client(i, n=20):
            r = post(srv, "/generate", {"text": f"client {i}", "sampling_params": long_params(n)}, timeout=300)
            with lock:
                statuses.append((r.status_code, r.headers.get("Retry-After"), r.json()))

        blocker = threading.Thread(target=client, args=(-1, 1900))
        blocker.start()

        def blocker_running():
            state = requests.get(srv.url + "/get_server_info", timeout=10).json()["internal_states"][0]
            return state["running_requests"] == 1

        assert wait_until(blocker_running, 10, interval=0.02)
        # No request has completed lately and the only slot is busy: the probe times out.
        assert requests.get(srv.url + "/health_generate", timeout=30).status_code == 503
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in [blocker, *threads]:
            t.join(300)
        refused = [s for s in statuses if s[0] == 503]
        served = [s for s in statuses if s[0] == 200]
        assert len(refused) + len(served) == 9 and refused and served
        assert all(retry == "1" and "queue is full" in body["error"]["message"] for _, retry, body in refused)
        assert all(body["meta_info"]["completion_tokens"] in (20, 1900) for _, _, body in served)
        assert post(srv, "/generate", {"text": "after", "sampling_params": greedy(2)}).status_code == 200
        # The only slot busy again, but a request completed just now: healthy
        # at once (a probe would queue behind the blocker and time out).
        blocker = threading.Thread(target=client, args=(-2, 1900))
        blocker.start()
        assert wait_until(blocker_running, 10, interval=0.02)
        assert requests.get(srv.url + "/health_generate", timeout=30).status_code == 200
        blocker.join(300)
    finally:
        assert srv.stop() == 0


# -- faults and lifecycle -------------------------------------------------------


def _socket_dirs() -> set[str]:
    return set(glob.glob("/tmp/rxs-*"))


def test_sigkill_of_the_main_process_leaves_no_child_or_socket(spawn):
    before = _socket_dirs()
    srv = spawn()
    ours = _socket_dirs() - before
    assert len(ours) == 1
    children = srv.children()
    assert children

    def load():
        try:
            post(srv, "/generate", {"text": "busy", "sampling_params": long_params(), "stream": False}, timeout=30)
        except requests.RequestException:
            pass

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    srv.proc.kill()
    srv.proc.wait(10)
    assert wait_until(lambda: not any(alive(pid) for pid in children), 10), "a child outlived the server"
    assert wait_until(lambda: not (ours & _socket_dirs()), 5), "the socket directory was left behind"
    for t in threads:
        t.join(30)


def test_detokenizer_death_fails_requests_and_the_scheduler_exits_promptly(spawn):
    srv = spawn("--log-level", "info")
    processes = requests.get(srv.url + "/get_server_info", timeout=10).json()["processes"]
    results = []

    def load():
        r = post(srv, "/generate", {"text": "busy", "sampling_params": long_params()}, timeout=30)
        results.append(r.status_code)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    os.kill(processes["detokenizer"], signal.SIGKILL)
    assert srv.proc.wait(15) == 1
    for t in threads:
        t.join(30)
    assert results == [500] * 4
    # With the scheduler's output undeliverable, a non-zero ZMQ linger once
    # held its exit for seconds, until the launcher killed it.
    assert "did not stop" not in srv.log()
    assert not alive(processes["scheduler"])


def test_sigterm_under_load_ends_every_response_cleanly(spawn):
    srv = spawn("--shutdown-grace", "3", "--max-total-tokens", "32768")
    children = srv.children()
    outcomes: list = []
    lock = threading.Lock()

    def streamer(path, body):
        try:
            with requests.post(srv.url + path, json=body, stream=True, timeout=60) as r:
                events = sse_events(r) if r.status_code == 200 else r.json()
            with lock:
                outcomes.append(("stream", r.status_code, events))
        except requests.RequestException as err:  # a cut body would land here
            with lock:
                outcomes.append(("stream", "cut", repr(err)))

    def plain(body):
        try:
            r = post(srv, "/generate", body)
            with lock:
                outcomes.append(("plain", r.status_code, r.json()))
        except requests.RequestException as err:
            with lock:
                outcomes.append(("plain", "cut", repr(err)))

    threads = []
    for i in range(4):
        threads.append(threading.Thread(target=streamer, args=(
            "/generate", {"text": f"s{i}", "sampling_params": long_params(), "stream": True})))
        threads.append(threading.Thread(target=streamer, args=(
            "/v1/completions", {"model": "default", "prompt": f"o{i}", "max_tokens": 1900,
                                "ignore_eos": True, "stream": True})))
        threads.append(threading.Thread(target=plain, args=({"text": f"p{i}", "sampling_params": long_params()},)))
    for t in threads:
        t.start()

    def all_running():
        state = requests.get(srv.url + "/get_server_info", timeout=10).json()["internal_states"][0]
        return state["running_requests"] + state["waiting_requests"] == 12  # all arrived

    assert wait_until(all_running, 30)
    # In flight when the signal comes, short enough to finish within the grace.
    quick = threading.Thread(target=plain, args=({"text": "quick", "sampling_params": greedy(8)},))
    quick.start()
    time.sleep(0.2)
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    try:  # new work while draining: 503 (or, if already gone, no connection)
        late = post(srv, "/generate", {"text": "late", "sampling_params": greedy(2)}, timeout=10)
        assert late.status_code == 503 and late.headers.get("Retry-After")
    except requests.ConnectionError:
        pass
    code = srv.proc.wait(30)
    for t in [*threads, quick]:
        t.join(30)
    assert code == 0
    assert len(outcomes) == 13
    for kind, status, payload in outcomes:
        assert status != "cut", payload
        if status == 503:  # had not started when the grace ran out: refused, not cut
            assert "shutting down" in payload["error"]["message"]
        elif kind == "stream":
            assert status == 200 and payload[-1] == "[DONE]"
            last = payload[-2]
            finished = "error" in last or (last.get("meta_info") or {}).get("finish_reason") or \
                any(c.get("finish_reason") for c in last.get("choices", ()))
            assert finished, last
        else:
            assert status == 200, payload
    finished = [p for k, status, p in outcomes if k == "plain" and status == 200]
    assert len(finished) == 1 and finished[0]["meta_info"]["completion_tokens"] == 8  # "quick", within the grace
    assert "Traceback" not in srv.log()
    assert wait_until(lambda: not any(alive(pid) for pid in children), 5)


def test_hung_scheduler_turns_health_red_and_the_watchdog_exits(spawn):
    srv = spawn("--health-check-timeout", "2", "--watchdog-timeout", "4")
    processes = requests.get(srv.url + "/get_server_info", timeout=10).json()["processes"]
    scheduler = processes["scheduler"]
    try:
        os.kill(scheduler, signal.SIGSTOP)
        # Idle and stopped: unhealthy, but nothing pending, so no watchdog exit.
        assert wait_until(lambda: health(srv) == 503, 6)
        time.sleep(3)
        assert srv.proc.poll() is None
        os.kill(scheduler, signal.SIGCONT)
        assert wait_until(lambda: health(srv) == 200, 5)
        # Stopped with a request pending: the watchdog ends the server.
        os.kill(scheduler, signal.SIGSTOP)
        start = time.monotonic()
        r = post(srv, "/generate", {"text": "stuck", "sampling_params": greedy(4)}, timeout=30)
        assert r.status_code == 500 and "watchdog" in r.json()["error"]["message"]
        assert srv.proc.wait(20) != 0
        assert time.monotonic() - start < 15
    finally:
        if alive(scheduler):
            os.kill(scheduler, signal.SIGKILL)
        if srv.proc.poll() is None:
            srv.proc.kill()
    assert wait_until(lambda: not any(alive(pid) for pid in processes.values()), 10)


# -- start-up -------------------------------------------------------------------


def _launch(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "runtime.launch_server", "--log-level", "info", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_port_in_use_is_found_before_the_model_loads(tiny_qwen3):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _launch("--model-path", str(tiny_qwen3), "--port", str(port))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr and "scheduler" not in result.stderr  # no process was started


def test_missing_model_path_is_one_clear_line(tmp_path):
    result = _launch("--model-path", str(tmp_path / "nope"), "--port", str(free_port()))
    assert result.returncode == 1
    assert "no such directory" in result.stderr and "Traceback" not in result.stderr
    assert "Repo id" not in result.stderr


def test_missing_tokenizer_files_refuse_to_start(tiny_qwen3, tmp_path):
    model = tmp_path / "no-tokenizer"
    model.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        os.symlink(tiny_qwen3 / name, model / name)
    result = _launch("--model-path", str(model), "--port", str(free_port()))
    assert result.returncode == 1
    assert "no tokenizer in" in result.stderr and "--skip-tokenizer-init" in result.stderr
    assert "Traceback" not in result.stderr
