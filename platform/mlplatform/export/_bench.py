"""CPU benchmark: latency and throughput of torch FP32 and each ORT variant, threads pinned equally.

Run in the export's process, or as one Ray task per node group (`benchmark.node_groups`) so that
the numbers serving's `variant: auto` picks by come from the hardware the replicas run on.
"""

from __future__ import annotations

import time

import numpy as np

from mlplatform.export._report import BenchmarkRow, NodeBenchmark

NODE_GROUP_LABEL = "ray.io/node-group"


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


def on_this_node(model, onnx: dict[str, bytes], x: np.ndarray, input_name: str, batch_sizes: list[int],
                 threads: int, seconds: float, warmup: int) -> dict:
    """The body of the per-node-group Ray task: sessions from the ONNX bytes, timed here, with this
    node's CPU flags and node group. Returns NodeBenchmark.to_json() (plain data crosses processes)."""
    from mlplatform.export import _cpu, _onnx

    sessions = {name: _onnx.session_from_bytes(data, threads, name) for name, data in onnx.items()}
    rows = run(model, sessions, x, input_name, batch_sizes, threads, seconds, warmup)
    return NodeBenchmark(_node_group(), _cpu.cpu_features(), threads, rows).to_json()


def _node_group() -> str | None:
    """This process's `ray.io/node-group` label (None outside a Ray node)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_labels().get(NODE_GROUP_LABEL)
    except Exception:  # no Ray runtime context here: the export ran off any cluster
        pass
    return None


def here(model, sessions: dict[str, object], x: np.ndarray, input_name: str, batch_sizes: list[int],
         threads: int, seconds: float, warmup: int) -> NodeBenchmark:
    """The benchmark in this process, labelled with this node's group when it is on a Ray node."""
    from mlplatform.export import _cpu

    rows = run(model, sessions, x, input_name, batch_sizes, threads, seconds, warmup)
    return NodeBenchmark(_node_group(), _cpu.cpu_features(), threads, rows)
