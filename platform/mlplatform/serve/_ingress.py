"""FastAPI ingress: API key → request contract → router (canary split, GPU→CPU fallback) → model.

Which key scope each endpoint needs: POST /v1/predict and the Open Inference Protocol's
POST /v2/models/{name}[/versions/{v}]/infer `predict`; GET /v1/contract and GET
/v2/models/{name}[/versions/{v}] `predict` or `metrics` (a client that predicts must be able
to read the contract); /healthz, /v2/health/*, /v2/models/{name}/ready, GET /v2, /docs and
/openapi.json stay open (liveness probes carry no key; tritonclient's is_server_live sends
none; the schema is public documentation). No endpoint of the ingress is administrative today:
`admin` is for the key and policy verbs of the CLI. Bad input is answered here
(400/401/403/404/413/415/422/429/431) and never reaches a model's batch queue. A dead model
replica is retried once (inference is idempotent), then answered 503 with Retry-After.

No `from __future__ import annotations` here: FastAPI must see real annotations (a string
"Request" on a method wrapped by serve.ingress is taken for a query parameter).
"""


import asyncio
import hashlib
import logging
import time
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
from fastapi import FastAPI, Request, Security
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.exceptions import BackPressureError

from mlplatform.serve import _v2
from mlplatform.serve._contract import Contract, ContractViolation
from mlplatform.serve._keys import KeyChecker, Verdict
from mlplatform.serve._quota import QuotaLimiter, retry_after_header

logger = logging.getLogger("ray.serve")


class PredictRequest(BaseModel):
    """Body of POST /v1/predict (documented in the OpenAPI schema; checked by the contract)."""

    inputs: list[list[float]] = Field(description="Rows of features; shape and limits: GET /v1/contract.")


class PredictResponse(BaseModel):
    """Model outputs, one row per input row."""

    outputs: list[list[float | None]] = Field(description="Model outputs per input row (null: not finite, the "
                                              "model overflowed on extreme inputs).")
    predictions: list[int] | None = Field(None, description="Arg-max class per row (classifiers).")
    model: str = Field(description="The registry version that answered, e.g. digits@3.")
    served_by: str = Field(description="Deployment and variant that answered, e.g. primary/onnx_int8.")


class ErrorResponse(BaseModel):
    """Every refusal: {"error": {code, message, field}}."""

    error: dict[str, str] = Field(description="code, message and the field at fault.")


api = FastAPI(
    title="mlplatform model serving",
    description="Predictions from a registered model version. Send `Authorization: Bearer <key>` or `X-API-Key`.",
    version="1",
    # Served by Ingress itself: the schema is built per application from its signature and limits.
    openapi_url=None, docs_url=None, redoc_url=None,
)

_ERRORS = {c: {"model": ErrorResponse} for c in (400, 401, 403, 413, 415, 422, 429, 431, 503)}
_V2_ERRORS = {c: {"model": _v2.ErrorBody} for c in (400, 401, 403, 404, 413, 415, 422, 429, 431, 503)}
# The key, from either header; auto_error=False so a missing key gets the platform's own 401 body.
_BEARER = HTTPBearer(auto_error=False, scheme_name="bearer",
                     description="`Authorization: Bearer <key>`; create one with `mlplatform serve keys create APP`.")
_API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="apiKey",
                        description="The same key in the `X-API-Key` header.")
_JSON = ("application/json",)
# An infer answer is JSON, or with the binary tensor data extension a JSON header then raw tensors.
_V2_OK = {200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                "description": "Outputs (JSON; binary tensor data when asked for)."}}
_UNAVAILABLE = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "DeploymentUnavailableError",
                "RequestCancelledError")


class _NoReplica(Exception):
    pass


def _unavailable(e: Exception) -> bool:
    # By name: RayTaskError(ActorDiedError) and friends are classes made on the fly.
    return any(n in type(e).__name__ for n in _UNAVAILABLE)


class _ClientGone(Exception):
    """The request body could not be read: the client, or the proxy holding its connection, went away."""


async def _await(response):
    return await response


class _Refusal(ContractViolation):
    """An authentication or quota refusal: names the key (by id, never its secret) and carries headers."""

    def __init__(self, status: int, code: str, message: str, key_id: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status, code, message, "Authorization")
        self.key_id, self.headers = key_id, headers or {}

    def body(self) -> dict[str, Any]:
        body = super().body()
        if self.key_id:
            body["error"]["key_id"] = self.key_id
        return body


