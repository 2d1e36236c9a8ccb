"""A small registered digits classifier in the export's format, for the serving tests and benchmarks.

Built directly (a torch MLP trained for about a second, written as ONNX with onnx.helper,
INT8 by ONNX Runtime's dynamic quantization) so the serving tests depend on neither the
training nor the export package: only on the files a registered exported version holds.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import numpy as np

FEATURES = 64
CLASSES = 10


def digits_data() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def train_mlp(hidden: int = 32, epochs: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Weights of 64 → hidden → 10 (ReLU) trained on sklearn digits."""
    import torch

    x, y = digits_data()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, CLASSES))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        for i in range(0, len(xt), 128):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[i : i + 128]), yt[i : i + 128]).backward()
            opt.step()
    w = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return {"w1": w["0.weight"], "b1": w["0.bias"], "w2": w["2.weight"], "b2": w["2.bias"]}


def random_mlp(widths: tuple[int, ...], seed: int = 0) -> dict[str, np.ndarray]:
    """Untrained weights of 64 → widths… → 10 (He init): for benchmarks, where only size matters."""
    rng = np.random.default_rng(seed)
    dims = [FEATURES, *widths, CLASSES]
    weights = {}
    for i, (d_in, d_out) in enumerate(zip(dims, dims[1:]), start=1):
        weights[f"w{i}"] = (rng.standard_normal((d_out, d_in)) * np.sqrt(2.0 / d_in)).astype(np.float32)
        weights[f"b{i}"] = np.zeros(d_out, np.float32)
    return weights


def layers(weights: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight [out, in], bias) per layer, in order (w1/b1, w2/b2, …)."""
    return [(weights[f"w{i}"], weights[f"b{i}"]) for i in range(1, len(weights) // 2 + 1)]


def onnx_mlp(weights: dict[str, np.ndarray], path: Path) -> Path:
    """The MLP (ReLU between layers) as an ONNX graph: input [batch, 64] float32 → output [batch, 10]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits, nodes, x = [], [], "input"
    pairs = layers(weights)
    for i, (w, b) in enumerate(pairs, start=1):
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"), numpy_helper.from_array(b.astype(np.float32), f"b{i}")]
        last = i == len(pairs)
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], ["output" if last else f"h{i}"], transB=1))
        if not last:
            nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"]))
            x = f"r{i}"
    graph = helper.make_graph(
        nodes, "digits_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def artifact(target: Path, seed: int = 0, scale: float = 1.0, int8_deployable: bool = True,
             weights: dict[str, np.ndarray] | None = None) -> Path:
    """An exported-version directory: model.onnx, model.int8.onnx, metadata.json,
    reference_sample.parquet, export_report.json. `scale` multiplies the last layer (a
    different but valid model for canary tests); `weights` replaces the trained 64-32-10 MLP
    (e.g. a wider `random_mlp` for the serving benchmark)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    w = dict(weights) if weights is not None else train_mlp(seed=seed)
    last = len(w) // 2
    w[f"w{last}"], w[f"b{last}"] = w[f"w{last}"] * scale, w[f"b{last}"] * scale
    onnx_mlp(w, target / "model.onnx")
    quantize_dynamic(str(target / "model.onnx"), str(target / "model.int8.onnx"), weight_type=QuantType.QInt8)
    x, _ = digits_data()
    cols = [f"pixel_{i}" for i in range(FEATURES)]
    pq.write_table(pa.table({c: x[:256, i] for i, c in enumerate(cols)}), target / "reference_sample.parquet")
    signature = {"names": ["input"], "dtypes": ["float32"], "shapes": [[-1, FEATURES]], "feature_columns": cols}
    (target / "metadata.json").write_text(json.dumps({
        "model_ref": "test:digits_mlp", "task": "classification", "spec": {}, "metrics": {},
        "input_signature": signature,
        "output_signature": {"names": ["output"], "dtypes": ["float32"], "shapes": [[-1, CLASSES]]},
    }))
    variants = [
        {"variant": "onnx_fp32", "file": "model.onnx", "deployable": True, "checks": []},
        {"variant": "onnx_int8", "file": "model.int8.onnx", "deployable": int8_deployable, "checks": []},
    ]
    (target / "export_report.json").write_text(json.dumps({"format": 1, "variants": variants}))
    return target


def broken_artifact(target: Path, seed: int = 0) -> Path:
    """Like `artifact`, but both ONNX graphs expect 65 features while the signature says 64:
    it loads and serves, and every prediction fails in ONNX Runtime (a deliberately bad canary)."""
    target = artifact(target, seed=seed)
    w = train_mlp(seed=seed)
    w["w1"] = np.concatenate([w["w1"], np.zeros((w["w1"].shape[0], 1), np.float32)], axis=1)
    for file in ("model.onnx", "model.int8.onnx"):
        onnx_mlp(w, target / file)
        _widen_input(target / file, FEATURES + 1)
    return target


def _widen_input(path: Path, features: int) -> None:
    import onnx

    model = onnx.load(str(path))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = features
    onnx.save(model, str(path))


def register_digits(root: Path, work: Path, name: str = "digits", *, alias: str = "production",
                    broken: bool = False, lineage: dict | None = None, **kwargs):
    """Register one such version under `root` and point `alias` at it; returns the Version.
    kwargs go to `artifact` (or `broken_artifact`): seed, scale, int8_deployable, weights;
    `lineage` to the registry (e.g. an `extra.export` record with benchmarks, for `variant: auto`)."""
    from mlplatform import registry

    target = Path(work) / f"{name}-{len(list(Path(work).glob('*')))}"
    path = broken_artifact(target, **kwargs) if broken else artifact(target, **kwargs)
    version = registry.register(path, name, root=str(root), lineage=lineage)
    registry.set_alias(name, alias, version.version, root=str(root))
    return version


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    """The model's outputs run locally, for comparing with the served ones."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.astype(np.float32)})[0]


