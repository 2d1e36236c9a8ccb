"""P1 (issue 16): the variant `variant: auto` picks ÷ torch eager FP32 at batch 32, per model size.

    .venv/bin/python tests/benchmarks/bench_variants.py [--threads 2] [--seconds 1] [--models digits,mlp_wide,gpt_mid]

Each model is trained for seconds and exported with mlplatform.export (every candidate: ORT FP32,
dynamic INT8, static QDQ INT8, and for digits a pruned and a distilled student made with
mlplatform.compress), benchmarked side by side in this one process (ratios, not absolute
numbers: shared machines are noisy). The choice is serving's own (mlplatform.serve._variant.choose)
on the export's record, at max_batch_size 32. Goals: chosen ÷ torch >= 5× on every model (the
model's own variants); for digits the best gated student >= 8× within 1 point of accuracy.
Then a quick measurement of the ORT session options serving uses (tuned_options) against the
alternatives, per replica CPU share. Starts no Ray cluster. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the artifact builders

from export_artifacts import digits_artifact, gpt_artifact  # noqa: E402

from mlplatform.export import ExportSpec, cpu_features, export_artifact  # noqa: E402

MODELS = {
    # name: (builder, kwargs, description): the three sizes of bench_export.py
    "digits": (digits_artifact, {"hidden": (128, 64)}, "digits MLP 64-128-64-10"),
    "mlp_wide": (digits_artifact, {"hidden": (1024, 1024, 1024), "epochs": 3}, "digits MLP 64-1024x3-10"),
    "gpt_mid": (
        gpt_artifact,
        {"kwargs": {"vocab_size": 256, "seq_len": 128, "d_model": 256, "n_layer": 6, "n_head": 8}, "steps": 3},
        "GPT d256 L6 seq128",
    ),
}
BATCH = 32


def students(teacher: Path, tmp: Path) -> dict[str, Path]:
    """A pruned and a distilled student of the digits teacher, made by mlplatform.compress's own
    in-process work function (what jobs/compress.py runs in its Ray task), written as artifacts."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from mlplatform.compress import CompressSpec
    from mlplatform.compress._work import compress
    from mlplatform.train import read_metadata

    meta = read_metadata(teacher)
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    x_tr, _, y_tr, _ = train_test_split(x, digits.target, test_size=0.2, random_state=0, stratify=digits.target)
    cols = meta["input_signature"]["feature_columns"]
    train = tmp / "digits-train.parquet"
    pq.write_table(pa.table({**{c: x_tr[:, i] for i, c in enumerate(cols)}, "label": y_tr.astype("int64")}), train)
    results = compress(meta, (teacher / "model.safetensors").read_bytes(), CompressSpec().model_dump(mode="json"),
                       str(train), meta["dataset"]["validation"])
    out = {}
    for r in results:
        kind = {"prune": "pruned", "distill": "distilled"}[r["method"]]
        target = tmp / f"digits-{kind}"
        shutil.copytree(teacher, target)
        (target / "model.safetensors").write_bytes(r["weights"])
        m = json.loads((target / "metadata.json").read_text())
        m["model_kwargs"] = r["model_kwargs"]
        (target / "metadata.json").write_text(json.dumps(m))
        print(f"<!-- {kind}: {r['params_before']} → {r['params_after']} params, compress gate {r['gate']} -->")
        out[kind] = target
    return out


def ort_options_probe(onnx: Path, x, seconds: float) -> None:
    """Serving's tuned ORT options vs one change at a time, per replica CPU share, batch 1 and 32."""
    import numpy as np

    from mlplatform.export import session_options, tuned_options
    from mlplatform.export._bench import _time

    print(f"\n| replica num_cpus | ORT options (digits ORT FP32) | batch 1 p50 µs | batch 1 rows/s at p50 "
          f"| batch {BATCH} p50 µs | batch {BATCH} rows/s at p50 |")
    print("|---|---|---|---|---|---|")
    import onnxruntime as ort

    for cpus in (0.5, 1, 2):
        base = tuned_options(cpus)
        trials = {"tuned (serving)": base,
                  "spinning " + ("on" if not base["allow_spinning"] else "off"): {
                      **base, "allow_spinning": not base["allow_spinning"]},
                  "arena off": {**base, "enable_cpu_mem_arena": False},
                  "graph EXTENDED": {**base, "graph_optimization_level": "extended"},
                  "intra_op 2" if base["intra_op_num_threads"] != 2 else "intra_op 1": {
                      **base, "intra_op_num_threads": 2 if base["intra_op_num_threads"] != 2 else 1}}
        sessions = {k: ort.InferenceSession(str(onnx), session_options(v), providers=["CPUExecutionProvider"])
                    for k, v in trials.items()}
        results: dict[str, list[float]] = {k: [] for k in trials}
        for b in (1, BATCH):
            xb = np.ascontiguousarray(x[:b])
            times = {k: [] for k in trials}
            for _ in range(5):  # interleaved rounds, as the export benchmark does
                for k, s in sessions.items():
                    times[k] += _time(lambda s=s: s.run(None, {"input": xb}), seconds / 5)
            for k in trials:
                t = np.array(times[k])
                p50 = float(np.percentile(t, 50))
                results[k] += [p50 * 1e6, b / p50]  # rows/s of the typical call: stalls excluded
        for k, (p1, r1, p32, r32) in results.items():
            print(f"| {cpus:g} | {k} | {p1:.1f} | {r1:.0f} | {p32:.1f} | {r32:.0f} |")