# Query parameters that would carry a key: refused before any handler, so such a URL never
# reaches code that might log it (Serve's access log records the path, never the query).
_KEY_PARAMS = frozenset({"api_key", "apikey", "api-key", "key", "access_token", "token"})
# Total request header bytes accepted; a bigger block is refused with 431 before auth.
MAX_HEADER_BYTES = 16 * 1024


class _RequestGuard:
    """ASGI middleware run before every endpoint (open ones too): keys in the query string (400)
    and oversized headers (431). Plain ASGI, not BaseHTTPMiddleware: no per-request task or
    body re-buffering on the prediction path."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = _guard(scope)
            if refusal is not None:
                return await JSONResponse(refusal.body(), status_code=refusal.status)(scope, receive, send)
        return await self.app(scope, receive, send)


def _guard(scope) -> ContractViolation | None:
    query = scope.get("query_string") or b""
    if query:
        names = {k.lower() for k, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True)}
        found = sorted(names & _KEY_PARAMS)
        if found:
            # The value is never echoed: the message names only the parameter.
            return ContractViolation(
                400, "key_in_query", f"An API key was sent in the query string (`{found[0]}`); URLs end up in "
                "proxy logs and browser history. Send it in the Authorization header "
                "(`Authorization: Bearer <key>`), and replace this key if the URL was shared or logged "
                "(`mlplatform serve keys rotate APP KEY_ID --grace 0`).", found[0],
            )
    size = sum(len(k) + len(v) for k, v in scope.get("headers") or ())
    if size > MAX_HEADER_BYTES:
        return ContractViolation(431, "headers_too_large",
                                 f"Request headers total {size} bytes; at most {MAX_HEADER_BYTES} are accepted.",
                                 "headers")
    return None


api.add_middleware(_RequestGuard)


# Defined before the class: serve.ingress pickles the class when it is decorated, so a helper
# defined below it would be missing in the replicas (NameError).
def _client(request: Request) -> str:
    return request.client.host if request.client else "anonymous"


def _refused(e: ContractViolation, v2: bool = False) -> JSONResponse:
    """The refusal in the endpoint's format: {"error": {code, message, field}}, or v2's {"error": "..."}."""
    headers = dict(getattr(e, "headers", None) or {})
    if e.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(_v2.error(e) if v2 else e.body(), status_code=e.status, headers=headers or None)


def _refused_v2(e: ContractViolation) -> JSONResponse:
    return _refused(e, v2=True)


class _Status(ContractViolation):
    """503/499/500 answers, in the endpoint's own error format."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(status, code, message, "")
        self.headers = headers or {}


def _presented(bearer: HTTPAuthorizationCredentials | None, api_key: str | None) -> str | None:
    return bearer.credentials if bearer is not None else api_key


def _media_type(request: Request, accepted: tuple[str, ...]) -> None:
    """415 for a body declared as anything but JSON (a body without Content-Type is read as JSON)."""
    declared = request.headers.get("content-type")
    if declared is None:
        return
    media = declared.split(";", 1)[0].strip().lower()
    if media not in accepted and not media.endswith("+json"):
        raise ContractViolation(415, "unsupported_media_type", f"Content-Type {media or declared!r} is not accepted; "
                                f"send the body as {' or '.join(accepted)}.", "Content-Type")


