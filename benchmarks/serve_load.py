"""Bounded load test of `raysel serve` on loopback: throughput and p50/p99 latency at several concurrencies.

Starts `raysel serve` (its own local Ray cluster, 127.0.0.1, a free port) unless --url names a running one,
then acts as the client from this separate process: for each concurrency level, that many threads (one
keep-alive connection each) send a fixed number of POST /v1/score requests of real BBC text, under a time
limit (no request starts after it; each request times out at it). Exits non-zero if any request failed or
was not sent in time.

    .venv/bin/python benchmarks/serve_load.py                          # 1, 8, 32 clients
    .venv/bin/python benchmarks/serve_load.py --concurrency 1 8 --requests 40 80
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import yaml

SERVE_CONFIG = {
    "scorers": [  # the same settings: one SmolLM2 pass computes both
        {"name": "entropy", "max_tokens": 32, "batch_size": 32},
        {"name": "loss", "max_tokens": 32, "batch_size": 32},
    ],
    "embed": None,
    "limits": {"max_texts": 8, "max_chars": 2000},
    "batching": {"max_texts": 32, "wait_s": 0.02},
    "replicas": {"min": 1, "max": 1, "max_ongoing_requests": 64, "resources": {"cpus": 2}},
}


def free_port() -> int:
    while True:
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue


def start_server(config_path: Path, port: int, log_path: Path, timeout_s: float) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_agent_register_timeout_ms"] = "180000"  # a busy machine can start Ray's agent slowly
    raysel = Path(sys.executable).parent / "raysel"
    cmd = [str(raysel), "serve", "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"raysel serve exited with {proc.returncode}; see {log_path}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    raise SystemExit(f"raysel serve was not healthy in {timeout_s} s; see {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    import psutil

    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=30)
    for p in alive:
        p.kill()


def run_level(
    url: str, payloads: list[bytes], concurrency: int, requests: int, time_limit_s: float
) -> dict[str, float | int]:
    """`requests` requests from `concurrency` threads; returns throughput, latency percentiles and error count."""
    target = urlparse(url)
    lock = threading.Lock()
    next_index = [0]
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + time_limit_s

    def client() -> None:
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=time_limit_s)
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= requests or time.monotonic() > deadline:
                return
            body = payloads[i % len(payloads)]
            start = time.perf_counter()
            try:
                conn.request("POST", "/v1/score", body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                ok = resp.status == 200 and len(json.loads(data)["results"]) == len(json.loads(body)["texts"])
            except (OSError, http.client.HTTPException, ValueError) as err:
                ok, data = False, str(err).encode()
                conn.close()
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=time_limit_s)
            elapsed = time.perf_counter() - start
            with lock:
                (latencies if ok else errors).append(elapsed if ok else data[:200].decode(errors="replace"))

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    texts = sum(len(json.loads(payloads[i % len(payloads)])["texts"]) for i in range(len(latencies)))
    return {
        "concurrency": concurrency,
        "requests": len(latencies) + len(errors),
        "ok": len(latencies),
        "errors": len(errors),
        "unsent": max(0, requests - len(latencies) - len(errors)),
        "seconds": round(wall, 2),
        "req_per_s": round(len(latencies) / wall, 2),
        "texts_per_s": round(texts / wall, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else float("nan"),
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else float("nan"),
        "first_error": errors[0] if errors else "",
    }


def payloads_from_bbc(n: int, texts_per_request: int, chars: int, seed: int = 0) -> list[bytes]:
    from raysel.demo import bbc_articles

    articles = bbc_articles()
    random.Random(seed).shuffle(articles)
    texts = [a["text"][:chars] for a in articles[: n * texts_per_request]]
    return [
        json.dumps({"texts": texts[i : i + texts_per_request], "scorers": ["entropy", "loss"]}).encode()
        for i in range(0, len(texts), texts_per_request)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running service (default: start `raysel serve` here)")
    parser.add_argument("--config", type=Path, help="serve config for the started service (default: built in)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, nargs="+", default=[40, 120, 320], help="per level")
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--chars", type=int, default=400, help="characters of each article sent")
    parser.add_argument("--time-limit", type=float, default=240, help="seconds per level")
    args = parser.parse_args()
    if len(args.requests) != len(args.concurrency):
        parser.error("--requests takes one count per --concurrency level")

    tmp = Path(tempfile.mkdtemp(prefix="raysel-serve-load-"))
    proc = None
    url = args.url
    if url is None:
        config = args.config or tmp / "serve.yaml"
        if args.config is None:
            config.write_text(yaml.safe_dump(SERVE_CONFIG))
        port = free_port()
        started = time.perf_counter()
        proc = start_server(config, port, tmp / "serve.log", timeout_s=300)
        url = f"http://127.0.0.1:{port}"
        print(f"server up in {time.perf_counter() - started:.1f} s: {url} (log {tmp / 'serve.log'})", flush=True)
    try:
        payloads = payloads_from_bbc(max(args.requests), args.texts_per_request, args.chars)
        run_level(url, payloads[:4], 1, 4, 120)  # warm-up: first forward passes, thread pools
        rows = []
        for concurrency, requests in zip(args.concurrency, args.requests, strict=True):
            load_before = os.getloadavg()[0]
            row = run_level(url, payloads, concurrency, requests, args.time_limit)
            row["load_avg_1m"] = round(load_before, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if proc is not None:
            stop_server(proc)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print("| clients | requests | errors | seconds | req/s | texts/s | p50 ms | p99 ms | load avg (1 min) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['ok']} | {r['errors'] + r['unsent']} | {r['seconds']} | {r['req_per_s']} "
            f"| {r['texts_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['load_avg_1m']} |"
        )
    if any(r["errors"] or r["unsent"] for r in rows):
        raise SystemExit("some requests failed or were not sent within the time limit")


if __name__ == "__main__":
    main()
