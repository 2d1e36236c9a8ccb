"""The proxy middleware that turns a dropped request (its replica died) into a replay, then a 503."""

from __future__ import annotations

import asyncio
import json

from mlplatform.serve._proxy import MAX_REPLAY_BYTES, ReplicaLossGuard, middlewares


def _run(app, body_chunks: list[bytes], method: str = "POST"):
    messages = [{"type": "http.request", "body": c, "more_body": i < len(body_chunks) - 1}
                for i, c in enumerate(body_chunks)]
    sent = []

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": "/v1/predict"}
    asyncio.run(ReplicaLossGuard(app)(scope, receive, send))
    return sent


class _Proxy:
    """Stands in for Ray's proxy app: drops the first `drops` requests without answering (as the
    proxy does on RayActorError), then echoes the body it read."""

    def __init__(self, drops: int):
        self.drops, self.calls, self.bodies = drops, 0, []

    async def __call__(self, scope, receive, send):
        self.calls += 1
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        self.bodies.append(body)
        if self.calls <= self.drops:
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


def test_a_dropped_request_is_replayed_once_with_the_same_body():
    proxy = _Proxy(drops=1)
    sent = _run(proxy, [b'{"inputs": ', b"[[1.0]]}"])
    assert proxy.calls == 2 and proxy.bodies == [b'{"inputs": [[1.0]]}'] * 2
    assert sent[0]["status"] == 200 and sent[1]["body"] == b'{"inputs": [[1.0]]}'


def test_dropped_twice_answers_503_with_retry_after_and_a_json_reason():
    proxy = _Proxy(drops=2)
    sent = _run(proxy, [b"{}"])
    assert proxy.calls == 2
    start = sent[0]
    assert start["status"] == 503 and (b"retry-after", b"1") in start["headers"]
    assert json.loads(sent[1]["body"])["error"]["code"] == "replica_lost"


def test_an_answer_the_app_started_is_never_replayed_even_a_500():
    async def app_500(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b"model_error"})

    sent = _run(app_500, [b"{}"])
    assert [m.get("status") for m in sent if m["type"] == "http.response.start"] == [500]


def test_a_body_too_big_to_keep_is_not_replayed_but_still_gets_503_not_500():
    proxy = _Proxy(drops=1)
    big = [b"x" * (MAX_REPLAY_BYTES // 2 + 1)] * 3
    sent = _run(proxy, big)
    assert proxy.calls == 1 and proxy.bodies == [b"".join(big)]
    assert sent[0]["status"] == 503


def test_the_first_attempt_streams_so_the_app_sees_a_client_that_left_mid_body():
    seen = []

    async def app(scope, receive, send):
        while True:
            m = await receive()
            seen.append(m["type"])
            if m["type"] == "http.disconnect":
                return  # nobody to answer
            if not m.get("more_body"):
                break

    messages = [{"type": "http.request", "body": b'{"in', "more_body": True}, {"type": "http.disconnect"}]
    sent = []

    async def receive():
        return messages.pop(0)

    async def send(m):
        sent.append(m)

    asyncio.run(ReplicaLossGuard(app)({"type": "http", "method": "POST", "path": "/"}, receive, send))
    assert seen == ["http.request", "http.disconnect"] and sent == []  # not replayed, no answer to nobody


def test_a_replay_starts_from_the_scope_as_the_client_sent_it():
    scopes = []

    async def app(scope, receive, send):
        await receive()
        scopes.append(dict(scope))
        scope["path"] = "/"  # as Ray's proxy strips an app's route prefix
        if len(scopes) == 2:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    sent = _run(app, [b"{}"])
    assert [s["path"] for s in scopes] == ["/v1/predict", "/v1/predict"] and sent[0]["status"] == 200


def test_other_methods_pass_through():
    proxy = _Proxy(drops=1)
    assert _run(proxy, [b""], method="DELETE") == [] and proxy.calls == 1


def test_ray_loads_it_as_a_list_of_starlette_middlewares():
    from ray.serve._private.http_util import validate_http_proxy_callback_return

    assert validate_http_proxy_callback_return(middlewares())[0].cls is ReplicaLossGuard
