"""Load test of `dsv3 serve`: throughput and latency percentiles at a few concurrency levels.

Starts its own server on 127.0.0.1 (a free port, never another host), sends streaming completions with a fixed
number of output tokens (ignore_eos), and for each concurrency level stops after --requests requests or
--time-limit seconds, whichever comes first. Reports requests/s, output tokens/s, and p50/p99 of the time to the
first token (TTFT) and of the whole request, as a Markdown table.

    python benchmarks/load.py --concurrency 1 4 16 64 --requests 64 --max-tokens 32
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dsv3.server.metrics import parse_metrics

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
HOST = "127.0.0.1"  # loopback only: this tool never sends load anywhere else
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu", "nu",
         "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega"]


def prompt_for(i: int, words: int) -> str:
    # Distinct prompts, so that the prefix cache does not turn the test into a cache benchmark.
    return f"Request {i}: " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(words))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(args, log_file) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "dsv3", "serve", "--host", HOST, "--port", str(port),
           "--max-num-seqs", str(max(args.concurrency)), "--max-queue", str(4 * max(args.concurrency))]
    if args.model:
        cmd += ["--model", args.model]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    cmd += args.server_args
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {log_file.name}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server was not healthy after {args.startup_timeout} s; see {log_file.name}")


async def one_request(http: httpx.AsyncClient, i: int, args) -> dict:
    body = {"prompt": prompt_for(i, args.prompt_words), "max_tokens": args.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    usage = None
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if ttft is None and data["choices"] and data["choices"][0]["text"]:
                ttft = time.perf_counter() - t0
            if data.get("usage"):
                usage = data["usage"]
    total = time.perf_counter() - t0
    return {"ttft": ttft if ttft is not None else total, "latency": total,
            "tokens": usage["completion_tokens"] if usage else 0}


async def run_level(url: str, concurrency: int, n_requests: int, args, offset: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 4)
    results, started = [], 0
    async with httpx.AsyncClient(base_url=url, timeout=args.time_limit + 120, limits=limits) as http:
        t0 = time.perf_counter()
        deadline = t0 + args.time_limit

        async def worker() -> None:
            nonlocal started
            while started < n_requests and time.perf_counter() < deadline:
                i = offset + started
                started += 1
                results.append(await one_request(http, i, args))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    ttft = np.array([r["ttft"] for r in ok]) if ok else np.zeros(1)
    lat = np.array([r["latency"] for r in ok]) if ok else np.zeros(1)
    return {"concurrency": concurrency, "requests": len(ok), "errors": len(results) - len(ok), "elapsed": elapsed,
            "req_s": len(ok) / elapsed, "tok_s": sum(r["tokens"] for r in ok) / elapsed,
            "ttft_p50": np.percentile(ttft, 50), "ttft_p99": np.percentile(ttft, 99),
            "lat_p50": np.percentile(lat, 50), "lat_p99": np.percentile(lat, 99)}


def table(rows: list[dict]) -> str:
    out = [("| concurrency | requests | errors | requests/s | output tokens/s | TTFT p50 (ms) | TTFT p99 (ms) | "
            "latency p50 (ms) | latency p99 (ms) |"),
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['req_s']:.2f} | {r['tok_s']:.1f} | "
                   f"{r['ttft_p50'] * 1e3:.0f} | {r['ttft_p99'] * 1e3:.0f} | {r['lat_p50'] * 1e3:.0f} | "
                   f"{r['lat_p99'] * 1e3:.0f} |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: the embedded model)")
    p.add_argument("--dtype", help="server compute dtype (default: the server's)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level (upper bound)")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per level before no new request starts")
    p.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (eos ignored)")
    p.add_argument("--prompt-words", type=int, default=24, help="words per prompt")
    p.add_argument("--warmup", type=int, default=4, help="requests before measuring")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("server_args", nargs="*", help="extra `dsv3 serve` flags after --, e.g. -- --speculative off")
    args = p.parse_args()
    if min(args.concurrency) < 1 or args.requests < 1 or args.time_limit <= 0:
        p.error("--concurrency values and --requests must be >= 1, --time-limit > 0")

    log = tempfile.NamedTemporaryFile("wb", prefix="dsv3-load-", suffix=".log", delete=False)  # noqa: SIM115
    proc, url = start_server(args, log)
    try:
        if args.warmup:  # first calls pay for one-time work (allocator growth, kernel selection)
            asyncio.run(run_level(url, min(args.warmup, 4), args.warmup, args, 10**6))
        rows, offset = [], 0
        for c in args.concurrency:
            rows.append(asyncio.run(run_level(url, c, args.requests, args, offset)))
            offset += args.requests
            print(f"concurrency {c}: {rows[-1]['requests']} requests in {rows[-1]['elapsed']:.1f} s",
                  file=sys.stderr)
        metrics = httpx.get(url + "/metrics", timeout=10).text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    with open(log.name, errors="replace") as f:
        loaded = next((line.strip() for line in f if "loaded" in line and " in torch." in line), "")
    dtype = loaded.rsplit(" in torch.", 1)[-1].split()[0] if loaded else args.dtype or "?"
    spec = parse_metrics(metrics).get("dsv3_spec_decode_acceptance_ratio", 0.0)
    info = (f"{platform.machine()}, {os.cpu_count()} CPUs; model {args.model or 'embedded default'}; dtype {dtype}; "
            f"prompts ~{args.prompt_words} words, {args.max_tokens} output tokens/request; speculative acceptance "
            f"{spec:.2f}; server log {log.name}")
    print(info)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
