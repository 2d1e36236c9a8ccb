"""CPU benchmark: latency and throughput of torch FP32 and each ORT variant, threads pinned equally."""

from __future__ import annotations

import time

import numpy as np

from mlplatform.export._report import BenchmarkRow


_ROUNDS = 5  # runtimes take turns in short rounds, so a burst of load elsewhere hits all of them


def run(model, sessions: dict[str, object], x: np.ndarray, input_name: str, batch_sizes: list[int],
        threads: int, seconds: float, warmup: int) -> tuple[BenchmarkRow, ...]:
    """Time torch eager FP32 ("torch_fp32") and every session at each batch size, interleaved."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows: list[BenchmarkRow] = []
    try:
        for batch in batch_sizes:
            xb = _batch(x, batch)
            tb = torch.from_numpy(xb)

            def torch_call(tb=tb):
                with torch.inference_mode():
                    model(tb)

            runners = {"torch_fp32": torch_call}
            for name, sess in sessions.items():
                runners[name] = lambda sess=sess, xb=xb: sess.run(None, {input_name: xb})
            times: dict[str, list[float]] = {name: [] for name in runners}
            for name, call in runners.items():
                for _ in range(warmup):
                    call()
            for _ in range(_ROUNDS):
                for name, call in runners.items():
                    times[name] += _time(call, seconds / _ROUNDS)
            rows += [_row(name, batch, t) for name, t in times.items()]
    finally:
        torch.set_num_threads(before)
    return tuple(rows)


def _batch(x: np.ndarray, batch: int) -> np.ndarray:
    reps = -(-batch // len(x))  # ceil: tile a small holdout up to the batch size
    return np.ascontiguousarray(np.concatenate([x] * reps)[:batch])


def _time(call, seconds: float) -> list[float]:
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 2 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return times


def _row(name: str, batch: int, times: list[float]) -> BenchmarkRow:
    ms = np.array(times) * 1e3
    return BenchmarkRow(
        runtime=name, batch_size=batch, p50_ms=float(np.percentile(ms, 50)), p99_ms=float(np.percentile(ms, 99)),
        throughput=batch * len(times) / sum(times), runs=len(times),
    )
