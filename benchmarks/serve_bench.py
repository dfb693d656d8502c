#!/usr/bin/env python
"""Serving numbers, bundled model on this CPU:

  1. aggregate decode tokens/s of batched generation at batch 1, 2, 4, 8 (`generate([...], max_batch=b)`,
     b prompts of held-out text, --tokens new tokens each, experts resident: the CPU default);
  2. expert bytes copied per generated token, offloaded at --slots slots per layer, batch 1 vs 4;
  3. time to first token: the server (an SSE stream over HTTP, the openai client's path) vs
     `generate(stream=True)` in-process, same prompt, median of --repeats;
  4. the server under load: 1, 4 and 16 concurrent SSE streams (--max-batch 16, experts resident), each
     stream issuing requests back to back (--tokens new tokens, different held-out prompts): p50 / p99
     time to first token and aggregate generated tokens/s over the wall time.

    python benchmarks/serve_bench.py [--tokens 32] [--slots 4] [--repeats 5] [--only concurrency] [--out JSON]

--only concurrency runs part 4 alone and merges it into an existing --out file.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import threading
import time

import httpx
import uvicorn

from moe_offload import runtime
from moe_offload.results import result_metadata, write_json_atomic
from moe_offload.serve import ServeConfig, create_app


def prompts(om, n: int, length: int = 24) -> list[list[int]]:
    ids = om.encode_text(runtime.bundled_heldout_text().read_text(encoding="utf-8"))
    step = len(ids) // (n + 1)
    return [ids[i * step: i * step + length] for i in range(n)]


def aggregate(tokens: int) -> dict[str, float]:
    om = runtime.load(device="cpu")
    out = {}
    for b in (1, 2, 4, 8):
        ps = prompts(om, b)
        om.generate(ps, max_new_tokens=4, max_batch=b)  # warm
        t0 = time.perf_counter()
        res = om.generate(ps, max_new_tokens=tokens, max_batch=b)
        dt = time.perf_counter() - t0
        out[str(b)] = sum(len(r.token_ids) for r in res) / dt
        print(f"batch {b}: {out[str(b)]:.1f} tokens/s aggregate", flush=True)
    return out


def bytes_per_token(tokens: int, slots: int) -> dict[str, float]:
    out = {}
    with runtime.load(device="cpu", cache_per_layer=slots) as om:
        ps = prompts(om, 4)
        for b in (1, 4):
            cache = om.expert_cache
            cache.clear()  # the same cold start for both
            start, n = int(cache.stats.bytes_h2d.sum()), 0
            for i in range(0, len(ps), b):
                n += sum(len(r.token_ids) for r in om.generate(ps[i:i + b], max_new_tokens=tokens, max_batch=b))
            out[str(b)] = (int(cache.stats.bytes_h2d.sum()) - start) / n
            print(f"{slots} slots/layer, batch {b}: {out[str(b)] / 1e6:.3f} MB copied per generated token", flush=True)
    return out


def ttft(repeats: int) -> dict[str, float]:
    om = runtime.load(device="cpu")
    prompt = "And the LORD said unto Moses"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(om, ServeConfig()), host="127.0.0.1", port=port,
                                           log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    srv, gen = [], []
    body = {"model": "moe-offload", "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.Client() as client:
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            with client.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
                first = None
                for line in r.iter_lines():  # read to the end: the request then leaves cleanly
                    if first is None and line.startswith("data: {") and '"text": ""' not in line:
                        first = time.perf_counter() - t0
                srv.append(first)
            t0 = time.perf_counter()
            stream = om.generate(prompt, max_new_tokens=8, stream=True)
            next(iter(stream))
            gen.append(time.perf_counter() - t0)
            for _ in stream:
                pass
    server.should_exit = True
    th.join(timeout=10)
    out = {"server_ms": statistics.median(srv[1:]) * 1e3, "generate_ms": statistics.median(gen[1:]) * 1e3}
    print(f"time to first token: server {out['server_ms']:.1f} ms, generate {out['generate_ms']:.1f} ms", flush=True)
    return out


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def concurrency(tokens: int, levels=(1, 4, 16), requests: int = 32) -> dict[str, dict[str, float]]:
    from concurrent.futures import ThreadPoolExecutor

    om = runtime.load(device="cpu")
    ps = [om.decode(p) for p in prompts(om, 32)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(om, ServeConfig(max_batch=16)), host="127.0.0.1", port=port,
                                           log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/completions"

    def one(client: httpx.Client, prompt: str) -> tuple[float, int]:
        body = {"model": "moe-offload", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        first, n = None, 0
        with client.stream("POST", url, json=body, timeout=600) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                d = json.loads(line[6:])
                if first is None and d["choices"] and d["choices"][0]["text"]:
                    first = time.perf_counter() - t0
                if d.get("usage"):
                    n = d["usage"]["completion_tokens"]
        return first if first is not None else time.perf_counter() - t0, n

    out = {}
    with httpx.Client() as warm:
        one(warm, ps[0])
    for c in levels:
        per = max(2, requests // c)

        def worker(w: int) -> list[tuple[float, int]]:
            with httpx.Client() as client:
                return [one(client, ps[(w * per + i) % len(ps)]) for i in range(per)]

        t0 = time.perf_counter()
        with ThreadPoolExecutor(c) as ex:
            res = [x for rs in ex.map(worker, range(c)) for x in rs]
        wall = time.perf_counter() - t0
        ttfts = [r[0] for r in res]
        out[str(c)] = {"requests": len(res), "ttft_p50_ms": _percentile(ttfts, 0.5) * 1e3,
                       "ttft_p99_ms": _percentile(ttfts, 0.99) * 1e3,
                       "tokens_per_second": sum(r[1] for r in res) / wall}
        print(f"{c:2d} concurrent streams: ttft p50 {out[str(c)]['ttft_p50_ms']:.1f} ms, p99 "
              f"{out[str(c)]['ttft_p99_ms']:.1f} ms, {out[str(c)]['tokens_per_second']:.1f} tokens/s "
              f"({len(res)} requests)", flush=True)
    server.should_exit = True
    th.join(timeout=10)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/serve.json")
    ap.add_argument("--only", choices=["concurrency"], default=None)
    args = ap.parse_args()
    if args.only == "concurrency":
        prev = json.load(open(args.out)) if os.path.exists(args.out) else {}
        meta = result_metadata("cpu")
        res = {**prev, "concurrency_meta": meta, "concurrency_tokens": args.tokens,
               "concurrent_streams": concurrency(args.tokens)}
        print("saved", write_json_atomic(args.out, res))
        return 0
    res = {**result_metadata("cpu"), "tokens": args.tokens, "slots_per_layer": args.slots,
           "aggregate_tokens_per_second": aggregate(args.tokens),
           "bytes_per_generated_token": bytes_per_token(args.tokens, args.slots),
           "time_to_first_token": ttft(args.repeats),
           "concurrency_tokens": args.tokens, "concurrent_streams": concurrency(args.tokens)}
    print("saved", write_json_atomic(args.out, res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
