"""`make demo`: the platform end to end on a local multi-region cluster.

Brings the cluster up (unless it already runs), runs each stage through the same
interfaces a user has (`ray job submit` via the job API, the CLI's library calls),
prints a report and the dashboard URL, and stops what it started.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from mlplatform import cluster, config
from mlplatform._internal.artifact_layout import EXPORT_REPORT
from mlplatform.cli import print_nodes, table
from mlplatform.errors import PlatformError

REPO = Path(__file__).resolve().parents[2]


# Where the demo registers models; serve_apps/digits-*.yaml load `digits@production` from here.
REGISTRY = "/tmp/mlplatform/registry"
MODEL = "digits"
SERVE_APP = "serve_apps/digits-cpu.yaml"


def _job(entrypoint: str, name: str, tail: int = 25) -> str:
    from mlplatform.cluster.jobs import submit_job

    result = submit_job(entrypoint, str(REPO), name=name)
    if tail or not result.succeeded:
        print("\n".join(result.logs.rstrip().splitlines()[-(tail or 40):]))
    if not result.succeeded:
        raise PlatformError(f"job {result.job_id} ({entrypoint}) ended {result.status}; its logs are above.")
    return result.logs


def _stage_hello(name: str, state: dict) -> str:
    logs = _job("python jobs/hello.py", name, tail=6)
    results = json.loads(next(line for line in logs.splitlines() if line.startswith("HELLO_RESULT "))[len("HELLO_RESULT "):])
    groups = {n.group for n in cluster.inventory(name) if n.alive and n.group}
    landed = {r["asked_for_group"]: r["labels"].get("ray.io/node-group") for r in results}
    if set(landed) != groups or any(asked != got for asked, got in landed.items()):
        raise PlatformError(f"hello tasks landed on {landed}; the cluster's node groups are {sorted(groups)}")
    return f"{len(landed)} node groups answered, each task on a node of its group ({', '.join(sorted(landed))})"


def _stage_train(name: str, state: dict) -> str:
    from mlplatform.train import read_metadata

    # A run name of its own each time: the shipped name would resume its last checkpoint and
    # train nothing on a second `make demo`.
    run = f"digits-demo-{time.strftime('%Y%m%d-%H%M%S')}"
    state["run"] = run
    logs = _job(f"python jobs/train.py --config jobs/configs/digits.yaml --name {run}", name, tail=0)
    # Ray Data's progress lines interleave with the job's own; show the run's summary.
    summary = [line for line in logs.splitlines() if line.startswith(run) or line.strip().startswith(("artifact ", "checkpoint "))]
    print("\n".join(summary))
    state["artifact"] = next(line.split()[-1] for line in summary if line.strip().startswith("artifact "))
    meta = read_metadata(state["artifact"])
    training, engine = meta["training"], meta["training"]["engine"]
    if training["resumed_from_step"] or not training["steps"]:
        raise PlatformError(f"{run} trained {training['steps']} steps, resumed from {training['resumed_from_step']}: "
                            "the demo must train from scratch")
    cost = meta.get("training_cost") or {}
    return (
        f"{training['steps']} steps from scratch, ZeRO-{training['zero_stage']} {training['precision']} on "
        f"{len(engine)} CPU workers ({engine[0]['optimizer']}, as the DeepSpeed engines report); "
        f"val_accuracy {meta['metrics']['val_accuracy']:.4f}; cost {cost.get('cost', 0):.6f} {cost.get('currency')}"
    )


def _stage_tune(name: str, state: dict) -> str:
    from mlplatform.cli import main

    spec_path = "jobs/configs/tune-digits.yaml"
    if main(["tune", "plan", "--config", spec_path, "--name", name]) != 0:
        raise PlatformError("`mlplatform tune plan` failed; its error is above.")
    experiment = f"tune-demo-{time.strftime('%Y%m%d-%H%M%S')}"
    logs = _job(f"python jobs/tune.py --config {spec_path} --name {experiment}", name, tail=0)
    results = Path(f"/tmp/mlplatform/tune/{experiment}/results")
    print((results / "pareto.md").read_text())
    print("\n".join(line for line in logs.splitlines() if line.startswith((experiment, "  best", "  registered"))))
    best = json.loads((results / "best.json").read_text())
    state["tune_job"] = best["cost"]["job_id"]
    trial = best["trial"]
    from mlplatform import registry

    tuned = registry.show("digits-tuned", root=REGISTRY)
    if tuned.lineage.extra.get("tuning", {}).get("experiment") != experiment:
        raise PlatformError(f"{tuned.ref} is not this search's winner; the job's logs say why registering failed")
    return (f"trial {trial['trial']} won ({best['why']}): val_accuracy {trial['metric']:.4f} for "
            f"{trial['cost']:.6f} {best['cost']['currency']}; search {best['cost']['cost']:.6f}; registered "
            f"{tuned.ref}; Pareto table and PNG in {results}")


def _stage_cost(name: str, state: dict) -> str:
    from mlplatform.cli import main

    for args in (["--by", "job"], ["--job", state["tune_job"], "--by", "trial"]):
        if main(["cost", "report", "--cluster", name, *args]) != 0:
            raise PlatformError(f"`mlplatform cost report {' '.join(args)}` failed; its error is above.")
    return f"ledger printed by job, and by trial for the search (job {state['tune_job']})"


def _stage_residency(name: str, state: dict) -> str:
    from collections import Counter

    from ray.util.state import list_actors, list_tasks

    from mlplatform.residency import REGION_LABEL, audit

    trail = audit.default_path(name)
    placed = [r for r in audit.read(trail, "placement") if r.get("name") == state["run"]]
    if not placed:
        raise PlatformError(f"no placement of {state['run']} in the audit trail {trail}")
    record = placed[-1]
    region_of = {n.node_id: n.labels.get(REGION_LABEL, "?") for n in cluster.inventory(name)}
    job = [("job_id", "=", record["job_id"])]
    # Where everything of the job ran, as Ray's state API reports it (not as the platform asked).
    ran = Counter()
    for a in list_actors(filters=job, detail=True, limit=10_000, raise_on_missing_output=False):
        ran[(a.class_name, region_of.get(a.node_id, "?"))] += 1
    for t in list_tasks(filters=job, detail=True, limit=10_000, raise_on_missing_output=False):
        if t.node_id:
            ran[(t.name, region_of.get(t.node_id, "?"))] += 1
    print(f"{state['run']}: classification {record['classification']} (policy {record['policy']}), "
          f"workers' selector {record['selector']}")
    for (what, region), count in sorted(ran.items()):
        print(f"  {count:4d} x {what:<40} {region}")
    outside = sorted({what for (what, region) in ran if region != "me-central-1"})
    if outside:
        raise PlatformError(f"{state['run']}: {', '.join(outside)} ran outside me-central-1, which the policy forbids")
    report = audit.verify(trail)
    if not report.ok:
        raise PlatformError(f"the audit trail {trail} is broken: {report.reason}")
    state["job_id"] = record["job_id"]
    return (f"all {sum(ran.values())} actors and tasks, Ray Train's and Ray Data's own included, in me-central-1 "
            f"(Ray state API); audit chain of {report.records} records intact")


def _stage_residency_report(name: str, state: dict) -> str:
    from mlplatform.cli import main

    # The auditor's view, as `mlplatform residency report` prints it: where the run ran, and where
    # each version of the model (trained and exported) was trained and is stored.
    for args in (["--job", state["job_id"]], ["--model", f"{MODEL}@latest"]):
        if main(["residency", "report", "--name", name, "--root", REGISTRY, *args]) != 0:
            raise PlatformError(f"`mlplatform residency report {' '.join(args)}` failed; its error is above.")
    if main(["residency", "sweep", "--name", name, "--job", state["job_id"]]) != 0:
        raise PlatformError(f"`mlplatform residency sweep` found work of {state['run']} outside its regions (above).")
    return f"report printed for job {state['job_id']} and {MODEL}@latest; the sweep found nothing outside"


def _stage_register(name: str, state: dict) -> str:
    from mlplatform import registry

    # A registry left by an earlier demo, from before the metadata store, is imported first.
    for m in registry.migrate(root=REGISTRY):
        print(f"imported {m.name} ({m.versions} versions) from the file-based index into the metadata store")
    version = registry.register(state["artifact"], MODEL, root=REGISTRY)
    state["trained"] = version.ref
    integrity = registry.verify(version.ref, root=REGISTRY)
    if not integrity.ok:
        raise PlatformError(f"{version.ref} failed its integrity check right after registering: {integrity}")
    print(f"registered {version.ref} under {REGISTRY}: {integrity.files_checked} files, sha256 of each verified")
    return f"{version.ref}: {integrity.files_checked} files, sha256 of each verified on read-back"


def _stage_compress(name: str, state: dict) -> str:
    from mlplatform import registry

    _job(f"python jobs/compress.py --model {state['trained']} --config jobs/configs/compress-digits.yaml --root {REGISTRY}",
         name, tail=6)
    students, lines = [], []
    for kind in ("pruned", "distilled"):
        version = registry.resolve(f"{MODEL}-{kind}@latest", root=REGISTRY)
        extra = version.lineage.extra
        gate = extra["compression"]["gate"]
        if extra.get("compressed_from") != state["trained"] or not gate["passed"]:
            raise PlatformError(f"{version.ref}: compressed_from {extra.get('compressed_from')!r}, gate {gate}; "
                                f"expected a passed gate against {state['trained']}")
        students.append(version.ref)
        c = extra["compression"]
        lines.append(f"{version.ref} ({c['params_before']} -> {c['params_after']} params, accuracy {gate['accuracy']:.3f} "
                     f"vs {gate['teacher_accuracy']:.3f}, agreement {gate['top1_agreement']:.3f})")
    state["students"] = students
    return "; ".join(lines) + f", both lineage -> {state['trained']}"


def _stage_export(name: str, state: dict) -> str:
    import tempfile

    from mlplatform import registry
    from mlplatform.export import ExportReport

    students = " ".join(f"--student {ref}" for ref in state.get("students", ()))
    _job(
        f"python jobs/export.py --model {state['trained']} --config jobs/configs/export-digits.yaml --root {REGISTRY} "
        f"{students}",
        name, tail=45,
    )
    exported = registry.resolve(f"{MODEL}@latest", root=REGISTRY)
    if exported.lineage.extra.get("exported_from") != state["trained"]:
        raise PlatformError(f"{exported.ref} was not exported from {state['trained']}: lineage {exported.lineage.extra}")
    # The gate verdicts and measurements as the export stored them with the version, read back
    # before any alias moves.
    with tempfile.TemporaryDirectory() as tmp:
        registry.fetch(exported.ref, tmp, root=REGISTRY)
        report = ExportReport.from_json(json.loads((Path(tmp) / EXPORT_REPORT).read_text()))
    deployable = sorted(v for v, ok in report.deployable.items() if ok)
    groups = sorted({b.node_group or "(export process)" for b in report.benchmarks})
    if not report.passed or not deployable:
        failed = {v.variant: v.failures() for v in report.variants if not v.deployable}
        raise PlatformError(f"{exported.ref}'s export gates failed ({failed}); {MODEL}@production was not moved.")
    registry.set_alias(MODEL, "production", exported.version, root=REGISTRY,
                       reason=f"demo: export gates passed ({', '.join(deployable)})")
    production = registry.resolve(f"{MODEL}@production", root=REGISTRY)
    integrity = registry.verify(production.ref, root=REGISTRY)
    if production.version != exported.version or not integrity.ok:
        raise PlatformError(f"{MODEL}@production is {production.ref} (integrity ok: {integrity.ok}); expected {exported.ref}")
    print(f"{MODEL}@production -> {production.ref}; integrity: {integrity.files_checked} files verified")
    return (f"{len(report.variants)} candidates gated, {len(deployable)} deployable ({', '.join(deployable)}), "
            f"benchmarked on node group(s) {', '.join(groups)} ({report.cpu.summary()}); "
            f"{MODEL}@production -> {production.ref}, {integrity.files_checked} files verified")


def _stage_serve(name: str, state: dict) -> str:
    import yaml
    from sklearn.datasets import load_digits

    from mlplatform import serve

    config = yaml.safe_load((REPO / SERVE_APP).read_text())
    app = config["applications"][0]["name"]
    primary = config["applications"][0]["args"]["primary"]
    serve.deploy(REPO / SERVE_APP, cluster=name)
    try:
        _wait_running(app, name)
        # https:// once the cluster runs with TLS (serve.deploy gave Serve the cluster's certificate).
        url = f"{serve.endpoint(app, cluster=name)}/v1/predict"
        key = serve.create_key(app, label="make demo").key
        digits = load_digits()
        rows, labels = (digits.data / 16.0).tolist(), digits.target.tolist()  # the 0..1 scaling training used
        load = _Load(url, key, rows, labels)
        replicas = load.run(app, primary["autoscaling"]["max_replicas"], SCALE_TIMEOUT_S)
        print(load.summary())
        print(f"RUNNING replicas of {app} while loaded (serve status, every {POLL_S:.0f}s): {replicas}")
        placement = _replica_groups(app)
        print(f"replica node groups (state API): {placement}")
        refusals = _key_refusals(app, url, rows[0])
        chosen = _chosen_variant(app, name)
        protocol = _inference_protocol(app, serve.endpoint(app, cluster=name), key, digits.data[:4] / 16.0)
    finally:
        serve.delete(app, cluster=name)
    if load.failed or load.completed < 2:
        raise PlatformError(f"serving: {load.completed} completed, failures {dict(load.failed)}; expected no failures")
    if max(replicas) <= replicas[0]:
        raise PlatformError(f"{app} stayed at {replicas[0]} replicas under {CALLERS} callers for {SCALE_TIMEOUT_S:.0f}s")
    pinned = primary["label_selector"]["ray.io/node-group"]
    if set(placement) != {pinned}:
        raise PlatformError(f"{app}'s replicas ran on node groups {placement}; the spec pins them to {pinned!r}")
    return (
        f"{chosen}; {protocol}; {refusals}; "
        f"{load.completed} requests completed, 0 failed, {load.completed / load.seconds:.0f} req/s, "
        f"p50 {load.percentile(50):.1f} ms, p99 {load.percentile(99):.1f} ms, accuracy {load.correct / load.completed:.3f}; "
        f"autoscaled {replicas[0]} -> {max(replicas)} replicas under {CALLERS} callers, all on the {pinned} group"
    )


def _chosen_variant(app: str, name: str) -> str:
    """The variant `variant: auto` chose and why, as `mlplatform serve status` shows it."""
    from mlplatform import serve

    deployments = serve.status(cluster=name)[app]["deployments"]
    chosen = {d: info for d, info in deployments.items() if info.get("variant")}
    for d, info in chosen.items():
        print(f"serve status: {app}/{d} serves {info['variant']}: {info.get('variant_reason', '')}")
    if not chosen:
        raise PlatformError(f"`mlplatform serve status` shows no variant for {app}'s deployments: {deployments}")
    return ", ".join(f"{d} chose {info['variant']} by measurement" for d, info in chosen.items())


def _inference_protocol(app: str, base: str, key: str, rows) -> str:
    """The official Triton client against the app's Open Inference Protocol endpoints, and a text/plain body."""
    import numpy as np
    import tritonclient.http as triton

    from mlplatform.serve import https_context

    # Verified against the cluster's CA, as every client of the demo is.
    client = triton.InferenceServerClient(base.split("://", 1)[1], ssl=True, ssl_context_factory=lambda **_: https_context())
    headers = {"Authorization": f"Bearer {key}"}
    meta = client.get_model_metadata(app, headers=dict(headers))
    tensor = triton.InferInput(meta["inputs"][0]["name"], [len(rows), rows.shape[1]], "FP32")
    tensor.set_data_from_numpy(np.asarray(rows, dtype=np.float32))
    wanted = [triton.InferRequestedOutput(n) for n in ("probabilities", "class")]
    result = client.infer(app, [tensor], outputs=wanted, headers=dict(headers))
    probabilities, classes = result.as_numpy("probabilities"), result.as_numpy("class")
    print(f"tritonclient: {app} v{meta['versions'][0]} inputs {meta['inputs']}; classes {classes.tolist()}, "
          f"top probabilities {np.round(probabilities.max(axis=1), 3).tolist()}")
    if not np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4) or classes.tolist() != probabilities.argmax(axis=1).tolist():
        raise PlatformError(f"tritonclient got probabilities {probabilities} and classes {classes}; they disagree")
    request = urllib.request.Request(f"{base}/v1/predict", data=b"0.1 0.2", method="POST",
                                     headers={**headers, "Content-Type": "text/plain"})
    try:
        urllib.request.urlopen(request, timeout=30, context=https_context())
        plain = 200
    except urllib.error.HTTPError as e:
        plain = e.code
    if plain != 415:
        raise PlatformError(f"a text/plain body got HTTP {plain}; expected 415")
    return (f"tritonclient: metadata and {len(rows)} rows classified with probabilities over the Open Inference "
            "Protocol; text/plain 415")


