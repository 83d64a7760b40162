"""Load on ``medvlp serve``: N concurrent clients on 127.0.0.1 for a bounded time, with server-side batching
and with batch size 1, in one run.

Starts ``medvlp serve RUN`` twice on a free loopback port (``max_batch=B`` then ``max_batch=1``, fp32 so that
answers are exact), first asks each of a few (image, question) pairs once to get its reference answers, then
lets ``--clients`` clients post ``/v1/answer`` in a loop for ``--seconds``. Every response is checked against
the reference of the pair it asked (same question echoed, same answers, probabilities within 1e-4): nothing may
be lost or mixed up. Prints requests/s, p50/p95 latency, the mean batch the server formed and the gain.

    python benchmarks/serve_load.py RUN [--clients 16] [--seconds 10] [--max-batch 32] [--max-wait-ms 5]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

HOST = "127.0.0.1"  # loopback only
QUESTIONS = ("Is there a lesion?", "What modality is this?", "Which side is the lesion on?",
             "How many lesions are there?")


def pairs(count: int) -> list[tuple[bytes, str]]:
    """``count`` (PNG, question) pairs: random grey images of a few sizes."""
    out = []
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (96 + 16 * (i % 3), 128), dtype=np.uint8)
        data = io.BytesIO()
        Image.fromarray(pixels, "L").save(data, "PNG")
        out.append((data.getvalue(), QUESTIONS[i % len(QUESTIONS)]))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start(run: str, settings: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "medvlp", "serve", run, "--host", HOST, "--port", str(port),
                                "precision=fp32", "max_queue=4096", *settings],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"medvlp serve exited: {process.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("medvlp serve did not start within 180 s")


def ask(client: httpx.AsyncClient, pair: tuple[bytes, str]):
    return client.post("/v1/answer", files={"image": ("scan.png", pair[0])}, data={"question": pair[1], "k": "5"})


def matches(body: dict, question: str, reference: dict) -> bool:
    if body.get("question") != question:
        return False
    got, want = body["answers"], reference["answers"]
    return ([a["answer"] for a in got] == [a["answer"] for a in want]
            and all(abs(a["probability"] - b["probability"]) <= 1e-4 for a, b in zip(got, want)))


async def load(url: str, work: list[tuple[bytes, str]], clients: int, seconds: float) -> dict:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        references = [(await ask(client, pair)).json() for pair in work]  # one at a time
        latencies: list[float] = []
        wrong = failed = 0
        stop = time.perf_counter() + seconds

        async def one_client(index: int) -> None:
            nonlocal wrong, failed
            turn = index
            while time.perf_counter() < stop:
                pair = work[turn % len(work)]
                begin = time.perf_counter()
                response = await ask(client, pair)
                latencies.append(time.perf_counter() - begin)
                if response.status_code != 200:
                    failed += 1
                elif not matches(response.json(), pair[1], references[turn % len(work)]):
                    wrong += 1
                turn += 7  # each client walks the pairs in its own order

        begin = time.perf_counter()
        await asyncio.gather(*(one_client(i) for i in range(clients)))
        elapsed = time.perf_counter() - begin
        batching = (await client.get("/v1/model")).json()["batching"]["scores"]
    requests = len(latencies)
    passes = batching["passes"] - len(work)  # the reference requests were one pass each
    return {"requests": requests, "rps": requests / elapsed, "p50": statistics.median(latencies) * 1000,
            "p95": float(np.percentile(latencies, 95)) * 1000, "wrong": wrong, "failed": failed,
            "mean_batch": (batching["requests"] - len(work)) / max(passes, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a VQA run of `medvlp finetune` (a tiny one)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0, help="load time per setting (default 10)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--pairs", type=int, default=12, help="distinct (image, question) pairs (default 12)")
    args = parser.parse_args()
    if not Path(args.run).is_dir():
        raise SystemExit(f"{args.run}: no such run folder")
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    work = pairs(args.pairs)
    results = {}
    for name, settings in (("batched", [f"max_batch={args.max_batch}", f"max_wait_ms={args.max_wait_ms}"]),
                           ("batch size 1", ["max_batch=1", "max_wait_ms=0"])):
        process, url = start(args.run, settings)
        try:
            results[name] = asyncio.run(load(url, work, args.clients, args.seconds))
        finally:
            process.terminate()
            process.wait(30)
    print(f"{args.clients} clients, {args.seconds:g} s each, POST /v1/answer, {HOST}")
    print(f"{'':14s} {'requests':>8s} {'req/s':>7s} {'p50 ms':>7s} {'p95 ms':>7s} {'mean batch':>10s} "
          f"{'wrong':>5s} {'failed':>6s}")
    for name, r in results.items():
        print(f"{name:14s} {r['requests']:8d} {r['rps']:7.1f} {r['p50']:7.1f} {r['p95']:7.1f} "
              f"{r['mean_batch']:10.1f} {r['wrong']:5d} {r['failed']:6d}")
    print(f"gain of server-side batching: {results['batched']['rps'] / results['batch size 1']['rps']:.2f}x "
          "requests/s")
    if any(r["wrong"] or r["failed"] for r in results.values()):
        raise SystemExit("some responses were wrong or failed")


if __name__ == "__main__":
    main()
