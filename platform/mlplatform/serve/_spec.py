"""ServeSpec: what a user writes under `args:` of a serve_apps/*.yaml (no Ray import here).

Autoscaling presets are starting points; a spec overrides them field by field:

    autoscaling: {preset: throughput, max_replicas: 2}
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Any

from pydantic import Field, field_validator, model_validator

from mlplatform.config import Spec

_APP_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*@[A-Za-z0-9][A-Za-z0-9._-]*$")


class Variant(str, Enum):
    """Which file of a registered version a model deployment runs (`auto`: the fastest gated ONNX one)."""

    AUTO = "auto"
    ONNX_INT8 = "onnx_int8"
    ONNX_FP32 = "onnx_fp32"
    ONNX_INT8_QDQ = "onnx_int8_qdq"
    PRUNED_ONNX_FP32 = "pruned_onnx_fp32"
    PRUNED_ONNX_INT8 = "pruned_onnx_int8"
    DISTILLED_ONNX_FP32 = "distilled_onnx_fp32"
    DISTILLED_ONNX_INT8 = "distilled_onnx_int8"
    TORCH = "torch"


class Preset(str, Enum):
    """Named autoscaling starting points."""

    LATENCY = "latency"
    THROUGHPUT = "throughput"
    COST = "cost"


class TorchDtype(str, Enum):
    """Precision a torch deployment runs in."""

    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FLOAT32 = "float32"


# Why these numbers: `latency` keeps queues short (few ongoing requests per replica, fast
# upscale, slow downscale); `throughput` lets batches fill; `cost` may scale to zero.
PRESETS: dict[Preset, dict[str, Any]] = {
    Preset.LATENCY: dict(min_replicas=1, max_replicas=4, initial_replicas=1, target_ongoing_requests=2.0,
                         upscale_delay_s=3.0, downscale_delay_s=60.0),
    Preset.THROUGHPUT: dict(min_replicas=1, max_replicas=8, initial_replicas=1, target_ongoing_requests=16.0,
                            upscale_delay_s=10.0, downscale_delay_s=120.0),
    Preset.COST: dict(min_replicas=0, max_replicas=2, initial_replicas=1, target_ongoing_requests=8.0,
                      upscale_delay_s=15.0, downscale_delay_s=30.0),
}


class AutoscalingSpec(Spec):
    """A preset plus field-by-field overrides; becomes Serve's autoscaling_config."""

    preset: Preset = Field(Preset.LATENCY, description="Starting point: latency, throughput or cost.")
    min_replicas: int | None = Field(None, ge=0, description="Fewest replicas (0 allows scale to zero). Default: preset.")
    max_replicas: int | None = Field(None, ge=1, description="Most replicas. Default: preset.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time. Default: preset.")
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="Ongoing requests per replica the autoscaler aims for. Default: preset."
    )
    upscale_delay_s: float | None = Field(None, ge=0, description="Seconds of high load before adding replicas.")
    downscale_delay_s: float | None = Field(None, ge=0, description="Seconds of low load before removing replicas.")
    look_back_period_s: float | None = Field(
        None, gt=0, description="Seconds of load the autoscaler averages over (Serve's default, 30, when unset)."
    )

    def resolved(self) -> dict[str, Any]:
        """The preset with this spec's overrides applied (Serve autoscaling_config keys)."""
        out = dict(PRESETS[self.preset])
        out.update({k: v for k, v in self.model_dump(exclude={"preset"}).items() if v is not None})
        return out

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSpec:
        r = self.resolved()
        if not r["min_replicas"] <= r["initial_replicas"] <= r["max_replicas"]:
            raise ValueError(
                f"min_replicas {r['min_replicas']} <= initial_replicas {r['initial_replicas']} <= max_replicas "
                f"{r['max_replicas']} must hold after applying preset {self.preset.value!r}; override the others too"
            )
        return self


class BatchingSpec(Spec):
    """Dynamic batching of the model call (`@serve.batch`), counted in rows."""

    max_batch_size: int = Field(32, ge=1, le=4096, description="Most rows run in one model call.")
    batch_wait_timeout_s: float = Field(
        0.001, ge=0, le=1,
        description="Longest a first request waits for others to join its batch, in seconds. A lone request "
        "waits the whole window, so it adds to p50 at low load; under load, requests queue while a batch runs and "
        "the next batch fills anyway. Measured on the digits app, 2 cores (bench_serve_hop.py): p50 at "
        "concurrency 1 was 12.9 / 13.6 / 20.4 / 22.6 ms for 0 / 0.001 / 0.005 / 0.01, and req/s at concurrency 16 "
        "173 / 161 / 163 / 183 (within run-to-run noise). Keep it at or below the model's own batch time; raise it "
        "only for models whose batch-32 call is much cheaper per row than batch 1 and traffic that arrives in "
        "bursts.",
    )


