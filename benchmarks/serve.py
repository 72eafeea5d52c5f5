"""Serving throughput: requests/s, tokens/s and latency (p50, p99) of `python -m xlab.serve` at 1, 16 and 64
concurrent clients, and the server's resident memory (idle and peak) when this script started it.

The server runs in its own process (started here on a free loopback port, or already running: --url); this process
is the load: N client threads, each sending its next request as soon as its last one is answered (closed loop),
until --requests requests are done. Every request asks for --max-tokens tokens (sampled at temperature 1, its own
seed) after one of a few short prompts; tokens are the completion tokens the server reports (a row that samples
eos ends early). rows/batch = rows decoded / batches, from the server's /health: how much of the concurrency the
batcher turned into batched decoding.

    python benchmarks/serve.py --ckpt tests/fixtures/ckpt_435677f/step_000003 --max-tokens 16
    python benchmarks/serve.py --ckpt outputs/DATE/TIME/checkpoints/last --requests 64 --max-tokens 64
    python benchmarks/serve.py --url http://127.0.0.1:8000 --clients 1 8
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

PROMPTS = ["The list", "A dictionary", "Return the", "import os", "class", "def f(x):", "If the file", "This module"]


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def start_server(ckpt: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "xlab.serve", f"ckpt={ckpt}", f"port={port}", *extra],
                            cwd=Path(__file__).resolve().parent.parent)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while True:
        try:
            get(url + "/health")
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start (exit code {proc.poll()})") from None
            time.sleep(0.2)


def load(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    """`requests` requests from `clients` threads; returns the row of the table."""
    before = get(url + "/health")
    latencies: list[float] = []
    tokens = [0]
    lock, next_request = threading.Lock(), iter(range(requests))

    def client() -> None:
        while True:
            with lock:
                i = next(next_request, None)
            if i is None:
                return
            body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "seed": i}
            started = time.perf_counter()
            reply = post(url, body)
            with lock:
                latencies.append(time.perf_counter() - started)
                tokens[0] += reply["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    after = get(url + "/health")
    batches = after["batches"] - before["batches"]
    return {"clients": clients, "requests": requests, "wall_s": wall, "requests_per_s": requests / wall,
            "tokens_per_s": tokens[0] / wall, "latency_p50_s": statistics.median(latencies),
            "latency_p90_s": sorted(latencies)[int(0.9 * (len(latencies) - 1))],
            "latency_p99_s": sorted(latencies)[int(0.99 * (len(latencies) - 1))],
            "rows_per_batch": (after["rows"] - before["rows"]) / max(batches, 1)}


def memory_mb(proc: subprocess.Popen | None) -> dict[str, float]:
    """The server's resident memory now (VmRSS) and at its peak (VmHWM), in MB; {} for a server not started here."""
    if proc is None:
        return {}
    status = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in status if ":" in line)
    return {key: int(fields[key].split()[0]) / 1e3 for key in ("VmRSS", "VmHWM")}


def worst_request(url: str, model: str, proc: subprocess.Popen | None) -> str:
    """One request at the default bounds' largest (4 prompts x n=16 = 64 rows, each up to 1024 tokens, sampled):
    its time and the server's peak RSS after it (a row ends at eos or at the model's context)."""
    started = time.perf_counter()
    reply = post(url, {"model": model, "prompt": PROMPTS[:4], "max_tokens": 1024, "n": 16, "seed": 0})
    peak = memory_mb(proc).get("VmHWM", float("nan"))
    return (f"worst allowed request (64 rows, max_tokens=1024): {time.perf_counter() - started:.1f} s, "
            f"{reply['usage']['completion_tokens']} tokens; server RSS peak after it {peak:.0f} MB")


def table(rows: list[dict]) -> str:
    lines = ["| clients | requests | wall s | requests/s | tokens/s | latency p50 s | latency p99 s | rows/batch |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['wall_s']:.2f} | {r['requests_per_s']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {r['latency_p50_s']:.3f} | {r['latency_p99_s']:.3f} | "
                     f"{r['rows_per_batch']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--ckpt", help="start `python -m xlab.serve ckpt=CKPT` on a free loopback port")
    where.add_argument("--url", help="a running server")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--server-arg", action="append", default=[], help="an extra xlab.serve override")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--worst", action="store_true", help="then the largest request the default bounds allow "
                        "(4 prompts x n=16 = 64 rows of max_tokens=1024: max_request_rows, max_tokens_limit), "
                        "and the peak RSS")
    args = parser.parse_args()
    proc, url = start_server(args.ckpt, args.server_arg) if args.ckpt else (None, args.url.rstrip("/"))
    try:
        model = get(url + "/v1/models")["data"][0]["id"]
        post(url, {"model": model, "prompt": PROMPTS[0], "max_tokens": args.max_tokens, "seed": 0})  # warm-up
        idle = memory_mb(proc)
        rows = [load(url, model, c, args.requests, args.max_tokens) for c in args.clients]
        peak = memory_mb(proc)
        worst = worst_request(url, model, proc) if args.worst else None
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"model {model}, {args.max_tokens} new tokens per request, {platform.processor() or platform.machine()}")
    print(table(rows))
    if idle:
        print(f"server RSS: {idle['VmRSS']:.0f} MB idle (after a warm-up request), {peak['VmHWM']:.0f} MB peak")
    if worst:
        print(worst)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