def _key_refusals(app: str, url: str, row: list[float]) -> str:
    """What the app answers a key it must refuse, and plain HTTP: each must be refused, never 5xx."""
    from mlplatform import serve
    from mlplatform.serve import Quota, https_context

    def status(key: str) -> tuple[int, str]:
        request = urllib.request.Request(url, data=json.dumps({"inputs": [row]}).encode(),
                                         headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30, context=https_context()) as response:
                return response.status, ""
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Retry-After", "")

    metrics_only = serve.create_key(app, label="demo: metrics only", scopes=["metrics"]).key
    expiring = serve.create_key(app, label="demo: expires", expires="1s").key
    limited = serve.create_key(app, label="demo: 1 request/s", quota=Quota.of(1, 1)).key
    time.sleep(2.5)  # the expiring key has expired; every replica has re-read the key file (each second)
    seen = {"metrics-scoped key": status(metrics_only)[0], "expired key": status(expiring)[0]}
    quota = [status(limited) for _ in range(8)]
    seen["over quota"] = next((code for code, _ in quota if code == 429), quota[-1][0])
    retry_after = next((after for code, after in quota if code == 429), "")
    try:  # the same port without TLS: the proxy only speaks HTTPS
        urllib.request.urlopen(url.replace("https://", "http://", 1), timeout=10)
        seen["plain HTTP"] = "answered"
    except urllib.error.HTTPError as e:
        seen["plain HTTP"] = f"HTTP {e.code}"
    except OSError as e:  # the connection is dropped: the request never reaches the model
        seen["plain HTTP"] = f"refused ({type(e).__name__})"
    print(f"refusals: {seen}; 429 Retry-After {retry_after!r} s")
    want = {"metrics-scoped key": 403, "expired key": 401, "over quota": 429}
    wrong = {k: v for k, v in want.items() if seen[k] != v}
    if wrong or not str(seen["plain HTTP"]).startswith("refused") or not retry_after:
        raise PlatformError(f"key and transport refusals: got {seen} (Retry-After {retry_after!r}); expected {want}, "
                            "plain HTTP refused, a Retry-After on 429")
    return "metrics-scoped key 403, expired key 401, over quota 429, plain HTTP refused"


