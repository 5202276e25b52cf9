#!/usr/bin/env python3
"""Throughput and latency of `mt serve` under concurrent clients, against `mt translate`'s batch speed.

    python scripts/bench_serve.py RUN_DIR SOURCE_FILE [--clients 1 8 64] [--sentences 1000] [--beam 5]
        [--precision int8]
    python scripts/bench_serve.py RUN_DIR SOURCE_FILE --abuse 10000

Starts a real server on a free loopback port. For each client count, the clients share the first
`--sentences` lines of SOURCE_FILE, one sentence per request (LibreTranslate's POST /translate), and
the script prints sentences/s, p50/p95/p99 latency and failed requests; then the same lines through
the batch path of `mt translate` (in this process, the model loaded once) and one sentence at a time
in-process, for the latency a single client should see. `--abuse N` sends N requests, most of them
malformed or oversized, mixed with valid ones, and checks every valid one is answered correctly,
every bad one with a 4xx, and the server's RSS stays flat.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mt.translate import Translator  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(run_dir: Path, port: int, max_wait_ms: float, precision: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "mt", "--quiet", "serve", str(run_dir), "--port", str(port), "--device", "cpu"]
    command += ["--max-wait-ms", str(max_wait_ms)] + (["--precision", precision] if precision else [])
    process = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not start")


class Client:
    """One keep-alive connection, as a real client library would hold."""

    def __init__(self, port: int):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def send(self, body: bytes, content_type: str = "application/json") -> tuple[int, bytes]:
        self.connection.request("POST", "/translate", body, {"Content-Type": content_type})
        answer = self.connection.getresponse()
        return answer.status, answer.read()


def run_clients(port: int, lines: list[str], clients: int, pair: tuple[str, str]) -> dict:
    """`clients` threads share `lines`, one sentence per request; latencies and failures."""
    latencies: list[float] = []
    failures = 0
    shares = [lines[i::clients] for i in range(clients)]

    def work(share: list[str]) -> tuple[list[float], int, list[str]]:
        client, times, failed, texts = Client(port), [], 0, []
        for line in share:
            body = json.dumps({"q": line, "source": pair[0], "target": pair[1]}).encode()
            started = time.perf_counter()
            status, answer = client.send(body)
            times.append(time.perf_counter() - started)
            if status != 200:
                failed += 1
            texts.append(json.loads(answer).get("translatedText", ""))
        return times, failed, texts

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        outcomes = list(pool.map(work, shares))
    elapsed = time.perf_counter() - started
    translations = [""] * len(lines)
    for index, (times, failed, texts) in enumerate(outcomes):
        latencies += times
        failures += failed
        translations[index::clients] = texts
    quantiles = statistics.quantiles(latencies, n=100)
    return {
        "clients": clients,
        "sentences_per_s": len(lines) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * quantiles[94],
        "p99_ms": 1000 * quantiles[98],
        "failed": failures,
        "translations": translations,
    }


def abuse(port: int, lines: list[str], count: int, pair: tuple[str, str], want: dict[str, str], pid: int) -> None:
    rng = random.Random(1)
    bad_bodies = [
        (b"{not json", "application/json"),
        (b"[1, 2]", "application/json"),
        (json.dumps({"q": 5, "source": pair[0], "target": pair[1]}).encode(), "application/json"),
        (json.dumps({"q": "x", "source": "xx", "target": "yy"}).encode(), "application/json"),
        (json.dumps({"q": ["x"] * 1000, "source": pair[0], "target": pair[1]}).encode(), "application/json"),
        (json.dumps({"q": "x" * 5000, "source": pair[0], "target": pair[1]}).encode(), "application/json"),
        (b"x" * (2 << 20), "application/json"),
        (b"q=%ff%fe&source=" + pair[0].encode(), "application/x-www-form-urlencoded"),
        (json.dumps({"q": "x", "source": pair[0], "target": pair[1], "alternatives": -3}).encode(), "application/json"),
    ]
    rss_before = rss_kb(pid)
    outcomes = {"valid ok": 0, "valid wrong": 0, "bad 4xx": 0, "bad other": 0}

    def work(seed: int) -> dict[str, int]:
        local_rng, client, counts = random.Random(seed), Client(port), dict.fromkeys(outcomes, 0)
        for _ in range(count // 8):
            if local_rng.random() < 0.2:
                line = local_rng.choice(lines)
                body = json.dumps({"q": line, "source": pair[0], "target": pair[1]}).encode()
                status, answer = client.send(body)
                ok = status == 200 and json.loads(answer)["translatedText"] == want[line]
                counts["valid ok" if ok else "valid wrong"] += 1
            else:
                body, kind = local_rng.choice(bad_bodies)
                try:
                    status, _ = client.send(body, kind)
                except (http.client.HTTPException, OSError):  # the server may close after a 413
                    client, status = Client(port), 413
                counts["bad 4xx" if 400 <= status < 500 else "bad other"] += 1
        return counts

    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        for counts in pool.map(work, [rng.randrange(1 << 30) for _ in range(8)]):
            for key, value in counts.items():
                outcomes[key] += value
    elapsed = time.perf_counter() - started
    print(f"abuse: {sum(outcomes.values())} requests in {elapsed:.1f} s: {outcomes}")
    print(f"server RSS before {rss_before / 1024:.0f} MB, after {rss_kb(pid) / 1024:.0f} MB")


def batch_count(port: int) -> int:
    """Decoded batches so far, from the server's /metrics."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", "/metrics")
    for line in connection.getresponse().read().decode().splitlines():
        if line.startswith("mt_batch_segments_count"):
            return int(line.split()[1])
    return 0


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("source", type=Path)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--abuse", type=int, default=0, help="send this many mostly malformed requests")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="the server's --max-wait-ms")
    parser.add_argument("--precision", help="the server's and the batch path's --precision (default: the model's)")
    args = parser.parse_args()

    lines = [line.strip() for line in args.source.read_text(encoding="utf-8").splitlines()][: args.sentences]
    translator = Translator(args.run_dir, device="cpu", precision=args.precision)
    if translator.options().beam != args.beam:
        raise SystemExit(f"the model's decode.beam is {translator.options().beam}; run with --beam that, or tune it")
    pair = (translator.config.data.src, translator.config.data.tgt)
    port = free_port()
    server = start_server(args.run_dir, port, args.max_wait_ms, args.precision)
    try:
        precision = translator.options().precision
        print(
            f"{len(lines)} sentences, beam {args.beam}, precision {precision}, server pid {server.pid}, "
            "torch threads per process: default"
        )
        results = []
        for clients in args.clients:
            batches_before = batch_count(port)
            result = run_clients(port, lines, clients, pair)
            results.append(result)
            batches = batch_count(port) - batches_before
            print(
                f"{clients:3d} clients: {result['sentences_per_s']:7.1f} sentences/s, p50 {result['p50_ms']:7.1f} ms, "
                f"p95 {result['p95_ms']:7.1f} ms, p99 {result['p99_ms']:7.1f} ms, failed {result['failed']}, "
                f"{len(lines) / batches:.1f} segments per decoded batch"
            )
        started = time.perf_counter()
        batch = [found[0].text for found in translator.translate(lines)]
        batch_rate = len(lines) / (time.perf_counter() - started)
        print(f"mt translate (batch, in-process): {batch_rate:.1f} sentences/s")
        single = []
        for line in lines[:100]:
            started = time.perf_counter()
            next(translator.translate([line]))
            single.append(time.perf_counter() - started)
        print(f"one sentence in-process: median {1000 * statistics.median(single):.1f} ms (first 100 sentences)")
        for result in results:
            same = sum(a == b for a, b in zip(result["translations"], batch))
            print(
                f"{result['clients']:3d} clients: {result['sentences_per_s'] / batch_rate:.0%} of batch throughput, "
                f"{result['sentences_per_s'] / results[0]['sentences_per_s']:.1f}x one client; "
                f"{same}/{len(lines)} translations identical to mt translate's"
            )
        if args.abuse:
            abuse(port, lines, args.abuse, pair, dict(zip(lines, batch)), server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        print(f"server exit code after SIGTERM: {server.wait(timeout=60)}")


if __name__ == "__main__":
    main()
