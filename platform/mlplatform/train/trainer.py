"""Driver side of a run: plan, preflight, Ray Train TorchTrainer wiring, final artifact.

Storage: checkpoints go to <storage_path>/<name>/checkpoint_step*/ and the artifact to
<storage_path>/<name>/artifact/. Every node must see the same storage path: on one
machine a local directory does; across machines use NFS or a URI (s3://, gs://).
Submitting the same spec again resumes from its newest complete checkpoint (the result
and the artifact say from which step); pick a new `name` for a fresh run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlplatform import residency
from mlplatform._internal import artifact_layout as layout
from mlplatform._internal import envelope, keyring
from mlplatform._internal import storage as _storage
from mlplatform.errors import PreflightError, ResidencyError, TrainingFailed
from mlplatform.residency import guard, sweep
from mlplatform.train import artifact as _artifact
from mlplatform.train import checkpoints
from mlplatform.train import data as _data
from mlplatform.train.loop import train_loop_per_worker
from mlplatform.train.plan import Plan, plan
from mlplatform.train.preflight import preflight
from mlplatform.train.spec import TrainSpec


@dataclass(frozen=True)
class TrainResult:
    """What a finished run leaves: the artifact, its metrics and the last checkpoint."""

    name: str
    artifact_dir: str
    metrics: dict[str, Any] = field(hash=False)
    checkpoint_path: str | None
    steps: int
    resumed_from_step: int  # 0: trained from scratch; else the checkpoint step the last attempt started at
    zero_stage: int  # as the DeepSpeed engine reported it
    precision: str  # as the DeepSpeed engine reported it
    engine: list[dict[str, Any]] = field(hash=False)  # per rank: engine.facts()

    @property
    def steps_trained(self) -> int:
        """Optimizer steps the last attempt ran (all of them unless it resumed)."""
        return self.steps - self.resumed_from_step

    def summary(self) -> str:
        keys = [k for k in ("val_accuracy", "val_rmse", "val_perplexity", "val_loss") if k in self.metrics]
        shown = ", ".join(f"{k} {self.metrics[k]:.4f}" for k in keys)
        resumed = f" (resumed from the step-{self.resumed_from_step} checkpoint)" if self.resumed_from_step else ""
        return (
            f"{self.name}: {self.steps} steps{resumed}, ZeRO-{self.zero_stage} {self.precision}; {shown}\n"
            f"  artifact    {self.artifact_dir}\n  checkpoint  {self.checkpoint_path}"
        )


def train(spec: TrainSpec) -> TrainResult:
    """Plan, check, train on the connected Ray cluster, and write the final artifact.

    Inside `ray job submit` this joins the job's cluster; elsewhere connect first
    (`mlplatform.cluster.connect`) or a local single-node Ray starts.

    Raises:
        SpecError, PlanError, PreflightError: bad input, before any worker starts.
        TrainingFailed: the run failed after `max_failures` restarts.
    """
    import ray

    clock = _Phases(spec.name)
    the_plan = plan(spec)
    if not ray.is_initialized():
        # In the job's environment, every worker's residency guard knows the classification from its start.
        ray.init(runtime_env={"env_vars": {guard.CLASSIFICATION_ENV: spec.classification}} if spec.classification else None)
    policy = residency.current()
    try:
        selector = preflight(spec, policy=policy)
        if policy is not None:
            guard.check_driver(policy, policy.resolve(spec.classification))
    except ResidencyError as e:
        residency.record("denial", what="train", name=spec.name, job_id=_job_id(), reason=str(e))
        raise
    if policy is not None:
        guard.declare(policy.resolve(spec.classification))
        residency.record("placement", what="train", name=spec.name, job_id=_job_id(), policy=policy.name,
                        classification=policy.resolve(spec.classification), selector=selector)
    if spec.start == "off-peak":
        _wait_off_peak(spec)
    clock.done("plan and preflight")
    # Everything the driver writes (dataset files, the artifact) stays inside the data's storage prefixes.
    with residency.confined(policy, spec.classification):
        return _train(spec, the_plan, policy, selector, clock)


def _train(spec: TrainSpec, the_plan: Plan, policy, selector: dict[str, str], clock: _Phases, *,
           callbacks: tuple = (), max_preemption_failures: int = -1, whole_job: bool = True) -> TrainResult:
    """Data, fit, artifact: the run itself, after plan and preflight.

    A tuning trial calls this too, with `whole_job` false: the search sweeps and meters its job once.
    """
    fs, root = _run_storage(spec)
    if _storage.is_uri(spec.storage_path):
        data_root = os.path.join(tempfile.gettempdir(), "mlplatform", "datasets")
    else:
        data_root = os.path.join(root, "datasets")
    paths = _data.resolve_paths(spec, data_root)
    fingerprint = _data.fingerprint(paths)
    datasets = _data.load_datasets(spec, paths, selector)
    clock.done("data")
    result = _fit(spec, the_plan, datasets, selector, callbacks=callbacks,
                  max_preemption_failures=max_preemption_failures)
    clock.done("training")
    ran = _where_it_ran(spec, policy) if whole_job else None
    training_cost = _metered(spec, root) if whole_job else None

    metrics = dict(result.metrics or {})
    # The newest complete checkpoint on storage, as the workers resume from: a run resumed at
    # its final checkpoint reports nothing new, so Ray Train's latest may be an older one.
    from ray.train import Checkpoint

    newest = checkpoints.newest_complete(fs, f"{root.rstrip('/')}/{spec.name}")
    final = Checkpoint(newest.path, filesystem=fs) if newest else result.checkpoint
    if final is None:
        raise TrainingFailed(f"{spec.name}: the run ended without a checkpoint; see the job logs.")
    with final.as_directory() as ckpt_dir, _plain_weights(ckpt_dir) as weights:
        if not weights.is_file():
            raise TrainingFailed(
                f"{spec.name}: the last checkpoint ({final.path}) has no {layout.WEIGHTS}; the run stopped "
                "before its final step. Submit the same spec again to resume."
            )
        artifact_dir = _write_artifact(spec, the_plan, paths, fingerprint, datasets, str(weights), metrics, root, ran,
                                       training_cost)
    meta = _artifact.read_metadata(artifact_dir)
    clock.done("artifact")
    return TrainResult(
        name=spec.name,
        artifact_dir=artifact_dir,
        metrics=meta["metrics"],
        checkpoint_path=final.path,
        steps=newest.step if newest else int(metrics.get("step", 0)),
        resumed_from_step=meta["training"]["resumed_from_step"],
        zero_stage=meta["training"]["zero_stage"],
        precision=meta["training"]["precision"],
        engine=meta["training"]["engine"],
    )


@contextmanager
def _plain_weights(ckpt_dir: str) -> Iterator[Path]:
    """The checkpoint's consolidated weights as a plaintext file, decrypted into scratch if encrypted.

    The file says whether it is encrypted (the workers decided, from the policy they ran under).
    """
    stored = Path(ckpt_dir) / layout.WEIGHTS
    if not stored.is_file() or not envelope.is_encrypted(stored):
        yield stored
        return
    keys = keyring.cluster_keyring(create=False)
    scratch = _storage.temp_dir("mlplatform-weights-")  # inside the data's prefixes (confined)
    try:
        envelope.decrypt_file(stored, scratch / layout.WEIGHTS, keys, layout.WEIGHTS)
        yield scratch / layout.WEIGHTS
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _where_it_ran(spec: TrainSpec, policy) -> dict[str, Any] | None:
    """Where every actor and task of this job ran, from Ray's state API, into the audit trail.

    The evidence is Ray's record, not the platform's request: Ray Train's and Ray Data's own
    actors and tasks are in it, and anything outside the classification's regions is a `violation`.
    """
    if policy is None:
        return None
    classification = policy.resolve(spec.classification)
    time.sleep(sweep.TASK_EVENTS_DELAY_S)  # so the last tasks' events have reached the state API
    checked, findings = sweep.sweep(policy, _job_id())
    ran = {"classification": classification, **sweep.where(checked)}
    residency.record("ran", what="train", name=spec.name, job_id=_job_id(), placements=len(checked),
                     outside=len(findings), **ran)
    for f in findings:
        # `name` is the actor or task that ran outside; the run is `run`.
        residency.record("violation", **{**f.to_json(), "what": "train", "run": spec.name})
    return ran


def _wait_off_peak(spec: TrainSpec) -> None:
    from mlplatform.cost import catalog
    from mlplatform.errors import CostError

    prices = catalog.current()
    if prices is None:
        raise CostError(f"{spec.name}: `start: off-peak` needs the cluster's price catalog (its off-peak window); "
                        "name one in the cluster spec (`price_catalog:`), or use `start: now`")
    prices.wait_for_off_peak(spec.name)


def _metered(spec: TrainSpec, root: str) -> dict[str, Any] | None:
    """What this job cost so far, from Ray's records priced by the cluster's catalog, into the ledger.

    None on a cluster without a price catalog. Steps redone after a restart are counted as lost.
    """
    from mlplatform.cost import catalog, ledger, lost, meter

    prices = catalog.current()
    if prices is None:
        return None
    cluster, job_id = os.environ.get(residency.CLUSTER_ENV) or "local", meter.ledger_job_id(_job_id())
    usages = meter.meter_job(_job_id(), cluster, prices)
    book = ledger.open_ledger()
    book.record(usages)
    step_log = f"{root.rstrip('/')}/{spec.name}/steps.log"
    losses = [] if _storage.is_uri(spec.storage_path) else lost.from_step_logs(cluster, job_id, {None: step_log}, usages)
    book.record_lost(losses)
    book.record_job(cluster, job_id, "train", spec.name, ended_at=time.time(),
                    extra={"submission_id": os.environ.get("RAY_JOB_SUBMISSION_ID")})
    try:
        from mlplatform.cost import metrics, report

        rows = report.report(book, cluster=cluster, job=job_id, by="job")["rows"]
        metrics.publish(rows, currency=prices.currency, by="job")
    except Exception as e:  # noqa: BLE001 - the ledger holds the figures; Prometheus is a view of them
        print(f"[mlplatform.train] cost metrics not published: {e}", flush=True)
    return {**meter.describe(usages), "lost_cost": round(sum(x.cost for x in losses), 6),
            "lost_steps": sum(x.steps for x in losses), "job_id": job_id}


def _job_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_job_id()


def _fit(spec: TrainSpec, the_plan: Plan, datasets, selector: dict[str, str], *, callbacks: tuple = (),
         max_preemption_failures: int = -1):
    """Ray Train's TorchTrainer.fit() for the spec, with the platform's callbacks.

    A preemption notice is not the run's fault: by default Ray Train restarts from the
    emergency checkpoint as often as spot nodes go (`max_preemption_failures=-1`); a tuning
    trial passes 0 to choose the next market itself.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from mlplatform.train import preemption

    run_dir = _run_storage(spec)[1].rstrip("/") + "/" + spec.name
    loop_config = {
        "spec": spec.model_dump(mode="json"),
        "deepspeed": the_plan.deepspeed_config(),
        "precision": the_plan.precision.value,
        # Rank 0 appends "step pid unix_time" per optimizer step: an audit of what each attempt ran.
        "step_log": None if _storage.is_uri(spec.storage_path) else f"{run_dir}/steps.log",
    }
    resources = dict(spec.resources_per_worker)
    if spec.use_gpu:
        resources.setdefault("GPU", 1.0)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=spec.num_workers,
            use_gpu=spec.use_gpu,
            resources_per_worker=resources,
            label_selector=selector or None,
        ),
        run_config=RunConfig(
            name=spec.name,
            storage_path=_storage.absolute(spec.storage_path),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep_last),
            failure_config=FailureConfig(
                max_failures=spec.max_failures, max_preemption_failures=max_preemption_failures
            ),
            callbacks=[preemption.PinnedPreemptionCallback(), *callbacks],
        ),
        datasets=datasets,
        dataset_config=_data.data_config(selector),
    )
    from ray.train import TrainingFailedError

    try:
        with _pinned_preemption_watcher():
            return trainer.fit()
    except TrainingFailedError as e:
        raise TrainingFailed(
            f"{spec.name}: training failed after {spec.max_failures} restarts ({e}). Checkpoints so far are under "
            f"{run_dir}; fix the cause and submit the same spec to resume, or raise `max_failures`."
        ) from None


