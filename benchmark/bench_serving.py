"""Online serving benchmark: an asyncio HTTP load generator against a running server.

    python -m benchmark.bench_serving --backend native --dataset random --num-prompts 200 \\
        --random-input-len 512 --random-output-len 128 --request-rate 8 --max-concurrency 32

Backends: native (`POST /generate`), openai (`/v1/completions`), openai-chat
(`/v1/chat/completions`); every request streams. Datasets: random (random
token ids decoded to text), generated-shared-prefix (groups sharing a long
system prompt), sharegpt (a local ShareGPT-format JSON file). Requests arrive
as a Poisson process at `--request-rate` (`inf`: all at once), at most
`--max-concurrency` in flight. Reports throughput, TTFT, TPOT, ITL and
end-to-end latency (mean / median / p99); `--output-file` writes it as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import numpy as np
from tqdm import tqdm

MAX_ERRORS_REPORTED = 5
# ShareGPT filters (SGLang's): drop degenerate turns and ones too long for a 2k-context model.
SHAREGPT_MIN_LEN, SHAREGPT_MAX_PROMPT, SHAREGPT_MAX_TOTAL = 4, 1024, 2048


@dataclass
class RequestInput:
    prompt: str
    prompt_len: int  # by the client's tokenizer; the server's own count wins when it reports one
    output_len: int


@dataclass
class RequestOutput:
    success: bool = False
    error: str = ""
    ttft: float = 0.0  # seconds to the first chunk that carried tokens
    itl: list[float] = field(default_factory=list)  # gaps between token-carrying chunks
    latency: float = 0.0
    text: str = ""
    output_tokens: int = 0
    prompt_tokens: int = 0
    reported_output_tokens: int | None = None  # server's count (meta_info / usage), if any
    reported_prompt_tokens: int | None = None


# ------------------------------------------------------------------ datasets


def _token_pool(tokenizer) -> list[int]:
    # Special tokens would end or restructure the prompt; keep them out of random text.
    special = set(tokenizer.all_special_ids)
    return [i for i in range(len(tokenizer)) if i not in special]


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def random_text(tokenizer, length: int, rng: random.Random, pool: list[int]) -> tuple[str, int]:
    """Text of about `length` tokens. Decoding random ids and re-encoding merges or
    splits tokens, so trim (or top up) and re-check a few times."""
    ids = [rng.choice(pool) for _ in range(length)]
    for _ in range(4):
        again = _encode(tokenizer, tokenizer.decode(ids))
        if len(again) == length:
            break
        ids = again[:length] + [rng.choice(pool) for _ in range(length - len(again))]
    text = tokenizer.decode(ids)
    return text, len(_encode(tokenizer, text))


def _draw_len(length: int, ratio: float, rng: random.Random) -> int:
    return rng.randint(max(1, int(length * (1 - ratio))), max(1, length))


def sample_random(args: argparse.Namespace, tokenizer, rng: random.Random) -> list[RequestInput]:
    pool = _token_pool(tokenizer)
    out = []
    for _ in range(args.num_prompts):
        text, n = random_text(tokenizer, _draw_len(args.random_input_len, args.random_range_ratio, rng), rng, pool)
        out.append(RequestInput(text, n, _draw_len(args.random_output_len, args.random_range_ratio, rng)))
    return out


def sample_shared_prefix(args: argparse.Namespace, tokenizer, rng: random.Random) -> list[RequestInput]:
    pool = _token_pool(tokenizer)
    out = []
    for _ in range(args.gsp_num_groups):
        system, _ = random_text(tokenizer, args.gsp_system_prompt_len, rng, pool)
        for _ in range(args.gsp_prompts_per_group):
            question, _ = random_text(tokenizer, args.gsp_question_len, rng, pool)
            prompt = system + "\n" + question
            out.append(RequestInput(prompt, len(_encode(tokenizer, prompt)), args.gsp_output_len))
    return out


def _first_exchange(conversation: list[dict]) -> tuple[str, str] | None:
    for turn, reply in zip(conversation, conversation[1:]):
        if turn.get("from") in ("human", "user") and reply.get("from") in ("gpt", "assistant"):
            return turn.get("value", ""), reply.get("value", "")
    return None


def sample_sharegpt(args: argparse.Namespace, tokenizer, rng: random.Random) -> list[RequestInput]:
    if not args.dataset_path:
        raise ValueError("--dataset sharegpt needs --dataset-path to a ShareGPT JSON file")
    with open(args.dataset_path) as f:
        data = json.load(f)
    rng.shuffle(data)
    out: list[RequestInput] = []
    for entry in data:
        exchange = _first_exchange(entry.get("conversations") or entry.get("conversation") or [])
        if exchange is None:
            continue
        prompt_len = len(_encode(tokenizer, exchange[0]))
        output_len = args.sharegpt_output_len or len(_encode(tokenizer, exchange[1]))
        if prompt_len < SHAREGPT_MIN_LEN or output_len < SHAREGPT_MIN_LEN:
            continue
        if prompt_len > SHAREGPT_MAX_PROMPT or prompt_len + output_len > SHAREGPT_MAX_TOTAL:
            continue
        out.append(RequestInput(exchange[0], prompt_len, output_len))
        if len(out) == args.num_prompts:
            break
    if not out:
        raise ValueError(f"no usable conversations in {args.dataset_path}")
    if len(out) < args.num_prompts:
        print(f"warning: only {len(out)} usable conversations; running {len(out)} prompts", file=sys.stderr)
    return out


DATASETS = {"random": sample_random, "generated-shared-prefix": sample_shared_prefix, "sharegpt": sample_sharegpt}

# ------------------------------------------------------------------ backends


def native_payload(req: RequestInput, args: argparse.Namespace) -> dict:
    params = {"max_new_tokens": req.output_len, "temperature": 0.0, "ignore_eos": not args.disable_ignore_eos}
    return {"text": req.prompt, "sampling_params": params, "stream": True}


def _openai_common(req: RequestInput, args: argparse.Namespace) -> dict:
    # ignore_eos is an SGLang/vLLM extension; include_usage gives the server's token counts.
    return {"model": args.model, "max_tokens": req.output_len, "temperature": 0.0, "stream": True,
            "ignore_eos": not args.disable_ignore_eos, "stream_options": {"include_usage": True}}


def openai_payload(req: RequestInput, args: argparse.Namespace) -> dict:
    return {**_openai_common(req, args), "prompt": req.prompt}


def chat_payload(req: RequestInput, args: argparse.Namespace) -> dict:
    return {**_openai_common(req, args), "messages": [{"role": "user", "content": req.prompt}]}


def native_update(out: RequestOutput, event: dict) -> bool:
    """Native chunks are cumulative; a chunk is new only if the token count grew
    (the server may resend the same state)."""
    meta = event.get("meta_info", {})
    count = meta.get("completion_tokens", len(event.get("output_ids", ())))
    out.reported_prompt_tokens = meta.get("prompt_tokens", out.reported_prompt_tokens)
    grew = count > (out.reported_output_tokens or 0)
    out.reported_output_tokens = count
    out.text = event.get("text", out.text)
    return grew


def openai_update(out: RequestOutput, event: dict) -> bool:
    """OpenAI chunks carry deltas; the final include_usage chunk has no choices."""
    if usage := event.get("usage"):
        out.reported_output_tokens = usage.get("completion_tokens")
        out.reported_prompt_tokens = usage.get("prompt_tokens")
    delta = ""
    for choice in event.get("choices") or ():
        delta += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    out.text += delta
    return bool(delta)


def llamacpp_payload(req: RequestInput, args: argparse.Namespace) -> dict:
    # llama-server's own endpoint: its OpenAI routes run every reply through a
    # chat-format parser that rejects some random-token text.
    return {"prompt": req.prompt, "n_predict": req.output_len, "temperature": 0.0, "stream": True,
            "ignore_eos": not args.disable_ignore_eos}


def llamacpp_update(out: RequestOutput, event: dict) -> bool:
    if event.get("stop"):
        out.reported_output_tokens = event.get("tokens_predicted", out.reported_output_tokens)
        out.reported_prompt_tokens = event.get("tokens_evaluated", out.reported_prompt_tokens)
    delta = event.get("content") or ""
    out.text += delta
    return bool(delta)


Backend = tuple[str, Callable[[RequestInput, argparse.Namespace], dict], Callable[[RequestOutput, dict], bool]]
BACKENDS: dict[str, Backend] = {
    "native": ("/generate", native_payload, native_update),
    "openai": ("/v1/completions", openai_payload, openai_update),
    "openai-chat": ("/v1/chat/completions", chat_payload, openai_update),
    "llamacpp": ("/completion", llamacpp_payload, llamacpp_update),
}

# ------------------------------------------------------------------ requests


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """`data:` payloads of an SSE stream. Buffered by hand: aiohttp's line reader
    caps a line at 64 KiB, and native chunks repeat the whole text so far."""
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.startswith(b"data:"):
                yield line[5:].strip().decode()
    if buffer.startswith(b"data:"):
        yield buffer[5:].strip().decode()


def _error_message(body: str) -> str:
    try:
        err = json.loads(body).get("error", body)
        return str(err.get("message", err) if isinstance(err, dict) else err)
    except (ValueError, AttributeError):
        return body


async def send_request(session: aiohttp.ClientSession, url: str, backend: Backend,
                       req: RequestInput, args: argparse.Namespace) -> RequestOutput:
    _, make_payload, update = backend
    out = RequestOutput(prompt_tokens=req.prompt_len)
    start = last = time.perf_counter()
    first = True
    try:
        async with session.post(url, json=make_payload(req, args)) as response:
            if response.status != 200:
                out.error = f"HTTP {response.status}: {_error_message(await response.text())}"
                return out
            async for data in sse_events(response):
                if data == "[DONE]":
                    out.success = True
                    break
                event = json.loads(data)
                if "error" in event:
                    out.error = _error_message(data)
                    return out
                if update(out, event):
                    now = time.perf_counter()
                    if first:
                        out.ttft, first = now - start, False
                    else:
                        out.itl.append(now - last)
                    last = now
                if event.get("stop") is True:  # llama-server's last event; no [DONE] follows
                    out.success = True
                    break
            if not out.success:
                out.error = "stream ended without [DONE]"
                return out
            out.latency = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 -- one broken request must not end the run
        out.error = f"{type(exc).__name__}: {exc}"
    return out


async def arrivals(requests: list[RequestInput], rate: float, rng: random.Random) -> AsyncIterator[RequestInput]:
    # Poisson process: exponential gaps between arrivals, independent of completions.
    for i, req in enumerate(requests):
        if i and rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))
        yield req


# ------------------------------------------------------------------ report


@dataclass
class BenchmarkReport:
    backend: str
    dataset: str
    num_prompts: int
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    input_throughput: float
    output_throughput: float
    total_token_throughput: float
    mean_ttft_ms: float | None
    median_ttft_ms: float | None
    p99_ttft_ms: float | None
    mean_tpot_ms: float | None
    median_tpot_ms: float | None
    p99_tpot_ms: float | None
    mean_itl_ms: float | None
    median_itl_ms: float | None
    p99_itl_ms: float | None
    mean_e2e_latency_ms: float | None
    median_e2e_latency_ms: float | None
    p99_e2e_latency_ms: float | None
    concurrency: float
    max_concurrency: int | None
    request_rate: float | str  # "inf" keeps the JSON valid (no Infinity literal)
    errors: list[str]


def _stats(name: str, seconds: list[float]) -> dict[str, float | None]:
    # None, not NaN, when nothing was measured (e.g. TPOT with 1-token outputs): valid JSON.
    ms = np.asarray(seconds) * 1000
    have = len(ms) > 0
    return {f"mean_{name}_ms": float(ms.mean()) if have else None,
            f"median_{name}_ms": float(np.median(ms)) if have else None,
            f"p99_{name}_ms": float(np.percentile(ms, 99)) if have else None}


def build_report(args: argparse.Namespace, outputs: list[RequestOutput], duration: float) -> BenchmarkReport:
    ok = [o for o in outputs if o.success]
    inputs = sum(o.prompt_tokens for o in ok)
    produced = sum(o.output_tokens for o in ok)
    tpots = [(o.latency - o.ttft) / (o.output_tokens - 1) for o in ok if o.output_tokens > 1]
    return BenchmarkReport(
        backend=args.backend, dataset=args.dataset, num_prompts=len(outputs), completed=len(ok),
        failed=len(outputs) - len(ok), duration_s=duration, total_input_tokens=inputs,
        total_output_tokens=produced, request_throughput=len(ok) / duration,
        input_throughput=inputs / duration, output_throughput=produced / duration,
        total_token_throughput=(inputs + produced) / duration,
        **_stats("ttft", [o.ttft for o in ok]), **_stats("tpot", tpots),
        **_stats("itl", [gap for o in ok for gap in o.itl]), **_stats("e2e_latency", [o.latency for o in ok]),
        concurrency=sum(o.latency for o in ok) / duration, max_concurrency=args.max_concurrency,
        request_rate="inf" if args.request_rate == float("inf") else args.request_rate,
        errors=[o.error for o in outputs if not o.success][:MAX_ERRORS_REPORTED],
    )


def print_report(report: dict[str, Any]) -> None:
    print(f"{' Serving Benchmark Result ':=^60}")
    for key, value in ((k, v) for k, v in report.items() if k != "errors"):
        shown = "n/a" if value is None else f"{value:.2f}" if isinstance(value, float) else value
        print(f"{key:<40}{shown:>20}")
    for message in report["errors"]:
        print(f"error: {message}")
    print("=" * 60)


# ------------------------------------------------------------------ driver


async def _get_json(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(url) as response:
        response.raise_for_status()
        return await response.json()


async def resolve_server(session: aiohttp.ClientSession, args: argparse.Namespace):
    """Fill in --model / --tokenizer from the server, then load the tokenizer."""
    from transformers import AutoTokenizer  # slow import: only when a run starts

    if args.model is None and args.backend not in ("native", "llamacpp"):
        args.model = (await _get_json(session, args.base_url + "/v1/models"))["data"][0]["id"]
    if args.tokenizer is None:
        info = await _get_json(session, args.base_url + "/get_model_info")
        args.tokenizer = info.get("tokenizer_path") or info["model_path"]
    return AutoTokenizer.from_pretrained(args.tokenizer, trust_remote_code=args.trust_remote_code)


async def run_benchmark(args: argparse.Namespace) -> dict:
    if args.host is not None or args.port is not None:
        args.base_url = f"http://{args.host or '127.0.0.1'}:{args.port or 30000}"
    args.base_url = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    # limit=0: aiohttp's default pool of 100 connections would queue requests client-side
    # and count that wait as TTFT.
    # force_close: a fresh connection per request; a pooled keep-alive
    # connection the server has just timed out fails the next request
    # (llama-server closes idle ones after a few seconds).
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=6 * 3600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        tokenizer = await resolve_server(session, args)
        rng = random.Random(args.seed)
        requests = DATASETS[args.dataset](args, tokenizer, rng)
        backend = BACKENDS[args.backend]
        url = args.base_url + backend[0]
        # nullcontext: without --max-concurrency nothing holds requests back.
        limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else contextlib.nullcontext()
        pbar = tqdm(total=len(requests), disable=args.disable_tqdm)

        async def one(req: RequestInput) -> RequestOutput:
            async with limit:
                out = await send_request(session, url, backend, req, args)
            pbar.update(1)
            return out

        start = time.perf_counter()
        tasks = [asyncio.create_task(one(req)) async for req in arrivals(requests, args.request_rate, rng)]
        outputs = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        pbar.close()
    for out in outputs:
        if out.success:
            # The server's counts are exact (and include the chat template); re-tokenizing is the fallback.
            out.output_tokens = out.reported_output_tokens or len(_encode(tokenizer, out.text))
            out.prompt_tokens = out.reported_prompt_tokens or out.prompt_tokens
    report = asdict(build_report(args, outputs, duration))
    print_report(report)
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump(report, f, indent=2)
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--host", default=None, help="with --port, overrides --base-url")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--backend", choices=list(BACKENDS), default="native")
    p.add_argument("--model", default=None, help="default: the first of the server's /v1/models")
    p.add_argument("--tokenizer", default=None, help="default: the server's tokenizer_path")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the tokenizer run code shipped with it (as the server's flag)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset", choices=list(DATASETS), default="random")
    p.add_argument("--dataset-path", default=None, help="ShareGPT JSON file")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths are uniform in [len * (1 - ratio), len]")
    for name, default in [("num-groups", 8), ("prompts-per-group", 16), ("system-prompt-len", 1024),
                          ("question-len", 128), ("output-len", 128)]:
        p.add_argument(f"--gsp-{name}", type=int, default=default)
    p.add_argument("--sharegpt-output-len", type=int, default=None, help="override the reply's length")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf: all at once")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--disable-ignore-eos", action="store_true")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--output-file", default=None, help="write the report as JSON")
    args = p.parse_args(argv)
    if args.dataset == "generated-shared-prefix":
        args.num_prompts = args.gsp_num_groups * args.gsp_prompts_per_group
    return args


def main(argv: list[str] | None = None) -> dict:
    return asyncio.run(run_benchmark(parse_args(argv)))


if __name__ == "__main__":
    main()
