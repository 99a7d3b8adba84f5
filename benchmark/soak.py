"""Soak test: a server under a long mixed load, its memory and latency sampled over time.

    python -m benchmark.soak --minutes 10                  # starts the small demo server itself
    python -m benchmark.soak --url http://127.0.0.1:30000  # or drives a running one

The load mixes what leaked before: n > 1 requests (each once left a hidden
warm-up request behind), streams cut mid-way (client disconnects), explicit
aborts and plain requests. Every `--sample-s` seconds it records the resident
memory of the server and each child process, the KV pool's use, and the
latency of one fixed probe request. Memory must be flat once the KV pool and
allocator are warm, and the probe must not get slower as requests pile up;
the report compares the first warm sample with the last. Exit code 1 if any
request failed unexpectedly or KV slots are still in use at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import aiohttp

PROBE = {"input_ids": list(range(10, 74)), "sampling_params": {"max_new_tokens": 32, "temperature": 0,
                                                                "ignore_eos": True}}


@dataclass
class Sample:
    t_s: float
    requests_done: int
    rss_mib: dict[str, float]
    kv_used_tokens: int
    probe_s: float


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Load:
    """Closed-loop clients; counts what finished and what failed."""

    def __init__(self, url: str, rng: random.Random, vocab: int) -> None:
        self.url, self.rng, self.vocab = url, rng, vocab
        self.done = 0
        self.errors: list[str] = []

    def _body(self, i: int) -> dict:
        rng = self.rng
        prefix = [7 + (i % 4)] * rng.choice([0, 48])  # some prompts share a prefix
        ids = prefix + [rng.randrange(1, self.vocab) for _ in range(rng.randint(4, 96))]
        params = {"max_new_tokens": rng.randint(1, 64), "temperature": rng.choice([0, 0.8]),
                  "n": rng.choice([1, 1, 2, 3]), "ignore_eos": True}
        return {"input_ids": ids, "sampling_params": params, "rid": f"soak-{i}"}

    async def client(self, session: aiohttp.ClientSession, first: int, stride: int, stop: float) -> None:
        i = first
        while time.monotonic() < stop:
            body = self._body(i)
            kind = self.rng.random()
            try:
                if kind < 0.25:  # a stream cut after a few chunks
                    body["stream"] = True
                    async with session.post(self.url + "/generate", json=body) as r:
                        chunks = 0
                        async for line in r.content:
                            chunks += line.startswith(b"data: ")
                            if chunks >= 3:
                                break
                elif kind < 0.35:  # aborted through the API while it runs
                    task = asyncio.ensure_future(session.post(self.url + "/generate", json=body))
                    await asyncio.sleep(0.05)
                    await session.post(self.url + "/abort_request", json={"rid": body["rid"]})
                    async with await task as r:
                        await r.read()
                        if r.status != 200:
                            self.errors.append(f"aborted request: HTTP {r.status}")
                else:
                    async with session.post(self.url + "/generate", json=body) as r:
                        if r.status != 200:
                            self.errors.append(f"HTTP {r.status}: {(await r.text())[:200]}")
                        await r.read()
            except aiohttp.ClientError as err:
                self.errors.append(repr(err))
            self.done += 1
            i += stride


async def probe(session: aiohttp.ClientSession, url: str) -> float:
    start = time.monotonic()
    async with session.post(url + "/generate", json=PROBE) as r:
        await r.read()
    return time.monotonic() - start


async def state(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(url + "/get_server_info") as r:
        return await r.json()


async def soak(args: argparse.Namespace, url: str, server_pid: int | None) -> tuple[list[Sample], Load]:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        info = await state(session, url)
        async with session.get(url + "/get_model_info") as r:
            vocab = (await r.json())["vocab_size"]
        pids = {"main": server_pid} if server_pid else {}
        pids.update(info["processes"])
        load = Load(url, random.Random(args.seed), vocab)
        stop = time.monotonic() + args.minutes * 60
        clients = [asyncio.ensure_future(load.client(session, c, args.concurrency, stop))
                   for c in range(args.concurrency)]
        samples: list[Sample] = []
        start = time.monotonic()
        while time.monotonic() < stop:
            await asyncio.sleep(args.sample_s)
            kv = (await state(session, url))["internal_states"][0]["kv_used_tokens"]
            sample = Sample(round(time.monotonic() - start, 1), load.done,
                            {name: round(rss_mib(pid), 1) for name, pid in pids.items()}, kv,
                            round(await probe(session, url), 3))
            samples.append(sample)
            print(json.dumps(asdict(sample)), flush=True)
        await asyncio.gather(*clients)
        await asyncio.sleep(1.0)
        final = (await state(session, url))["internal_states"][0]
        async with session.post(url + "/flush_cache") as r:
            flushed = r.status == 200
        after = (await state(session, url))["internal_states"][0]
        if not flushed or after["kv_used_tokens"] != 0 or final["requests_holding_kv"] != 0:
            load.errors.append(f"KV not returned at the end: {final} / after flush {after}")
        return samples, load


def report(samples: list[Sample], load: Load, warm_fraction: float) -> dict:
    warm = samples[min(len(samples) - 1, int(len(samples) * warm_fraction))]
    last = samples[-1]
    growth = {name: round(last.rss_mib[name] - warm.rss_mib[name], 1) for name in last.rss_mib}
    out = {"requests": load.done, "errors": len(load.errors), "warm_sample_t_s": warm.t_s, "last_t_s": last.t_s,
           "rss_warm_mib": warm.rss_mib, "rss_last_mib": last.rss_mib, "rss_growth_mib": growth,
           "probe_first_s": samples[0].probe_s, "probe_warm_s": warm.probe_s, "probe_last_s": last.probe_s}
    print(json.dumps(out, indent=2))
    for err in load.errors[:5]:
        print("error:", err, file=sys.stderr)
    return out


def start_demo_server(port: int, extra: list[str], size: str) -> subprocess.Popen:
    from runtime.demo_model import demo_model_path

    cmd = [sys.executable, "-m", "runtime.launch_server", "--model-path", str(demo_model_path("qwen3", size)),
           "--port", str(port), "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd)
    import urllib.request

    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("the server exited during start-up")
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not come up")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server; default: start the small demo model")
    parser.add_argument("--port", type=int, default=30123)
    parser.add_argument("--size", default="small", choices=("tiny", "small"), help="demo model to start")
    parser.add_argument("--server-args", default="--max-total-tokens 16384",
                        help="extra flags for the server this script starts")
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sample-s", type=float, default=30)
    parser.add_argument("--warm-fraction", type=float, default=0.2,
                        help="memory growth is measured from the sample at this share of the run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-file")
    args = parser.parse_args(argv)
    proc = None
    url = args.url
    if url is None:
        proc = start_demo_server(args.port, args.server_args.split(), args.size)
        url = f"http://127.0.0.1:{args.port}"
    try:
        samples, load = asyncio.run(soak(args, url, proc.pid if proc else None))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    if not samples:
        raise SystemExit("no samples: run longer than --sample-s")
    out = report(samples, load, args.warm_fraction)
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump({"summary": out, "samples": [asdict(s) for s in samples]}, f, indent=2)
    return 1 if load.errors else 0


if __name__ == "__main__":
    sys.exit(main())
