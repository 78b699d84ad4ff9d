"""Bounded load test of an OpenAI-compatible server on this machine (loopback only).

For each concurrency level (default 1, 4, 16 clients) every client sends ``--requests``
streaming completions one after another; the script reports aggregate output tokens/s (all
tokens of the level / its wall time), p50/p95 request latency and p50 time to first token.
``ignore_eos`` (a vLLM extra llmslim also accepts) fixes every output at ``--max-tokens``,
so servers are compared on equal work.

    python serve/load_test.py --url http://127.0.0.1:8000 --clients 1,4,16 --max-tokens 128

It refuses any host but the loopback one and caps the total number of requests: it is a
benchmark of the server, not a way to load someone else's.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import statistics
import sys
import time
from urllib.parse import urlparse

import httpx

MAX_TOTAL_REQUESTS = 2000
PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
          "combined movable metal type, oil-based ink and a wooden press adapted from wine making. "
          "Write a short essay about how it changed the spread of knowledge in Europe.")


def loopback_only(url: str) -> str:
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        sys.exit(f"refusing {url}: this load test only talks to the loopback interface (127.0.0.1)")
    return url.rstrip("/")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def one_request(client: httpx.AsyncClient, model: str, max_tokens: int, ignore_eos: bool) -> dict:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos}
    t0 = time.perf_counter()
    ttft, tokens, chunks = None, 0, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    tokens = tokens or chunks  # servers without stream usage (llama-cpp-python): one token per chunk
    latency = time.perf_counter() - t0
    return {"latency": latency, "ttft": ttft if ttft is not None else latency, "tokens": tokens}


async def run_level(url: str, headers: dict, model: str, clients: int, requests: int, max_tokens: int,
                    ignore_eos: bool) -> dict:
    limits = httpx.Limits(max_connections=clients + 4)
    timeout = httpx.Timeout(600.0, connect=10.0)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout) as client:

        async def worker() -> list[dict]:
            return [await one_request(client, model, max_tokens, ignore_eos) for _ in range(requests)]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker() for _ in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    latencies = [r["latency"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": round(wall, 2),
            "tok_s": round(tokens / wall, 1), "p50_s": round(percentile(latencies, 0.5), 2),
            "p95_s": round(percentile(latencies, 0.95), 2),
            "ttft_p50_s": round(percentile([r["ttft"] for r in results], 0.5), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model id (default: the server's first)")
    p.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    p.add_argument("--requests", type=int, default=2, help="requests per client per level (default 2)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    p.add_argument("--warmup", type=int, default=1, help="requests before measuring (default 1)")
    p.add_argument("--api-key", default=os.environ.get("LLMSLIM_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)

    url = loopback_only(args.url)
    levels = [int(c) for c in args.clients.split(",") if c.strip()]
    if any(c < 1 for c in levels) or args.requests < 1 or not 1 <= args.max_tokens <= 4096:
        sys.exit("clients and requests must be >= 1, max-tokens in [1, 4096]")
    if sum(levels) * args.requests > MAX_TOTAL_REQUESTS:
        sys.exit(f"at most {MAX_TOTAL_REQUESTS} requests in all")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model or httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]

    for _ in range(args.warmup):
        asyncio.run(run_level(url, headers, model, 1, 1, min(args.max_tokens, 16), args.ignore_eos))
    rows = []
    print(f"{url}  model={model}  max_tokens={args.max_tokens}  ignore_eos={args.ignore_eos}")
    print(f"{'clients':>7} {'requests':>8} {'tok/s':>8} {'p50 s':>7} {'p95 s':>7} {'ttft p50':>9}")
    for clients in levels:
        row = asyncio.run(run_level(url, headers, model, clients, args.requests, args.max_tokens, args.ignore_eos))
        rows.append(row)
        print(f"{row['clients']:>7} {row['requests']:>8} {row['tok_s']:>8} {row['p50_s']:>7} {row['p95_s']:>7} "
              f"{row['ttft_p50_s']:>9}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"url": url, "model": model, "max_tokens": args.max_tokens, "levels": rows,
                       "median_p50": statistics.median(r["p50_s"] for r in rows)}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