def _auth_refusal(verdict: Verdict, app: str, scopes: tuple[str, ...], endpoint: str) -> _Refusal:
    """401/403 naming the key id, why it was refused and how to fix it (never the secret)."""
    send = "send `Authorization: Bearer <key>` or `X-API-Key: <key>`"
    create = f"`mlplatform serve keys create {app} --scope {scopes[0]}`"
    r, outcome = verdict.record, verdict.outcome
    if outcome == KeyChecker.MISSING:
        return _Refusal(401, "unauthorized", f"No API key; {send} (create one with {create}).")
    if outcome == KeyChecker.INVALID:
        return _Refusal(401, "unauthorized", f"Unknown or malformed API key; {send} with a key of {app!r} "
                        f"(create one with {create}).")
    if outcome == KeyChecker.REVOKED:
        return _Refusal(401, "key_revoked", f"Key {r.key_id} was revoked at {r.revoked_at}; use another key of "
                        f"{app!r} (create one with {create}).", r.key_id)
    if outcome == KeyChecker.EXPIRED:
        how = (f"it was rotated: use its replacement, key {r.rotated_to}" if r.rotated_to
               else f"create a new one with {create}, and rotate keys before they expire "
               f"(`mlplatform serve keys rotate {app} KEY_ID --grace 1h`)")
        return _Refusal(401, "key_expired", f"Key {r.key_id} expired at {r.expires_at}; {how}.", r.key_id)
    if outcome == KeyChecker.FORBIDDEN:
        return _Refusal(403, "forbidden", f"Key {r.key_id} belongs to application {r.app!r}, not {app!r}; "
                        f"use a key of {app!r} (create one with {create}).", r.key_id)
    return _Refusal(403, "missing_scope", f"Key {r.key_id} has scope(s) {', '.join(r.scopes)}; {endpoint} needs "
                    f"{' or '.join(scopes)}. Create a key with {create}.", r.key_id)


