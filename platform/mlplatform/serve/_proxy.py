"""Serve HTTP proxy middleware: a request whose replica died answers 503 with Retry-After, never 500.

Ray 2.60's proxy maps a replica that dies mid-request (RayActorError) to a bare 500: its
request handler returns without sending any response, and uvicorn answers "Internal Server
Error". With a colocated ingress (the shipped CPU apps) that replica is the whole app, so the
ingress cannot catch it. This middleware wraps the proxy's ASGI app (Ray loads it from
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, which every node of a platform cluster gets at
`ray start`): when the proxy finished a request without starting a response, it replays the
request once (inference is idempotent), and if that fails too it answers 503 with Retry-After
and a JSON reason.

Only POST and GET requests with a body of at most MAX_REPLAY_BYTES are replayed, and only while
the client is still there; a bigger one gets the 503 at once. The first attempt streams the body
as it arrives (recorded on the way), so the app still sees a client that leaves mid-body. An
answer the app did start (any status, 500s of the app's own included) is never replayed or
rewritten.
"""

from __future__ import annotations

import json
import logging

logger = logging.getLogger("ray.serve")

# The largest body buffered for a replay: the serving apps' default payload limit (1 MiB) plus slack.
MAX_REPLAY_BYTES = (1 << 20) + 4096
RETRY_AFTER_S = 1
_REPLAYED = frozenset({"GET", "POST"})


def middlewares() -> list:
    """Ray's proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH): the middlewares to apply."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaLossGuard)]


class ReplicaLossGuard:
    """Replays once, then answers 503, a request the proxy dropped because its replica died."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in _REPLAYED:
            return await self.app(scope, receive, send)
        # The first attempt streams as without this middleware (a client that leaves mid-body
        # is seen by the app); the body is recorded on the way for a replay.
        body = _Recorder(receive)
        # The proxy rewrites the scope it is given (route prefix, headers): each attempt gets a fresh copy.
        def fresh():
            return {**scope, "headers": list(scope.get("headers") or ())}

        if await self._attempt(fresh(), body.receive, send) or body.gone:
            return  # answered, or nobody is left to answer
        if body.replayable:
            logger.warning("replica lost during %s %s; replaying it once", scope.get("method"), scope.get("path"))
            if await self._attempt(fresh(), body.replay(), send):
                return
        logger.warning("replica lost during %s %s; answering 503", scope.get("method"), scope.get("path"))
        await _unavailable(send)

    async def _attempt(self, scope, receive, send) -> bool:
        """Run the proxy once; whether it started a response."""
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, receive, tracking_send)
        return started


class _Recorder:
    """receive() of the client, keeping the body's chunks while they fit MAX_REPLAY_BYTES."""

    def __init__(self, receive):
        self._receive = receive
        self.chunks: list[bytes] | None = []  # None: too big to keep
        self.size = 0
        self.complete = False  # the whole body arrived
        self.gone = False  # the client disconnected

    @property
    def replayable(self) -> bool:
        return self.complete and not self.gone and self.chunks is not None

    async def receive(self):
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self.gone = True
        elif message["type"] == "http.request" and not self.complete:
            chunk = message.get("body", b"")
            self.size += len(chunk)
            if self.chunks is not None:
                self.chunks = self.chunks + [chunk] if self.size <= MAX_REPLAY_BYTES else None
            self.complete = not message.get("more_body", False)
        return message

    def replay(self):
        """A receive() that gives the recorded body again, then the client's disconnect when it comes."""
        pending = list(self.chunks or [b""])

        async def replayed():
            if pending:
                chunk = pending.pop(0)
                return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
            return await self._receive()

        return replayed


async def _unavailable(send) -> None:
    body = json.dumps({"error": {
        "code": "replica_lost",
        "message": f"The replica serving this request stopped before answering; retry after {RETRY_AFTER_S} s "
                   "(Serve is starting a replacement).",
        "field": "",
    }}).encode()
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(RETRY_AFTER_S).encode()),
    ]})
    await send({"type": "http.response.body", "body": body})