# Closed-loop callers for the serve stage: the shipped throughput preset aims at 16 ongoing requests
# per replica, so 48 keep the load above target until max_replicas (3) is reached.
CALLERS = 48
SCALE_TIMEOUT_S = 150.0
POLL_S = 2.0


class _Load:
    """Callers that POST one row each until told to stop, counting what completed and what failed."""

    def __init__(self, url: str, key: str, rows: list[list[float]], labels: list[int]):
        self.url, self.key, self.rows, self.labels = url, key, rows, labels
        from mlplatform.serve import https_context

        # Verified against the cluster's CA (RAY_TLS_CA_CERT, exported when the demo connected).
        self._context = https_context() if url.startswith("https://") else None
        self.completed = self.correct = 0
        self.failed: Counter[str] = Counter()  # by kind: "HTTP 503", "ConnectionRefusedError", ...
        self.latencies_ms: list[float] = []
        self.seconds = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def run(self, app: str, want_replicas: int, timeout_s: float) -> list[int]:
        """Load `app` until it runs `want_replicas` replicas or `timeout_s` passes; returns the counts polled."""
        threads = [threading.Thread(target=self._caller, args=(i,), daemon=True) for i in range(CALLERS)]
        start = time.monotonic()
        seen = [_replicas(app)]
        for t in threads:
            t.start()
        try:
            while seen[-1] < want_replicas and time.monotonic() - start < timeout_s:
                time.sleep(POLL_S)
                seen.append(_replicas(app))
        finally:
            self._stop.set()
            for t in threads:
                t.join()
            self.seconds = time.monotonic() - start
        return seen

    def _caller(self, i: int) -> None:
        n = i
        while not self._stop.is_set():
            row = n % len(self.rows)
            n += CALLERS
            request = urllib.request.Request(
                self.url, data=json.dumps({"inputs": [self.rows[row]]}).encode(),
                headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
            )
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=30, context=self._context) as response:
                    outputs = json.loads(response.read())["outputs"][0]
            except urllib.error.HTTPError as e:
                kind = f"HTTP {e.code}"
            except Exception as e:  # noqa: BLE001 - every failure is counted by kind and fails the stage
                kind = type(e).__name__
            else:
                kind = None
            elapsed = (time.perf_counter() - t0) * 1000
            with self._lock:
                if kind:
                    self.failed[kind] += 1
                else:
                    self.completed += 1
                    self.correct += outputs.index(max(outputs)) == self.labels[row]
                    self.latencies_ms.append(elapsed)

    def percentile(self, q: float) -> float:
        return statistics.quantiles(self.latencies_ms, n=100, method="inclusive")[int(q) - 1]

    def summary(self) -> str:
        return f"{self.completed} completed, failures {dict(self.failed) or 'none'} in {self.seconds:.1f}s"


