"""Constrained decoding's cost in serving: output tok/s of concurrent chat
requests with a JSON schema (`response_format`) against the same requests
without, alternating round by round on one server, and the time to first
token of a request whose grammar is not cached yet against one whose is.

    python -m benchmark.bench_structured --rounds 3 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import tempfile
import time
import uuid

import aiohttp

from benchmark.bench_vs_llamacpp import _free_port, our_server_cmd, running

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    },
    "required": ["name", "age", "tags"],
}


async def one(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int,
              schema: dict | None) -> tuple[float, int]:
    """(seconds to the first content, completion tokens) of one streamed chat request."""
    body = {"model": "default", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.8, "seed": sum(map(ord, prompt)) % 1000, "stream": True,
            "stream_options": {"include_usage": True}}
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    start, first, tokens = time.perf_counter(), None, 0
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    return (first if first is not None else time.perf_counter() - start), tokens


async def burst(url: str, n: int, max_tokens: int, schema: dict | None) -> float:
    """Output tok/s of `n` requests sent at once."""
    async with aiohttp.ClientSession() as session:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(session, url, f"Person {i}: describe them.", max_tokens, schema)
                                         for i in range(n)))
        return sum(t for _, t in results) / (time.perf_counter() - start)


async def first_token(url: str, schema: dict) -> float:
    async with aiohttp.ClientSession() as session:
        return (await one(session, url, "Describe a person.", 8, schema))[0]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", type=pathlib.Path, default=None, help="default: the small demo model")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--server-args", default="", help="extra launch_server flags")
    args = p.parse_args(argv)
    if args.model_path is None:
        from runtime.demo_model import demo_model_path

        args.model_path = demo_model_path("qwen3", "small")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = our_server_cmd(args.model_path, port, args.concurrency, args.server_args.split())
    report: dict = {"free": [], "json_schema": [], "ttft_uncached_s": [], "ttft_cached_s": []}
    with tempfile.TemporaryDirectory() as work, running(cmd, f"{url}/health", pathlib.Path(work) / "server.log"):
        asyncio.run(burst(url, 4, 16, SCHEMA))  # warm-up, grammar compiler included
        for _ in range(args.rounds):
            for name, schema in (("free", None), ("json_schema", SCHEMA)):
                report[name].append(asyncio.run(burst(url, args.concurrency, args.max_tokens, schema)))
                print(f"{name:>12}: {report[name][-1]:7.1f} out tok/s")
            fresh = {**SCHEMA, "description": uuid.uuid4().hex}  # new text: not in the grammar cache
            report["ttft_uncached_s"].append(asyncio.run(first_token(url, fresh)))
            report["ttft_cached_s"].append(asyncio.run(first_token(url, fresh)))
            print(f"TTFT uncached {report['ttft_uncached_s'][-1] * 1e3:.1f} ms, cached "
                  f"{report['ttft_cached_s'][-1] * 1e3:.1f} ms")
    medians = {k: statistics.median(v) for k, v in report.items()}
    print(f"json_schema / free output tok/s (medians): {medians['json_schema'] / medians['free']:.2f}x; "
          f"TTFT uncached {medians['ttft_uncached_s'] * 1e3:.1f} ms vs cached {medians['ttft_cached_s'] * 1e3:.1f} ms")
    return {"rounds": report, "medians": medians}


if __name__ == "__main__":
    main()