def serve_on_free_port(cluster) -> int:
    """Connect this process to `cluster` and (re)start Serve with its proxy on a free loopback port."""
    from ray import serve

    from conftest import free_port
    from mlplatform.cluster import connect

    connect(cluster.name)
    serve.shutdown()  # a Serve left by an earlier module would keep its own port
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, **https_options(cluster)}, proxy_location="HeadOnly")
    return port


def https_options(cluster) -> dict[str, str]:
    """Serve's HTTPS http_options for `cluster` (the platform's own, as `mlplatform serve deploy`
    sets them); {} for a cluster without TLS. Also makes `requests` and urllib in this process trust
    the cluster's CA, so the tests' https:// URLs verify the proxy's certificate."""
    from mlplatform.cluster import tls

    material = cluster.tls()
    if material is None:
        return {}
    os.environ["REQUESTS_CA_BUNDLE"] = os.environ["SSL_CERT_FILE"] = str(material.ca_cert)
    return tls.serve_http_options(material)


# Ray's head writes the scrape targets of every node's metrics agent here (ray_constants
# PROMETHEUS_SERVICE_DISCOVERY_FILE, in the session dir; metrics_agent.py keeps it current).
DISCOVERY = "prom_metrics_service_discovery.json"


def ray_metric(cluster, name: str, timeout_s: float = 60.0, want=bool) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of `name` (as exported: `ray_` prefix) scraped from every
    node's metrics endpoint, once `want(samples)` holds (Ray exports every few seconds)."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    deadline, samples = time.time() + timeout_s, []
    while time.time() < deadline:
        targets = [t for f in Path(cluster.temp_dir).glob(f"*/session_latest/{DISCOVERY}")
                   for group in json.loads(f.read_text()) for t in group["targets"]]
        samples = []
        for target in targets:
            port = target.rsplit(":", 1)[1]  # every node of a local cluster is this machine
            try:
                text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            except requests.RequestException:
                continue
            samples += [(s.labels, s.value) for family in text_string_to_metric_families(text)
                        for s in family.samples if s.name == name]
        if samples and want(samples):
            return samples
        time.sleep(2)
    raise AssertionError(f"no {name} samples satisfying the check within {timeout_s:.0f}s; last: {samples}")


class CountingModel:
    """A stand-in model deployment that takes `delay_s` per call and counts the calls that
    started and finished (a call cancelled on the replica never finishes), answering zeros
    in the shape the ingress expects."""

    def __init__(self, delay_s: float):
        self.delay_s, self.started, self.finished = delay_s, 0, 0

    async def __call__(self, x: np.ndarray) -> dict:
        self.started += 1
        await asyncio.sleep(self.delay_s)
        self.finished += 1
        return {"outputs": np.zeros((len(x), CLASSES), np.float32), "batch_rows": len(x), "task": "classification"}

    def counts(self) -> dict[str, int]:
        return {"started": self.started, "finished": self.finished}