def _replicas(app: str) -> int:
    """RUNNING replicas of `app`'s deployments, as Serve's controller reports them."""
    from ray import serve

    deployments = serve.status().applications[app].deployments.values()
    return sum(n for d in deployments for state, n in d.replica_states.items() if str(getattr(state, "value", state)) == "RUNNING")


def _replica_groups(app: str) -> dict[str, int]:
    """Alive replica actors of `app` per node group, from Ray's state API."""
    from ray.util.state import list_actors

    groups = {n.node_id: n.group for n in cluster.inventory()}
    actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=10_000)
    return dict(Counter(groups.get(a.node_id, "?") for a in actors if a.class_name.startswith(f"ServeReplica:{app}:")))


def _wait_running(app: str, name: str, timeout_s: float = 300.0) -> None:
    import tenacity

    from mlplatform import serve

    def running() -> bool:
        status = serve.status(cluster=name).get(app, {})
        if status.get("status") == "DEPLOY_FAILED":
            raise PlatformError(f"{app} failed to deploy: {status.get('message')}")
        return status.get("status") == "RUNNING"

    def gave_up(_: tenacity.RetryCallState) -> None:
        raise PlatformError(f"{app} was not RUNNING within {timeout_s:.0f}s; see `mlplatform serve status`.")

    tenacity.Retrying(
        retry=tenacity.retry_if_result(lambda ok: not ok), stop=tenacity.stop_after_delay(timeout_s),
        wait=tenacity.wait_fixed(2), retry_error_callback=gave_up,
    )(running)