class CacheSpec(Spec):
    """Opt-in response cache of each replica (serve/_cache.py): a repeated identical request is answered
    from memory, skipping the batch queue and the model. Only for deterministic models."""

    enabled: bool = Field(
        False,
        description="Cache answers per request (key: model version + variant + sha256 of the input's dtype, shape "
        "and bytes). Only for deterministic models: the same input must always give the same output.",
    )
    max_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, le=64 * 1024**3,
        description="Memory budget of one replica's cache in bytes (least recently used answers evicted first).",
    )


class ModelDeploymentSpec(Spec):
    """One model deployment: variant, placement, batching, scaling and backpressure."""

    variant: Variant = Field(
        Variant.ONNX_INT8,
        description="auto (at deploy time, the fastest export-gated ONNX variant measured on this deployment's node "
        "group at its max_batch_size), an ONNX Runtime variant (onnx_fp32, onnx_int8, onnx_int8_qdq, "
        "pruned_onnx_fp32/int8, distilled_onnx_fp32/int8) or torch.",
    )
    label_selector: dict[str, str] = Field(
        default_factory=lambda: {"ray.io/node-group": "cpu"},
        description="Ray label selector the replicas must be placed by, e.g. {'ray.io/node-group': 'cpu'}.",
    )
    num_cpus: float = Field(1.0, gt=0, description="CPUs per replica; ONNX Runtime uses this many intra-op threads.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (torch on CUDA).")
    device: str = Field(
        "auto", pattern="^(auto|cuda|cpu)$",
        description="torch only: cuda, cpu (a CPU stand-in), or auto (cuda when present, else cpu).",
    )
    dtype: TorchDtype = Field(TorchDtype.BFLOAT16, description="torch only: bfloat16, float16 or float32.")
    replicas: int | None = Field(
        None, ge=0, description="Fixed replica count; when set, autoscaling is off for this deployment."
    )
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec, description="Autoscaling preset and overrides.")
    batching: BatchingSpec = Field(default_factory=BatchingSpec, description="Dynamic batching of the model call.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica works on at once (Serve).")
    max_queued_requests: int = Field(
        128, ge=1, description="Requests waiting for a replica before new ones get 503 with Retry-After (Serve)."
    )
    cache: CacheSpec = Field(
        default_factory=CacheSpec, description="Opt-in response cache of each replica (off by default)."
    )


class IngressSpec(Spec):
    """The FastAPI ingress: auth, request contract, routing, metrics."""

    label_selector: dict[str, str] = Field(
        default_factory=dict, description="Ray label selector for the ingress replicas (empty: anywhere)."
    )
    num_cpus: float = Field(0.25, ge=0, description="CPUs reserved per ingress replica.")
    replicas: int | None = Field(None, ge=1, description="Fixed replica count; when set, autoscaling is off.")
    autoscaling: AutoscalingSpec = Field(
        default_factory=lambda: AutoscalingSpec(max_replicas=2),
        description="Autoscaling of the ingress replicas.",
    )
    max_ongoing_requests: int = Field(256, ge=1, description="Requests one ingress replica handles at once.")
    max_queued_requests: int = Field(512, ge=1, description="Requests queued at the proxy before 503.")
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After header (seconds) sent with every 503.")
    colocate: bool = Field(
        False,
        description="Run the primary model inside the ingress replicas: one Serve hop less per request, which "
        "is most of the platform's per-request CPU on small CPU nodes (BENCHMARKS.md). Only for a lone primary "
        "(no fallback, no canary); the one deployment then takes the primary's placement, CPUs, replicas, "
        "autoscaling and request limits.",
    )


# What a colocated ingress takes from the primary instead of its own settings.
_PLACEMENT_FIELDS = {"label_selector", "num_cpus", "replicas", "autoscaling", "max_ongoing_requests",
                     "max_queued_requests"}


class LimitsSpec(Spec):
    """Request limits enforced before anything reaches a model."""

    max_rows: int = Field(32, ge=1, description="Most input rows in one request (413 beyond).")
    max_payload_bytes: int = Field(1 << 20, ge=64, description="Largest request body in bytes (413 beyond).")


class AuthSpec(Spec):
    """API keys: every prediction needs one of this application's keys."""

    enabled: bool = Field(True, description="Require an API key on prediction endpoints.")
    keys_dir: str | None = Field(
        None, description="Directory of the hashed key files; default $MLPLATFORM_HOME/serve/keys."
    )