def main() -> None:
    from mlplatform.serve._variant import choose

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=1.0, help="timing per (runtime, batch) case")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--no-ort-probe", action="store_true")
    a = p.parse_args()
    cpu = cpu_features()
    print(f"# {datetime.now(timezone.utc).isoformat(timespec='seconds')}  {cpu.summary()}  threads={a.threads}")
    print(f"# command: {' '.join([Path(sys.executable).name, *sys.argv])}\n")
    # Two ratios per runtime: rows/s as the export records it (mean over every run, so stalls of a
    # busy shared machine count) and torch p50 ÷ variant p50 (the typical call, stalls excluded).
    print(f"| model | torch FP32 /s (b{BATCH}) | candidates ÷ torch at b{BATCH}, rows/s [p50] (gate) | auto picks "
          f"(own variants) | ÷ torch rows/s [p50] (goal ≥5×) | best student | ÷ torch rows/s [p50] (goal ≥8×) "
          f"| student accuracy Δ |")
    print("|---|---|---|---|---|---|---|---|")
    probe = None
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for name in a.models.split(","):
            builder, kwargs, desc = MODELS[name]
            t0 = time.perf_counter()
            art = builder(tmp / name, **kwargs)
            studs = students(art, tmp) if name == "digits" else {}
            spec = ExportSpec(
                max_holdout_rows=64 if name.startswith("gpt") else 2000,
                benchmark={"threads": a.threads, "batch_sizes": [1, 8, BATCH], "seconds_per_case": a.seconds},
            )
            r = export_artifact(art, tmp / f"{name}-out", spec, students=studs)
            record = {"deployable": r.deployable, "benchmarks": [b.to_json() for b in r.benchmarks]}
            local = dataclasses.asdict(cpu)
            own = {**record, "deployable": {v: ok for v, ok in r.deployable.items()
                                            if not v.startswith(("pruned_", "distilled_"))}}
            pick = choose(own, None, BATCH, name, "primary", local_cpu=local)
            speed = {v: r.speedup(v, BATCH) for v in r.deployable}
            p50 = {x.runtime: x.p50_ms for x in r.benchmark if x.batch_size == BATCH}
            typical = {v: p50["torch_fp32"] / p50[v] for v in r.deployable}
            cands = ", ".join(f"{v} {speed[v]:.2f}× [{typical[v]:.2f}×]{'' if r.deployable[v] else ' (FAIL)'}"
                              for v in r.deployable)
            stud = {v: s for v, s in speed.items() if v.startswith(("pruned_", "distilled_")) and r.deployable[v]}
            best = max(stud, key=stud.get) if stud else None
            acc = (f"{-r.variant(best).metrics['accuracy_drop'] * 100:+.2f} pts, agree "
                   f"{r.variant(best).metrics['top1_agreement']:.3f}") if best else "-"
            torch_rate = next(x.throughput for x in r.benchmark if x.runtime == "torch_fp32" and x.batch_size == BATCH)
            print(f"| {desc} | {torch_rate:.0f} | {cands} | {pick.variant} | {speed[pick.variant]:.2f}× "
                  f"[{typical[pick.variant]:.2f}×] | {best or '-'} | "
                  f"{f'{stud[best]:.2f}× [{typical[best]:.2f}×]' if best else '-'} | {acc} |")
            print(f"<!-- {name}: auto's reason: {pick.reason}; skipped {r.skipped}; {time.perf_counter() - t0:.0f}s -->",
                  flush=True)
            if name == "digits":
                import numpy as np

                probe = (tmp / f"{name}-out" / "model.onnx", np.random.default_rng(0).random((BATCH, 64), np.float32))
                if not a.no_ort_probe:
                    ort_options_probe(*probe, a.seconds)


if __name__ == "__main__":
    main()