def _stage_security(name: str, state: dict) -> str:
    """TLS between Ray's processes, roles on alias moves (audited), restricted checkpoints encrypted."""
    import os
    import subprocess

    import torch

    from mlplatform import access, registry
    from mlplatform._internal import envelope
    from mlplatform.cluster import tls
    from mlplatform.residency import audit

    # 1. Ray's own CLI: refused without the cluster's client certificate, let in with `cluster env`.
    env = cluster.find(name).env()
    tls_vars = tls.TLS_ENV
    base = {k: v for k, v in os.environ.items() if k not in tls_vars}
    ray_cli = str(Path(sys.executable).with_name("ray"))
    without = subprocess.run([ray_cli, "status"], env={**base, **{k: v for k, v in env.items() if k not in tls_vars}},
                             capture_output=True, text=True, timeout=120)
    with_env = subprocess.run([ray_cli, "status"], env={**base, **env}, capture_output=True, text=True, timeout=120)
    print(f"`ray status` with the token but without the TLS variables: exit {without.returncode}; "
          f"with `mlplatform cluster env`: exit {with_env.returncode}")
    if without.returncode == 0 or with_env.returncode != 0:
        raise PlatformError(f"ray status: exit {without.returncode} without the cluster's certificate (want non-zero), "
                            f"{with_env.returncode} with it (want 0): {with_env.stderr[-1000:]}")

    # 2. Roles: a viewer may not move a production alias, a deployer may; both decisions audited.
    stamp = time.strftime("%Y%m%d%H%M%S")
    viewer, deployer = f"demo-viewer-{stamp}", f"demo-deployer-{stamp}"
    _, viewer_token = access.add_user(viewer, "viewer")
    _, deployer_token = access.add_user(deployer, "deployer", on=f"registry:{MODEL}")
    target = registry.resolve(f"{MODEL}@production", root=REGISTRY).version
    try:
        os.environ[access.TOKEN_ENV] = viewer_token
        try:
            registry.set_alias(MODEL, "production", target, root=REGISTRY)
            raise PlatformError(f"user {viewer} (viewer) moved {MODEL}@production: roles are not enforced")
        except access.AccessDenied as e:
            print(f"viewer refused: {e}")
        os.environ[access.TOKEN_ENV] = deployer_token
        registry.set_alias(MODEL, "production", target, root=REGISTRY)
        print(f"deployer {deployer} moved {MODEL}@production to version {target}")
    finally:
        os.environ.pop(access.TOKEN_ENV, None)
        for user in (viewer, deployer):
            access.remove_user(user)
    trail = audit.default_path(name)
    decisions: dict[str, bool] = {}
    deadline = time.monotonic() + 30  # records reach the cluster's trail through its writer actor
    while len(decisions) < 2 and time.monotonic() < deadline:
        decisions = {r["user"]: r["allowed"] for r in audit.read(trail, "access")
                     if r.get("user") in (viewer, deployer) and r.get("action") == "registry.alias.set"}
        time.sleep(0.5)
    if decisions != {viewer: False, deployer: True}:
        raise PlatformError(f"the audit trail {trail} holds {decisions} for the two alias moves; want the viewer's "
                            "refusal and the deployer's move")

    # 3. The restricted training run's checkpoints: ciphertext torch cannot read.
    stored = [p for c in Path(state["artifact"]).parent.glob("checkpoint_step*") for p in c.rglob("*.pt")]
    readable = []
    for path in stored:
        try:
            torch.load(path, weights_only=True)
            readable.append(path)
        except Exception:  # noqa: BLE001 - any failure to parse is what is wanted
            pass
    if not stored or readable or not all(envelope.is_encrypted(p) for p in stored):
        raise PlatformError(f"{len(stored)} checkpoint files of {state['run']}, {len(readable)} readable by torch "
                            f"without the key (e.g. {readable[:1]}); want all encrypted")
    print(f"{len(stored)} checkpoint .pt files of {state['run']} are envelope-encrypted; torch.load fails on each")
    return (f"ray status refused without the cluster's certificate; viewer's alias move refused and deployer's "
            f"allowed, both in the audit trail; {len(stored)} restricted checkpoint files unreadable without the key")


