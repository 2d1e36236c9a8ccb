"""GPU proof: the platform's training step, DeepSpeed plan and GPU serving path on one CUDA GPU.

Runs outside Ray (the GPU machine has no Ray): one process joins a single-rank
torch.distributed group (NCCL on CUDA, gloo on CPU) and trains through
mlplatform.train.engine, the code every Ray Train worker runs, with the DeepSpeed config
that mlplatform.train.plan builds. Parts, each writing <out>/<part>.json:

  train   ZeRO 0-3 × bf16/fp16 (dynamic loss scaling), activation checkpointing and CPU
          offload on the small GPT: loss goes down, no NaN, checkpoint save/load round trip,
          what the engine reports (stage, precision, offload) equals what was asked
  memory  peak GPU memory per configuration on the 114M GPT beside the plan's estimate,
          tokens/s and model FLOPs utilisation
  width   the largest GPT width that trains under a fixed memory cap, per configuration,
          beside the width the memory model predicts
  serve   TorchForward (the torch serving model class's forward path) rows/s at batch
          1/8/32/128, called whole and as coalesced single-row requests (dynamic batching);
          ONNX Runtime's CUDA provider where the installed onnxruntime has it
  report  results.json and summary.md from the parts

    python tests/benchmarks/gpu_check.py --device cuda --out /tmp/gpu
    python tests/benchmarks/gpu_check.py --device cpu --tiny --out /tmp/gpu   # dry run, the test suite
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "platform"))

from mlplatform import config  # noqa: E402
from mlplatform.errors import PlatformError  # noqa: E402
from mlplatform.train import TrainSpec, engine, plan  # noqa: E402

PARTS = ("train", "memory", "width", "serve")
# Dense bf16/fp16 tensor-core peak of the SXM parts (datasheets), for model FLOPs utilisation.
PEAK_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


@dataclass(frozen=True)
class Config:
    """One DeepSpeed configuration to run: spec fields over a base TrainSpec."""

    name: str
    stage: int
    precision: str
    offload_optimizer: bool = False
    offload_params: bool = False
    checkpointing: bool | None = None  # None: the base spec's
    micro: int | None = None  # micro batch, where it differs from the part's

    def fields(self) -> dict[str, Any]:
        out = dict(zero_stage=self.stage, precision=self.precision,
                   offload_optimizer=self.offload_optimizer, offload_params=self.offload_params)
        if self.checkpointing is not None:
            out["activation_checkpointing"] = self.checkpointing
        return out


STAGES = [Config(f"zero{s}-{p}", s, p) for p in ("bf16", "fp16") for s in range(4)]
OFFLOAD = [Config("zero2-bf16-offload-opt", 2, "bf16", offload_optimizer=True),
           Config("zero3-bf16-offload-all", 3, "bf16", offload_optimizer=True, offload_params=True)]
TRAIN_CONFIGS = [*STAGES, Config("zero2-bf16-ckpt", 2, "bf16", checkpointing=True), *OFFLOAD]
# The micro-16 row is a throughput figure (micro 4 × 512 tokens leaves an H100 launch-bound) and
# checks the model at a batch it was not fitted on.
MEMORY_CONFIGS = [*STAGES, Config("zero2-bf16-no-ckpt", 2, "bf16", checkpointing=False), *OFFLOAD,
                  Config("zero2-bf16-micro16", 2, "bf16", micro=16)]
WIDTH_CONFIGS = [Config(f"zero{s}-bf16", s, "bf16") for s in range(4)] + OFFLOAD


@dataclass
class Sizes:
    """How big and how long each part runs: full on a GPU, tiny for the CPU dry run."""

    train_model: dict[str, Any]
    train_seq: int
    train_micro: int
    train_steps: int
    train_lr: float
    memory_model: dict[str, Any]
    memory_seq: int
    memory_micro: int
    memory_steps: int
    width_layers: int
    width_seq: int
    width_micro: int
    width_cap_gib: float
    width_bounds: tuple[int, int]  # d_model search range
    width_step: int  # d_model granularity (a multiple of the 64 per attention head)
    width_seconds: float  # time budget per configuration
    serve_batches: tuple[int, ...] = (1, 8, 32, 128)
    serve_seconds: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)


FULL = Sizes(
    train_model={"d_model": 128, "n_layer": 5, "n_head": 4}, train_seq=64, train_micro=32, train_steps=200, train_lr=0.002,
    memory_model={"d_model": 768, "n_layer": 16, "n_head": 12}, memory_seq=512, memory_micro=4, memory_steps=8,
    width_layers=8, width_seq=256, width_micro=4, width_cap_gib=1.0, width_bounds=(128, 4096), width_step=128, width_seconds=30, serve_seconds=0.3,
)
TINY = Sizes(
    train_model={"d_model": 32, "n_layer": 2, "n_head": 2}, train_seq=16, train_micro=8, train_steps=40, train_lr=0.01,
    memory_model={"d_model": 32, "n_layer": 2, "n_head": 2}, memory_seq=16, memory_micro=2, memory_steps=3,
    width_layers=1, width_seq=16, width_micro=2, width_cap_gib=1.0, width_bounds=(64, 128), width_step=64, width_seconds=30,
    serve_batches=(1, 8), serve_seconds=0.2,
)


# ---------------------------------------------------------------- one process, one rank


def make_spec(device: str, model: dict[str, Any], seq: int, micro: int, steps: int, cfg: Config, name: str,
              lr: float | None = None) -> TrainSpec:
    """lm_tiny.yaml moved to one worker of this device, with `cfg`'s stage, precision and offload."""
    base = config.load(REPO / "jobs/configs/lm_tiny.yaml", TrainSpec).model_dump(mode="json")
    if lr is not None:
        base["optimizer"]["lr"] = lr
    # Warm-up is a tenth of the run at most, so short runs train too.
    base["schedule"]["warmup_steps"] = min(base["schedule"]["warmup_steps"], steps // 10)
    base.update(
        name=name, model={"ref": "builtin:gpt", "kwargs": dict(model)}, max_steps=steps,
        dataset={**base["dataset"], "seq_len": seq}, num_workers=1, micro_batch_size=micro, global_batch_size=micro,
        use_gpu=device == "cuda", resources_per_worker={"CPU": 1, "GPU": 1} if device == "cuda" else {"CPU": 1},
        placement={"label_selector": {}, "allow_spot": True}, **cfg.fields(),
    )
    return config.validate(base, TrainSpec, f"gpu check {cfg.name}")


def corpus_arrays(spec: TrainSpec):
    """The built-in corpus as (x, y) token blocks, through the loader's own preprocessing."""
    import numpy as np

    from mlplatform.train import data

    docs = data.corpus_documents()
    return data.to_arrays(spec, {"text": np.array(docs, dtype=object)})


def release(*runs) -> None:
    """Free engines so the next configuration starts from an empty GPU."""
    import torch

    for run in runs:
        if run is not None:
            run.engine.destroy()
    del runs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def flops_per_token(num_params: int, n_layer: int, seq: int, d_model: int) -> float:
    """Model FLOPs per trained token: 6Ψ for the matmuls forward and backward, plus attention
    (12·L·s·d; PaLM, Chowdhery et al. 2022, appendix B). Recomputation is not counted."""
    return 6 * num_params + 12 * n_layer * seq * d_model


# ---------------------------------------------------------------- parts


def part_train(device, sizes: Sizes, out: Path) -> list[dict[str, Any]]:
    """Convergence, finiteness, engine facts and the checkpoint round trip per configuration."""
    import numpy as np

    rows = []
    for cfg in TRAIN_CONFIGS:
        row: dict[str, Any] = {"config": cfg.name}
        rows.append(row)
        try:
            spec = make_spec(device.type, sizes.train_model, sizes.train_seq, sizes.train_micro, sizes.train_steps,
                             cfg, f"gpu-check-{cfg.name}", lr=sizes.train_lr)
        except PlatformError as e:  # e.g. fp16 or offload asked of a CPU: the spec says why
            skip(row, e, out / "train.json", rows)
            continue
        run = restored = None
        try:
            the_plan = plan(spec)
            x, y = corpus_arrays(spec)
            cut = int(len(x) * 0.9)
            run = engine.build(spec, the_plan.deepspeed_config(), the_plan.precision.value, sizes.train_steps)
            asked = engine.facts(run.engine)
            batches = engine.Batches(x[:cut], y[:cut], spec.micro_batch_size, spec.seed, 0, device, run.in_dtype)
            loss_of = engine.loss_function(spec.task)
            steps_per_epoch = cut // spec.micro_batch_size
            losses = []
            sync(device)
            started = time.perf_counter()
            for step in range(sizes.train_steps):
                epoch, i = divmod(step, steps_per_epoch)
                losses.append(engine.train_step(run.engine, [batches.get(epoch, i)], loss_of))
            sync(device)
            seconds = time.perf_counter() - started
            window = max(1, min(10, len(losses) // 3))
            first, last = float(np.mean(losses[:window])), float(np.mean(losses[-window:]))
            val = engine.evaluate(run.engine, spec.task, x[cut:], y[cut:], device, run.in_dtype, torch_dist())
            with tempfile.TemporaryDirectory(prefix="gpu-check-ckpt-") as tmp:
                engine.save_checkpoint(run, tmp, sizes.train_steps, 0, spec)
                restored = engine.build(spec, the_plan.deepspeed_config(), the_plan.precision.value, sizes.train_steps)
                step_back = engine.load_checkpoint(restored, tmp, 0)
                val_back = engine.evaluate(restored.engine, spec.task, x[cut:], y[cut:], device, run.in_dtype,
                                           torch_dist())
                fp32_loss = consolidated_loss(spec, tmp, run.model_kwargs, x[cut:], y[cut:], device)
            facts = engine.facts(run.engine)
            problems = []
            if not all(math.isfinite(v) for v in losses):
                problems.append("a loss was NaN or infinite")
            if not last < 0.8 * first:
                problems.append(f"loss did not go down by 20% ({first:.3f} → {last:.3f})")
            if (facts["zero_stage"], facts["bf16"], facts["fp16"]) != (cfg.stage, cfg.precision == "bf16",
                                                                       cfg.precision == "fp16"):
                problems.append(f"engine runs {facts}, not {cfg}")
            if (facts["offload_optimizer"], facts["offload_params"]) != (cfg.offload_optimizer, cfg.offload_params):
                problems.append("engine offload differs from the plan")
            if cfg.precision == "fp16" and not facts["dynamic_loss_scale"]:
                problems.append("fp16 without dynamic loss scaling")
            if step_back != sizes.train_steps or not math.isclose(val_back["val_loss"], val["val_loss"], rel_tol=1e-5):
                problems.append(f"checkpoint round trip differs: step {step_back}, val_loss {val_back} vs {val}")
            # The consolidated fp32 weights are the master copy; the engine evaluates in 16 bits.
            if not math.isclose(fp32_loss, val["val_loss"], rel_tol=0.02):
                problems.append(f"consolidated fp32 weights give val_loss {fp32_loss:.4f} vs the engine's {val['val_loss']:.4f}")
            row.update(
                ok=not problems, problems=problems, steps=sizes.train_steps, loss_first=first, loss_last=last,
                val_loss=val["val_loss"], val_loss_restored=val_back["val_loss"], val_loss_consolidated_fp32=fp32_loss,
                tokens_per_s=sizes.train_steps * spec.micro_batch_size * spec.dataset.seq_len / seconds,
                loss_scale_start=asked["loss_scale"], engine=facts, num_params=the_plan.num_params,
            )
        except Exception as e:  # noqa: BLE001 - one configuration's failure is a result, not the end
            row.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=6))
        finally:
            release(run, restored)
        print(f"[train] {cfg.name}: {summary(row)}", flush=True)
        write(out / "train.json", rows)
    return rows


def consolidated_loss(spec, directory: str, kwargs, x, y, device) -> float:
    """val_loss of the consolidated fp32 artifact weights, as load_model() rebuilds them."""
    import torch

    from mlplatform.train import artifact

    model = artifact.build_with_weights(spec.model.ref, kwargs, Path(directory) / artifact.WEIGHTS).to(device)
    loss_of = engine.loss_function(spec.task)
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), 256):
            xb, yb = torch.from_numpy(x[i : i + 256]).to(device), torch.from_numpy(y[i : i + 256]).to(device)
            total += loss_of(model(xb), yb).item() * len(xb)
            n += len(xb)
    return total / max(n, 1)


