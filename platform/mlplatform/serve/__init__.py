"""Serving registered models on Ray Serve: ingress → router → ONNX CPU / torch GPU deployments.

    # serve_apps/digits-cpu.yaml:  import_path: mlplatform.serve:build_app, args: <ServeSpec>
    serve deploy serve_apps/digits-cpu.yaml

    from mlplatform.serve import ServeSpec, build_app, create_key
    app = build_app({"name": "digits", "model": "digits@production", "registry_root": "/data/registry"})
    serve.run(app, name="digits", route_prefix="/")
    key = create_key("digits").key        # plaintext shown once; stored hashed

Prediction: POST /v1/predict {"inputs": [[...64 floats...], ...]} with `Authorization: Bearer <key>`.
GET /v1/contract needs a `predict` or `metrics` key; open: GET /healthz, GET /docs, GET /openapi.json.
Keys carry scopes, an expiry and a quota; `rotate_key` replaces one with a grace period.
"""

from mlplatform.serve._app import build_app
from mlplatform.serve._client import Latencies, endpoint, https_context, latency_histogram, timed_predictions
from mlplatform.serve._keys import CreatedKey, KeyRecord, create_key, list_keys, revoke_key, rotate_key
from mlplatform.serve._manage import check_config, delete, deploy, status
from mlplatform.serve._quota import Quota
from mlplatform.serve._spec import (
    PRESETS,
    AutoscalingSpec,
    BatchingSpec,
    CanaryGateSpec,
    CanarySpec,
    FallbackSpec,
    ModelDeploymentSpec,
    Preset,
    ServeConfigFile,
    ServeSpec,
    Variant,
)

__all__ = [
    "PRESETS",
    "AutoscalingSpec",
    "BatchingSpec",
    "CanaryGateSpec",
    "CanarySpec",
    "CreatedKey",
    "FallbackSpec",
    "Latencies",
    "KeyRecord",
    "ModelDeploymentSpec",
    "Preset",
    "Quota",
    "ServeConfigFile",
    "ServeSpec",
    "Variant",
    "build_app",
    "check_config",
    "create_key",
    "delete",
    "deploy",
    "endpoint",
    "https_context",
    "latency_histogram",
    "list_keys",
    "revoke_key",
    "rotate_key",
    "status",
    "timed_predictions",
]