# Read by Ray Train where fit() starts its controller: "0" turns its unpinned watcher off.
_RAY_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


@contextmanager
def _pinned_preemption_watcher() -> Iterator[None]:
    """Ray Train's preemption watcher runs on the controller's node, never where Ray picks.

    Its own watcher (Ray 2.60) is an actor with no selector that Ray may place in any region;
    the run gets mlplatform.train.preemption's pinned one instead (Ray Train reads the
    variable from the driver's environment when fit() starts its controller).
    """
    before = os.environ.get(_RAY_WATCHER_ENV)
    os.environ[_RAY_WATCHER_ENV] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_RAY_WATCHER_ENV, None)
        else:
            os.environ[_RAY_WATCHER_ENV] = before


def _write_artifact(spec, the_plan, paths, fingerprint, datasets, weights, train_metrics, root, ran,
                    training_cost=None) -> str:
    import numpy as np

    engine = train_metrics["engine"]
    model_kwargs = dict(spec.model.kwargs)
    if spec.model.ref == "builtin:gpt":
        model_kwargs.setdefault("seq_len", spec.dataset.seq_len)
    xs, ys = [], []
    for batch in datasets["validation"].iter_batches(batch_size=None, batch_format="numpy"):
        xs.append(batch["x"])
        ys.append(batch["y"])
    x_val, y_val = np.concatenate(xs), np.concatenate(ys)

    sample = _data.reference_sample(spec, paths)
    signature, output = layout.input_signature(spec.task.value, spec.dataset.seq_len, sample.schema.names)

    metadata: dict[str, Any] = {
        "model_ref": spec.model.ref,
        "model_kwargs": model_kwargs,
        "task": spec.task.value,
        "spec": spec.model_dump(mode="json"),
        "dataset_fingerprint": fingerprint,
        "dataset": {"train": paths.train, "validation": paths.validation},
        "input_signature": signature,
        "output_signature": output,
        "training": {
            # From the DeepSpeed engines, as the workers reported them at the last checkpoint.
            "zero_stage": engine[0]["zero_stage"],
            "precision": "bf16" if engine[0]["bf16"] else "fp16" if engine[0]["fp16"] else "fp32",
            "engine": engine,
            "num_workers": spec.num_workers,
            "steps": train_metrics.get("step"),
            "resumed_from_step": train_metrics.get("resumed_from_step", 0),
            "num_params": the_plan.num_params,
        },
        "ray_job_id": os.environ.get("RAY_JOB_SUBMISSION_ID") or _ray_job_id(),
    }
    if training_cost:
        metadata["training_cost"] = training_cost  # the registry keeps it in each version's lineage
    target = None if _storage.is_uri(spec.storage_path) else f"{root.rstrip('/')}/{spec.name}/artifact"
    local = target or str(_storage.temp_dir("mlplatform-artifact-"))
    # The metrics recorded are those of the consolidated fp32 weights on the held-out data:
    # what load_model() on the artifact reproduces.
    model = _artifact.build_with_weights(spec.model.ref, model_kwargs, weights)
    final = _artifact.evaluate(model, x_val, y_val, spec.task.value)
    kept = {k: v for k, v in train_metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    final.update({f"train_{k}": v for k, v in kept.items()})
    _artifact.write_artifact(local, weights, {**metadata, "metrics": final}, sample, residency=ran)
    if target is None:
        import pyarrow.fs as pafs

        fs, inner = _run_storage(spec)
        dest = f"{inner.rstrip('/')}/{spec.name}/artifact"
        _storage.check_write(f"{spec.storage_path.rstrip('/')}/{spec.name}/artifact", "storage_path")
        fs.create_dir(dest, recursive=True)
        pafs.copy_files(local, dest, destination_filesystem=fs)
        return f"{spec.storage_path.rstrip('/')}/{spec.name}/artifact"
    return local


def _run_storage(spec: TrainSpec):
    """(pyarrow filesystem, root path) of the spec's `storage_path`."""
    return _storage.filesystem(spec.storage_path, "storage_path", PreflightError)


class _Phases:
    """Prints how long each phase of a run took (job logs)."""

    def __init__(self, name: str):
        import time

        self.name, self.time, self.last = name, time.perf_counter, time.perf_counter()

    def done(self, phase: str) -> None:
        now = self.time()
        print(f"[mlplatform.train] {self.name}: {phase} took {now - self.last:.1f} s", flush=True)
        self.last = now


def _ray_job_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_job_id()
    except Exception:  # noqa: BLE001 - metadata only; never fail a finished run over it
        return None


__all__ = ["PreflightError", "TrainResult", "train"]