class FallbackSpec(Spec):
    """When the primary deployment has no healthy replica, serve from a second deployment."""

    enabled: bool = Field(True, description="Allow requests to go to the fallback deployment.")
    deployment: ModelDeploymentSpec = Field(
        default_factory=ModelDeploymentSpec, description="The fallback (by default ONNX INT8 on the cpu group)."
    )
    primary_timeout_s: float = Field(
        5.0, gt=0, description="A primary call slower than this is retried on the fallback."
    )


class CanaryGateSpec(Spec):
    """Watches the canary's error rate and p99 latency over a window, then rolls it back or promotes it."""

    window_s: float = Field(300.0, gt=0, description="Seconds of canary traffic judged (sliding window), and the "
                            "least time the canary runs before any verdict.")
    min_requests: int = Field(100, ge=1, description="Fewest canary requests in the window before a verdict.")
    max_error_rate: float = Field(0.01, ge=0, le=1, description="Largest share of 5xx answers the canary may give.")
    max_p99_ms: float = Field(500.0, gt=0, description="Largest p99 request latency (ms) the canary may have.")
    promote: bool = Field(True, description="Promote the canary (canary alias -> the primary's alias) when it passes; "
                          "false: only roll back failures.")


class CanarySpec(Spec):
    """A second version taking a share of traffic, sticky per caller key."""

    model: str = Field(description="Registry reference of the canary version, e.g. 'digits@canary' or 'digits@4'.")
    percent: float = Field(10.0, ge=0, le=100, description="Share of callers (by key) sent to the canary.")
    deployment: ModelDeploymentSpec = Field(default_factory=ModelDeploymentSpec, description="The canary's deployment.")
    gate: CanaryGateSpec | None = Field(
        None, description="Automatic rollback or promotion from the canary's live error rate and p99 latency."
    )

    @field_validator("model")
    @classmethod
    def _ref(cls, v: str) -> str:
        return _check_ref(v)


class DriftSpec(Spec):
    """Population stability index of live inputs against the version's reference sample."""

    enabled: bool = Field(True, description="Compute per-feature PSI in the model replicas.")
    window_rows: int = Field(2000, ge=100, description="Live rows per PSI window.")
    alert_psi: float = Field(0.2, gt=0, description="PSI above this for any feature raises the alert gauge.")
    sample_rate: float = Field(
        1.0, gt=0, le=1,
        description="Fraction of model batches binned for PSI (chosen at random per batch). Binning costs about "
        "10 µs for a small batch, so 1.0 is cheap; lower it for wide inputs or very high request rates. A window "
        "then takes 1/sample_rate times longer to fill.",
    )


class LoggingSpec(Spec):
    """Ray Serve's logging for every deployment of the app (Serve's LoggingConfig)."""

    access_log: bool = Field(
        False,
        description="Serve's access log: one INFO line per request per replica (method, route, status, latency). "
        "Off by default: at serving rates it is most of the log volume and costs replica CPU per request; the "
        "request metrics (mlplatform_serve_requests_total, latency histogram) carry the same counts. Turn it on "
        "to debug single requests.",
    )
    level: str = Field(
        "INFO", pattern="^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$",
        description="Log level of the replicas' Serve and application loggers (DEBUG, INFO, WARNING, ERROR).",
    )


