"""Model deployments: a registered version loaded by hash-verified fetch, called in dynamic batches.

Both classes take one plain `settings` dict (built by the app builder) and expose
`__call__(x) -> {"outputs", "batch_rows", "task"}`; `@serve.batch` sits on the model
call, counted in rows, so requests of several rows share a batch fairly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from mlplatform._internal import artifact_layout as layout
from mlplatform._internal import onnx_files
from mlplatform.errors import ModelNotDeployable, ServeError
from mlplatform.serve._forward import TorchForward, run_batched

logger = logging.getLogger("ray.serve")


def _rows(items: list[np.ndarray]) -> int:
    return sum(len(x) for x in items)


def deployable_variants(report: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """variant → (file, deployable) from an export_report.json (list or mapping form)."""
    raw = report.get("variants") or []
    items = raw.items() if isinstance(raw, dict) else ((v.get("variant"), v) for v in raw)
    return {name: (v.get("file", layout.VARIANT_FILES.get(name, "")), bool(v.get("deployable"))) for name, v in items if name}


def check_variant(files: dict[str, Any], report: dict[str, Any] | None, variant: str, ref: str, where: str) -> str:
    """The file of `variant` in a version, refusing one its export gate did not pass.

    Raises:
        ModelNotDeployable: the file is absent or the export report marks the variant not deployable.
    """
    if variant != "torch":
        gated = deployable_variants(report or {})
        if variant in gated:
            file, ok = gated[variant]
            if not ok:
                raise ModelNotDeployable(
                    f"Got {variant!r} for `{where}.variant`; {ref}'s export gate marked it NOT deployable "
                    f"(see {layout.EXPORT_REPORT}). Serve another variant ({sorted(k for k, (_, d) in gated.items() if d)}) "
                    f"or re-export with a gate it passes."
                )
        elif report is not None or variant not in layout.VARIANT_FILES:
            raise ModelNotDeployable(
                f"Got {variant!r} for `{where}.variant`; {ref} has no such exported variant "
                f"(has {sorted(gated) or 'none'}). Run `mlplatform export --model {ref}` first."
            )
        else:
            file = layout.VARIANT_FILES[variant]
    else:
        file = layout.VARIANT_FILES["torch"]
    if file not in files:
        raise ModelNotDeployable(
            f"Got {variant!r} for `{where}.variant`; {ref} has no file {file!r} (files: {sorted(files)})."
        )
    return file


class _Model:
    """Fetch, verify and hold one version; batch, meter and drift-check every call."""

    def __init__(self, settings: dict[str, Any]):
        from mlplatform import registry

        self.s = settings
        self._work = Path(tempfile.mkdtemp(prefix="mlplatform-serve-"))
        self.dir = self._work / "version"
        # An encrypted (restricted) version is verified and decrypted into this process's memory only;
        # a plaintext one is fetched to local scratch. Both verify every hash.
        self.memory: dict[str, bytes] | None = None
        if registry.resolve(settings["ref"], root=settings["root"]).encrypted:
            _, self.memory = registry.read_verified(settings["ref"], root=settings["root"])
            files = {name: None for name in self.memory if "/" not in name}
        else:
            registry.fetch(settings["ref"], self.dir, root=settings["root"])
            files = {p.name: p for p in self.dir.iterdir()}
        report = json.loads(self.read(layout.EXPORT_REPORT)) if layout.EXPORT_REPORT in files else None
        self.file = check_variant(files, report, settings["variant"], settings["ref"], settings["role"])
        meta = json.loads(self.read(layout.METADATA)) if layout.METADATA in files else {}
        self.task = meta.get("task", "")
        self.input_name = ((meta.get("input_signature") or {}).get("names") or ["input"])[0]
        self._tags = {"app": settings["app"], "deployment": settings["role"], "version": settings["ref"]}
        self._drift = self._drift_monitor(meta) if settings.get("drift_enabled") and layout.SAMPLE in files else None
        self._batched.set_max_batch_size(settings["max_batch_size"])
        self._batched.set_batch_wait_timeout_s(settings["batch_wait_timeout_s"])
        # Opt-in (`cache.enabled`; 0 bytes: off): deterministic models only, see serve/_cache.py.
        self._cache = None
        if settings.get("cache_max_bytes"):
            from mlplatform.serve._cache import ResponseCache

            self._cache = ResponseCache(settings["cache_max_bytes"], settings["ref"], settings["variant"])
            self._cache_gauge_at = 0.0

    def read(self, name: str) -> bytes:
        """One file of the version, from memory (encrypted version) or the fetched copy."""
        return self.memory[name] if self.memory is not None else (self.dir / name).read_bytes()

    def _drift_monitor(self, meta: dict[str, Any]):
        import pyarrow as pa
        import pyarrow.parquet as pq

        from mlplatform.serve._drift import DriftMonitor

        # The reference sample is rows of the training data: read from memory, never written out.
        table = pq.read_table(pa.BufferReader(self.read(layout.SAMPLE)))
        cols = layout.metadata_features(meta, table.column_names)
        self.features = cols
        ref = np.column_stack([table.column(c).to_numpy() for c in cols]).astype(np.float64)
        return DriftMonitor(ref, self.s["drift_window_rows"], sample_rate=self.s.get("drift_sample_rate", 1.0))

    async def __call__(self, x: np.ndarray) -> dict[str, Any]:
        if self._cache is None:
            return await self._batched(x)
        return await self._cached(x)

    async def _cached(self, x: np.ndarray) -> dict[str, Any]:
        """A hit skips the batch queue and the model (its answer says batch_rows 0); a miss fills the cache."""
        key = self._cache.key(x)
        out = self._cache.get(key)
        if out is not None:
            self._count_cache("hit")
            return {"outputs": out, "batch_rows": 0, "task": self.task}
        result = await self._batched(x)
        self._cache.put(key, result["outputs"])
        self._count_cache("miss")
        return result

    def _count_cache(self, result: str) -> None:
        from mlplatform.serve._metrics import metrics

        m = metrics()
        m["cache"].inc(1, tags={**self._tags, "result": result})
        now = time.monotonic()
        if now - self._cache_gauge_at >= 1.0:  # a gauge is not buffered: set it at most once a second
            self._cache_gauge_at = now
            m["cache_bytes"].set(float(self._cache.bytes), tags=self._tags)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=_rows)
    async def _batched(self, xs: list[np.ndarray]) -> list[dict[str, Any]]:
        # Off the event loop (the model and the drift bins): requests arriving meanwhile queue
        # up into the next batch.
        outs, rows, psi = await asyncio.to_thread(self._run_and_bin, xs)
        self._observe(rows, psi)
        return [{"outputs": out, "batch_rows": rows, "task": self.task} for out in outs]

    def _run_and_bin(self, xs: list[np.ndarray]) -> tuple[list[np.ndarray], int, np.ndarray | None]:
        outs, big = run_batched(self._run, xs)
        if self._drift is None or big.ndim != 2 or big.shape[1] != len(self.features):
            return outs, len(big), None
        return outs, len(big), self._drift.observe(big)  # PSI per feature when a window completes, else None

    def _observe(self, rows: int, psi: np.ndarray | None) -> None:
        from mlplatform.serve._metrics import metrics

        m = metrics()
        m["batch_rows"].observe(rows, tags=self._tags)
        m["rows"].inc(rows, tags=self._tags)
        if psi is not None:
            tags = {"app": self.s["app"], "version": self.s["ref"]}
            for name, value in zip(self.features, psi):
                m["psi"].set(float(value), tags={**tags, "feature": name})
            m["drift_alert"].set(float((psi > self.s["drift_alert_psi"]).any()), tags=tags)

    def _run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve's user_config: the variant, why it was chosen (`variant: auto`) and the ONNX Runtime
        options, set by the app builder so that `mlplatform serve status` shows them."""
        self.choice = dict(config or {})

    def info(self) -> dict[str, Any]:
        """What this replica serves (for status and tests)."""
        import ray

        choice = getattr(self, "choice", {})
        return {"ref": self.s["ref"], "variant": self.s["variant"], "file": self.file,
                "node_id": ray.get_runtime_context().get_node_id(),
                "variant_reason": choice.get("variant_reason"), "ort_options": getattr(self, "ort_options", None)}

    def __del__(self):
        shutil.rmtree(getattr(self, "_work", ""), ignore_errors=True)