def _stage_production(name: str, state: dict) -> str:
    """Every shipped KubeRay and launcher file is the render of its spec; the dashboard's queries are sound."""
    import contextlib
    import io
    import shlex

    from mlplatform.cli import main as cli
    from mlplatform.cluster.render import rendered_by
    from mlplatform.observability import check_dashboard

    shipped = sorted([*REPO.glob("cluster_configs/kuberay/*.yaml"), *REPO.glob("cluster_configs/launcher/*.yaml")])
    kinds = Counter()
    for path in shipped:
        command = rendered_by(path)  # each file's first line names the command that renders it
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            cli(command)
        if out.getvalue() != path.read_text():
            raise PlatformError(f"{path.relative_to(REPO)} differs from its render; run `{shlex.join(['mlplatform', *command])}`")
        kinds[command[command.index("--target") + 1]] += 1
    queries = check_dashboard(REPO / "cluster_configs/observability/grafana-dashboard.json")
    rendered = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    return f"{len(shipped)} shipped files re-rendered from their specs, all identical ({rendered}); {queries} dashboard queries use only exported metrics"


STAGES: list[tuple[str, Callable[[str, dict], str]]] = [
    ("hello job (ray job submit: one task per node group)", _stage_hello),
    ("train digits (ray job submit jobs/train.py, DeepSpeed ZeRO-2)", _stage_train),
    ("residency: where the restricted run ran (Ray state API) and its audit record", _stage_residency),
    ("tune digits (cost-aware search on spot nodes, jobs/tune.py)", _stage_tune),
    ("cost: what each job and trial cost (the ledger)", _stage_cost),
    ("register the artifact (versioned, hashed)", _stage_register),
    ("compress: pruned and distilled students, gated against the teacher (jobs/compress.py)", _stage_compress),
    ("export every candidate with accuracy gates, measured on the cpu group (jobs/export.py)", _stage_export),
    (f"serve {SERVE_APP} (keys, batching, autoscaling) under load", _stage_serve),
    ("residency report: where the job ran, where each model version was trained and is stored", _stage_residency_report),
    ("security: mutual TLS, roles on alias moves (audited), encrypted restricted checkpoints", _stage_security),
    ("production: KubeRay/launcher renders and the Grafana dashboard's queries", _stage_production),
]