def torch_dist():
    import torch

    return torch.distributed


def part_memory(device, sizes: Sizes, out: Path) -> list[dict[str, Any]]:
    """Peak device memory per configuration beside the plan's estimate; tokens/s and MFU."""
    import numpy as np
    import torch

    rows = []
    gpu_name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_FLOPS.items() if k in gpu_name), None)
    for cfg in MEMORY_CONFIGS:
        row: dict[str, Any] = {"config": cfg.name}
        rows.append(row)
        try:
            spec = make_spec(device.type, sizes.memory_model, sizes.memory_seq, cfg.micro or sizes.memory_micro,
                             sizes.memory_steps,
                             Config(cfg.name, cfg.stage, cfg.precision, cfg.offload_optimizer, cfg.offload_params,
                                    True if cfg.checkpointing is None else cfg.checkpointing),
                             f"gpu-check-mem-{cfg.name}")
        except PlatformError as e:
            skip(row, e, out / "memory.json", rows)
            continue
        run = None
        try:
            the_plan = plan(spec)
            x, y = corpus_arrays(spec)
            if len(x) < spec.micro_batch_size:
                raise RuntimeError(f"corpus gives {len(x)} blocks, fewer than a micro batch")
            release()
            base = memory(device) or 0
            reset_peak(device)
            run = engine.build(spec, the_plan.deepspeed_config(), the_plan.precision.value, sizes.memory_steps)
            static = memory(device)
            batches = engine.Batches(x, y, spec.micro_batch_size, spec.seed, 0, device, run.in_dtype)
            loss_of = engine.loss_function(spec.task)
            times, after_first, first_peak = [], None, None
            for step in range(sizes.memory_steps):
                sync(device)
                t0 = time.perf_counter()
                engine.train_step(run.engine, [batches.get(0, step % max(1, len(x) // spec.micro_batch_size))], loss_of)
                sync(device)
                times.append(time.perf_counter() - t0)
                if step == 0:  # the first step also creates the optimizer states
                    after_first, first_peak = memory(device), peak_memory(device)
                    reset_peak(device)
            steady_peak = peak_memory(device)
            measured = None if first_peak is None else max(first_peak, steady_peak) - base
            e = the_plan.chosen
            steady = float(np.median(times[2:] if len(times) > 3 else times))
            tokens_per_s = spec.micro_batch_size * spec.dataset.seq_len / steady
            k = spec.model.kwargs
            fpt = flops_per_token(the_plan.num_params, k["n_layer"], spec.dataset.seq_len, k["d_model"])
            if device.type == "cuda":
                static, after_first = static - base, after_first - base
                first_peak, steady_peak = first_peak - base, steady_peak - base
            row.update(
                ok=True, num_params=the_plan.num_params, precision=the_plan.precision.value,
                activation_checkpointing=spec.activation_checkpointing,
                predicted_bytes=e.device, predicted={"params": e.params, "grads": e.grads, "optimizer": e.optimizer,
                                                     "activations": e.activations, "host": e.host},
                measured_peak_bytes=measured, measured_static_bytes=static, measured_after_first_step_bytes=after_first,
                measured_first_step_peak_bytes=first_peak, measured_steady_peak_bytes=steady_peak,
                ratio=measured / e.device if measured is not None and e.device else None,
                step_seconds=steady, tokens_per_s=tokens_per_s,
                mfu=tokens_per_s * fpt / peak if peak else None, flops_per_token=fpt, engine=engine.facts(run.engine),
            )
        except Exception as e:  # noqa: BLE001
            row.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=6))
        finally:
            release(run)
        print(f"[memory] {cfg.name}: {summary(row)}", flush=True)
        write(out / "memory.json", rows)
    return rows


def memory(device) -> int | None:
    """Bytes the caching allocator hands out now (None on a CPU, which has no such count)."""
    import torch

    return torch.cuda.memory_allocated() if device.type == "cuda" else None


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device) -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if device.type == "cuda" else None


def largest(lo: int, hi: int, step: int, fits, deadline: float) -> tuple[int | None, int | None, int]:
    """Binary search for the largest multiple of `step` in [lo, hi] where fits() holds.

    Returns (largest that fit, smallest that failed, probes); stops at `deadline`
    (time.monotonic()), leaving the bracket found so far.
    """
    good, bad, probes = None, None, 0
    a, b = lo // step, hi // step
    while a <= b and time.monotonic() < deadline:
        mid = (a + b) // 2
        probes += 1
        if fits(mid * step):
            good, a = mid * step, mid + 1
        else:
            bad, b = mid * step, mid - 1
    return good, bad, probes


def width_spec(device_type: str, sizes: Sizes, cfg: Config, width: int) -> TrainSpec:
    """The width search's GPT at one d_model (64 per head), with activation checkpointing."""
    model = {"d_model": width, "n_layer": sizes.width_layers, "n_head": max(1, width // 64)}
    return make_spec(device_type, model, sizes.width_seq, sizes.width_micro, 2,
                     Config(cfg.name, cfg.stage, cfg.precision, cfg.offload_optimizer, cfg.offload_params, True),
                     f"gpu-check-width-{cfg.name}")


def probe(device, sizes: Sizes, cfg: Config, width: int) -> bool:
    """Whether two training steps at `width` fit under the cap (run in a process of its own:
    a DeepSpeed engine that failed with out-of-memory can leave memory held in the process)."""
    import torch

    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(sizes.width_cap_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    spec = width_spec(device.type, sizes, cfg, width)
    the_plan = plan(spec)
    try:
        run = engine.build(spec, the_plan.deepspeed_config(), the_plan.precision.value, 2)
        x = torch.randint(0, 256, (spec.micro_batch_size, spec.dataset.seq_len), device=device)
        loss_of = engine.loss_function(spec.task)
        for _ in range(2):  # the first step creates the optimizer states
            engine.train_step(run.engine, [(x, x)], loss_of)
        sync(device)
        return True
    except RuntimeError as e:  # DeepSpeed re-raises some OOMs as plain RuntimeErrors
        if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
            return False
        raise


PROBE_OOM = 3  # exit code of a probe process whose width did not fit


def part_width(device, sizes: Sizes, out: Path) -> list[dict[str, Any]]:
    """The widest GPT (d_model) that trains within a fixed device-memory cap, per configuration.

    The search brackets the memory model's prediction (2/3 to 3/2 of it) and probes each
    width in a fresh process, so one probe's out-of-memory cannot shrink the next one's room.
    """
    cap = int(sizes.width_cap_gib * 2**30)
    rows = []
    for cfg in WIDTH_CONFIGS:
        row: dict[str, Any] = {"config": cfg.name, "cap_bytes": cap}
        rows.append(row)
        try:
            width_spec(device.type, sizes, cfg, sizes.width_bounds[0])
        except PlatformError as e:
            skip(row, e, out / "width.json", rows)
            continue

        def trains(width: int) -> bool:
            args = [sys.executable, __file__, "--device", device.type, "--out", str(out), "--probe", f"{cfg.name}:{width}"]
            proc = subprocess.run(args + (["--tiny"] if sizes is TINY else []), capture_output=True, text=True,
                                  timeout=120)
            if proc.returncode not in (0, PROBE_OOM):
                raise RuntimeError(f"probe at width {width} exited {proc.returncode}: {proc.stderr[-600:]}")
            return proc.returncode == 0

        try:
            lo, hi = sizes.width_bounds
            step = sizes.width_step
            predicted, _, _ = largest(lo, hi, step, lambda w: plan(width_spec(device.type, sizes, cfg, w)).chosen.device <= cap,
                                      math.inf)
            if device.type == "cuda":
                low = max(lo, (predicted or lo) * 2 // 3)
                high = min(hi, (predicted or lo) * 3 // 2)
                measured, failed, probes = largest(low, high, step, trains, time.monotonic() + sizes.width_seconds)
            else:  # no cap on a CPU: one real probe at the smallest width keeps the code path alive
                low, high = lo, hi
                measured, failed, probes = (lo if trains(lo) else None), None, 1
            params = lambda w: plan(width_spec(device.type, sizes, cfg, w)).num_params if w else None  # noqa: E731
            row.update(
                ok=True, predicted_width=predicted, measured_width=measured, first_failing_width=failed, probes=probes,
                searched=[low, high], measured_params=params(measured), predicted_params=params(predicted),
                at_upper_bound=measured == high - high % step,
                ratio=measured / predicted if device.type == "cuda" and measured and predicted else None,
            )
        except Exception as e:  # noqa: BLE001
            row.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=6))
        print(f"[width] {cfg.name}: {summary(row)}", flush=True)
        write(out / "width.json", rows)
    return rows


def part_serve(device, sizes: Sizes, out: Path) -> dict[str, Any]:
    """Rows/s of the torch serving forward path, whole batches and coalesced single rows."""
    import numpy as np
    import pyarrow as pa
    from safetensors.torch import save_model

    from mlplatform.serve._forward import TorchForward, run_batched
    from mlplatform.train import artifact, models

    result: dict[str, Any] = {"device": device.type, "torch": [], "onnxruntime": {}}
    shapes = [
        ("builtin:digits_mlp", {}, lambda b: np.random.rand(b, 64).astype(np.float32)),
        ("builtin:gpt", {**sizes.train_model, "seq_len": sizes.train_seq},
         lambda b: np.random.randint(0, 256, (b, sizes.train_seq))),
        ("builtin:gpt", {**sizes.memory_model, "seq_len": sizes.memory_seq},
         lambda b: np.random.randint(0, 256, (b, sizes.memory_seq))),
    ]
    for ref, kwargs, make in shapes:
        name = f"{ref.removeprefix('builtin:')} {models.count_params(ref, kwargs) / 1e6:.2f}M"
        with tempfile.TemporaryDirectory(prefix="gpu-check-serve-") as tmp:
            weights = Path(tmp) / "weights.safetensors"
            save_model(models.build(ref, kwargs), str(weights))
            meta = {"model_ref": ref, "model_kwargs": kwargs, "task": "causal_lm" if "gpt" in ref else "classification"}
            target = Path(tmp) / "artifact"
            artifact.write_artifact(str(target), str(weights), meta, pa.table({"x": [0]}))
            for dtype in ("bfloat16", "float16") if device.type == "cuda" else ("float32",):
                forward = TorchForward(target, {"device": device.type, "dtype": dtype, "num_cpus": 1, "role": "model"})
                for batch in sizes.serve_batches:
                    whole = rows_per_s(lambda x=make(batch): forward(x), batch, sizes.serve_seconds)
                    singles = [make(1) for _ in range(batch)]
                    coalesced = rows_per_s(lambda: run_batched(forward, singles), batch, sizes.serve_seconds)
                    result["torch"].append({"model": name, "dtype": dtype, "batch": batch,
                                            "rows_per_s": whole, "rows_per_s_coalesced": coalesced})
                    print(f"[serve] {name} {dtype} b{batch}: {whole:,.0f} rows/s whole, "
                          f"{coalesced:,.0f} coalesced", flush=True)
    result["onnxruntime"] = onnxruntime_cuda(sizes)
    write(out / "serve.json", result)
    return result


def rows_per_s(call, rows: int, seconds: float) -> float:
    """Rows per second of `call` (which returns host arrays, so the device work is done)."""
    for _ in range(3):
        call()
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        call()
        n += 1
    return n * rows / (time.perf_counter() - started)


def onnxruntime_cuda(sizes: Sizes) -> dict[str, Any]:
    """The digits MLP in ONNX Runtime's CUDA provider, where this onnxruntime build has it."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        return {"available": False, "reason": str(e)}
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return {"available": False, "version": ort.__version__, "providers": providers,
                "reason": "this onnxruntime build has no CUDAExecutionProvider (onnxruntime-gpu has it)"}
    import numpy as np
    import torch

    from mlplatform.train import models

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "digits.onnx")
        torch.onnx.export(models.build("builtin:digits_mlp", {}), (torch.zeros(1, 64),), path,
                          input_names=["input"], dynamic_axes={"input": {0: "batch"}}, dynamo=False)
        session = ort.InferenceSession(path, providers=["CUDAExecutionProvider"])
        rows = []
        for batch in sizes.serve_batches:
            x = np.random.rand(batch, 64).astype(np.float32)
            rows.append({"batch": batch, "rows_per_s": rows_per_s(lambda: session.run(None, {"input": x}), batch,
                                                                  sizes.serve_seconds)})
    return {"available": True, "version": ort.__version__, "providers": providers, "digits_mlp": rows}


# ---------------------------------------------------------------- report


def part_report(out: Path) -> dict[str, Any]:
    """results.json (every part) and summary.md (the tables BENCHMARKS.md takes)."""
    results = {p: json.loads((out / f"{p}.json").read_text()) for p in (*PARTS, "env", "pytest")
               if (out / f"{p}.json").exists()}
    write(out / "results.json", results)
    mib = lambda v: f"{v / 2**20:,.0f}" if v is not None else "—"  # noqa: E731
    millions = lambda v: f"{v / 1e6:.1f}M" if v else "—"  # noqa: E731
    number = lambda v, f: format(v, f) if v is not None else "—"  # noqa: E731
    lines = [f"# GPU check — {results.get('env', {}).get('device_name', '?')}", ""]
    lines += table(results.get("train"), "Training (small GPT)",
                   ["config", "checks", "loss first → last", "val loss (restored)", "fp32 artifact val loss",
                    "loss scale", "tokens/s"],
                   lambda r: ["yes" if r["ok"] else "NO: " + "; ".join(r["problems"]),
                              f"{r['loss_first']:.3f} → {r['loss_last']:.3f}",
                              f"{r['val_loss']:.4f} ({r['val_loss_restored']:.4f})",
                              f"{r['val_loss_consolidated_fp32']:.4f}", number(r["engine"]["loss_scale"], "g"),
                              f"{r['tokens_per_s']:,.0f}"])
    lines += table(results.get("memory"), "Peak memory vs the plan's memory model (one rank)",
                   ["config", "params", "predicted MiB", "measured peak MiB", "ratio", "static MiB", "tokens/s", "MFU"],
                   lambda r: [millions(r["num_params"]), mib(r["predicted_bytes"]), mib(r["measured_peak_bytes"]),
                              number(r["ratio"], ".2f"), mib(r["measured_static_bytes"]), f"{r['tokens_per_s']:,.0f}",
                              number(r["mfu"], ".1%")])
    lines += table(results.get("width"), "Largest trainable width under the cap",
                   ["config", "cap GiB", "predicted d_model (params)", "measured d_model (params)", "ratio",
                    "first failing", "searched", "probes"],
                   lambda r: [f"{r['cap_bytes'] / 2**30:.1f}", f"{r['predicted_width']} ({millions(r['predicted_params'])})",
                              f"{r['measured_width']}{' (bound)' if r['at_upper_bound'] else ''} "
                              f"({millions(r['measured_params'])})", number(r.get("ratio"), ".2f"),
                              r["first_failing_width"] or "—", "–".join(map(str, r.get("searched", []))), r["probes"]])
    if "serve" in results:
        lines += table(results["serve"]["torch"], "Serving forward path (TorchForward), rows/s",
                       ["model", "dtype", "batch", "whole batch", "coalesced single rows"],
                       lambda r: [r["dtype"], r["batch"], f"{r['rows_per_s']:,.0f}", f"{r['rows_per_s_coalesced']:,.0f}"],
                       first="model")
        ort_result = results["serve"]["onnxruntime"]
        lines += [f"ONNX Runtime CUDA provider: {ort_result.get('digits_mlp') or ort_result}", ""]
    if "pytest" in results:
        lines += [f"## gpu-marked tests: {results['pytest'].get('summary')}", ""]
    (out / "summary.md").write_text("\n".join(lines))
    return results


def table(rows: list[dict[str, Any]] | None, title: str, columns: list[str], cells, first: str = "config") -> list[str]:
    """A Markdown table: `cells(row)` gives the columns after the first; rows that did not run
    say why in the second column."""
    if rows is None:
        return []
    lines = [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        reason = r.get("skipped") or r.get("error")
        rest = [f"skipped: {r['skipped']}" if "skipped" in r else f"ERROR {r['error']}"] + [""] * (len(columns) - 2) \
            if reason else cells(r)
        lines.append("| " + " | ".join(str(c) for c in [r[first], *rest]) + " |")
    return lines + [""]


def skip(row: dict[str, Any], error: PlatformError, path: Path, rows: list[dict[str, Any]]) -> None:
    """Record a configuration this device cannot run, in the spec error's own words."""
    row["skipped"] = str(error).splitlines()[-1].strip().removeprefix("- ")
    print(f"[{path.stem}] {row['config']}: {summary(row)}", flush=True)
    write(path, rows)


def summary(row: dict[str, Any]) -> str:
    if "skipped" in row:
        return f"skipped ({row['skipped']})"
    if "error" in row:
        return f"ERROR {row['error']}"
    keep = ("ok", "problems", "loss_first", "loss_last", "ratio", "tokens_per_s", "mfu", "predicted_width",
            "measured_width", "first_failing_width")
    return json.dumps({k: row[k] for k in keep if k in row}, default=str)


def write(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1, default=str))


def environment(device) -> dict[str, Any]:
    import deepspeed
    import torch

    env = {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "python": sys.version.split()[0],
           "device": device.type, "date": time.strftime("%Y-%m-%d")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(device_name=props.name, memory_bytes=props.total_memory, cuda=torch.version.cuda,
                   nccl=".".join(map(str, torch.cuda.nccl.version())), bf16=torch.cuda.is_bf16_supported())
    else:
        env["device_name"] = "cpu"
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes and step counts (the CPU dry run)")
    parser.add_argument("--out", required=True, help="folder for the <part>.json files, results.json, summary.md")
    parser.add_argument("--probe", metavar="CONFIG:WIDTH", help=argparse.SUPPRESS)  # part_width's own processes
    parser.add_argument("parts", nargs="*", default=[*PARTS, "report"], help=f"any of {', '.join(PARTS)}, report")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.parts == ["report"]:
        part_report(out)
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device; use --device cpu for the dry run", file=sys.stderr)
        return 2
    sizes = TINY if args.tiny else FULL
    engine.init_single_process(args.device)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if args.probe:
        name, width = args.probe.split(":")
        fits = probe(device, sizes, next(c for c in WIDTH_CONFIGS if c.name == name), int(width))
        return 0 if fits else PROBE_OOM
    write(out / "env.json", environment(device))
    failed = False
    for part in args.parts:
        if part == "report":
            continue
        rows = {"train": part_train, "memory": part_memory, "width": part_width, "serve": part_serve}[part](
            device, sizes, out)
        failed |= isinstance(rows, list) and any(r.get("ok") is False for r in rows)
    if "report" in args.parts:
        part_report(out)
    torch.distributed.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