class ServeSpec(Spec):
    """A served model: `args:` of serve_apps/*.yaml, passed to mlplatform.serve:build_app."""

    name: str = Field(description="Application name (lowercase letters, digits, '-'); scopes its API keys.")
    model: str = Field(description="Registry reference: 'name@alias' (e.g. digits@production) or 'name@N'.")
    registry_root: str = Field(description="Registry root path or URI the replicas load from.")
    primary: ModelDeploymentSpec = Field(
        default_factory=ModelDeploymentSpec, description="The model deployment that takes traffic first."
    )
    fallback: FallbackSpec | None = Field(None, description="CPU fallback when the primary has no healthy replica.")
    canary: CanarySpec | None = Field(None, description="Traffic split to a second version.")
    ingress: IngressSpec = Field(default_factory=IngressSpec, description="The HTTP ingress deployment.")
    limits: LimitsSpec = Field(default_factory=LimitsSpec, description="Request size limits.")
    auth: AuthSpec = Field(default_factory=AuthSpec, description="API key settings.")
    drift: DriftSpec = Field(default_factory=DriftSpec, description="Input drift monitoring.")
    logging: LoggingSpec = Field(
        default_factory=LoggingSpec, description="Serve logging of the app's replicas (access log, level)."
    )
    classification: str | None = Field(
        None,
        description="Data classification of the requests and model under the cluster's residency policy (e.g. "
        "uae-restricted); absent: the policy's default. Every replica is placed only in the regions it allows.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _APP_NAME.match(v):
            raise ValueError("must be 1-63 lowercase letters, digits or '-', starting with a letter or digit")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return _check_ref(v)

    @model_validator(mode="after")
    def _limits_fit_batches(self) -> ServeSpec:
        # A request larger than a batch could never be scheduled by @serve.batch.
        for where, dep in self.deployments().items():
            if self.limits.max_rows > dep.batching.max_batch_size:
                raise ValueError(
                    f"limits.max_rows {self.limits.max_rows} exceeds {where}.batching.max_batch_size "
                    f"{dep.batching.max_batch_size}; a request must fit in one batch"
                )
        return self

    @model_validator(mode="after")
    def _colocate_needs_a_lone_primary(self) -> ServeSpec:
        if not self.ingress.colocate:
            return self
        others = [k for k in ("fallback", "canary") if k in self.deployments()]
        if others:
            one = len(others) == 1
            raise ValueError(f"ingress.colocate needs a lone primary, but {' and '.join(others)} "
                             f"{'is' if one else 'are'} set; remove {'it' if one else 'them'} or set "
                             f"ingress.colocate: false")
        ignored = sorted(self.ingress.model_fields_set & _PLACEMENT_FIELDS)
        if ignored:
            raise ValueError(f"ingress.{ignored[0]} is set, but with ingress.colocate the primary's settings apply "
                             f"to the one deployment; set primary.{ignored[0]} instead")
        return self

    def deployments(self) -> dict[str, ModelDeploymentSpec]:
        """Model deployments by role: primary, fallback (if enabled), canary (if any)."""
        out = {"primary": self.primary}
        if self.fallback and self.fallback.enabled:
            out["fallback"] = self.fallback.deployment
        if self.canary:
            out["canary"] = self.canary.deployment
        return out


def _check_ref(v: str) -> str:
    if not _REF.match(v):
        raise ValueError("must be 'name@alias' or 'name@N', e.g. 'digits@production' or 'digits@3'")
    return v


class ServeApplicationConfig(Spec):
    """One entry of a Serve config file's `applications:` whose args are a ServeSpec."""

    name: str = Field(description="Serve application name; should equal args.name.")
    import_path: str = Field(
        "mlplatform.serve:build_app", pattern=r"^mlplatform\.serve:build_app$",
        description="Must be mlplatform.serve:build_app.",
    )
    route_prefix: str = Field("/", pattern=r"^/[A-Za-z0-9/_-]*$", description="HTTP route prefix of the application.")
    runtime_env: dict[str, Any] = Field(default_factory=dict, description="Ray runtime_env for the application.")
    args: ServeSpec = Field(description="The application's ServeSpec.")

    @model_validator(mode="after")
    def _same_name(self) -> ServeApplicationConfig:
        if self.name != self.args.name:
            raise ValueError(f"name {self.name!r} differs from args.name {self.args.name!r}; make them equal")
        return self


class HttpOptions(Spec):
    """The subset of Serve's http_options the shipped configs use."""

    host: str = Field("127.0.0.1", description="Address the Serve proxy listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port the Serve proxy listens on.")
    request_timeout_s: float | None = Field(None, gt=0, description="End-to-end HTTP request timeout of the proxy.")
    ssl_certfile: str | None = Field(
        None, description="HTTPS certificate (PEM). Leave unset: `mlplatform serve deploy` fills in the cluster's "
        "own when it runs with TLS.",
    )
    ssl_keyfile: str | None = Field(None, description="Private key of `ssl_certfile` (PEM); set both or neither.")

    @model_validator(mode="after")
    def _ssl_pair(self) -> "HttpOptions":
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("set both `ssl_certfile` and `ssl_keyfile`, or neither (then the cluster's own are used)")
        return self


class ServeConfigFile(Spec):
    """A serve_apps/*.yaml: Serve's config file with every application's args validated."""

    proxy_location: str = Field(
        "HeadOnly", pattern="^(HeadOnly|EveryNode|Disabled)$",
        description="Where Serve runs HTTP proxies: HeadOnly (one proxy, least memory), EveryNode or Disabled.",
    )
    http_options: HttpOptions = Field(default_factory=HttpOptions, description="Serve HTTP proxy options.")
    applications: list[ServeApplicationConfig] = Field(min_length=1, description="The applications to deploy.")