AUTOSCALING_CLUSTER = "cluster_configs/local/autoscaling.yaml"


def _autoscaling() -> str:
    """A cluster of its own whose `gpu` spot group starts empty: pending demand launches a node."""
    import ray

    spec = config.load(REPO / AUTOSCALING_CLUSTER, cluster.ClusterSpec)
    running = cluster.up(spec, str(REPO / AUTOSCALING_CLUSTER))
    try:
        cluster.connect(spec.name)
        alive = [n for n in cluster.inventory(spec.name) if n.alive]
        before = {n.node_id for n in alive}
        if any(n.group == "gpu" for n in alive):
            raise PlatformError("the autoscaling cluster started with a gpu node; its gpu group must start empty")
        task = ray.remote(num_cpus=1)(lambda: ray.get_runtime_context().get_node_id())
        t0 = time.monotonic()
        node_id = ray.get(task.options(label_selector={"ray.io/node-group": "gpu"}).remote(), timeout=120)
        waited = time.monotonic() - t0
        nodes = cluster.inventory(spec.name)
        node = next(n for n in nodes if n.node_id == node_id)
        if node_id in before or node.group != "gpu" or node.market != "spot":
            raise PlatformError(f"the gpu task ran on {node.name} ({node.group}, {node.market}), not on a launched gpu spot node")
        print_nodes(nodes)
        return (f"a pending gpu task made Ray's autoscaler launch a {node.group} {node.market} node in {node.zone}; "
                f"it ran there {waited:.0f}s after submission")
    finally:
        ray.shutdown()
        cluster.down(running.name)


