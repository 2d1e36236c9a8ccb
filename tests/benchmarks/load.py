"""Closed-loop HTTP load on a served app: completed requests, failures by kind, latency, batch sizes.

    .venv/bin/python tests/benchmarks/load.py https://127.0.0.1:8000/v1/predict --key KEY [--seconds 10] [--concurrency 16]

`concurrency` callers each keep one request (one digits row) in flight until `seconds` pass.
Only answered 2xx requests count as completed; every other outcome is counted by its kind
(an HTTP status or the client exception's class), so a refused connection is reported, not lost.
aiohttp, not httpx: it ships with Ray's dependencies and httpx does not.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class LoadResult:
    """What the callers observed."""

    seconds: float
    completed: int
    failed: dict[str, int]  # kind ("HTTP 503", "ClientConnectorError", ...) → count
    latencies_ms: tuple[float, ...]  # completed requests only
    batch_rows: dict[int, int]  # X-Batch-Rows of completed requests → count

    def percentile(self, q: float) -> float:
        return statistics.quantiles(self.latencies_ms, n=100, method="inclusive")[int(q) - 1]

    def summary(self) -> str:
        text = (f"{self.completed} completed in {self.seconds:.1f}s = {self.completed / self.seconds:.0f} req/s; "
                f"failed {self.failed or 'none'}")
        if len(self.latencies_ms) < 2:  # no percentiles of fewer than two
            return text
        return (f"{text}; latency p50 {self.percentile(50):.1f} ms, p99 {self.percentile(99):.1f} ms; "
                f"batch sizes {dict(sorted(self.batch_rows.items()))}")


async def load(url: str, key: str, rows: list[list[float]], *, seconds: float, concurrency: int) -> LoadResult:
    """POST one row per request from `concurrency` callers for `seconds`."""
    import aiohttp

    from mlplatform.serve._client import https_context

    failed: Counter[str] = Counter()
    batches: Counter[int] = Counter()
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {key}"}
    start = time.perf_counter()
    deadline = start + seconds

    async def caller(session: aiohttp.ClientSession, i: int) -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                async with session.post(url, json={"inputs": [rows[i % len(rows)]]}, headers=headers) as r:
                    await r.read()
                    if r.status // 100 != 2:
                        failed[f"HTTP {r.status}"] += 1
                        continue
                    batches[int(r.headers.get("X-Batch-Rows", 0))] += 1
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                failed[type(e).__name__] += 1
                continue
            latencies.append((time.perf_counter() - t0) * 1000)
            i += concurrency

    timeout = aiohttp.ClientTimeout(total=30)
    # https:// is verified against the cluster's CA (RAY_TLS_CA_CERT, from `mlplatform cluster env`).
    ssl_context = https_context() if url.startswith("https://") else None
    connector = aiohttp.TCPConnector(limit=concurrency, ssl=ssl_context if ssl_context else True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(caller(session, i) for i in range(concurrency)))
    return LoadResult(time.perf_counter() - start, len(latencies), dict(failed), tuple(latencies), dict(batches))


def main() -> None:
    from sklearn.datasets import load_digits

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url", help="prediction URL, e.g. https://127.0.0.1:8000/v1/predict")
    p.add_argument("--key", required=True, help="API key (mlplatform serve keys create APP)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=16)
    a = p.parse_args()
    rows = (load_digits().data / 16.0).tolist()  # the 0..1 scaling training used
    result = asyncio.run(load(a.url, a.key, rows, seconds=a.seconds, concurrency=a.concurrency))
    print(result.summary())
    raise SystemExit(1 if result.failed or not result.completed else 0)


if __name__ == "__main__":
    main()
