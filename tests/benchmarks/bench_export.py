"""Export benchmark: ORT INT8 and ORT FP32 vs torch eager FP32, batch 32, threads pinned equally.

    .venv/bin/python tests/benchmarks/bench_export.py [--threads 2] [--seconds 2] [--models digits,mlp_wide,gpt_mid]

Each model is trained for seconds, exported with mlplatform.export (the same code path as
`mlplatform export`), and timed side by side in this one process; ratios, not absolute
numbers, are the result (shared machines are noisy). Prints one Markdown table row per model.
Not collected by pytest (file name does not start with test_).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the artifact builders

from export_artifacts import digits_artifact, gpt_artifact  # noqa: E402

from mlplatform.export import ExportSpec, cpu_features, export_artifact  # noqa: E402

MODELS = {
    # name: (builder, kwargs, description)
    "digits": (digits_artifact, {"hidden": (128, 64)}, "digits MLP 64-128-64-10 (~17k params)"),
    "mlp_wide": (digits_artifact, {"hidden": (1024, 1024, 1024), "epochs": 3}, "digits MLP 64-1024x3-10 (~2.2M params)"),
    "gpt_mid": (
        gpt_artifact,
        {"kwargs": {"vocab_size": 256, "seq_len": 128, "d_model": 256, "n_layer": 6, "n_head": 8}, "steps": 3},
        "GPT d256 L6 seq128 (~4.8M params)",
    ),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=2.0, help="timing per (runtime, batch) case")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batch-sizes", default="1,8,32")
    a = p.parse_args()
    batches = [int(b) for b in a.batch_sizes.split(",")]
    cpu = cpu_features()
    print(f"# {datetime.now(timezone.utc).isoformat(timespec='seconds')}  {cpu.summary()}  threads={a.threads}")
    print(f"# command: {' '.join([Path(sys.executable).name, *sys.argv])}\n")
    print("| model | batch | torch FP32 /s | ORT FP32 /s | ORT INT8 /s | ORT FP32 ÷ torch (anchor 1.30×) "
          "| ORT INT8 ÷ torch (goal ≥3×) | INT8 accuracy delta | INT8 size ÷ FP32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            builder, kwargs, desc = MODELS[name]
            t0 = time.perf_counter()
            art = builder(Path(tmp) / name, **kwargs)
            spec = ExportSpec(
                max_holdout_rows=64 if name.startswith("gpt") else 2000,
                benchmark={"threads": a.threads, "batch_sizes": batches, "seconds_per_case": a.seconds},
            )
            r = export_artifact(art, Path(tmp) / f"{name}-out", spec)
            fp32, int8 = r.variant("onnx_fp32"), r.variant("onnx_int8")
            if r.task == "classification":
                delta = (f"acc {r.reference_metrics['accuracy']:.4f}→{int8.metrics['accuracy']:.4f} "
                         f"(Δ {-int8.metrics['accuracy_drop']:+.4f}), agree {int8.metrics['top1_agreement']:.4f}")
            else:
                delta = (f"logits max {int8.metrics['max_abs_error']:.3f} / mean {int8.metrics['mean_abs_error']:.4f}, "
                         f"next-token agree {int8.metrics['top1_agreement']:.4f}")
            rows = {(x.runtime, x.batch_size): x.throughput for x in r.benchmark}
            for b in batches:
                print(
                    f"| {desc} | {b} | {rows[('torch_fp32', b)]:.0f} | {rows[('onnx_fp32', b)]:.0f} | {rows[('onnx_int8', b)]:.0f} "
                    f"| {r.speedup('onnx_fp32', b):.2f}× | {r.speedup('onnx_int8', b):.2f}× | {delta} "
                    f"| {int8.size_bytes / fp32.size_bytes:.2f} ({int8.size_bytes / 1e6:.2f} / {fp32.size_bytes / 1e6:.2f} MB) |"
                )
            print(f"<!-- {name}: deployable {r.deployable}, {time.perf_counter() - t0:.0f}s -->", flush=True)


if __name__ == "__main__":
    main()
