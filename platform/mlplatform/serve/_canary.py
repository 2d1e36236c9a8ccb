"""The canary gate: judge the canary from the ingress's own per-request outcomes, then act once.

Every ingress replica sends its canary outcomes (time, ok, latency) to the one `canary_gate`
replica about once a second and gets the verdict back. When the canary has run `window_s`
and has `min_requests` in the last `window_s`, the gate either rolls it back (the canary
alias moves back, with the reason, in alias history; the ingresses stop sending it traffic)
or promotes it (canary alias -> the primary's alias; the ingresses send it all traffic
until the application is redeployed on the new production version).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger("ray.serve")

WATCHING, ROLLED_BACK, PROMOTED = "watching", "rolled_back", "promoted"


@dataclass(frozen=True)
class Sample:
    """One canary request as the ingress saw it."""

    t: float
    ok: bool
    latency_ms: float


@dataclass(frozen=True)
class Verdict:
    """The gate's decision and why; `stats` holds the window's figures."""

    state: str
    reason: str
    stats: dict[str, float]


def evaluate(samples: list[Sample], started: float, now: float, gate: dict[str, Any]) -> Verdict:
    """Judge the samples of the last `window_s` (a ServeSpec CanaryGateSpec as a dict)."""
    window = [s for s in samples if s.t >= now - gate["window_s"]]
    n = len(window)
    errors = sum(not s.ok for s in window)
    p99 = float(np.percentile([s.latency_ms for s in window], 99)) if window else 0.0
    stats = {"requests": n, "errors": errors, "error_rate": errors / n if n else 0.0, "p99_ms": p99,
             "age_s": now - started}
    if now - started < gate["window_s"] or n < gate["min_requests"]:
        return Verdict(WATCHING, f"{n} of {gate['min_requests']} requests, {now - started:.0f} of "
                                 f"{gate['window_s']:g} s watched", stats)
    figures = (f"error rate {stats['error_rate']:.1%} ({errors}/{n}), p99 {p99:.0f} ms "
               f"over the last {gate['window_s']:g} s")
    if stats["error_rate"] > gate["max_error_rate"]:
        return Verdict(ROLLED_BACK, f"canary gate: {figures}; error rate over max_error_rate "
                                    f"{gate['max_error_rate']:.1%}", stats)
    if p99 > gate["max_p99_ms"]:
        return Verdict(ROLLED_BACK, f"canary gate: {figures}; p99 over max_p99_ms {gate['max_p99_ms']:g}", stats)
    if not gate.get("promote", True):
        return Verdict(WATCHING, f"passing ({figures}); promotion is off", stats)
    return Verdict(PROMOTED, f"canary gate passed: {figures}", stats)


class CanaryGate:
    """One replica per application (a Serve deployment): collects outcomes, decides once, moves aliases."""

    def __init__(self, settings: dict[str, Any]):
        # settings: app, root, gate (CanaryGateSpec dict), canary_ref (pinned, name@N),
        # canary_alias / primary_alias (the aliases the spec named, or None), primary_ref.
        self.s = settings
        self.samples: deque[Sample] = deque()
        self.started: float | None = None
        self.verdict = Verdict(WATCHING, "no canary traffic yet", {})
        self.move: dict[str, Any] | None = None
        self._moving: asyncio.Task | None = None  # the one alias move, once the verdict is in

    async def record(self, samples: list[tuple[float, bool, float]]) -> dict[str, Any]:
        """Add canary outcomes from one ingress; returns the current verdict (with its alias move once made)."""
        if self.verdict.state == WATCHING:
            self._judge(samples)
        if self._moving is not None:
            # Every report answers with the one move's outcome: an ingress stops reporting once it
            # has a verdict, so it must not get one without the move. Shielded: a cancelled report
            # must not cancel the move.
            await asyncio.shield(self._moving)
        return self.status()

    def _judge(self, samples: list[tuple[float, bool, float]]) -> None:
        """Add the samples and decide. Synchronous on purpose: the replica serves several reports
        at once, and a decision interleaved with an await could be made (and the alias moved) twice."""
        for t, ok, ms in samples:
            self.started = t if self.started is None else min(self.started, t)
            self.samples.append(Sample(t, ok, ms))
        now = time.time()
        while self.samples and self.samples[0].t < now - self.s["gate"]["window_s"]:
            self.samples.popleft()
        if self.started is None:
            return
        self.verdict = evaluate(list(self.samples), self.started, now, self.s["gate"])
        self._export(self.verdict)
        if self.verdict.state != WATCHING:
            logger.warning("%s: canary %s %s: %s", self.s["app"], self.s["canary_ref"], self.verdict.state,
                           self.verdict.reason)
            self._moving = asyncio.get_running_loop().create_task(self._move(self.verdict))

    async def _move(self, verdict: Verdict) -> None:
        try:
            self.move = await asyncio.to_thread(self._act, verdict)
        except Exception as e:  # the traffic decision stands even if the registry refuses
            logger.exception("canary gate could not move the alias")
            self.move = {"error": f"{type(e).__name__}: {e}"}

    def _export(self, verdict: Verdict) -> None:
        """The verdict and its figures as gauges (dashboards, alerts on a rollback)."""
        from mlplatform.serve._metrics import metrics

        tags = {"app": self.s["app"], "canary": self.s["canary_ref"]}
        try:
            m = metrics()
            for state in (WATCHING, ROLLED_BACK, PROMOTED):
                m["canary_state"].set(float(state == verdict.state), tags={**tags, "state": state})
            for figure in ("requests", "error_rate", "p99_ms"):
                if figure in verdict.stats:
                    m["canary_window"].set(float(verdict.stats[figure]), tags={**tags, "figure": figure})
        except Exception as e:  # metrics must never stop the gate
            logger.debug("canary gate metrics failed: %s", e)

    def status(self) -> dict[str, Any]:
        v = self.verdict
        return {"state": v.state, "reason": v.reason, "stats": v.stats, "canary": self.s["canary_ref"],
                "alias_move": self.move}

    def _act(self, verdict: Verdict) -> dict[str, Any] | None:
        from mlplatform import registry
        from mlplatform.errors import AliasNotFound

        name = self.s["canary_ref"].split("@")[0]
        root, alias, actor = self.s["root"], self.s["canary_alias"], "canary-gate"
        if verdict.state == ROLLED_BACK:
            if alias is None:
                return None  # a pinned version number: only the traffic stops
            try:
                move = registry.rollback(name, alias, root=root, actor=actor, reason=verdict.reason)
            except AliasNotFound:  # never moved before: point it back at the primary's version
                primary = int(self.s["primary_ref"].split("@")[1])
                move = registry.set_alias(name, alias, primary, root=root, actor=actor, reason=verdict.reason)
        else:
            target = self.s["primary_alias"] or "production"
            if alias is not None:
                move = registry.promote(name, alias, target, root=root, actor=actor, reason=verdict.reason)
            else:
                version = int(self.s["canary_ref"].split("@")[1])
                move = registry.set_alias(name, target, version, root=root, actor=actor, reason=verdict.reason)
        return {"alias": move.alias, "action": move.action, "from": move.from_version, "to": move.to_version}
