"""A small closed-loop HTTP load generator for a served app: latency, throughput, batch sizes."""

from __future__ import annotations

import json
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class TrafficStats:
    """What `send` observed: per-request latency, codes and the batch size each request rode in."""

    requests: int
    seconds: float
    codes: dict[int, int]
    latencies_ms: tuple[float, ...]
    batch_rows: tuple[int, ...]

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return statistics.quantiles(self.latencies_ms, n=100, method="inclusive")[int(q) - 1]

    def summary(self) -> str:
        batches = Counter(self.batch_rows)
        return (
            f"{self.requests} requests in {self.seconds:.1f}s = {self.throughput:.0f} req/s; "
            f"latency p50 {self.percentile(50):.1f} ms, p99 {self.percentile(99):.1f} ms; codes {dict(self.codes)}; "
            f"batch sizes seen {dict(sorted(batches.items()))}"
        )


def send(url: str, key: str, rows: list[list[float]], *, requests: int = 400, concurrency: int = 16) -> TrafficStats:
    """POST one row per request to `url` from `concurrency` threads until `requests` are done."""
    lock = threading.Lock()
    codes: Counter[int] = Counter()
    latencies: list[float] = []
    batches: list[int] = []
    next_index = iter(range(requests))

    def worker() -> None:
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            body = json.dumps({"inputs": [rows[i % len(rows)]]}).encode()
            request = urllib.request.Request(
                url, data=body, headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            )
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    response.read()
                    code, rows_in_batch = response.status, int(response.headers.get("X-Batch-Rows", 0))
            except urllib.error.HTTPError as e:
                code, rows_in_batch = e.code, 0
            elapsed = (time.perf_counter() - t0) * 1000
            with lock:
                codes[code] += 1
                latencies.append(elapsed)
                if rows_in_batch:
                    batches.append(rows_in_batch)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return TrafficStats(requests, time.perf_counter() - start, dict(codes), tuple(latencies), tuple(batches))