def run(cluster_config: str) -> int:
    spec = config.load(cluster_config, cluster.ClusterSpec)
    started_here = spec.name not in {c.name for c in cluster.running()}
    if started_here:
        print(f"==> Starting cluster '{spec.name}' from {cluster_config}", flush=True)
        running = cluster.up(spec, cluster_config)
    else:
        print(f"==> Using the running cluster '{spec.name}' (it stays up afterwards)")
        running = cluster.find(spec.name)
    report, state = [], {}
    try:
        print("\n==> Inventory")
        print_nodes(cluster.inventory(spec.name))
        for title, stage in STAGES:
            print(f"\n==> {title}", flush=True)
            t0 = time.monotonic()
            outcome = stage(spec.name, state)
            report.append([title, outcome, f"{time.monotonic() - t0:.1f}s"])
        print(f"\nDashboard: {running.dashboard_url}  (token: `mlplatform cluster token --name {spec.name}`)")
    finally:
        import ray

        ray.shutdown()
        if started_here:
            print(f"\n==> Stopping cluster '{spec.name}'", flush=True)
            cluster.down(spec.name)
    title = f"autoscaling ({AUTOSCALING_CLUSTER}: Ray's autoscaler launches a node for pending demand)"
    print(f"\n==> {title}", flush=True)
    t0 = time.monotonic()
    report.append([title, _autoscaling(), f"{time.monotonic() - t0:.1f}s"])
    print("\n==> Report")
    print(table(["STAGE", "OUTCOME", "TIME"], report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlplatform.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", default="cluster_configs/local/three-region.yaml", help="Cluster spec YAML.")
    args = parser.parse_args(argv)
    try:
        return run(args.cluster)
    except PlatformError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