class OnnxCpuModel(_Model):
    """ONNX Runtime on CPU, session options tuned from the replica's CPUs (export._onnx.tuned_options)."""

    def __init__(self, settings: dict[str, Any]):
        super().__init__(settings)
        import onnxruntime as ort

        from mlplatform.export import session_options, tuned_options

        # The same options the export benchmark measured with, so auto's numbers hold here.
        self.ort_options = tuned_options(settings["num_cpus"])
        options = session_options(self.ort_options)
        try:
            if self.memory is not None:  # ONNX Runtime builds the session from the decrypted bytes
                model: str | bytes = self.memory[self.file]
                _refuse_external_data(model, settings["ref"], self.file)
            else:
                onnx_files.check_external_data(self.dir / self.file)
                model = str(self.dir / self.file)
            self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except ValueError as e:  # external data outside the model's folder
            raise ServeError(f"{settings['ref']}: {e}") from None
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise ServeError(f"{settings['ref']}: ONNX Runtime cannot load {self.file}: {e}") from None
        self.input_name = self.session.get_inputs()[0].name
        self._dtype = np.float32 if "float" in self.session.get_inputs()[0].type else np.int64

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x.astype(self._dtype, copy=False)})[0]


class TorchGpuModel(_Model):
    """The torch model from model.safetensors on CUDA in bf16/fp16 (or a CPU stand-in when asked)."""

    def __init__(self, settings: dict[str, Any]):
        super().__init__(settings)
        if self.memory is not None:
            # TorchForward loads safetensors by path: the one place a decrypted copy is written,
            # into this replica's private scratch (0700), removed with the replica.
            for name, data in self.memory.items():
                (self.dir / name).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                (self.dir / name).write_bytes(data)
        self.forward = TorchForward(self.dir, settings)
        self.device = self.forward.device

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def check_health(self) -> None:
        # Failing here makes Serve replace the replica; meanwhile the router sends traffic
        # to the fallback.
        self.forward.check_health()


def _refuse_external_data(model: bytes, ref: str, file: str) -> None:
    """A model served from memory must be self-contained: external data would be read from disk."""
    if onnx_files.has_external_data(model):
        raise ServeError(
            f"{ref}: {file} keeps tensors in external data files; an encrypted version is served from memory "
            f"and must be one self-contained .onnx file. Re-export it without external data."
        )


def model_class(variant: str) -> type[_Model]:
    """The deployment class that serves `variant` (torch on CUDA, ONNX Runtime otherwise)."""
    return TorchGpuModel if variant == "torch" else OnnxCpuModel