@serve.ingress(api)
class Ingress:
    """One ingress replica: auth, contract, routing, metrics (and, colocated, the primary model)."""

    def __init__(self, settings: dict[str, Any], primary, fallback=None, canary=None, gate=None):
        self.s = settings
        self.app_name = settings["app"]
        self.contract = Contract(**settings["contract"])
        self.keys = KeyChecker(self.app_name, settings["keys_dir"]) if settings["auth"] else None
        # Each replica enforces its share of every key's quota (see _quota.py for why).
        self.quotas = QuotaLimiter()
        self.handles = {"primary": primary, "fallback": fallback, "canary": canary}
        # ingress.colocate: the primary model lives in this replica and is called in-process
        # (imported only then: a split ingress never loads model code).
        self.local = None
        if settings.get("local_model"):
            from mlplatform.serve._models import model_class

            self.local = model_class(settings["local_model"]["variant"])(settings["local_model"])
        self.running: dict[str, int] = {}
        self._poller: asyncio.Task | None = None
        self._in_flight = 0
        # The canary gate may stop (0) or take over (100) the split; outcomes go to it each poll.
        self.gate = gate
        self.canary_percent = settings.get("canary_percent") or 0
        self.gate_status: dict[str, Any] | None = None
        self._outcomes: list[tuple[float, bool, float]] = []
        self._out: _v2.Outputs | None = None  # what the model answers (v2 metadata), from its first answer
        self._schema: dict[str, Any] | None = None  # this app's OpenAPI schema, built on first request

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve's user_config, set only when colocated: the primary's variant and why (for `serve status`)."""
        self.variant_choice = dict(config or {})

    # --- open endpoints ---

    @api.get("/healthz", summary="Liveness and model replica counts (no key needed).")
    async def healthz(self) -> dict[str, Any]:
        self._ensure_poller()
        return {"status": "ok", "app": self.app_name, "model": self.s["version"], "canary": self.s.get("canary_version"),
                "canary_percent": self.canary_percent, "canary_gate": self.gate_status, "running_replicas": self.running}

    @api.get("/v1/contract", summary="What a prediction request must look like (a `predict` or `metrics` key).",
             responses=_ERRORS)
    async def contract_info(self, bearer: HTTPAuthorizationCredentials | None = Security(_BEARER),
                            api_key: str | None = Security(_API_KEY)):
        try:
            await self._authenticate(_presented(bearer, api_key), ("predict", "metrics"), "GET /v1/contract")
        except ContractViolation as e:
            return _refused(e)
        return self.contract.describe()

    # --- predictions ---

    @api.post("/v1/predict", summary="Predict a batch of rows.", response_model=PredictResponse, responses=_ERRORS,
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": PredictRequest.model_json_schema()}}}})  # replaced per app in the served schema
    async def predict(self, request: Request, bearer: HTTPAuthorizationCredentials | None = Security(_BEARER),
                      api_key: str | None = Security(_API_KEY)):
        def answer(x, result, version, served_by, headers):
            outputs = result["outputs"]
            body: dict[str, Any] = {"outputs": _v2.json_values(outputs), "model": version, "served_by": served_by}
            if result.get("task") == "classification" and outputs.ndim == 2:
                body["predictions"] = outputs.argmax(axis=1).tolist()
            return JSONResponse(body, headers=headers)

        return await self._serve(request, _presented(bearer, api_key), "POST /v1/predict", _JSON,
                                 lambda body: (self.contract.parse(body), None), answer, _refused)

    # --- Open Inference Protocol v2 (logic in _v2.py) ---

    @api.get("/v2/health/live", summary="Server liveness (v2; no key needed).", response_model=_v2.Live)
    async def v2_live(self):
        return {"live": True}

    @api.get("/v2/health/ready", summary="Server readiness (v2; no key needed).", response_model=_v2.Ready,
             responses={503: {"model": _v2.ErrorBody}})
    async def v2_ready(self):
        return await self._ready(None)

    @api.get("/v2", summary="Server metadata (v2; no key needed).", response_model=_v2.ServerMetadata)
    async def v2_server(self):
        return _v2.server_metadata()

    @api.get("/v2/models/{model_name}", summary="Model metadata (v2; a `predict` or `metrics` key).",
             response_model=_v2.ModelMetadata, responses=_V2_ERRORS)
    async def v2_model(self, model_name: str, bearer: HTTPAuthorizationCredentials | None = Security(_BEARER),
                       api_key: str | None = Security(_API_KEY)):
        return await self._metadata(model_name, None, _presented(bearer, api_key))

    @api.get("/v2/models/{model_name}/versions/{model_version}", summary="Model version metadata (v2).",
             response_model=_v2.ModelMetadata, responses=_V2_ERRORS)
    async def v2_model_version(self, model_name: str, model_version: str,
                               bearer: HTTPAuthorizationCredentials | None = Security(_BEARER),
                               api_key: str | None = Security(_API_KEY)):
        return await self._metadata(model_name, model_version, _presented(bearer, api_key))

    @api.get("/v2/models/{model_name}/ready", summary="Model readiness (v2; no key needed).",
             response_model=_v2.Ready, responses={404: {"model": _v2.ErrorBody}, 503: {"model": _v2.ErrorBody}})
    async def v2_model_ready(self, model_name: str):
        return await self._ready(model_name)

    @api.get("/v2/models/{model_name}/versions/{model_version}/ready", summary="Model version readiness (v2).",
             response_model=_v2.Ready, responses={404: {"model": _v2.ErrorBody}, 503: {"model": _v2.ErrorBody}})
    async def v2_model_version_ready(self, model_name: str, model_version: str):
        return await self._ready(model_name, model_version)

    @api.post("/v2/models/{model_name}/infer", summary="Inference with typed tensors (v2; a `predict` key).",
              response_model=_v2.InferResponse, responses={**_V2_ERRORS, **_V2_OK})
    async def v2_infer(self, model_name: str, request: Request,
                       bearer: HTTPAuthorizationCredentials | None = Security(_BEARER),
                       api_key: str | None = Security(_API_KEY)):
        return await self._infer_v2(request, model_name, None, _presented(bearer, api_key))

    @api.post("/v2/models/{model_name}/versions/{model_version}/infer", summary="Inference on one version (v2).",
              response_model=_v2.InferResponse, responses={**_V2_ERRORS, **_V2_OK})
    async def v2_infer_version(self, model_name: str, model_version: str, request: Request,
                               bearer: HTTPAuthorizationCredentials | None = Security(_BEARER),
                               api_key: str | None = Security(_API_KEY)):
        return await self._infer_v2(request, model_name, model_version, _presented(bearer, api_key))

    # --- the schema and its viewer (open) ---

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi_json(self, request: Request):
        if self._schema is None:
            try:
                outputs = await self._outputs()
            except Exception as e:  # no replica answers yet: say so, and build it on a later call
                return JSONResponse({"error": f"The model has not answered yet ({type(e).__name__}); retry."},
                                    status_code=503, headers={"Retry-After": str(max(1, round(self.s["retry_after_s"])))})
            app = request.app
            base = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            self._schema = _v2.openapi(base, self.contract, outputs, self.app_name, sorted(self._versions()),
                                       request.scope.get("root_path", ""))
        return JSONResponse(self._schema)

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request):
        return get_swagger_ui_html(openapi_url=request.scope.get("root_path", "") + "/openapi.json",
                                   title=f"{self.app_name} · mlplatform")

    # --- one prediction, whichever protocol ---

    async def _serve(self, request: Request, presented: str | None, endpoint: str, media: tuple[str, ...],
                     parse, answer, refuse, role: str | None = None, check=None):
        """Auth → media type → contract → route → model → answer, with the metrics and canary outcomes.

        `parse(body)` gives (rows, context); `answer(context, result, version, served_by, headers)`
        the response; `refuse(ContractViolation)` an error response; `check()` may refuse after auth."""
        self._ensure_poller()
        start = time.perf_counter()
        self._in_flight += 1
        version, served_by, code = self.s["version"], "none", 500
        try:
            key_id = await self._authenticate(presented, ("predict",), endpoint)
            if check is not None:
                role = check() or role
            _media_type(request, media)
            self.contract.check_length(request.headers.get("content-length"))
            x, context = parse(await self._body(request))
            role = role or self._choose(key_id or request.headers.get("x-caller-id") or _client(request))
            version = self.s["canary_version"] if role == "canary" else self.s["version"]
            result, served_by, fallback_reason = await self._call(role, x)
            headers = {"X-Model-Version": version, "X-Served-By": served_by, "X-Batch-Rows": str(result["batch_rows"])}
            if fallback_reason:
                headers["X-Fallback"] = fallback_reason
            response = answer(context, result, version, served_by, headers)
            code = 200
            return response
        except ContractViolation as e:
            code = e.status
            self._metric("invalid", {"app": self.app_name, "reason": e.code})
            return refuse(e)
        except (BackPressureError, _NoReplica) as e:
            code = 503
            retry = self.s["retry_after_s"]
            what = "overloaded" if isinstance(e, BackPressureError) else "no_replica"
            message = (f"Model deployment is at capacity ({e}); retry after {retry:g} s." if what == "overloaded"
                       else f"No healthy model replica ({e}); retry after {retry:g} s.")
            return refuse(_Status(503, what, message, {"Retry-After": str(max(1, round(retry)))}))
        except _ClientGone as e:  # nobody is left to answer; not a server error (nginx's 499)
            code = 499
            logger.info("client went away while sending the request body (%s)", e)
            return refuse(_Status(499, "client_closed", str(e)))
        except asyncio.CancelledError:
            # Serve's proxy cancels the request when the client disconnects; which of this and
            # _ClientGone the ingress sees is a race. Either way it is a 499, never a 500.
            code = 499
            raise
        except Exception as e:  # a model failure on valid input: a real server error, reported plainly
            logger.exception("prediction failed")
            return refuse(_Status(500, "model_error", f"{type(e).__name__}"))
        finally:
            self._in_flight -= 1
            tags = {"app": self.app_name, "version": version}
            self._metric("requests", {**tags, "code": str(code), "served_by": served_by})
            elapsed_ms = (time.perf_counter() - start) * 1000
            self._metric("latency", tags, elapsed_ms, observe=True)
            if role == "canary" and self._gate_watching() and (code == 200 or code >= 500):
                self._outcomes.append((time.time(), code < 500, elapsed_ms))

    async def _infer_v2(self, request: Request, model_name: str, model_version: str | None, presented: str | None):
        header_length = request.headers.get(_v2.HEADER_LENGTH)

        def parse(body):
            req = _v2.parse_infer(body, header_length, self.contract)
            return req.x, req

        def answer(req, result, version, served_by, headers):
            if self._out is None:
                self._out = _v2.Outputs.of(result)
            body, extra, media = _v2.infer_response(req, result, self._out, self.app_name, _v2.version_number(version))
            return Response(body, media_type=media, headers={**headers, **extra})

        media = _JSON + (("application/octet-stream",) if header_length is not None else ())
        return await self._serve(request, presented, f"POST /v2/models/{model_name}/infer", media, parse, answer,
                                 _refused_v2, check=lambda: self._role_of(model_name, model_version))

    def _versions(self) -> dict[str, str]:
        """{protocol version number: role} of what this app serves."""
        versions = {_v2.version_number(self.s["version"]): "primary"}
        if self.s.get("canary_version"):
            versions[_v2.version_number(self.s["canary_version"])] = "canary"
        return versions

    def _role_of(self, model_name: str, model_version: str | None) -> str | None:
        """The role serving `model_version` of `model_name` (None: the usual split); 404 otherwise."""
        if model_name != self.app_name:
            raise ContractViolation(404, "unknown_model", f"No model {model_name!r} here; this application serves "
                                    f"{self.app_name!r} (the Serve application name).", "model_name")
        if model_version is None:
            return None
        role = self._versions().get(model_version)
        if role is None:
            raise ContractViolation(404, "unknown_version", f"{self.app_name!r} has no version {model_version!r}; it "
                                    f"serves version(s) {sorted(self._versions())}.", "model_version")
        return role

    async def _outputs(self) -> _v2.Outputs:
        """What the model answers; learned from one answer (a one-row probe of zeros if none yet)."""
        if self._out is None:
            probe = np.zeros((1, *self.contract.features), np.dtype(self.contract.dtype))
            result, _, _ = await self._call("primary", probe)
            self._out = _v2.Outputs.of(result)
        return self._out

    async def _metadata(self, model_name: str, model_version: str | None, presented: str | None):
        try:
            await self._authenticate(presented, ("predict", "metrics"), f"GET /v2/models/{model_name}")
            self._role_of(model_name, model_version)
            outputs = await self._outputs()
        except ContractViolation as e:
            return _refused_v2(e)
        except Exception as e:
            retry = str(max(1, round(self.s["retry_after_s"])))
            return _refused_v2(_Status(503, "no_replica", f"The model has not answered yet ({type(e).__name__}); "
                                       f"retry after {retry} s.", {"Retry-After": retry}))
        return _v2.model_metadata(self.app_name, sorted(self._versions()), self.contract, outputs)

    async def _ready(self, model_name: str | None, model_version: str | None = None):
        self._ensure_poller()
        try:
            if model_name is not None:
                self._role_of(model_name, model_version)
        except ContractViolation as e:
            return _refused_v2(e)
        if self.local is None and "primary" not in self.running:
            await self._poll_once()
        # Colocated, this replica answering is the model being ready; split, a model replica must run.
        if self.local is None and not self.running.get("primary"):
            return _refused_v2(_Status(503, "not_ready", f"{self.app_name!r} has no running model replica yet.",
                                       {"Retry-After": str(max(1, round(self.s["retry_after_s"])))}))
        return {"ready": True, "name": model_name}

    # --- pieces ---

    async def _authenticate(self, presented: str | None, scopes: tuple[str, ...], endpoint: str) -> str | None:
        """The key id of a valid key holding one of `scopes`, within its quota; else raises _Refusal."""
        if self.keys is None:
            return None
        verdict = await self.keys.check(presented, scopes)
        if verdict.outcome != KeyChecker.OK:
            raise _auth_refusal(verdict, self.app_name, scopes, endpoint)
        record = verdict.record
        wait_s = self.quotas.take(record.key_id, record.quota)
        if wait_s > 0:
            retry = retry_after_header(wait_s)
            raise _Refusal(
                429, "quota_exceeded", f"Key {record.key_id} is over its quota of {record.quota.describe()}; "
                f"retry after {retry} s, or ask an admin for a larger quota (`mlplatform serve keys create "
                f"{self.app_name} --rate R --burst B`, then rotate clients onto it).", record.key_id,
                {"Retry-After": retry},
            )
        return record.key_id

    async def _body(self, request: Request) -> bytes:
        # Stream with a running total: a body without Content-Length cannot exceed the limit either.
        chunks, total = [], 0
        stream = request.stream()
        while True:
            try:
                chunk = await anext(stream)
            except StopAsyncIteration:
                return b"".join(chunks)
            except Exception as e:  # ClientDisconnect, or the proxy actor died (Serve shutting down)
                raise _ClientGone(type(e).__name__) from None
            total += len(chunk)
            if total > self.contract.max_payload_bytes:
                raise self.contract._too_big(total)
            chunks.append(chunk)

    def _choose(self, caller: str) -> str:
        percent = self.canary_percent
        if not self.handles["canary"] or percent <= 0:
            return "primary"
        # Sticky: one caller always lands on the same side while the split is unchanged.
        bucket = int.from_bytes(hashlib.sha256(caller.encode()).digest()[:4], "big") % 10000
        return "canary" if bucket < percent * 100 else "primary"

    async def _call(self, role: str, x) -> tuple[dict[str, Any], str, str | None]:
        if self.local is not None:
            return await self.local(x), f"primary/{self.s['variants']['primary']}", None
        handle = self.handles[role]
        fallback = self.handles["fallback"] if role == "primary" else None
        name = f"{role}/{self.s['variants'][role]}"
        if fallback is not None and role not in self.running:
            await self._poll_once()  # first request of a fresh ingress: know before routing
        if fallback is not None and self.running.get(role) == 0:
            return await self._fallback(x, "no_healthy_replica")
        try:
            response = handle.remote(x)
            if fallback is None:
                return await response, name, None
            return await asyncio.wait_for(_await(response), self.s["primary_timeout_s"]), name, None
        except BackPressureError:
            raise
        except asyncio.TimeoutError:
            if fallback is None:
                raise
            # Giving up on the awaiting task leaves the request running on the primary; under
            # overload that replica would then work for nobody while the fallback does it again.
            response.cancel()
            return await self._fallback(x, "primary_timeout")
        except Exception as e:
            if not _unavailable(e):
                raise
            if fallback is None:
                return await self._retry(handle, x, name, e)
            return await self._fallback(x, "primary_unavailable")

    async def _retry(self, handle, x, name: str, first: Exception) -> tuple[dict[str, Any], str, None]:
        """Once more on another replica: inference is idempotent, and the router drops a dead replica
        it was told about. A second failure is a 503 with Retry-After (never a 500)."""
        logger.info("model replica unavailable (%s); retrying once", type(first).__name__)
        try:
            return await handle.remote(x), name, None
        except Exception as e:
            if not _unavailable(e):
                raise
            raise _NoReplica(f"{name}: {type(e).__name__}") from None

    async def _fallback(self, x, reason: str) -> tuple[dict[str, Any], str, str]:
        self._metric("fallback", {"app": self.app_name, "version": self.s["version"], "reason": reason})
        result = await self.handles["fallback"].remote(x)
        return result, f"fallback/{self.s['variants']['fallback']}", reason

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await self._poll_once()
            await self._report_to_gate()
            await asyncio.sleep(self.s["poll_interval_s"])

    def check_health(self) -> None:
        # A colocated GPU model's health is this replica's health (see TorchGpuModel.check_health).
        if self.local is not None and hasattr(self.local, "check_health"):
            self.local.check_health()

    def _gate_watching(self) -> bool:
        return self.gate is not None and (self.gate_status is None or self.gate_status["state"] == "watching")

    async def _report_to_gate(self) -> None:
        """Send the canary outcomes since the last report; follow the gate's verdict."""
        if not self._gate_watching():
            return
        outcomes, self._outcomes = self._outcomes, []
        try:
            self.gate_status = await self.gate.record.remote(outcomes)
        except Exception as e:  # a restarting gate must not stop routing
            logger.debug("canary gate report failed: %s", e)
            return
        if self.gate_status["state"] == "rolled_back":
            self.canary_percent = 0
        elif self.gate_status["state"] == "promoted":
            self.canary_percent = 100

    async def _poll_once(self) -> None:
        """Running replicas per model deployment, from the Serve controller."""
        try:
            status = await asyncio.to_thread(serve.status)
            deployments = status.applications[serve.get_replica_context().app_name].deployments
            if "ingress" in deployments:  # the replicas sharing each key's quota
                self.quotas.set_replicas(sum(v for k, v in deployments["ingress"].replica_states.items()
                                             if str(getattr(k, "value", k)) == "RUNNING"))
            # Colocated: the model's replicas are this deployment's.
            for role in [r for r, h in self.handles.items() if h is not None] or ["ingress"]:
                states = deployments[role].replica_states if role in deployments else {}
                n = sum(v for k, v in states.items() if str(getattr(k, "value", k)) == "RUNNING")
                self.running[role] = n
                self._metric("replicas", {"app": self.app_name, "deployment": role}, n, gauge=True)
            self._metric("in_flight", {"app": self.app_name}, self._in_flight, gauge=True)
        except Exception as e:  # the controller restarting must not stop the poller
            logger.debug("replica poll failed: %s", e)

    @staticmethod
    def _metric(name: str, tags: dict[str, str], value: float = 1.0, observe: bool = False, gauge: bool = False):
        from mlplatform.serve._metrics import metrics

        try:
            m = metrics()[name]
            if gauge:
                m.set(value, tags=tags)
            elif observe:
                m.observe(value, tags=tags)
            else:
                m.inc(value, tags=tags)
        except Exception as e:  # metrics must never fail a request
            logger.debug("metric %s failed: %s", name, e)
